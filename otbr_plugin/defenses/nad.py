"""NAD: Neural Attention Distillation (Li, Lyu, Koren, Lyu, Li and Ma, "Neural Attention Distillation: Erasing
Backdoor Triggers from Deep Neural Networks", ICLR 2021). Needs the clean defense subset.

1. Teacher: a copy of the backdoored model fine-tuned on the clean defense subset (``teacher_epochs``; the paper
   fine-tunes "5~10 epochs", the official README says the teacher is the NAD loop with every beta 0, which is how it
   is trained here).
2. Student: the backdoored model, trained on the same subset with

       L = CE(student(x), y) + sum_l beta_l * D(A(F_S^l(x)), A(F_T^l(x)))

   over the attention layers l (the teacher is frozen, in eval mode). The attention map of an activation F with
   C channels (the paper's Eq. 2, p = 2) is A(F) = a / (||a||_2 + 1e-6), a = sum_c |F_c|^p, the norm taken over the
   spatial positions of each sample. D (``distance``): "mse" (default: the official code's ``F.mse_loss``, the
   mean of the squared differences over the batch and every position; the betas 500 / 1000 / 1000 are tuned for
   it) or "l2" (the paper's Eq. 3, ||A_T - A_S||_2 per sample, averaged over the batch).
3. Schedule (official code): SGD, momentum 0.9, weight decay 1e-4, batch 64, lr 0.1, set to ``lr_values[i]`` from
   epoch ``lr_milestones[i]`` on (0.01 from epoch 2, 1e-4 from epoch 20), 20 epochs, random crop (and flip where
   the dataset allows it). The teacher follows the same schedule for its epochs.

4. BatchNorm statistics (``bn_stats``, beyond the paper): "training" (default, the paper's and the official code's
   NAD) keeps the running statistics the distillation left in the student; "reestimate" resets every BatchNorm's
   running statistics after the distillation and re-estimates them as a cumulative average over one training-mode
   pass over the clean defense subset (the training split the harness handed NAD), un-augmented and in batches of
   ``batch_size_eval`` (one batch when the subset fits: then exactly the subset's per-channel mean and unbiased
   variance), weights untouched. Why: at small subsets (50 images, 20 steps) the student's running statistics
   (momentum 0.1, one update per step) lag the weights that the attention loss keeps moving, and the student loses
   most of its clean accuracy through them (docs/baselines.md, NAD). Un-augmented, because the re-estimated
   statistics serve inference on un-augmented inputs (the crop's zero border would shift them) and the pass then
   draws nothing from the random stream. BackdoorBench's nad.py gets part of this effect differently: its three
   extra training-mode forward passes per step update the statistics four times per step; "reestimate" is not that
   semantics, only an explicit fix of the same symptom.

Attention layers (``attention_layers``): module names whose outputs are distilled, one beta each. Left empty: the
last three of ``layer1``..``layer4`` (the outputs of the last three residual stages of a ResNet; the paper's WRN-16-1
has three groups, all distilled, with betas 500, 1000, 1000 from low to high). Other architectures name theirs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import to_float
from ..otbr.repair import recalibrate_bn
from .base import CleanData, Defense, DefenseConfig, DefenseContext, DefenseOutcome, StageTimer
from .common import clean_accuracy, preprocess_batch
from .ft import check_training_fields
from .registry import register_defense

__all__ = ["NADConfig", "NAD", "attention_map", "attention_loss", "default_attention_layers", "nad_train",
           "reestimate_bn"]

DISTANCES = ("mse", "l2")
BN_STATS = ("training", "reestimate")


@dataclass
class NADConfig(DefenseConfig):
    """NAD settings (paper / official code defaults): ``betas`` one per attention layer (low to high),
    ``p`` the attention power, ``distance`` "mse" (official code) or "l2" (the paper's Eq. 3), ``epochs`` / ``lr`` /
    ``lr_milestones`` / ``lr_values`` / ``batch_size`` / ``momentum`` / ``weight_decay`` / ``augment`` of the
    distillation, ``teacher_epochs`` of the teacher's fine-tuning (same schedule), ``attention_layers`` (empty:
    the last three residual stages), ``bn_stats`` "training" (the official NAD: the student's BN running statistics
    as the distillation left them) or "reestimate" (reset and re-estimated from one un-augmented training-mode
    pass over the clean subset after the distillation; module docstring, step 4)."""

    betas: list[float] = field(default_factory=lambda: [500.0, 1000.0, 1000.0])
    p: float = 2.0
    distance: Literal["mse", "l2"] = "mse"
    attention_layers: list[str] = field(default_factory=list)
    teacher_epochs: int = 10
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.1
    lr_milestones: list[int] = field(default_factory=lambda: [2, 20])
    lr_values: list[float] = field(default_factory=lambda: [0.01, 0.0001])
    momentum: float = 0.9
    weight_decay: float = 1e-4
    augment: bool = True
    batch_size_eval: int = 512
    bn_stats: Literal["training", "reestimate"] = "training"

    def validate(self) -> None:
        check_training_fields(self, {"teacher_epochs": "epochs", "epochs": "epochs", "batch_size": "batch",
                                     "batch_size_eval": "batch", "lr": "lr", "momentum": "momentum",
                                     "weight_decay": "decay"})
        if not isinstance(self.betas, list) or not self.betas or any(
                isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b < 0
                for b in self.betas):
            raise ValueError(f"betas must be a non-empty list of finite numbers >= 0 (one per attention layer; paper "
                             f"500, 1000, 1000), got {self.betas!r}")
        if isinstance(self.p, bool) or not isinstance(self.p, (int, float)) or not math.isfinite(self.p) or self.p <= 0:
            raise ValueError(f"p must be a finite number > 0 (the attention map's power; paper 2), got {self.p!r}")
        if self.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {', '.join(map(repr, DISTANCES))}, got {self.distance!r}")
        if not isinstance(self.attention_layers, list) or any(
                not isinstance(n, str) or not n for n in self.attention_layers):
            raise ValueError(f"attention_layers must be a list of module names (empty: the last three residual "
                             f"stages), got {self.attention_layers!r}")
        if self.attention_layers and len(self.attention_layers) != len(self.betas):
            raise ValueError(f"attention_layers names {len(self.attention_layers)} layers but betas has "
                             f"{len(self.betas)} values: give one beta per layer")
        if not isinstance(self.lr_milestones, list) or any(
                isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in self.lr_milestones) \
                or self.lr_milestones != sorted(set(self.lr_milestones)):
            raise ValueError(f"lr_milestones must be a strictly increasing list of epochs >= 1, "
                             f"got {self.lr_milestones!r}")
        if not isinstance(self.lr_values, list) or len(self.lr_values) != len(self.lr_milestones) or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 for v in self.lr_values):
            raise ValueError(f"lr_values must list one learning rate > 0 per milestone ({len(self.lr_milestones)}), "
                             f"got {self.lr_values!r}")
        if not isinstance(self.augment, bool):
            raise ValueError(f"augment must be true or false, got {self.augment!r}")
        if self.bn_stats not in BN_STATS:
            raise ValueError(f"bn_stats must be one of {', '.join(map(repr, BN_STATS))} (\"training\": the "
                             f"student's BatchNorm statistics as the distillation left them, the official NAD; "
                             f"\"reestimate\": re-estimated on the clean subset afterwards), got {self.bn_stats!r}")

    def lr_at(self, epoch: int) -> float:
        """The learning rate of 0-based ``epoch``: ``lr`` until the first milestone, then the milestone's value."""
        lr = self.lr
        for milestone, value in zip(self.lr_milestones, self.lr_values):
            if epoch >= milestone:
                lr = value
        return lr


