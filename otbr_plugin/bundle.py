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

__all__ = ["Bundle", "BundleError", "non_finite_weights"]


class BundleError(ValueError):
    """A bundle is missing, malformed, tampered with or inconsistent."""


def non_finite_weights(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state`` that hold a NaN or an infinity."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


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
        bad = non_finite_weights(self.state_dict)
        if bad:
            raise BundleError(f"{self.path or 'the checkpoint'}: weight(s) {', '.join(bad[:5])} hold NaN or infinite "
                              "values; a model with non-finite weights is not evaluated or defended")
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as err:
            raise BundleError(f"weights do not fit {self.model_config}: {err}") from err
        return model.eval()
