"""The :class:`Bundle` type: a backdoored (or defended) model with everything needed to evaluate it.

Only the type lives here; how a bundle is stored (safetensors + meta.json) is the adapters' business:
:mod:`benchmark_adapters.bundle` saves and loads it, :mod:`benchmark_adapters.backdoorbench` converts it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data.poisoned import PoisonedTestSet
from .data.transforms import Normalizer
from .models import ModelConfig

__all__ = ["Bundle", "BundleError"]


class BundleError(ValueError):
    """A bundle is missing, malformed, tampered with or inconsistent."""


@dataclass
class Bundle:
    """A backdoored (or defended) model with everything needed to evaluate it."""

    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    dataset: str
    normalizer: Normalizer
    bd_test: PoisonedTestSet
    attack: dict[str, Any]
    metrics: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)
    defense: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # saved to extra.safetensors when non-empty
    path: Path | None = None
    model_sha256: str | None = None

    def build_model(self) -> nn.Module:
        """The zoo model with the bundle's weights loaded strictly (mismatches named by key)."""
        model = self.model_config.build()
        expected = model.state_dict()
        missing = sorted(set(expected) - set(self.state_dict))
        unexpected = sorted(set(self.state_dict) - set(expected))
        if missing or unexpected:
            raise BundleError(
                f"weights do not fit {self.model_config.name}: missing {missing[:10]}, unexpected {unexpected[:10]}"
            )
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as err:
            raise BundleError(f"weights do not fit {self.model_config}: {err}") from err
        return model.eval()
