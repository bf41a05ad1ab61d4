"""FP: Fine-Pruning (Liu, Dolan-Gavitt and Garg, "Fine-Pruning: Defending Against Backdooring Attacks on
Deep Neural Networks", RAID 2018). Needs the clean defense subset.

1. The clean defense subset is split (stratified, seeded) into a *fit* part and a *held-out* part
   (``holdout_ratio``). Neither is test data: both come from the training split.
2. Mean activation of every channel of the last convolutional feature map over the fit part. The feature
   map is the input of the global pooling that feeds the classifier (located from the dataflow graph):
   ReLU (and max-pool) output of the last conv in VGG / the small CNN, the last residual block's output in a
   pre-activation ResNet, where it is the sum of ``layer4.1.conv2`` and the shortcut.
3. Channels are pruned one by one in increasing order of mean activation; after each, the accuracy on the
   held-out part is measured. Pruning stops at the last count before the drop first exceeds ``acc_ratio``
   (sequential rule, as in the paper: "prune until the validation accuracy drops below a threshold").
   ``acc_drop="relative"`` (default): accuracy must stay >= (1 - acc_ratio) * acc_unpruned, i.e. the drop
   is a share of the unpruned accuracy, as BackdoorBench's ``acc_ratio`` ("accuracy should not drop more
   than a certain percentage"); ``"absolute"``: >= acc_unpruned - acc_ratio (percentage points / 100, as the
   paper's "4%" examples). ``prune_ratio`` set: prune that share of channels and skip the rule.
   The whole pruning curve is computed on cached feature maps (only the head is re-run per count) and
   reported as the ``pruning_curve`` table.
4. Pruning is a channel mask on the feature map (a forward pre-hook on the pooling layer) while fine-tuning
   (``epochs`` of SGD on the fit part with :func:`otbr_plugin.train.train_classifier`), so pruned channels
   stay pruned. Afterwards the mask is baked into the weights so the saved model reproduces it: the
   classifier's input columns for each pruned channel are zeroed and, where one conv alone produces the
   channel (conv -> BN -> ReLU), that conv's filter and bias and the BN's weight and bias too. In a
   pre-activation ResNet only the classifier columns are zeroed (the channel is a residual sum of several
   convs, which no single filter owns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import pandas as pd
import torch
from torch import nn

from ..data.subsets import SAMPLINGS
from ..train import TrainConfig, train_classifier
from .base import ORACLE_LABEL, CleanData, Defense, DefenseConfig, DefenseContext, DefenseOutcome, StageTimer
from .common import (FollowsSetting, bb_tolerance_ok, clean_accuracy, context_spec, preprocess_batch, split_holdout,
                     zero_channels)
from .registry import register_defense
from .structure import FeatureSite, feature_site, tail_module

__all__ = ["FPConfig", "FP", "SETTINGS", "SETTING_OPTIONS", "activation_order", "stopping_count", "stopping_index",
           "prune_schedule", "pruning_curve", "bake_channel_mask"]


# options whose value depends on `setting` (None in the config: as the setting says)
SETTINGS: dict[str, dict[str, Any]] = {
    "default": {"stop_rule": "sequential", "prune_step_ratio": 0.0, "step_off_by_one": False,
                "rank_augment": False, "finetune_data": "fit", "subset_sampling": "stratified",
                "max_prune_ratio": 0.95, "last_net_alias": False, "save_reparametrisation": False,
                "epochs": 10, "batch_size": 128},
    "backdoorbench": {"stop_rule": "backdoorbench", "prune_step_ratio": 0.01, "step_off_by_one": True,
                      "rank_augment": True, "finetune_data": "all", "subset_sampling": "uniform",
                      "max_prune_ratio": 1.0, "last_net_alias": True, "save_reparametrisation": True,
                      "epochs": 100, "batch_size": 256},
}
SETTING_OPTIONS = tuple(SETTINGS["default"])


@dataclass
class FPConfig(FollowsSetting, DefenseConfig):
    """Fine-Pruning settings.

    ``acc_ratio``: tolerated drop of held-out clean accuracy (see ``acc_drop``); ``holdout_ratio``: share of
    the clean defense subset held out for the stopping rule; ``prune_ratio``: fixed share of channels to
    prune instead of the stopping rule (None: use the rule); ``max_prune_ratio``: never prune more than
    this share (1.0: no cap). Fine-tuning: ``epochs``, ``lr``, ``batch_size``, ``momentum``, ``weight_decay``,
    ``augment`` (random crop / flip as in training); ``epochs=0`` gives pruning only. ``batch_size_eval`` for
    activation passes.

    ``setting``: "default" (this project's FP) or "backdoorbench" (BackdoorBench's fp.py; see the module
    docstring): it fills every setting-dependent option left at None. ``oracle``: select the stopping point on
    the TEST set, as BackdoorBench does (a labelled diagnostic; only an oracle-aware entry point runs it).
    """

    SETTINGS: ClassVar[dict[str, dict[str, Any]]] = SETTINGS
    setting: Literal["default", "backdoorbench"] = "default"
    oracle: bool = False
    acc_ratio: float = 0.1
    acc_drop: Literal["relative", "absolute"] = "relative"
    holdout_ratio: float = 0.2
    prune_ratio: float | None = None
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True
    batch_size_eval: int = 512
    # setting-dependent options (None: as `setting` says)
    stop_rule: Literal["sequential", "backdoorbench"] | None = None
    prune_step_ratio: float | None = None
    step_off_by_one: bool | None = None
    rank_augment: bool | None = None
    finetune_data: Literal["fit", "all"] | None = None
    subset_sampling: Literal["stratified", "uniform", "backdoorbench_stream"] | None = None
    max_prune_ratio: float | None = None
    last_net_alias: bool | None = None
    save_reparametrisation: bool | None = None
    epochs: int | None = None
    batch_size: int | None = None

    def validate(self) -> None:
        if self.setting not in SETTINGS:
            raise ValueError(f"setting must be one of {', '.join(map(repr, SETTINGS))}, got {self.setting!r}")
        for name in ("oracle", "step_off_by_one", "rank_augment", "last_net_alias", "save_reparametrisation",
                     "augment"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        choices = {"acc_drop": ("relative", "absolute"), "stop_rule": ("sequential", "backdoorbench"),
                   "finetune_data": ("fit", "all"), "subset_sampling": SAMPLINGS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r}")
        if not 0 <= self.acc_ratio <= 1:
            raise ValueError(f"acc_ratio must be in [0, 1], got {self.acc_ratio!r}")
        if not 0 < self.holdout_ratio < 1:
            raise ValueError(f"holdout_ratio must be in (0, 1), got {self.holdout_ratio!r}")
        if self.prune_ratio is not None and not 0 <= self.prune_ratio < 1:
            raise ValueError(f"prune_ratio must be in [0, 1) or null, got {self.prune_ratio!r}")
        if not 0 < self.max_prune_ratio <= 1:
            raise ValueError(f"max_prune_ratio must be in (0, 1] (1: no cap), got {self.max_prune_ratio!r}")
        if not 0 <= self.prune_step_ratio < 1:
            raise ValueError(f"prune_step_ratio must be in [0, 1) (0: one channel per step; BackdoorBench's "
                             f"once_prune_ratio 0.01), got {self.prune_step_ratio!r}")
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 0:
            raise ValueError(f"epochs must be an integer >= 0, got {self.epochs!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        for name in ("batch_size", "batch_size_eval"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.oracle and self.prune_ratio is not None:
            raise ValueError("oracle: true selects the stopping point on the test set; with a fixed prune_ratio "
                             "there is nothing to select (set prune_ratio: null or oracle: false)")


def activation_order(mean_activation: torch.Tensor) -> torch.Tensor:
    """Channel indices in increasing order of mean activation (stable: ties keep channel order)."""
    return torch.sort(mean_activation, stable=True).indices


def stopping_count(accuracies: list[float] | torch.Tensor, acc_ratio: float, mode: str = "relative",
                   max_count: int | None = None) -> int:
    """FP's stopping rule. ``accuracies[n]`` = held-out accuracy with the n lowest-activation channels pruned
    (``accuracies[0]``: unpruned). Returns the last n (scanning up from 0) before the first n whose drop
    exceeds the tolerance, capped at ``max_count``."""
    acc = [float(a) for a in accuracies]
    if not acc:
        raise ValueError("no accuracies to apply the stopping rule to")
    base = acc[0]
    floor = base * (1 - acc_ratio) if mode == "relative" else base - acc_ratio
    limit = len(acc) - 1 if max_count is None else min(max_count, len(acc) - 1)
    n = 0
    while n < limit and acc[n + 1] >= floor - 1e-12:
        n += 1
    return n


def prune_schedule(channels: int, step_ratio: float = 0.0, off_by_one: bool = False,
                   max_prune_ratio: float = 0.95) -> list[tuple[int, int]]:
    """The pruning steps as (nominal count, channels actually pruned).

    ``step_ratio`` 0: one channel per step (0, 1, 2, ...); else ``ceil(channels * step_ratio)`` per step, the
    nominal counts ``range(0, channels, step)`` as BackdoorBench's loop. ``off_by_one``: at nominal count n > 0
    only the n - 1 lowest channels are pruned (BackdoorBench prunes ``seq_sort[0:n-1]``). Steps that would prune
    more than ``max_prune_ratio`` of the channels are left out (1.0: no cap; never all channels)."""
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    step = 1 if step_ratio == 0 else max(1, math.ceil(channels * step_ratio))
    cap = channels - 1 if max_prune_ratio >= 1 else max(0, min(channels - 1, int(max_prune_ratio * channels)))
    out = []
    for nominal in range(0, channels, step):
        pruned = nominal - 1 if off_by_one and nominal > 0 else nominal
        if pruned > cap:
            break
        out.append((nominal, pruned))
    return out


def stopping_index(accuracies: list[float], acc_ratio: float, rule: str = "sequential", mode: str = "relative"
                   ) -> tuple[int, int | None]:
    """The stopping rule over ``accuracies[i]`` (accuracy after pruning step i; index 0 unpruned), scanned from
    step 0 up: returns (last step within tolerance, first step beyond it or None when every step is within).

    ``rule="sequential"``: within = accuracy >= the floor of ``mode`` (see :func:`stopping_count`);
    ``"backdoorbench"``: within = ``|acc - acc_0| / acc_0 < acc_ratio`` (two-sided, strict; step 0 is tested too,
    so ``acc_ratio`` 0 stops at once, as BackdoorBench's loop)."""
    acc = [float(a) for a in accuracies]
    if not acc:
        raise ValueError("no accuracies to apply the stopping rule to")
    base = acc[0]
    if rule == "sequential":
        floor = base * (1 - acc_ratio) if mode == "relative" else base - acc_ratio
        ok = [True] + [a >= floor - 1e-12 for a in acc[1:]]
    elif rule == "backdoorbench":
        ok = [bb_tolerance_ok(a, base, acc_ratio) for a in acc]
    else:
        raise ValueError(f"rule must be 'sequential' or 'backdoorbench', got {rule!r}")
    last = 0
    for i, good in enumerate(ok):
        if not good:
            return last, i
        last = i
    return last, None


def _mask_hook(mask: torch.Tensor):
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (args[0] * mask.view(1, -1, 1, 1).to(args[0].dtype),) + tuple(args[1:])
    return hook


@torch.no_grad()
def _features(model: nn.Module, site: FeatureSite, images: torch.Tensor, context: DefenseContext,
              batch_size: int, reduce: bool = False, augment: bool = False,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """The feature map (input of the global pooling) for uint8 ``images``, on CPU; with ``reduce`` only its
    mean per channel over samples and positions (the activation FP ranks by), without keeping the maps.
    ``augment``: training-style random crop / flip first (BackdoorBench ranks on its augmented train loader)."""
    pool = dict(model.named_modules())[site.pool]
    captured: list[torch.Tensor] = []
    total: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple) -> None:
        f = args[0].detach().float()
        if reduce:
            total.append(f.sum(dim=(0, 2, 3)).double().cpu())
            captured.append(torch.tensor(f.shape[0] * f.shape[2] * f.shape[3], dtype=torch.float64))
        else:
            captured.append(f.cpu())

    handle = pool.register_forward_pre_hook(hook)
    try:
        model.eval()
        for start in range(0, images.shape[0], batch_size):
            model(preprocess_batch(images[start:start + batch_size], context, augment, generator))
    finally:
        handle.remove()
    if reduce:
        return (torch.stack(total).sum(0) / torch.stack(captured).sum()).float()
    return torch.cat(captured)


@torch.no_grad()
def pruning_curve(tail: nn.Module, features: torch.Tensor, labels: torch.Tensor, order: torch.Tensor,
                  max_count: int, device: torch.device, batch_size: int = 512) -> list[float]:
    """Accuracy of ``tail`` (the head after the feature map) on cached ``features`` with the first n channels
    of ``order`` zeroed, for n = 0 .. max_count."""
    tail = tail.to(device).eval()
    accs = []
    mask = torch.ones(features.shape[1], device=device)
    for n in range(max_count + 1):
        if n > 0:
            mask[order[n - 1]] = 0
        correct = 0
        for start in range(0, features.shape[0], batch_size):
            f = features[start:start + batch_size].to(device)
            pred = tail(f * mask.view(1, -1, 1, 1)).argmax(1).cpu()
            correct += int((pred == labels[start:start + batch_size]).sum())
        accs.append(correct / features.shape[0])
    return accs


@torch.no_grad()
def bake_channel_mask(model: nn.Module, site: FeatureSite, pruned: torch.Tensor, positions: int) -> None:
    """Make ``pruned`` feature channels zero in the weights (see module docstring), in place."""
    if pruned.numel() == 0:
        return
    mods = dict(model.named_modules())
    linear: nn.Linear = mods[site.classifier]
    cols = (pruned.view(-1, 1) * positions + torch.arange(positions).view(1, -1)).flatten().to(linear.weight.device)
    linear.weight[:, cols] = 0
    if site.producer is not None:
        conv, *bns = site.producer
        idx = pruned.to(mods[conv].weight.device)
        zero_channels(mods[conv], idx)
        for name in bns:
            zero_channels(mods[name], idx)


@register_defense
class FP(Defense):
    name = "fp"
    config_class = FPConfig
    needs_clean_data = True
    description = "Fine-Pruning (Liu et al., RAID 2018): prune dormant last-layer channels, then fine-tune"

    # BackdoorBench's fp.py calls choose_index twice: it logs and saves (index.txt) the first draw but subsets the
    # data with the second
    backdoorbench_draw = 2

    def clean_subset_sampling(self) -> str:
        return self.config.subset_sampling

    def mitigate(self, model: nn.Module, context: DefenseContext) -> DefenseOutcome:
        clean = self.require_clean_data(context)
        cfg = self.config
        oracle = self.require_oracle(context)
        timer = StageTimer()
        defended = self.copy_model(model, context.device)
        with timer("split"):
            if oracle is None:
                fit, hold = split_holdout(clean, cfg.holdout_ratio, context.seed)
            else:  # the stopping point comes from the test set: nothing held out, as BackdoorBench
                fit, hold = clean, None
            site = feature_site(defended)
            tail = tail_module(defended, site.node)
        with timer("activations"):
            mean_act = _features(defended, site, fit.images, context, cfg.batch_size_eval, reduce=True,
                                 augment=cfg.rank_augment, generator=context.generator(offset=5))
            order = activation_order(mean_act)
            channels = int(mean_act.numel())
        linear: nn.Linear = dict(defended.named_modules())[site.classifier]
        if linear.in_features % channels:
            raise ValueError(f"classifier {site.classifier!r} takes {linear.in_features} inputs, not a multiple of the "
                             f"{channels} feature channels: cannot map channels to its columns")
        positions = linear.in_features // channels
        steps = prune_schedule(channels, cfg.prune_step_ratio, cfg.step_off_by_one, cfg.max_prune_ratio)
        max_count = steps[-1][1]
        pool = dict(defended.named_modules())[site.pool]
        accs: list[float] = []
        log_rows: list[dict[str, Any]] = []
        with timer("pruning_curve"):
            if oracle is None:
                feats_hold = _features(defended, site, hold.images, context, cfg.batch_size_eval)
                accs = pruning_curve(tail, feats_hold, hold.labels, order, max_count, context.device,
                                     cfg.batch_size_eval)
                del feats_hold
                step_accs = [accs[p] for _, p in steps]
                log_rows = [{"num_pruned": n, "all_filter_num": channels, "channels_pruned": p, "holdout_acc": a}
                            for (n, p), a in zip(steps, step_accs)]
            else:
                step_accs = []
                for n, p in steps:  # scored on the TEST set until the rule stops, as BackdoorBench's loop
                    m = _channel_mask(order[:p], channels, context.device)
                    handle = pool.register_forward_pre_hook(_mask_hook(m))
                    try:
                        scored = oracle(defended)
                    finally:
                        handle.remove()
                    step_accs.append(scored.acc)
                    log_rows.append({"num_pruned": n, "all_filter_num": channels, "channels_pruned": p,
                                     "test_acc": scored.acc, "test_asr": scored.asr, "test_ra": scored.ra})
                    if cfg.prune_ratio is None and stopping_index(step_accs, cfg.acc_ratio, cfg.stop_rule,
                                                                  cfg.acc_drop)[1] is not None:
                        break
        beyond = None
        if cfg.prune_ratio is not None:
            n_pruned = min(max_count, int(round(cfg.prune_ratio * channels)))
            rule = "fixed prune_ratio"
            chosen_step = None
        else:
            last, beyond = stopping_index(step_accs, cfg.acc_ratio, cfg.stop_rule, cfg.acc_drop)
            chosen_step = beyond if (cfg.last_net_alias and beyond is not None) else last
            n_pruned = steps[chosen_step][1]
            rule = (f"{cfg.acc_drop} drop <= {cfg.acc_ratio}" if cfg.stop_rule == "sequential"
                    else f"|acc - acc_0| / acc_0 < {cfg.acc_ratio} (BackdoorBench)")
            rule += " on the TEST set (oracle)" if oracle is not None else " on held-out clean training data"
            if chosen_step == beyond:
                rule += "; one step past tolerance (last_net_alias)"
        for i, row in enumerate(log_rows):
            row["within_tolerance"] = beyond is None or i < beyond
            row["chosen"] = i == chosen_step
        pruned = order[:n_pruned].clone()
        mask = _channel_mask(pruned, channels, context.device)
        history = []
        handle = pool.register_forward_pre_hook(_mask_hook(mask))
        tune = clean if cfg.finetune_data == "all" else fit
        try:
            if cfg.epochs > 0:
                with timer("finetune"):
                    spec = context_spec(context)
                    tc = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                                     weight_decay=cfg.weight_decay, seed=context.seed, device=str(context.device),
                                     augment=cfg.augment, progress=context.progress)
                    history = train_classifier(defended, tune.images, tune.labels, spec, tc, device=context.device,
                                               progress=context.progress).epochs
        finally:
            handle.remove()
        export_state = None
        with timer("bake"):
            if cfg.save_reparametrisation:  # BackdoorBench's file: torch's prune reparametrisation of the classifier
                weight_orig = linear.weight.detach().clone().cpu()
            bake_channel_mask(defended, site, pruned, positions)
            if cfg.save_reparametrisation:
                weight_mask = torch.ones_like(weight_orig)
                cols = (pruned.view(-1, 1) * positions + torch.arange(positions).view(1, -1)).flatten()
                weight_mask[:, cols] = 0
                export_state = {k: v.detach().cpu() for k, v in defended.state_dict().items()
                                if k != f"{site.classifier}.weight"}
                export_state[f"{site.classifier}.weight_orig"] = weight_orig
                export_state[f"{site.classifier}.weight_mask"] = weight_mask
            acc_hold_final = clean_accuracy(defended, hold, context, cfg.batch_size_eval) if hold is not None else None
        tables = {}
        if accs:
            tables["pruning_curve"] = pd.DataFrame({
                "pruned": list(range(len(accs))),
                "channel": [-1] + [int(c) for c in order[: len(accs) - 1]],
                "mean_activation": [float("nan")] + [float(mean_act[c]) for c in order[: len(accs) - 1]],
                "holdout_acc": accs,
                "chosen": [n == n_pruned for n in range(len(accs))],
            })
        if cfg.setting == "backdoorbench" or oracle is not None or cfg.prune_step_ratio > 0:
            log = pd.DataFrame(log_rows)
            if oracle is not None:
                log["diagnostic"] = ORACLE_LABEL
            tables["prune_log"] = log  # BackdoorBench's prune_log.csv, one row per pruning step
        tables["activations"] = pd.DataFrame({
            "channel": list(range(channels)),
            "mean_activation": mean_act.tolist(),
            "rank": torch.argsort(order).tolist(),
            "pruned": mask.cpu().eq(0).tolist(),
        })
        diagnostics = {
            "setting": cfg.setting,
            "oracle": ORACLE_LABEL if oracle is not None else False,
            "feature_map": {"pool": site.pool, "classifier": site.classifier, "last_conv": site.last_conv,
                            "producer": list(site.producer) if site.producer else None, "channels": channels},
            "fit_samples": len(fit),
            "holdout_samples": len(hold) if hold is not None else 0,
            "finetune_samples": len(tune) if cfg.epochs > 0 else 0,
            "rule": rule,
            "pruning_steps": len(steps),
            "pruned_channels": int(n_pruned),
            "pruned_fraction": n_pruned / channels,
            "pruned": [int(c) for c in pruned],
            "holdout_acc_unpruned": accs[0] if accs else None,
            "holdout_acc_pruned": accs[n_pruned] if accs else None,
            "holdout_acc_final": acc_hold_final,
            "finetune": history,
        }
        return DefenseOutcome(model=defended.eval(), diagnostics=diagnostics, tables=tables,
                              stage_seconds=timer.seconds, data_used=context.data_used(), units_removed=int(n_pruned),
                              export_state=export_state)


def _channel_mask(pruned: torch.Tensor, channels: int, device: torch.device) -> torch.Tensor:
    mask = torch.ones(channels, device=device)
    mask[pruned.to(device)] = 0
    return mask
