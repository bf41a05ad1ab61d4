"""EP, data-free: pruning of BatchNorm neurons whose stored pre-activation statistics are outliers, after Zheng,
Tang, Li and Liu, "Pre-activation Distributions Expose Backdoor Neurons", NeurIPS 2022. Data-free.

The paper's finding: a backdoor neuron's pre-activation (the input of its BatchNorm) has a different distribution on
poisoned than on benign inputs, so on the mixed (poisoned) training set its distribution is a two-population mixture,
and its moments differ from the neurons beside it. The paper reads this with data: EP (entropy-based pruning) from
a batch of the poisoned training set, BNP from a clean batch compared with the BN statistics. This module is the
data-free variant: the only description of the training-set pre-activations it uses is the one the model carries,
each BN's running statistics (mean mu_k, variance var_k, collected on the poisoned training set).

1. Each BN neuron k gets the paper's Gaussian model of its pre-activation, N(mu_k, var_k + eps) (eps: the BN's own,
   i.e. the variance the BN really divides by), and its differential entropy

       h_k = 1/2 * log(2 * pi * e * (var_k + eps)).

   A second population far from the benign one (the poisoned inputs) inflates the mixture's variance by
   rho * (1 - rho) * delta^2 (rho: poisoned share, delta: distance of the population means), so a backdoor neuron
   stands out as a high-entropy neuron of its layer. (h_k is an affine map of log(var_k + eps): the rule below,
   in units of the layer's spread, selects the same neurons for either.)
2. Within each BN layer: neurons with h_k > mean + u * std (``tail: upper``, default), h_k < mean - u * std
   (``tail: lower``, EP's direction for its histogram entropy of standardised activations) or either (``both``) are
   outliers; std is the unbiased one (as ``torch.std``, the official code); u = 3 (the paper's / official code's).
   A layer with fewer than 2 neurons has no spread: nothing is pruned there.
3. Pruning: the outlier's BN weight is zeroed (the official EP/BNP code); ``zero_bias: true`` zeroes the BN bias
   too (BackdoorBench's ep.py), which makes the channel exactly 0 after the BN.

What is not reproduced, and why (docs/baselines.md, "EP"): the paper's EP and BackdoorBench's ep.py read one batch
of the *poisoned training set* and compute a histogram entropy of each neuron's standardised per-sample maxima;
BNP reads a clean batch. Neither is data-free; this project's rule is their Gaussian-model reading from the
statistics stored in the model alone, so it sits beside CLP and OTBR as a data-free method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
from torch import nn

from .base import Defense, DefenseConfig, DefenseContext, DefenseOutcome, StageTimer
from .registry import register_defense

__all__ = ["EPConfig", "EP", "neuron_entropy", "outlier_neurons", "ep_layers"]

TAILS = ("upper", "lower", "both")


@dataclass
class EPConfig(DefenseConfig):
    """``u``: a neuron is an outlier when its score lies more than u standard deviations (of its layer) beyond the
    layer mean (paper / official code: 3); the score is the Gaussian differential entropy from the BN statistics.
    ``tail``: which side is an outlier ("upper" default, "lower", "both").
    ``zero_bias``: also zero the pruned neurons' BN bias (BackdoorBench) instead of the weight only (official)."""

    u: float = 3.0
    tail: Literal["upper", "lower", "both"] = "upper"
    zero_bias: bool = False

    def validate(self) -> None:
        if not isinstance(self.u, (int, float)) or isinstance(self.u, bool) or not math.isfinite(self.u) or self.u < 0:
            raise ValueError(f"u must be a finite number >= 0 (neurons beyond mean + u * std of their layer are "
                             f"pruned; paper default 3), got {self.u!r:.40}")
        if self.tail not in TAILS:
            raise ValueError(f"tail must be one of {', '.join(map(repr, TAILS))}, got {self.tail!r}")
        if not isinstance(self.zero_bias, bool):
            raise ValueError(f"zero_bias must be true or false, got {self.zero_bias!r}")


