"""ANP: Adversarial Neuron Pruning (Wu and Wang, "Adversarial Neuron Perturbations Purify Backdoored Deep
Neural Networks", NeurIPS 2021). Needs the clean defense subset.

Every BatchNorm2d neuron (channel) k gets a mask m_k in [0, 1] (init 1) and multiplicative perturbations
delta_k, xi_k on its weight and bias: the BN computes BN(x) with weight gamma * (m + delta) and bias
beta * (1 + xi) when perturbed, weight gamma * m and bias beta otherwise (as the reference code). Per
iteration on a clean batch (sampled with replacement, training-style augmentation, BN in training mode):

1. perturbation: delta, xi ~ U(-eps, eps), then ``anp_steps`` signed-gradient ascent steps of size
   eps / anp_steps on the cross-entropy (the reference does not clip delta, xi back to [-eps, eps] after the
   step; ``clip_noise=true`` does, as the paper's constraint reads);
2. mask step: loss = alpha * CE(unperturbed) + (1 - alpha) * CE(perturbed), SGD (momentum 0.9) on m, then
   m is clipped to [0, 1].

Model weights are never updated. Pruning then works on a fresh copy of the input model: a pruned neuron's
BN weight is set to 0 (its bias stays, exactly as the reference's pruning and the mask model, where m
multiplies only the weight). Which neurons:

- ``pruning_by="threshold"`` (default): every neuron with m <= ``threshold`` (default 0.2, fixed; the
  reference code scans thresholds and reads the test ASR to pick one, which this project never does);
- ``pruning_by="number"`` / ``"fraction"``: the ``prune_number`` / ``prune_fraction`` (of all BN neurons)
  neurons with the smallest masks (ties broken by layer order, then channel);
- ``select_threshold=true``: a held-out part of the clean defense subset (``holdout_ratio``) is kept out of
  mask learning, and the threshold is the largest of ``threshold_grid`` whose held-out clean accuracy drop
  stays within ``max_acc_drop`` (relative to the unpruned model), i.e. chosen from clean data only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .base import CleanData, Defense, DefenseConfig, DefenseContext, DefenseOutcome, StageTimer
from .common import clean_accuracy, preprocess_batch, split_holdout
from .registry import register_defense

__all__ = ["ANPConfig", "ANP", "PerturbedBatchNorm2d", "attach_perturbations", "optimize_masks", "select_neurons",
           "prune_neurons"]


@dataclass
class ANPConfig(DefenseConfig):
    """ANP settings; defaults are the paper's / reference code's (eps 0.4, one step, alpha 0.2, mask lr 0.2,
    2000 iterations of batch 128, pruning threshold 0.2)."""

    eps: float = 0.4
    anp_steps: int = 1
    alpha: float = 0.2
    mask_lr: float = 0.2
    momentum: float = 0.9
    iterations: int = 2000
    batch_size: int = 128
    rand_init: bool = True
    clip_noise: bool = False
    augment: bool = True
    pruning_by: Literal["threshold", "number", "fraction"] = "threshold"
    threshold: float = 0.2
    prune_number: int = 0
    prune_fraction: float = 0.0
    select_threshold: bool = False
    threshold_grid: list[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 19)])
    max_acc_drop: float = 0.1
    holdout_ratio: float = 0.2
    batch_size_eval: int = 512

    def validate(self) -> None:
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps!r}")
        if not isinstance(self.anp_steps, int) or self.anp_steps < 1:
            raise ValueError(f"anp_steps must be an integer >= 1, got {self.anp_steps!r}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if not self.mask_lr > 0:
            raise ValueError(f"mask_lr must be > 0, got {self.mask_lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"iterations must be an integer >= 0, got {self.iterations!r}")
        for name in ("batch_size", "batch_size_eval"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.pruning_by not in ("threshold", "number", "fraction"):
            raise ValueError(f"pruning_by must be 'threshold', 'number' or 'fraction', got {self.pruning_by!r}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold!r}")
        if not isinstance(self.prune_number, int) or self.prune_number < 0:
            raise ValueError(f"prune_number must be an integer >= 0, got {self.prune_number!r}")
        if not 0 <= self.prune_fraction < 1:
            raise ValueError(f"prune_fraction must be in [0, 1), got {self.prune_fraction!r}")
        if self.select_threshold and self.pruning_by != "threshold":
            raise ValueError("select_threshold=true needs pruning_by='threshold'")
        if not self.threshold_grid or any(not 0 <= t <= 1 for t in self.threshold_grid):
            raise ValueError(f"threshold_grid must be a non-empty list of values in [0, 1], got {self.threshold_grid!r}")
        if not 0 <= self.max_acc_drop <= 1:
            raise ValueError(f"max_acc_drop must be in [0, 1], got {self.max_acc_drop!r}")
        if not 0 < self.holdout_ratio < 1:
            raise ValueError(f"holdout_ratio must be in (0, 1), got {self.holdout_ratio!r}")


class PerturbedBatchNorm2d(nn.Module):
    """Wraps a BatchNorm2d with a neuron mask and multiplicative weight / bias perturbations."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        if not bn.affine:
            raise ValueError("ANP needs affine BatchNorm layers (a weight to mask)")
        self.bn = bn
        n = bn.num_features
        self.mask = nn.Parameter(torch.ones(n, device=bn.weight.device))
        self.noise_weight = nn.Parameter(torch.zeros(n, device=bn.weight.device))
        self.noise_bias = nn.Parameter(torch.zeros(n, device=bn.weight.device))
        self.perturbed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        if self.perturbed:
            w, b = bn.weight * (self.mask + self.noise_weight), bn.bias * (1 + self.noise_bias)
        else:
            w, b = bn.weight * self.mask, bn.bias
        use_batch = bn.training or bn.running_mean is None
        if bn.training and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        return F.batch_norm(x, bn.running_mean if not bn.training or bn.track_running_stats else None,
                            bn.running_var if not bn.training or bn.track_running_stats else None,
                            w, b, use_batch, momentum, bn.eps)


