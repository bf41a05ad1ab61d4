"""The poisoned test set: triggered test images with the attack's target and their true labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PoisonedTestSet"]


@dataclass
class PoisonedTestSet:
    """Triggered test samples. ``images`` uint8 (N, C, H, W); ``targets`` the labels the attack wants;
    ``original_labels`` the true labels (for RA); ``original_indices`` positions in the clean test set."""

    images: torch.Tensor
    targets: torch.Tensor
    original_labels: torch.Tensor
    original_indices: torch.Tensor

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"poisoned images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        for name in ("targets", "original_labels", "original_indices"):
            t = getattr(self, name)
            if t.dtype != torch.int64 or t.shape != (n,):
                raise ValueError(f"{name} must be int64 of shape ({n},), got {t.dtype} {tuple(t.shape)}")

    def __len__(self) -> int:
        return int(self.images.shape[0])
