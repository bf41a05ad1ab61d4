"""RNP: Reconstructive Neuron Pruning (Li, Lyu, Ma, Chen, Koren, Li and Jiang, "Reconstructive Neuron Pruning for
Backdoor Defense", ICML 2023). Needs the clean defense subset.

1. Unlearning: a copy of the model is trained by gradient *ascent* on the clean subset (SGD, ``unlearning_lr``,
   momentum, weight decay, the lr divided by 10 at each epoch of ``schedule``; BN in training mode, training
   augmentation), one epoch at a time, until the epoch's running training accuracy is <= ``clean_threshold``
   or ``unlearning_epochs`` epochs have run. Each step's gradient is clipped to norm ``max_grad_norm`` (20, the
   value in the official code, whose call comes before ``backward()`` and so never takes effect; ``null``: no
   clipping, as the published code in effect). Unclipped ascent on a small model can overflow within one epoch
   (the loss grows without bound); a non-finite loss is an error naming the epoch, never a silent NaN model.
2. Recovering: every BatchNorm2d neuron k of the unlearned model gets a mask m_k in [0, 1] (init 1) multiplying
   its BN weight (the bias stays), as in the official MaskBatchNorm2d. Only the masks are trained
   (``recovering_epochs`` epochs of SGD, ``recovering_lr``, momentum 0.9, on ``alpha * CE``; BN in training mode;
   masks clipped to [0, 1] after each step); every weight of the unlearned model stays frozen. Neurons the clean
   task does not need to recover -- the backdoor's -- keep small masks.
3. Pruning: on a fresh copy of the *original* model, the BN weight of each neuron whose mask is <= ``threshold``
   is set to 0 (or the ``prune_number`` / ``prune_fraction`` smallest masks). The official code scans
   thresholds and reports each on the test set; here the threshold is fixed (never chosen on test data).

The mask layer and the pruning are ANP's (:mod:`.anp`: the same BN mask semantics as RNP's official code).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .anp import attach_perturbations, mask_table, prune_neurons, select_neurons
from .base import CleanData, Defense, DefenseConfig, DefenseContext, DefenseOutcome, StageTimer
from .batches import shuffled_batches
from .common import preprocess_batch
from .registry import register_defense

__all__ = ["RNPConfig", "RNP", "unlearn", "recover_masks"]


@dataclass
class RNPConfig(DefenseConfig):
    """RNP settings; defaults are the official code's (main.py): unlearning lr 0.01 (momentum 0.9, weight decay
    5e-4, lr x0.1 at epochs 10 and 20) for at most 20 epochs, stopping at clean training accuracy <= 0.2; mask
    recovery 20 epochs, lr 0.2, alpha 0.2; batch 128; prune masks <= 0.2."""

    unlearning_lr: float = 0.01
    unlearning_epochs: int = 20
    schedule: list[int] = field(default_factory=lambda: [10, 20])
    momentum: float = 0.9
    weight_decay: float = 5e-4
    max_grad_norm: float | None = 20.0
    clean_threshold: float = 0.2
    recovering_lr: float = 0.2
    recovering_epochs: int = 20
    alpha: float = 0.2
    batch_size: int = 128
    augment: bool = True
    pruning_by: Literal["threshold", "number", "fraction"] = "threshold"
    threshold: float = 0.2
    prune_number: int = 0
    prune_fraction: float = 0.0

    def validate(self) -> None:
        for name in ("unlearning_epochs", "recovering_epochs", "prune_number"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        for name in ("unlearning_lr", "recovering_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not isinstance(self.schedule, list) or any(not isinstance(e, int) or isinstance(e, bool) or e < 1
                                                      for e in self.schedule):
            raise ValueError(f"schedule must be a list of epochs (integers >= 1), got {self.schedule!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or null (no clipping), got {self.max_grad_norm!r}")
        for name in ("clean_threshold", "alpha", "threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not isinstance(self.augment, bool):
            raise ValueError(f"augment must be true or false, got {self.augment!r}")
        if self.pruning_by not in ("threshold", "number", "fraction"):
            raise ValueError(f"pruning_by must be 'threshold', 'number' or 'fraction', got {self.pruning_by!r}")
        if not 0 <= self.prune_fraction < 1:
            raise ValueError(f"prune_fraction must be in [0, 1), got {self.prune_fraction!r}")


def unlearn(model: nn.Module, clean: CleanData, context: DefenseContext, cfg: RNPConfig) -> list[dict]:
    """RNP's step 1 on ``model`` (in place): gradient ascent on the clean subset until an epoch's running
    training accuracy is <= ``cfg.clean_threshold`` (or ``cfg.unlearning_epochs`` epochs). Returns the history."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.unlearning_lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=sorted(cfg.schedule), gamma=0.1)
    order_gen, aug_gen = context.generator(offset=1), context.generator(offset=2)
    labels = clean.labels.long()
    history: list[dict] = []
    for epoch in context.progress_bar(range(cfg.unlearning_epochs), desc="rnp unlearning", total=cfg.unlearning_epochs):
        model.train()
        lr = opt.param_groups[0]["lr"]
        correct, loss_sum, batches = 0, 0.0, 0
        for idx in shuffled_batches(len(clean), cfg.batch_size, order_gen):
            x = preprocess_batch(clean.images[idx], context, cfg.augment, aug_gen)
            y = labels[idx].to(context.device)
            out = model(x)
            loss = F.cross_entropy(out, y)
            if not torch.isfinite(loss):
                raise ValueError(f"RNP unlearning diverged: non-finite clean loss in epoch {epoch + 1}, batch "
                                 f"{batches + 1} (unlearning_lr {lr}, max_grad_norm {cfg.max_grad_norm}); clip the "
                                 "gradient (max_grad_norm) or lower unlearning_lr")
            opt.zero_grad(set_to_none=True)
            (-loss).backward()
            if cfg.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), max_norm=cfg.max_grad_norm)
            opt.step()
            correct += int((out.detach().argmax(1) == y).sum())
            loss_sum += float(loss.detach())
            batches += 1
        sched.step()
        acc = correct / len(clean)
        history.append({"epoch": epoch + 1, "lr": lr, "loss": loss_sum / batches, "train_acc": acc})
        if acc <= cfg.clean_threshold:
            break
    model.eval()
    return history


