"""OTBR stages 3-4 as one pure function: given NWC scores, prune the top gamma and OT-fuse.

The defense class computes the scores (random unlearning, :mod:`.unlearning`) and calls
:func:`prune_and_fuse`; tests and the diagnose command call it directly with scores of their own, so the
published semantics can be checked on the same model and the same NWCs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch
from torch import nn

from .fusion import Arithmetic, AttachedMode, CostMode, FusionResult, MassMode, ResidualMode, Solver, fuse_models, target_masses
from .pruning import prune_neurons, select_top_neurons

__all__ = ["FusionOptions", "PruneFuseResult", "prune_and_fuse", "REFERENCE_FUSION"]


@dataclass(frozen=True)
class FusionOptions:
    """How stages 3-4 run. Defaults: the repaired method ("fixed")."""

    target_mass: MassMode = "nwc"
    mass_floor: float = 1e-3
    cost: CostMode = "aligned"
    residual: ResidualMode = "block"
    attached: AttachedMode = "transport"
    solver: Solver = "emd"
    sinkhorn_reg: float = 0.01
    emd_max_iter: int = 10_000_000
    strict_solver: bool = True
    prune_rounding: Literal["robust", "truncate"] = "robust"
    ranking: Literal["global", "layer"] = "global"
    fuse: bool = True  # False: the pruned model alone (the ablation "without fusion")
    arithmetic: Arithmetic = "float64"  # "published": the published code's float32 operations (same plan)


#: the published code's stages 3-4 (linweiii/OTBR ``pruning`` + ``ot_fusion``)
REFERENCE_FUSION = FusionOptions(mass_floor=0.0, cost="unaligned", residual="chain", attached="keep",
                                 emd_max_iter=100_000, strict_solver=False, prune_rounding="truncate",
                                 arithmetic="published")


@dataclass
class PruneFuseResult:
    """Masks of pruned neurons, the pruned-only model, and the fused model (``fusion`` None: nothing pruned,
    ``model`` is then a copy of the input)."""

    masks: dict[str, torch.Tensor]
    pruned: nn.Module
    model: nn.Module
    fusion: FusionResult | None
    start: str | None


def prune_and_fuse(model: nn.Module, scores: Mapping[str, torch.Tensor], layers: Sequence[str], *, gamma: float,
                   lam: float, options: FusionOptions = FusionOptions()) -> PruneFuseResult:
    """Zero the incoming weights of the ``gamma`` share of target neurons with the highest score (ranked
    globally, ties in layer-then-neuron order; per layer with ``options.ranking="layer"``), then fuse the
    pruned model into ``model`` from the first layer
    holding a pruned neuron to the last target layer, with target masses from the same scores
    (``options.fuse=False``: no fusion, the pruned model is the result)."""
    masks = select_top_neurons({n: scores[n] for n in layers}, gamma, options.prune_rounding, options.ranking)
    pruned = prune_neurons(model, masks)
    start = next((n for n in layers if bool(masks[n].any())), None)
    if start is None or not options.fuse:
        return PruneFuseResult(masks, pruned, prune_neurons(model, masks), None, None)
    fused_from = list(layers)[list(layers).index(start):]
    masses = {n: target_masses(scores[n], options.target_mass, options.mass_floor, layer=n) for n in fused_from}
    fusion = fuse_models(pruned, model, layers, masses, start=start, lam=lam, cost=options.cost,
                         residual=options.residual, attached=options.attached, solver=options.solver,
                         sinkhorn_reg=options.sinkhorn_reg, max_iter=options.emd_max_iter,
                         strict_solver=options.strict_solver, arithmetic=options.arithmetic)
    return PruneFuseResult(masks, pruned, fusion.model, fusion, start)
