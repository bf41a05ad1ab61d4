"""Epoch-wise batching of the clean defense subset for the unlearning defenses (i-BAU, RNP, SAU): a seeded
shuffle per epoch, cut into consecutive batches (the last one may be smaller, as a DataLoader without
``drop_last``)."""

from __future__ import annotations

import torch

__all__ = ["shuffled_batches"]


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Index batches covering ``range(n)`` once, in an order drawn from ``generator`` (a CPU generator)."""
    if n < 1:
        raise ValueError(f"cannot batch an empty clean subset (n={n})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    order = torch.randperm(n, generator=generator)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]