def recover_masks(model: nn.Module, clean: CleanData, context: DefenseContext, cfg: RNPConfig
                  ) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """RNP's step 2: attach a [0, 1] mask to every BN neuron of ``model`` (modified in place: its BN layers are
    wrapped) and learn only the masks on ``alpha * CE``; every other parameter is frozen. Returns the masks by BN
    name and the history."""
    layers = attach_perturbations(model)
    for p in model.parameters():
        p.requires_grad_(False)
    masks = [layer.mask for layer in layers.values()]
    for m in masks:
        m.requires_grad_(True)
    opt = torch.optim.SGD(masks, lr=cfg.recovering_lr, momentum=0.9)
    order_gen, aug_gen = context.generator(offset=3), context.generator(offset=4)
    labels = clean.labels.long()
    history: list[dict] = []
    for epoch in context.progress_bar(range(cfg.recovering_epochs), desc="rnp recovering", total=cfg.recovering_epochs):
        model.train()
        correct, loss_sum, batches = 0, 0.0, 0
        for idx in shuffled_batches(len(clean), cfg.batch_size, order_gen):
            x = preprocess_batch(clean.images[idx], context, cfg.augment, aug_gen)
            y = labels[idx].to(context.device)
            out = model(x)
            loss = cfg.alpha * F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for m in masks:
                    m.clamp_(0.0, 1.0)
            correct += int((out.detach().argmax(1) == y).sum())
            loss_sum += float(loss.detach())
            batches += 1
        history.append({"epoch": epoch + 1, "loss": loss_sum / batches, "train_acc": correct / len(clean)})
    model.eval()
    return {name: layer.mask.detach().clone() for name, layer in layers.items()}, history


@register_defense
class RNP(Defense):
    name = "rnp"
    config_class = RNPConfig
    needs_clean_data = True
    description = "RNP (Li et al., ICML 2023): unlearn, recover BN neuron masks with weights frozen, prune by mask"

    def mitigate(self, model: nn.Module, context: DefenseContext) -> DefenseOutcome:
        clean = self.require_clean_data(context)
        cfg = self.config
        timer = StageTimer()
        with timer("unlearning"):
            work = self.copy_model(model, context.device)
            unlearn_history = unlearn(work, clean, context, cfg)
        with timer("recovering"):
            masks, recover_history = recover_masks(work, clean, context, cfg)
            del work
        with timer("pruning"):
            neurons = select_neurons(masks, cfg.pruning_by, cfg.threshold, cfg.prune_number, cfg.prune_fraction)
            defended = self.copy_model(model, context.device)
            prune_neurons(defended, neurons)
        table = mask_table(masks)
        chosen = set(neurons)
        table["pruned"] = [(l, c) in chosen for l, c in zip(table["layer"], table["channel"])]
        values = torch.cat([m.flatten() for m in masks.values()])
        diagnostics = {
            "pruning_by": cfg.pruning_by,
            "threshold": cfg.threshold if cfg.pruning_by == "threshold" else None,
            "pruned_neurons": len(neurons),
            "total_neurons": int(values.numel()),
            "unlearning_epochs_run": len(unlearn_history),
            "unlearned_train_acc": unlearn_history[-1]["train_acc"] if unlearn_history else None,
            "mask_stats": {"min": float(values.min()), "mean": float(values.mean()), "max": float(values.max())},
            "unlearning": unlearn_history,
            "recovering": recover_history,
        }
        return DefenseOutcome(model=defended.eval(), diagnostics=diagnostics, tables={"masks": table},
                              stage_seconds=timer.seconds, data_used=context.data_used(), units_removed=len(neurons))