def neuron_entropy(bn: nn.BatchNorm2d) -> torch.Tensor:
    """Per-neuron differential entropy (float64) of the Gaussian N(running_mean, running_var + eps) a BN layer
    stores for its pre-activations: 1/2 log(2 pi e (var + eps))."""
    if bn.running_var is None:
        raise ValueError("EP needs BatchNorm layers with running statistics (track_running_stats=True)")
    var = bn.running_var.detach().double() + bn.eps
    if not bool(torch.isfinite(var).all()) or bool((var <= 0).any()):
        raise ValueError("EP needs finite, positive BatchNorm running variances (the model's statistics are broken)")
    return 0.5 * torch.log(2 * math.pi * math.e * var)


def outlier_neurons(scores: torch.Tensor, u: float, tail: str = "upper") -> tuple[torch.Tensor, float, float]:
    """Boolean mask of the outliers of one layer (beyond mean +/- u * unbiased std, per ``tail``), with the
    layer's mean and std. Fewer than 2 neurons: no spread, no outlier."""
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {', '.join(map(repr, TAILS))}, got {tail!r}")
    if scores.numel() < 2:
        return torch.zeros_like(scores, dtype=torch.bool), float(scores.mean()) if scores.numel() else 0.0, 0.0
    mean, std = float(scores.mean()), float(scores.std())
    upper, lower = scores > mean + u * std, scores < mean - u * std
    mask = upper if tail == "upper" else lower if tail == "lower" else upper | lower
    return mask, mean, std


def ep_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """Every BatchNorm2d of ``model`` in registration order; a model without one is an error."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BatchNorm2d layer: EP reads the BN statistics of its neurons")
    return layers


@register_defense
class EP(Defense):
    name = "ep"
    config_class = EPConfig
    needs_clean_data = False
    description = ("Pre-activation distribution pruning (Zheng et al., NeurIPS 2022), data-free: BN neurons whose "
                   "stored statistics are outliers")

    def mitigate(self, model: nn.Module, context: DefenseContext) -> DefenseOutcome:
        self.check_context(context)
        self.require_oracle(context)  # a test-set scorer is refused: EP has nothing to select
        cfg = self.config
        timer = StageTimer()
        defended = self.copy_model(model, context.device)
        rows, layers = [], []
        with timer("scores"):
            scored = [(name, bn, neuron_entropy(bn)) for name, bn in ep_layers(defended)]
        with timer("pruning"):
            for name, bn, scores in scored:
                mask, mean, std = outlier_neurons(scores, cfg.u, cfg.tail)
                pruned = torch.nonzero(mask).flatten()
                with torch.no_grad():
                    if bn.weight is not None:
                        bn.weight[pruned.to(bn.weight.device)] = 0
                    if cfg.zero_bias and bn.bias is not None:
                        bn.bias[pruned.to(bn.bias.device)] = 0
                layers.append({"layer": name, "neurons": int(scores.numel()), "pruned": [int(i) for i in pruned],
                               "mean": mean, "std": std})
                for k, value in enumerate(scores.tolist()):
                    rows.append({"layer": name, "channel": k, "entropy": value, "layer_mean": mean, "layer_std": std,
                                 "pruned": bool(mask[k])})
        total = sum(len(l["pruned"]) for l in layers)
        neurons = sum(l["neurons"] for l in layers)
        diagnostics = {"u": cfg.u, "tail": cfg.tail, "zero_bias": cfg.zero_bias,
                       "pruned_neurons": total, "total_neurons": neurons,
                       "pruned_fraction": total / neurons if neurons else 0.0, "layers": layers}
        return DefenseOutcome(model=defended.eval(), diagnostics=diagnostics, tables={"entropy": pd.DataFrame(rows)},
                              stage_seconds=timer.seconds, data_used=context.data_used(), units_removed=total)
