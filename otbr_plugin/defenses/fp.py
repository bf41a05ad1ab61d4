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

from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
from torch import nn

from ..train import TrainConfig, train_classifier
from .base import CleanData, Defense, DefenseConfig, DefenseContext, DefenseOutcome, StageTimer
from .common import clean_accuracy, context_spec, preprocess_batch, split_holdout, zero_channels
from .registry import register_defense
from .structure import FeatureSite, feature_site, tail_module

__all__ = ["FPConfig", "FP", "activation_order", "stopping_count", "pruning_curve", "bake_channel_mask"]


@dataclass
class FPConfig(DefenseConfig):
    """Fine-Pruning settings.

    ``acc_ratio``: tolerated drop of held-out clean accuracy (see ``acc_drop``); ``holdout_ratio``: share of
    the clean defense subset held out for the stopping rule; ``prune_ratio``: fixed share of channels to
    prune instead of the stopping rule (None: use the rule); ``max_prune_ratio``: never prune more than
    this share. Fine-tuning: ``epochs``, ``lr``, ``batch_size``, ``momentum``, ``weight_decay``, ``augment``
    (random crop / flip as in training); ``epochs=0`` gives pruning only. ``batch_size_eval`` for activation
    passes.
    """

    acc_ratio: float = 0.1
    acc_drop: Literal["relative", "absolute"] = "relative"
    holdout_ratio: float = 0.2
    prune_ratio: float | None = None
    max_prune_ratio: float = 0.95
    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True
    batch_size_eval: int = 512

    def validate(self) -> None:
        if not 0 <= self.acc_ratio <= 1:
            raise ValueError(f"acc_ratio must be in [0, 1], got {self.acc_ratio!r}")
        if self.acc_drop not in ("relative", "absolute"):
            raise ValueError(f"acc_drop must be 'relative' or 'absolute', got {self.acc_drop!r}")
        if not 0 < self.holdout_ratio < 1:
            raise ValueError(f"holdout_ratio must be in (0, 1), got {self.holdout_ratio!r}")
        if self.prune_ratio is not None and not 0 <= self.prune_ratio < 1:
            raise ValueError(f"prune_ratio must be in [0, 1) or null, got {self.prune_ratio!r}")
        if not 0 < self.max_prune_ratio < 1:
            raise ValueError(f"max_prune_ratio must be in (0, 1), got {self.max_prune_ratio!r}")
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"epochs must be an integer >= 0, got {self.epochs!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        for name in ("batch_size", "batch_size_eval"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")


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


def _mask_hook(mask: torch.Tensor):
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (args[0] * mask.view(1, -1, 1, 1).to(args[0].dtype),) + tuple(args[1:])
    return hook


@torch.no_grad()
def _features(model: nn.Module, site: FeatureSite, images: torch.Tensor, context: DefenseContext,
              batch_size: int, reduce: bool = False) -> torch.Tensor:
    """The feature map (input of the global pooling) for uint8 ``images``, on CPU; with ``reduce`` only its
    mean per channel over samples and positions (the activation FP ranks by), without keeping the maps."""
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
            model(preprocess_batch(images[start:start + batch_size], context, augment=False))
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

    def mitigate(self, model: nn.Module, context: DefenseContext) -> DefenseOutcome:
        clean = self.require_clean_data(context)
        cfg = self.config
        timer = StageTimer()
        defended = self.copy_model(model, context.device)
        with timer("split"):
            fit, hold = split_holdout(clean, cfg.holdout_ratio, context.seed)
            site = feature_site(defended)
            tail = tail_module(defended, site.node)
        with timer("activations"):
            mean_act = _features(defended, site, fit.images, context, cfg.batch_size_eval, reduce=True)
            order = activation_order(mean_act)
            channels = int(mean_act.numel())
        linear: nn.Linear = dict(defended.named_modules())[site.classifier]
        if linear.in_features % channels:
            raise ValueError(f"classifier {site.classifier!r} takes {linear.in_features} inputs, not a multiple of the "
                             f"{channels} feature channels: cannot map channels to its columns")
        positions = linear.in_features // channels
        max_count = max(0, min(channels - 1, int(cfg.max_prune_ratio * channels)))
        with timer("pruning_curve"):
            feats_hold = _features(defended, site, hold.images, context, cfg.batch_size_eval)
            accs = pruning_curve(tail, feats_hold, hold.labels, order, max_count, context.device, cfg.batch_size_eval)
            del feats_hold
        if cfg.prune_ratio is not None:
            n_pruned = min(max_count, int(round(cfg.prune_ratio * channels)))
            rule = "fixed prune_ratio"
        else:
            n_pruned = stopping_count(accs, cfg.acc_ratio, cfg.acc_drop, max_count)
            rule = f"{cfg.acc_drop} drop <= {cfg.acc_ratio}"
        pruned = order[:n_pruned].clone()
        mask = torch.ones(channels, device=context.device)
        mask[pruned.to(context.device)] = 0
        history = []
        acc_hold_pruned = accs[n_pruned]
        pool = dict(defended.named_modules())[site.pool]
        handle = pool.register_forward_pre_hook(_mask_hook(mask))
        try:
            if cfg.epochs > 0:
                with timer("finetune"):
                    spec = context_spec(context)
                    tc = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                                     weight_decay=cfg.weight_decay, seed=context.seed, device=str(context.device),
                                     augment=cfg.augment, progress=context.progress)
                    history = train_classifier(defended, fit.images, fit.labels, spec, tc, device=context.device,
                                               progress=context.progress).epochs
        finally:
            handle.remove()
        with timer("bake"):
            bake_channel_mask(defended, site, pruned, positions)
            acc_hold_final = clean_accuracy(defended, hold, context, cfg.batch_size_eval)
        curve = pd.DataFrame({
            "pruned": list(range(len(accs))),
            "channel": [-1] + [int(c) for c in order[: len(accs) - 1]],
            "mean_activation": [float("nan")] + [float(mean_act[c]) for c in order[: len(accs) - 1]],
            "holdout_acc": accs,
            "chosen": [n == n_pruned for n in range(len(accs))],
        })
        activations = pd.DataFrame({
            "channel": list(range(channels)),
            "mean_activation": mean_act.tolist(),
            "rank": torch.argsort(order).tolist(),
            "pruned": mask.cpu().eq(0).tolist(),
        })
        diagnostics = {
            "feature_map": {"pool": site.pool, "classifier": site.classifier, "last_conv": site.last_conv,
                            "producer": list(site.producer) if site.producer else None, "channels": channels},
            "fit_samples": len(fit),
            "holdout_samples": len(hold),
            "rule": rule,
            "pruned_channels": int(n_pruned),
            "pruned_fraction": n_pruned / channels,
            "pruned": [int(c) for c in pruned],
            "holdout_acc_unpruned": accs[0],
            "holdout_acc_pruned": acc_hold_pruned,
            "holdout_acc_final": acc_hold_final,
            "finetune": history,
        }
        return DefenseOutcome(model=defended.eval(), diagnostics=diagnostics,
                              tables={"pruning_curve": curve, "activations": activations},
                              stage_seconds=timer.seconds, data_used=context.data_used(), units_removed=int(n_pruned))
