"""The OTBR defense: a typed config and a thin :class:`~otbr_plugin.defenses.base.Defense` around the pure
functions of :mod:`otbr_plugin.otbr.unlearning`, :mod:`~otbr_plugin.otbr.pruning` and :mod:`~otbr_plugin.otbr.fusion`.

Settings. ``setting="fixed"`` (default) is the method as the paper describes it, with the published code's
defects repaired; ``setting="reference"`` reproduces the published code's semantics (linweiii/OTBR) so results
can be compared. Options whose value differs between the two default to ``None`` = "as the setting says":

==============  ==========================  ===================================================
option          fixed                       reference (published code)
==============  ==========================  ===================================================
noise_space     pixel: U[0,1] pixels, then  normalized: U[0,1] fed to the model as is
                the model's normalization
label_range     all: labels over all K      k_minus_1: randint(0, K-1) never draws class K-1
nwc_precision   full (float64)              round4: NWCs rounded to 4 decimals
cost            aligned (Singh & Jaggi)     unaligned: cost on raw pruned weights
residual        block: maps follow the      chain: previous target layer's map, whatever the
                traced graph, identity      graph (also across residual additions)
                across residual sums
attached        transport: bias and BN of   keep: backdoored bias and BN untouched
                an aligned neuron follow it
arithmetic      float64: fusion on the CPU  published: the published code's float32 operations
                in float64                  on the model's device (same cost bits, same plan)
==============  ==========================  ===================================================

Both settings use noise of the model's real input shape (the published code hard-codes 3x32x32) and a mass
floor so that no transport mass is zero (the published code divides by zero when an NWC rounds to 0).
Further named options (same default in both settings): ``ranking`` ("global" | "layer": the top gamma share of
each layer, beyond the paper), ``fuse`` (false: the pruned model alone, the ablation without fusion), ``nwc_norm`` ("none" | "fan_in"), ``target_mass``
("nwc" | "uniform"), ``solver`` ("emd" | "sinkhorn"), ``include_shortcut``, ``include_linear``, ``unlearn_bn``.

gamma is never chosen on test data: it comes from the config (0.05). ``otbr-bench defend --sweep gamma=...``
scores several values on the test set as a labelled oracle diagnostic only.
"""

from __future__ import annotations

from dataclasses import dataclass
import hashlib
from typing import Any, Literal, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..otbr.auto import auto_gamma, auto_lam
from ..otbr.fusion import trace_links
from ..otbr.meanshift import compensate_means
from ..otbr.pipeline import FusionOptions, prune_and_fuse
from ..otbr.pruning import nwc_table, pruned_per_layer
from ..otbr.repair import agreement, bn_inversion, distill, recalibrate_bn
from ..otbr.unlearning import neuron_weight_change, nwc_scores, random_unlearning, target_layer_names
from .base import Defense, DefenseConfig, DefenseContext, DefenseOutcome, StageTimer
from .registry import register_defense

__all__ = ["OTBRConfig", "OTBRDefense", "SETTINGS", "SETTING_OPTIONS"]

# options whose value depends on `setting`
SETTINGS: dict[str, dict[str, Any]] = {
    "fixed": {"noise_space": "pixel", "label_range": "all", "nwc_precision": "full", "cost": "aligned",
              "residual": "block", "attached": "transport", "mass_floor": 0.001, "prune_rounding": "robust",
              "emd_max_iter": 10_000_000, "arithmetic": "float64"},
    "reference": {"noise_space": "normalized", "label_range": "k_minus_1", "nwc_precision": "round4",
                  "cost": "unaligned", "residual": "chain", "attached": "keep", "mass_floor": 0.0,
                  "prune_rounding": "truncate", "emd_max_iter": 100_000, "arithmetic": "published"},
}
SETTING_OPTIONS = tuple(SETTINGS["fixed"])

_CHOICES: dict[str, tuple[Any, ...]] = {
    "setting": ("fixed", "reference"),
    "noise_space": ("pixel", "normalized"),
    "label_range": ("all", "k_minus_1"),
    "nwc_precision": ("full", "round4"),
    "cost": ("aligned", "unaligned"),
    "residual": ("block", "chain"),
    "attached": ("transport", "keep"),
    "nwc_norm": ("none", "fan_in"),
    "target_mass": ("nwc", "uniform"),
    "solver": ("emd", "sinkhorn"),
    "unlearn_bn": ("train", "eval"),
    "prune_rounding": ("robust", "truncate"),
    "ranking": ("global", "layer"),
    "arithmetic": ("float64", "published"),
    "repair": ("none", "distill", "bn_recal", "mean"),
    "repair_guide": ("none", "original", "defended"),
}


