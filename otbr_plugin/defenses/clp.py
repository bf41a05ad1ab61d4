"""CLP: Channel Lipschitzness-based Pruning (Zheng et al., "Data-free backdoor removal based on channel
Lipschitzness", ECCV 2022). Data-free.

For output channel k of a conv layer followed by BatchNorm, the upper bound of the channel's Lipschitz
constant (UCLC) is

    UCLC_k = || W_k ||_2 * | gamma_k / sigma_k |,

where W_k is the channel's kernel reshaped to (C_in, kh * kw) and ||.||_2 its largest singular value, and
gamma_k / sigma_k the BN scale acting on the channel (sigma_k = sqrt(running_var_k + eps): the scale the BN
really applies; the reference code omits eps: a relative change of ~eps / (2 var) in the bound, which decides only
for a channel that close to its threshold, or for a dead channel, where it divides 0 by 0 and then prunes nothing in
that layer; docs/baselines.md lists every point).
Within each layer, channels with UCLC_k > mean + u * std (unbiased std, as ``torch.std``) are pruned.

Pairing of convs and BNs (``pairing``):

- ``"structural"`` (default): each conv is paired with the BN that really acts on its output, read from the
  dataflow graph (:func:`~otbr_plugin.defenses.structure.structural_pairs`). conv -> BN networks (VGG, the
  small CNN, the post-activation resnet18, whose branches and downsample end in their own BN) pair as in the
  paper. In a pre-activation ResNet (BN-ReLU-conv): a block's ``conv1`` feeds that
  block's ``bn2`` (an ordinary conv -> BN pair); ``conv2`` and the projection shortcut are added to the
  residual stream and the sum enters the *next* block's ``bn1``, whose scale therefore acts on their channels
  (the pair is marked non-exclusive: the BN also sees the other summand); the stem conv feeds
  ``layer1.0.bn1``; the network's last conv (``layer4.1.conv2``) reaches no BN and is scored by its weight
  alone. Every conv is scored, one layer = one conv.
  Pruning removes the path whose Lipschitz bound is too large, and nothing else:
  conv -> BN with nothing else reading the conv (VGG, ``conv1 -> bn2``): conv channel (weights, bias) and
  BN weight and bias are zeroed, so the channel is exactly 0 after the BN (what the reference achieves by
  zeroing the BN alone); conv -> BN where the conv output also feeds something else (the stem conv, whose
  output is also the identity shortcut of ``layer1.0``): only the BN's weight and bias (the scored path;
  zeroing the conv would wipe the channel from the whole residual stream, which the bound does not
  measure); conv -> residual add -> BN (``conv2``, shortcuts): only the conv channel, i.e. this conv's
  contribution (zeroing the BN would also cut the other summand); no BN: the conv channel.
- ``"backdoorbench"``: BackdoorBench's / the reference code's pairing: walking modules in registration
  order, each BN is paired with the most recently registered conv (one layer = one BN); pruning zeroes that
  BN's weight and bias only, as the reference does. In a pre-activation ResNet this pairs e.g.
  ``layer2.1.bn1`` with ``layer2.0.shortcut.0``. Use it to compare with published BackdoorBench numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
from torch import nn

from .common import zero_channels
from .base import Defense, DefenseConfig, DefenseContext, DefenseOutcome, StageTimer
from .registry import register_defense
from .structure import ConvBNPair, backdoorbench_pairs, structural_pairs

__all__ = ["CLPConfig", "CLP", "bn_scale", "channel_lipschitz", "outlier_channels", "clp_scores"]


@dataclass
class CLPConfig(DefenseConfig):
    """``u``: prune channels whose UCLC exceeds mean + u * std of their layer (paper default 3).
    ``pairing``: "structural" (the BN that really follows each conv) or "backdoorbench" (module order)."""

    u: float = 3.0
    pairing: Literal["structural", "backdoorbench"] = "structural"

    def validate(self) -> None:
        if not isinstance(self.u, (int, float)) or isinstance(self.u, bool) or not math.isfinite(self.u) or self.u < 0:
            raise ValueError(f"u must be a finite number >= 0 (channels above mean + u * std of their layer are "
                             f"pruned; paper default 3), got {self.u!r:.40}")
        if self.pairing not in ("structural", "backdoorbench"):
            raise ValueError(f"pairing must be 'structural' or 'backdoorbench', got {self.pairing!r}")


def bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """The per-channel factor BN applies in eval mode: gamma / sqrt(running_var + eps)."""
    if bn.running_var is None:
        raise ValueError("CLP needs BatchNorm layers with running statistics (track_running_stats=True)")
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    return gamma.detach() / torch.sqrt(bn.running_var + bn.eps)


def channel_lipschitz(weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """UCLC per output channel: spectral norm of each channel's kernel as a (C_in, kh * kw) matrix, times
    ``|scale|`` (the BN scale on that channel) when given. ``weight``: (C_out, C_in, kh, kw)."""
    if weight.dim() != 4:
        raise ValueError(f"expected a conv weight (C_out, C_in, kh, kw), got shape {tuple(weight.shape)}")
    w = weight.detach().double().reshape(weight.shape[0], weight.shape[1], -1)
    lips = torch.linalg.matrix_norm(w, ord=2)
    if scale is not None:
        if scale.shape != (weight.shape[0],):
            raise ValueError(f"scale must have one entry per output channel ({weight.shape[0]}), got {tuple(scale.shape)}")
        lips = lips * scale.detach().double().abs()
    return lips.float()


def outlier_channels(uclc: torch.Tensor, u: float) -> tuple[torch.Tensor, float, float, float]:
    """Boolean mask of channels with UCLC > mean + u * std (unbiased std), plus mean, std, threshold.
    A layer with fewer than 2 channels has no spread: nothing is pruned (threshold inf)."""
    if uclc.numel() < 2:
        return torch.zeros_like(uclc, dtype=torch.bool), float(uclc.mean()) if uclc.numel() else 0.0, 0.0, float("inf")
    mean, std = float(uclc.mean()), float(uclc.std())
    threshold = mean + u * std
    return uclc > threshold, mean, std, threshold


def clp_scores(model: nn.Module, pairing: str) -> list[tuple[ConvBNPair, torch.Tensor]]:
    """(pair, UCLC per channel) for every scored layer of ``model``."""
    pairs = structural_pairs(model) if pairing == "structural" else backdoorbench_pairs(model)
    mods = dict(model.named_modules())
    out = []
    for pair in pairs:
        conv = mods[pair.conv]
        try:
            scale = bn_scale(mods[pair.bn]) if pair.bn is not None else None
        except ValueError as err:
            raise ValueError(f"CLP cannot score layer {pair.conv!r} through BatchNorm {pair.bn!r}: {err}") from err
        for what, t in (("weight", conv.weight), ("BatchNorm scale", scale)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(f"CLP cannot score layer {pair.conv!r}: its {what} holds NaN or infinite values "
                                 "(the model's weights are broken)")
        out.append((pair, channel_lipschitz(conv.weight, scale)))
    return out


@torch.no_grad()
def prune_channels(model: nn.Module, pair: ConvBNPair, channels: torch.Tensor, pairing: str) -> None:
    """Zero ``channels`` in place (see the module docstring for what is zeroed in each pairing mode)."""
    if channels.numel() == 0:
        return
    mods = dict(model.named_modules())
    bn = mods[pair.bn] if pair.bn is not None else None
    zero_conv = pairing == "structural" and (not pair.exclusive or not pair.shared_output)
    if zero_conv:
        zero_channels(mods[pair.conv], channels)
    if bn is not None and (pairing == "backdoorbench" or pair.exclusive):
        zero_channels(bn, channels)


@register_defense
class CLP(Defense):
    name = "clp"
    config_class = CLPConfig
    needs_clean_data = False
    description = "Channel Lipschitzness-based Pruning (Zheng et al., ECCV 2022), data-free"

    def mitigate(self, model: nn.Module, context: DefenseContext) -> DefenseOutcome:
        self.check_context(context)
        cfg = self.config
        timer = StageTimer()
        defended = self.copy_model(model, context.device)
        rows = []
        layers = []
        with timer("scores"):
            scored = clp_scores(defended, cfg.pairing)
        with timer("pruning"):
            for pair, uclc in scored:
                mask, mean, std, threshold = outlier_channels(uclc, cfg.u)
                pruned = torch.nonzero(mask).flatten()
                prune_channels(defended, pair, pruned.to(context.device), cfg.pairing)
                layer = pair.conv if cfg.pairing == "structural" else pair.bn
                layers.append({"layer": layer, "conv": pair.conv, "bn": pair.bn, "exclusive": pair.exclusive,
                               "shared_output": pair.shared_output,
                               "channels": int(uclc.numel()), "pruned": [int(i) for i in pruned],
                               "mean": mean, "std": std,
                               "threshold": threshold if threshold != float("inf") else None})
                for k, value in enumerate(uclc.tolist()):
                    rows.append({"layer": layer, "conv": pair.conv, "bn": pair.bn or "", "exclusive": pair.exclusive,
                                 "channel": k, "uclc": value, "layer_mean": mean, "layer_std": std,
                                 "threshold": threshold, "pruned": bool(mask[k])})
        total = sum(len(l["pruned"]) for l in layers)
        channels = sum(l["channels"] for l in layers)
        diagnostics = {
            "pairing": cfg.pairing,
            "u": cfg.u,
            "pruned_channels": total,
            "scored_channels": channels,
            "pruned_fraction": total / channels if channels else 0.0,
            "layers": [{k: v for k, v in l.items()} for l in layers],
        }
        return DefenseOutcome(model=defended.eval(), diagnostics=diagnostics, tables={"uclc": pd.DataFrame(rows)},
                              stage_seconds=timer.seconds, data_used=context.data_used(), units_removed=total)