def attach_perturbations(model: nn.Module) -> dict[str, PerturbedBatchNorm2d]:
    """Replace every BatchNorm2d of ``model`` (in place) by a :class:`PerturbedBatchNorm2d`; returns them by
    the BN's module name (so ``name + '.weight'`` is the BN weight in the original model)."""
    wrapped: dict[str, PerturbedBatchNorm2d] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.BatchNorm2d):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            w = PerturbedBatchNorm2d(module)
            setattr(parent, attr, w)
            wrapped[name] = w
    if not wrapped:
        raise ValueError(f"{type(model).__name__} has no BatchNorm2d layer: ANP perturbs BN neurons")
    return wrapped


def optimize_masks(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, context: DefenseContext,
                   cfg: ANPConfig) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Learn ANP neuron masks on a perturbation-wrapped copy of ``model`` (which it modifies). Returns the
    masks by BN name and a short loss history."""
    layers = attach_perturbations(model)
    for p in model.parameters():
        p.requires_grad_(False)
    masks = [l.mask for l in layers.values()]
    noises = [t for l in layers.values() for t in (l.noise_weight, l.noise_bias)]
    for t in masks + noises:
        t.requires_grad_(True)
    mask_opt = torch.optim.SGD(masks, lr=cfg.mask_lr, momentum=cfg.momentum)
    noise_opt = torch.optim.SGD(noises, lr=cfg.eps / cfg.anp_steps)
    gen = context.generator(offset=1)
    aug_gen = context.generator(offset=2)
    noise_gen = context.generator(offset=3)
    labels = labels.long()
    history: list[dict] = []
    model.train()

    def set_perturbed(flag: bool) -> None:
        for l in layers.values():
            l.perturbed = flag

    running = {"loss": 0.0, "acc": 0.0, "n": 0}
    every = max(1, cfg.iterations // 10)
    for it in context.progress_bar(range(cfg.iterations), desc="anp masks", total=cfg.iterations):
        idx = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=gen)
        x = preprocess_batch(images[idx], context, cfg.augment, aug_gen)
        y = labels[idx].to(context.device)
        if cfg.eps > 0:
            with torch.no_grad():
                for t in noises:
                    if cfg.rand_init:  # U(-eps, eps), drawn on the CPU generator for reproducibility
                        t.copy_((torch.rand(t.shape, generator=noise_gen) * 2 - 1).mul_(cfg.eps))
                    else:
                        t.zero_()
            for _ in range(cfg.anp_steps):
                noise_opt.zero_grad(set_to_none=True)
                set_perturbed(True)
                loss_noise = -F.cross_entropy(model(x), y)
                loss_noise.backward()
                for t in noises:
                    t.grad = torch.sign(t.grad)
                noise_opt.step()
                if cfg.clip_noise:
                    with torch.no_grad():
                        for t in noises:
                            t.clamp_(-cfg.eps, cfg.eps)
        mask_opt.zero_grad(set_to_none=True)
        if cfg.eps > 0:
            set_perturbed(True)
            loss_rob = F.cross_entropy(model(x), y)
        else:
            loss_rob = torch.zeros((), device=context.device)
        set_perturbed(False)
        out = model(x)
        loss_nat = F.cross_entropy(out, y)
        loss = cfg.alpha * loss_nat + (1 - cfg.alpha) * loss_rob
        loss.backward()
        mask_opt.step()
        with torch.no_grad():
            for m in masks:
                m.clamp_(0.0, 1.0)
        running["loss"] += float(loss.detach())
        running["acc"] += float((out.detach().argmax(1) == y).float().mean())
        running["n"] += 1
        if (it + 1) % every == 0 or it + 1 == cfg.iterations:
            history.append({"iteration": it + 1, "loss": running["loss"] / running["n"],
                            "train_acc": running["acc"] / running["n"]})
            running = {"loss": 0.0, "acc": 0.0, "n": 0}
    for t in noises:
        t.grad = None
    return {name: l.mask.detach().clone() for name, l in layers.items()}, history


def mask_table(masks: dict[str, torch.Tensor]) -> pd.DataFrame:
    """One row per BN neuron: layer, channel, mask value."""
    rows = [{"layer": name, "channel": k, "mask": float(v)} for name, m in masks.items() for k, v in enumerate(m.tolist())]
    return pd.DataFrame(rows, columns=["layer", "channel", "mask"])


def select_neurons(masks: dict[str, torch.Tensor], pruning_by: str, threshold: float = 0.2, number: int = 0,
                   fraction: float = 0.0) -> list[tuple[str, int]]:
    """The (layer, channel) neurons to prune: mask <= threshold, or the ``number`` / ``fraction`` smallest
    masks (stable: ties in layer order, then channel order)."""
    table = mask_table(masks)
    if pruning_by == "threshold":
        # masks are float32: compare against the float32 threshold, so a mask of exactly 0.2 counts as <= 0.2
        chosen = table[table["mask"] <= float(torch.tensor(threshold, dtype=torch.float32))]
    else:
        count = number if pruning_by == "number" else int(round(fraction * len(table)))
        if count > len(table):
            raise ValueError(f"cannot prune {count} neurons: the model has {len(table)} BN neurons")
        chosen = table.sort_values("mask", kind="stable").head(count)
    return [(str(r.layer), int(r.channel)) for r in chosen.itertuples()]


@torch.no_grad()
def prune_neurons(model: nn.Module, neurons: list[tuple[str, int]]) -> None:
    """Zero the BN weight of each (layer, channel) in place (the reference's pruning)."""
    mods = dict(model.named_modules())
    for layer, k in neurons:
        bn = mods.get(layer)
        if not isinstance(bn, nn.BatchNorm2d):
            raise ValueError(f"{layer!r} is not a BatchNorm2d layer of the model")
        bn.weight[k] = 0


@register_defense
class ANP(Defense):
    name = "anp"
    config_class = ANPConfig
    needs_clean_data = True
    description = "Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021): prune BN neurons sensitive to perturbation"

    def mitigate(self, model: nn.Module, context: DefenseContext) -> DefenseOutcome:
        clean = self.require_clean_data(context)
        cfg = self.config
        timer = StageTimer()
        fit, hold = clean, None
        if cfg.select_threshold:
            fit, hold = split_holdout(clean, cfg.holdout_ratio, context.seed)
        with timer("mask_optimization"):
            work = self.copy_model(model, context.device)
            masks, history = optimize_masks(work, fit.images, fit.labels, context, cfg)
            del work
        threshold = cfg.threshold
        selection = []
        with timer("pruning"):
            if hold is not None:  # cfg.select_threshold: pick the threshold on the held-out clean part
                base = clean_accuracy(self.copy_model(model, context.device), hold, context, cfg.batch_size_eval)
                threshold = 0.0
                for t in sorted(cfg.threshold_grid):
                    cand = self.copy_model(model, context.device)
                    neurons = select_neurons(masks, "threshold", threshold=t)
                    prune_neurons(cand, neurons)
                    acc = clean_accuracy(cand, hold, context, cfg.batch_size_eval)
                    ok = acc >= base * (1 - cfg.max_acc_drop) - 1e-12
                    selection.append({"threshold": t, "pruned": len(neurons), "holdout_acc": acc, "within": ok})
                    if ok:
                        threshold = max(threshold, t)
            neurons = select_neurons(masks, cfg.pruning_by, threshold, cfg.prune_number, cfg.prune_fraction)
            defended = self.copy_model(model, context.device)
            prune_neurons(defended, neurons)
        table = mask_table(masks)
        pruned_set = set(neurons)
        table["pruned"] = [(l, c) in pruned_set for l, c in zip(table["layer"], table["channel"])]
        per_layer = {name: int(sum(1 for l, _ in neurons if l == name)) for name in masks}
        values = torch.cat([m.flatten() for m in masks.values()])
        diagnostics = {
            "pruning_by": cfg.pruning_by,
            "threshold": threshold if cfg.pruning_by == "threshold" else None,
            "threshold_selected_on_clean_holdout": cfg.select_threshold,
            "pruned_neurons": len(neurons),
            "total_neurons": int(values.numel()),
            "pruned_per_layer": per_layer,
            "mask_stats": {"min": float(values.min()), "mean": float(values.mean()), "max": float(values.max()),
                           "below_0.2": int((values <= 0.2).sum()), "zero": int((values == 0).sum())},
            "mask_samples": len(fit),
            "holdout_samples": len(hold) if hold is not None else 0,
            "history": history,
            "threshold_selection": selection,
        }
        tables = {"masks": table}
        if selection:
            tables["threshold_selection"] = pd.DataFrame(selection)
        return DefenseOutcome(model=defended.eval(), diagnostics=diagnostics, tables=tables,
                              stage_seconds=timer.seconds, data_used=context.data_used(), units_removed=len(neurons))
