"""Data-free rules for OTBR's gamma and lambda (beyond the paper, which leaves gamma to a test-set sweep).

Both rules read only the model's own NWC scores; no test, clean or poisoned data. The evidence behind them is
in docs/otbr.md (developed on checkpoints other than the reference benchmark's, scored on training-split data).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

__all__ = ["auto_gamma", "auto_lam", "robust_z"]


def robust_z(values: torch.Tensor) -> torch.Tensor:
    """``(v - median) / (1.4826 * MAD)`` of log-scores: a z-score that a few extreme neurons cannot mask."""
    v = torch.log(values.to(torch.float64).clamp_min(1e-12))
    med = v.median()
    mad = (v - med).abs().median() * 1.4826
    return (v - med) / mad.clamp_min(1e-12)


def auto_gamma(scores: Mapping[str, torch.Tensor], z: float = 3.5, max_gamma: float = 0.3) -> tuple[float, dict[str, Any]]:
    """gamma = share of neurons whose NWC is an outlier *within its own layer* (robust z of the log-NWC above
    ``z``), at least one neuron's share and at most ``max_gamma``.

    Per layer, because raw NWCs scale with a layer's fan-in and depth (a global threshold would pick whole
    layers); the share is then applied to the global ranking as the paper prescribes. Returns gamma and what
    the rule saw (outliers per layer).
    """
    per_layer = {}
    total = 0
    for name, s in scores.items():
        zs = robust_z(s)
        per_layer[name] = int((zs > z).sum())
        total += s.numel()
    outliers = sum(per_layer.values())
    gamma = min(max(outliers / total, 1.0 / total), max_gamma)
    return float(gamma), {"rule": f"per-layer robust z(log NWC) > {z}", "outliers": outliers, "neurons": total,
                          "outliers_per_layer": {k: v for k, v in per_layer.items() if v}}


def auto_lam(gamma: float, repair: str) -> float:
    """lambda: 1.0 (the aligned pruned model alone) when a repair step follows, since the repair restores the
    clean function the fusion would otherwise borrow from the backdoored weights; else the paper's 0.5."""
    return 1.0 if repair != "none" else 0.5