def attention_map(fm: torch.Tensor, p: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """NAD's attention map of activations ``fm`` (N, C, H, W): sum_c |fm_c|^p, divided by its L2 norm over the
    spatial positions of each sample (+ eps); shape (N, H * W)."""
    if fm.dim() != 4:
        raise ValueError(f"expected activations (N, C, H, W), got shape {tuple(fm.shape)}")
    a = fm.abs().pow(p).sum(dim=1).flatten(1)
    return a / (a.norm(dim=1, keepdim=True) + eps)


def attention_loss(fm_s: torch.Tensor, fm_t: torch.Tensor, p: float = 2.0, distance: str = "mse") -> torch.Tensor:
    """Distance between the attention maps of student and teacher activations: "mse" (mean squared difference
    over batch and positions, the official code) or "l2" (the paper's ||A_T - A_S||_2 per sample, batch mean)."""
    a_s, a_t = attention_map(fm_s, p), attention_map(fm_t, p)
    if distance == "mse":
        return F.mse_loss(a_s, a_t)
    if distance == "l2":
        return (a_s - a_t).norm(dim=1).mean()
    raise ValueError(f"distance must be one of {', '.join(map(repr, DISTANCES))}, got {distance!r}")


def default_attention_layers(model: nn.Module) -> list[str]:
    """The last three residual stages (``layer1``..``layer4``) of a ResNet-style model; an error otherwise."""
    names = dict(model.named_children())
    stages = [n for n in ("layer1", "layer2", "layer3", "layer4") if n in names]
    if len(stages) < 3:
        raise ValueError(f"NAD cannot pick attention layers for {type(model).__name__} (no layer1..layer4 stages): "
                         "set attention_layers to the module names whose outputs to distil, one beta each")
    return stages[-3:]


class _Capture:
    """Forward hooks keeping the outputs of named modules for one forward pass."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        mods = dict(model.named_modules())
        missing = [n for n in names if n not in mods]
        if missing:
            raise ValueError(f"attention_layers {missing} are not modules of {type(model).__name__}")
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [mods[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.outputs[name] = output
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def nad_train(student: nn.Module, teacher: nn.Module | None, clean: CleanData, context: DefenseContext,
              cfg: NADConfig, layers: list[str], epochs: int, seed_offset: int) -> list[dict]:
    """Train ``student`` in place on ``clean`` with CE + the attention losses to the frozen ``teacher`` (None: CE
    only, the teacher's own fine-tuning). Returns one dict per epoch (loss, attention loss, accuracy, lr)."""
    if epochs == 0:
        return []
    gen = context.generator(offset=seed_offset)
    opt = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    labels = clean.labels.long()
    cap_s = _Capture(student, layers) if teacher is not None else None
    cap_t = _Capture(teacher, layers) if teacher is not None else None
    history = []
    try:
        for epoch in context.progress_bar(range(epochs), desc="nad" if teacher is not None else "nad teacher",
                                          total=epochs):
            lr = cfg.lr_at(epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            student.train()
            order = torch.randperm(len(clean), generator=gen)
            sums = {"loss": 0.0, "at_loss": 0.0, "correct": 0, "seen": 0}
            for start in range(0, len(clean), cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                x = preprocess_batch(clean.images[idx], context, cfg.augment, gen)
                y = labels[idx].to(context.device)
                out = student(x)
                loss = F.cross_entropy(out, y)
                at = torch.zeros((), device=out.device)
                if teacher is not None:
                    with torch.no_grad():
                        teacher(x)
                    for name, beta in zip(layers, cfg.betas):
                        at = at + beta * attention_loss(cap_s.outputs[name], cap_t.outputs[name].detach(), cfg.p,
                                                        cfg.distance)
                total = loss + at
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                n = len(idx)
                sums["loss"] += float(total.detach()) * n
                sums["at_loss"] += float(at.detach()) * n
                sums["correct"] += int((out.detach().argmax(1) == y).sum())
                sums["seen"] += n
            history.append({"epoch": epoch + 1, "lr": lr, "loss": sums["loss"] / sums["seen"],
                            "attention_loss": sums["at_loss"] / sums["seen"],
                            "train_acc": sums["correct"] / sums["seen"]})
    finally:
        for cap in (cap_s, cap_t):
            if cap is not None:
                cap.remove()
    student.eval()
    return history


def reestimate_bn(model: nn.Module, clean: CleanData, context: DefenseContext, batch_size: int) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are reset and re-estimated (cumulative average over
    batches of ``batch_size``) from one un-augmented training-mode pass over the clean subset; weights unchanged,
    the copy in eval mode on the context's device (``recalibrate_bn`` of the OTBR repair)."""
    return recalibrate_bn(model, to_float(clean.images), context.normalizer, batch_size=batch_size,
                          device=context.device)


@register_defense
class NAD(Defense):
    name = "nad"
    config_class = NADConfig
    needs_clean_data = True
    description = "Neural Attention Distillation (Li et al., ICLR 2021): fine-tuned teacher, attention distillation"

    def mitigate(self, model: nn.Module, context: DefenseContext) -> DefenseOutcome:
        clean = self.require_clean_data(context)
        self.require_oracle(context)
        cfg = self.config
        timer = StageTimer()
        student = self.copy_model(model, context.device)
        layers = list(cfg.attention_layers) or default_attention_layers(student)
        if len(layers) != len(cfg.betas):
            raise ValueError(f"NAD distils {len(layers)} attention layers ({', '.join(layers)}) but betas has "
                             f"{len(cfg.betas)} values: give one beta per layer")
        with timer("teacher"):
            teacher = self.copy_model(model, context.device)
            teacher_history = nad_train(teacher, None, clean, context, cfg, layers, cfg.teacher_epochs, 11)
            teacher.eval()
            for prm in teacher.parameters():
                prm.requires_grad_(False)
        with timer("distillation"):
            history = nad_train(student, teacher, clean, context, cfg, layers, cfg.epochs, 12)
        acc_distilled = None
        if cfg.bn_stats == "reestimate":
            with timer("bn_reestimate"):
                acc_distilled = clean_accuracy(student, clean, context, cfg.batch_size_eval)
                student = reestimate_bn(student, clean, context, cfg.batch_size_eval)
        with timer("evaluate_subset"):
            acc_teacher = clean_accuracy(teacher, clean, context, cfg.batch_size_eval)
            acc_student = clean_accuracy(student, clean, context, cfg.batch_size_eval)
        diagnostics = {"attention_layers": layers, "betas": list(cfg.betas), "distance": cfg.distance,
                       "samples": len(clean), "teacher_subset_acc": acc_teacher, "student_subset_acc": acc_student,
                       "bn_stats": cfg.bn_stats, "student_subset_acc_before_bn_reestimate": acc_distilled,
                       "teacher_finetune": teacher_history, "distillation": history}
        return DefenseOutcome(model=student.eval(), diagnostics=diagnostics, stage_seconds=timer.seconds,
                              data_used=context.data_used(), units_removed=0)
