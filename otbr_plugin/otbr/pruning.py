"""OTBR stage 3: rank all target neurons globally by NWC score and zero the top fraction gamma.

``ranking="layer"`` (beyond the paper) zeroes the top gamma share of *each* target layer instead, so that
pruning is not confined to the deepest, widest layers whose raw NWCs are largest (docs/otbr.md).

Pruning a neuron zeroes its incoming weights (the rows ``weight[k]`` of its conv/linear layer), exactly
as the published method does. The layer's bias and the batch norm that follows are left alone, so the
pruned channel becomes a constant, input-independent signal (the trigger can no longer drive it); the
fusion stage then blends it with the backdoored neuron.
"""

from __future__ import annotations

import copy
import math
from typing import Mapping, Sequence

import pandas as pd
import torch
from torch import nn

__all__ = ["num_to_prune", "global_ranking", "select_top_neurons", "prune_neurons", "nwc_table"]


def num_to_prune(total: int, gamma: float, rounding: str = "robust") -> int:
    """Number of neurons to prune: ``floor(gamma * total)``.

    ``rounding="robust"`` tolerates float round-off (``0.29 * 100`` = 28.999999999999996 gives 29);
    ``"truncate"`` is the published code's ``int(total * gamma)`` (gives 28 there).
    """
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma (share of neurons to prune) must be in [0, 1), got {gamma}")
    if rounding == "truncate":
        return int(total * gamma)
    if rounding != "robust":
        raise ValueError(f"prune count rounding must be 'robust' or 'truncate', got {rounding!r}")
    return int(math.floor(gamma * total + 1e-9))


def global_ranking(scores: Mapping[str, torch.Tensor]) -> tuple[list[tuple[str, int]], torch.Tensor]:
    """All (layer, neuron) pairs sorted by descending score, and the sorted scores.

    Ties keep layer order, then neuron order (a stable sort), so the ranking is deterministic.
    """
    keys = [(name, i) for name, v in scores.items() for i in range(v.numel())]
    flat = torch.cat([v.detach().to("cpu", torch.float64).flatten() for v in scores.values()]) if keys else torch.empty(0)
    if torch.isnan(flat).any():
        raise ValueError("NWC scores contain NaN; the unlearning step diverged (lower lr or steps)")
    order = torch.sort(-flat, stable=True).indices
    return [keys[i] for i in order.tolist()], flat[order]


def select_top_neurons(scores: Mapping[str, torch.Tensor], gamma: float, rounding: str = "robust",
                       ranking: str = "global") -> dict[str, torch.Tensor]:
    """Boolean mask per layer marking the ``floor(gamma * N)`` neurons with the highest score across all
    layers (N = number of neurons in all layers together; ``rounding`` as in :func:`num_to_prune`).
    ``ranking="layer"``: the ``floor(gamma * N_l)`` highest-scored neurons of each layer ``l`` (ties in neuron
    order)."""
    if ranking == "layer":
        return {name: select_top_neurons({name: v}, gamma, rounding)[name] for name, v in scores.items()}
    if ranking != "global":
        raise ValueError(f"ranking must be 'global' or 'layer', got {ranking!r}")
    ranked, _ = global_ranking(scores)
    k = num_to_prune(len(ranked), gamma, rounding)
    masks = {name: torch.zeros(v.numel(), dtype=torch.bool) for name, v in scores.items()}
    for name, idx in ranked[:k]:
        masks[name][idx] = True
    return masks


def prune_neurons(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` with the incoming weights of every masked neuron set to zero."""
    pruned = copy.deepcopy(model)
    modules = dict(pruned.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            if name not in modules:
                raise KeyError(f"layer {name!r} is not in the model")
            weight = modules[name].weight
            if mask.numel() != weight.shape[0]:
                raise ValueError(f"{name}: mask has {mask.numel()} entries for {weight.shape[0]} neurons")
            weight[mask.to(weight.device)] = 0.0
    return pruned


def nwc_table(nwc: Mapping[str, torch.Tensor], scores: Mapping[str, torch.Tensor],
              masks: Mapping[str, torch.Tensor]) -> pd.DataFrame:
    """One row per neuron: layer, neuron, nwc (raw L1 change), score (value ranked), rank (1 = highest
    score, global), pruned."""
    ranked, _ = global_ranking(scores)
    rank = {key: r + 1 for r, key in enumerate(ranked)}
    rows = []
    for name, v in nwc.items():
        s, m = scores[name], masks[name]
        for i in range(v.numel()):
            rows.append((name, i, float(v[i]), float(s[i]), rank[(name, i)], bool(m[i])))
    return pd.DataFrame(rows, columns=["layer", "neuron", "nwc", "score", "rank", "pruned"])


def pruned_per_layer(masks: Mapping[str, torch.Tensor], layers: Sequence[str] | None = None) -> dict[str, int]:
    """Number of pruned neurons in each layer (layers with none included, in order)."""
    return {name: int(masks[name].sum()) for name in (layers or masks)}