@dataclass
class OTBRConfig(DefenseConfig):
    """OTBR hyperparameters (paper defaults). See the module docstring for ``setting`` and the options."""

    setting: Literal["fixed", "reference"] = "fixed"
    # pruning share and fusion weight
    gamma: float | Literal["auto"] = 0.05
    lam: float | Literal["auto"] = 0.5
    # data-free "auto" rules (docs/otbr.md): gamma from the NWC distribution's outliers, lam from gamma
    auto_z: float = 3.5
    auto_gamma_max: float = 0.3
    # random unlearning (I, batch, lr, momentum of the paper)
    unlearn_steps: int = 20
    unlearn_batch_size: int = 256
    unlearn_lr: float = 1e-4
    unlearn_momentum: float = 0.9
    unlearn_bn: Literal["train", "eval"] = "train"
    # which layers are ranked, pruned and fused
    include_shortcut: bool = False
    include_linear: bool = False
    # NWC scores and transport; ranking "layer" (beyond the paper): the top gamma share of each layer
    ranking: Literal["global", "layer"] = "global"
    fuse: bool = True  # False: the pruned model alone, no OT fusion (ablation)
    nwc_norm: Literal["none", "fan_in"] = "none"
    target_mass: Literal["nwc", "uniform"] = "nwc"
    solver: Literal["emd", "sinkhorn"] = "emd"
    sinkhorn_reg: float = 0.01
    # data-free repair after fusion (beyond the paper; docs/otbr.md): none | distill | bn_recal (surrogate images)
    # | mean (BN running means shifted analytically by what pruning/fusion removed; no images)
    repair: Literal["none", "distill", "bn_recal", "mean"] = "none"
    repair_images: int = 256
    repair_inversion_steps: int = 100
    repair_inversion_lr: float = 0.1
    repair_guide: Literal["none", "original", "defended"] = "none"
    repair_ce_weight: float = 0.0
    repair_steps: int = 200
    repair_batch_size: int = 64
    repair_lr: float = 0.001
    repair_temperature: float = 4.0
    repair_freeze: bool = True  # hold the pruned neurons' weights at zero in the repaired model
    # setting-dependent options (None: as `setting` says)
    noise_space: Literal["pixel", "normalized"] | None = None
    label_range: Literal["all", "k_minus_1"] | None = None
    nwc_precision: Literal["full", "round4"] | None = None
    cost: Literal["aligned", "unaligned"] | None = None
    residual: Literal["block", "chain"] | None = None
    attached: Literal["transport", "keep"] | None = None
    mass_floor: float | None = None
    prune_rounding: Literal["robust", "truncate"] | None = None
    emd_max_iter: int | None = None
    arithmetic: Literal["float64", "published"] | None = None

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise ValueError(f"OTBRConfig.setting must be one of {', '.join(SETTINGS)}, got {self.setting!r}")
        for key, value in SETTINGS[self.setting].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        super().__post_init__()

    def validate(self) -> None:
        def bad(field: str, expected: str) -> ValueError:
            return ValueError(f"OTBRConfig.{field} must be {expected}, got {getattr(self, field)!r}")

        for key, choices in _CHOICES.items():
            if getattr(self, key) not in choices:
                raise bad(key, "one of " + ", ".join(map(repr, choices)))
        if self.gamma != "auto" and (isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float))
                                     or not 0.0 <= self.gamma < 1.0):
            raise bad("gamma", "a share of neurons to prune in [0, 1), or 'auto'")
        if self.lam != "auto" and (isinstance(self.lam, bool) or not isinstance(self.lam, (int, float))
                                   or not 0.0 <= self.lam <= 1.0):
            raise bad("lam", "the fusion weight lambda of the pruned model in [0, 1], or 'auto'")
        if not isinstance(self.auto_z, (int, float)) or not self.auto_z > 0:
            raise bad("auto_z", "> 0 (robust z-score above which a neuron's NWC is an outlier)")
        if not isinstance(self.auto_gamma_max, (int, float)) or not 0.0 < self.auto_gamma_max < 1.0:
            raise bad("auto_gamma_max", "in (0, 1)")
        for key in ("repair_images", "repair_inversion_steps", "repair_steps", "repair_batch_size", "emd_max_iter"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(key, "an integer >= 1")
        for key in ("repair_inversion_lr", "repair_lr", "repair_temperature"):
            if not isinstance(getattr(self, key), (int, float)) or not getattr(self, key) > 0:
                raise bad(key, "> 0")
        if not isinstance(self.repair_ce_weight, (int, float)) or self.repair_ce_weight < 0:
            raise bad("repair_ce_weight", ">= 0")
        if isinstance(self.unlearn_steps, bool) or not isinstance(self.unlearn_steps, int) or self.unlearn_steps < 1:
            raise bad("unlearn_steps", "the number of unlearning steps I, an integer >= 1")
        if isinstance(self.unlearn_batch_size, bool) or not isinstance(self.unlearn_batch_size, int) \
                or self.unlearn_batch_size < 1:
            raise bad("unlearn_batch_size", "an integer >= 1")
        if not isinstance(self.unlearn_lr, (int, float)) or not self.unlearn_lr > 0:
            raise bad("unlearn_lr", "a learning rate > 0")
        if not isinstance(self.unlearn_momentum, (int, float)) or not 0.0 <= self.unlearn_momentum < 1.0:
            raise bad("unlearn_momentum", "in [0, 1)")
        if not isinstance(self.mass_floor, (int, float)) or not 0.0 <= self.mass_floor <= 1.0:
            raise bad("mass_floor", "in [0, 1] (share of the layer's mean NWC given to every neuron at least; "
                                    "0 = none, as published: a zero NWC is then an error)")
        if not isinstance(self.sinkhorn_reg, (int, float)) or not self.sinkhorn_reg > 0:
            raise bad("sinkhorn_reg", "> 0")
        if self.arithmetic == "published" and self.solver != "emd":
            raise ValueError("OTBRConfig.arithmetic 'published' (the reference setting's) runs the exact solver only: "
                             f"set solver 'emd' or arithmetic 'float64', got solver {self.solver!r}")
        for key in ("include_shortcut", "include_linear", "repair_freeze", "fuse"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "true or false")

    def replace(self, **changes: Any) -> "OTBRConfig":
        """A copy with ``changes``; switching ``setting`` re-derives the setting-dependent options that are
        not themselves in ``changes``."""
        data = self.to_dict()
        if "setting" in changes and changes["setting"] != self.setting:
            for key in SETTING_OPTIONS:
                data[key] = None
        return self.from_dict({**data, **changes})

    def unlearning_options(self) -> dict[str, Any]:
        """The gradient-ascent settings of the unlearning stage (steps, batch_size, lr, momentum, bn_mode), as
        keyword arguments of :func:`~otbr_plugin.otbr.unlearning.random_unlearning` -- also used by
        ``otbr-bench diagnose`` to unlearn poisoned/clean data with exactly the same loop."""
        return {"steps": self.unlearn_steps, "batch_size": self.unlearn_batch_size, "lr": self.unlearn_lr,
                "momentum": self.unlearn_momentum, "bn_mode": self.unlearn_bn}

    def nwc_accumulate(self) -> torch.dtype:
        """dtype of the NWC difference and sum (the published code works in float32)."""
        return torch.float32 if self.nwc_precision == "round4" else torch.float64

    def fusion_options(self) -> FusionOptions:
        """The :class:`~otbr_plugin.otbr.pipeline.FusionOptions` of stages 3-4 this config asks for."""
        return FusionOptions(target_mass=self.target_mass, mass_floor=self.mass_floor, cost=self.cost,
                             residual=self.residual, attached=self.attached, solver=self.solver,
                             sinkhorn_reg=self.sinkhorn_reg, emd_max_iter=self.emd_max_iter,
                             strict_solver=self.setting != "reference", prune_rounding=self.prune_rounding,
                             ranking=self.ranking, fuse=self.fuse, arithmetic=self.arithmetic)

    def scores(self, nwc: Mapping[str, torch.Tensor], model: nn.Module, layers: list[str]) -> dict[str, torch.Tensor]:
        """The values neurons are ranked by (and transport masses come from), from raw NWCs."""
        modules = dict(model.named_modules())
        fan_in = {n: int(modules[n].weight[0].numel()) for n in layers}
        return nwc_scores(nwc, fan_in, self.nwc_norm, self.nwc_precision)

    def deviations_from_reference(self) -> dict[str, Any]:
        """Setting-dependent options whose value differs from the published code's."""
        return {k: getattr(self, k) for k, v in SETTINGS["reference"].items() if getattr(self, k) != v}


@register_defense
class OTBRDefense(Defense):
    """OTBR (Lin et al., AAAI 2025): random-unlearning NWC pruning + pruned-to-backdoored OT fusion.
    Data-free: it uses only the model, the input shape, the normalization and the number of classes."""

    name = "otbr"
    config_class = OTBRConfig
    needs_clean_data = False
    description = "data-free: prune neurons that move most under random unlearning, OT-fuse pruned and backdoored"

    config: OTBRConfig

    # fields that the unlearning/NWC stage depends on; the others only act after it
    UNLEARNING_FIELDS = ("unlearn_steps", "unlearn_batch_size", "unlearn_lr", "unlearn_momentum", "unlearn_bn",
                         "noise_space", "label_range", "include_shortcut", "include_linear")

    def __init__(self, config: OTBRConfig | Mapping[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._nwc_memo: dict[tuple, tuple] | None = None

    def share_work_with(self, other: Defense) -> None:
        """Reuse the unlearning/NWC stage of ``other`` (and vice versa) when model, context and the unlearning
        fields match exactly -- for sweeps over gamma, lam or the fusion options, where it gives the same
        result as a fresh run at a fraction of the cost. Off by default; another defense class shares nothing."""
        if not isinstance(other, OTBRDefense):
            return
        if other._nwc_memo is None:
            other._nwc_memo = {}
        self._nwc_memo = other._nwc_memo

    def _memo_key(self, model: nn.Module, context: DefenseContext) -> tuple:
        h = hashlib.sha256()
        for k, v in model.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return (h.hexdigest(), context.seed, tuple(context.input_shape), context.num_classes,
                tuple(context.normalizer.mean), tuple(context.normalizer.std), str(context.device),
                tuple(getattr(self.config, f) for f in self.UNLEARNING_FIELDS))

    def random_nwc(self, model: nn.Module, context: DefenseContext, layers: list[str],
                   timer: StageTimer | None = None) -> tuple[dict[str, torch.Tensor], list[float], torch.Tensor]:
        """Stages 1-2 as this config runs them: random unlearning of a copy of ``model`` (seeded from the
        context) and the raw NWC of each neuron of ``layers``; also the loss per step and the label counts."""
        cfg = self.config
        timer = timer or StageTimer()
        with timer("unlearning"):
            unlearned = random_unlearning(
                model, num_classes=context.num_classes, input_shape=context.input_shape,
                normalizer=context.normalizer, noise_space=cfg.noise_space, label_range=cfg.label_range,
                generator=context.generator(), device=context.device,
                progress=context.progress_bar if context.progress else None, **cfg.unlearning_options(),
            )
        with timer("nwc"):
            nwc = neuron_weight_change(model, unlearned.model, layers, cfg.nwc_accumulate())
        return nwc, unlearned.losses, unlearned.label_counts

    def mitigate(self, model: nn.Module, context: DefenseContext) -> DefenseOutcome:
        self.check_context(context)
        cfg = self.config
        timer = StageTimer()
        original = self.copy_model(model, context.device)
        layers = target_layer_names(original, cfg.include_shortcut, cfg.include_linear)
        trace_links(original, layers, cfg.residual)  # a model the fusion cannot follow fails now, naming the layer

        key = self._memo_key(original, context) if self._nwc_memo is not None else None
        reused = key is not None and key in self._nwc_memo
        if reused:
            with timer("unlearning"):
                nwc, losses, counts = self._nwc_memo[key]
        else:
            nwc, losses, counts = self.random_nwc(original, context, layers, timer)
            if key is not None:
                self._nwc_memo[key] = (nwc, losses, counts)
        with timer("nwc"):
            scores = cfg.scores(nwc, original, layers)
        with timer("auto"):
            gamma, gamma_info = (auto_gamma(scores, cfg.auto_z, cfg.auto_gamma_max) if cfg.gamma == "auto"
                                 else (float(cfg.gamma), None))
            lam = auto_lam(gamma, cfg.repair) if cfg.lam == "auto" else float(cfg.lam)
        with timer("prune_fuse"):
            result = prune_and_fuse(original, scores, layers, gamma=gamma, lam=lam, options=cfg.fusion_options())
            masks, fusion, start = result.masks, result.fusion, result.start
            defended = result.model
        repair_info: dict[str, Any] = {"mode": cfg.repair}
        if cfg.repair == "mean":
            with timer("repair"):
                defended, shifts = compensate_means(original, defended)
            repair_info["batch_norms_moved"] = len(shifts)
            repair_info["largest_mean_shift"] = max(shifts.values(), default=0.0)
        elif cfg.repair != "none":
            progress = context.progress_bar if context.progress else None
            with timer("repair_synthesis"):
                guide = {"none": None, "original": original, "defended": defended}[cfg.repair_guide]
                surrogate = bn_inversion(
                    original, num_images=cfg.repair_images, input_shape=context.input_shape,
                    normalizer=context.normalizer, num_classes=context.num_classes,
                    steps=cfg.repair_inversion_steps, lr=cfg.repair_inversion_lr, ce_weight=cfg.repair_ce_weight,
                    guide=guide, generator=context.generator(1), device=context.device, progress=progress)
            with timer("repair"):
                frozen = masks if cfg.repair_freeze else {}
                before = agreement(original, defended, surrogate, context.normalizer, device=context.device)
                if cfg.repair == "distill":
                    distilled = distill(defended, original, surrogate, normalizer=context.normalizer,
                                        steps=cfg.repair_steps, batch_size=cfg.repair_batch_size, lr=cfg.repair_lr,
                                        temperature=cfg.repair_temperature, frozen=frozen,
                                        generator=context.generator(2), device=context.device, progress=progress)
                    defended = distilled.model
                    repair_info["loss"] = {"first": distilled.losses[0], "last": distilled.losses[-1]}
                else:
                    defended = recalibrate_bn(defended, surrogate, context.normalizer, device=context.device)
                repair_info["agreement_before"] = before
                repair_info["agreement_after"] = agreement(original, defended, surrogate, context.normalizer,
                                                           device=context.device)
                repair_info["surrogate_images"] = int(surrogate.shape[0])
        defended.eval()

        table = nwc_table(nwc, scores, masks)
        diagnostics: dict[str, Any] = {
            "setting": cfg.setting,
            "gamma": cfg.gamma,
            "lam": cfg.lam,
            "gamma_used": gamma,
            "lam_used": lam,
            "gamma_auto": gamma_info,
            "repair": repair_info,
            "solver_warnings": fusion.warnings if fusion else [],
            "options": cfg.to_dict(),
            "deviations_from_reference": cfg.deviations_from_reference(),
            "target_layers": layers,
            "num_neurons": int(sum(m.numel() for m in masks.values())),
            "num_pruned": int(sum(int(m.sum()) for m in masks.values())),
            "pruned_per_layer": pruned_per_layer(masks, layers),
            "pruned_neurons": {n: torch.nonzero(masks[n]).flatten().tolist() for n in layers if masks[n].any()},
            "unlearning_loss": {"first": losses[0], "last": losses[-1]},
            "unlearning_reused": reused,
            "unlearning_label_counts": counts.tolist(),
            "fusion_start": start,
            "fused_layers": fusion.fused_layers if fusion else [],
            "transport_cost": fusion.costs if fusion else {},
            "input_links": {n: fusion.links[n].input_from for n in fusion.fused_layers} if fusion else {},
            "attached_bn": {n: list(fusion.links[n].attached) for n in fusion.fused_layers} if fusion else {},
            "link_source": fusion.link_source if fusion else None,
        }
        tables = {"nwc": table}
        if fusion is not None:
            tables["fusion"] = pd.DataFrame([
                {"layer": n, "input_from": fusion.links[n].input_from or "", "attached": ";".join(fusion.links[n].attached),
                 "pruned": int(masks[n].sum()), "transport_cost": fusion.costs[n],
                 "target_mass_max": float(np.max(fusion.target_mass[n])),
                 "target_mass_min": float(np.min(fusion.target_mass[n]))}
                for n in fusion.fused_layers
            ])
        return DefenseOutcome(model=defended, diagnostics=diagnostics, tables=tables,
                              stage_seconds=dict(timer.seconds), data_used=context.data_used(),
                              units_removed=diagnostics["num_pruned"])
