"""Supervised training on in-memory uint8 tensors: SGD + cosine schedule, seeded, with progress bar.

Used by the quick-start job, the attacks (on poisoned training sets) and fine-tuning defenses.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data.specs import DatasetSpec
from .data.transforms import Preprocess
from .runtime import autocast_context, resolve_device, seed_everything

__all__ = ["TrainConfig", "TrainHistory", "train_classifier"]


@dataclass
class TrainConfig:
    """Training hyperparameters; defaults are BackdoorBench's (SGD 0.01, momentum 0.9, wd 5e-4, batch 128).

    The cosine schedule is stepped per iteration (T_max = all steps) so that short CPU runs still anneal.
    ``epoch_cosine_t_max`` (an int >= 1) instead keeps the lr constant within an epoch and steps a cosine of
    period ``T_max`` epochs after each epoch, as BackdoorBench's trainers do with ``CosineAnnealingLR(T_max)``:
    epoch ``e`` (0-based) uses ``lr * (1 + cos(pi * e / T_max)) / 2`` (past ``T_max`` the cosine rises again).
    ``bf16`` turns on bfloat16 autocast (CPU or accelerator); ``amp`` fp16 autocast on an accelerator.
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    device: str = "auto"
    augment: bool = True
    channels_last: bool = False
    bf16: bool = False
    amp: bool = True
    progress: bool = True
    epoch_cosine_t_max: int | None = None

    def __post_init__(self) -> None:
        t_max = self.epoch_cosine_t_max
        if t_max is not None and (not isinstance(t_max, int) or isinstance(t_max, bool) or t_max < 1):
            raise ValueError(f"epoch_cosine_t_max must be an integer >= 1 (BackdoorBench's per-epoch cosine T_max) "
                             f"or None (cosine over all steps, per iteration), got {t_max!r}")
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainHistory:
    """One dict per epoch: epoch, loss, train_acc, lr (after the epoch's scheduler steps), epoch_lr (the lr of
    the epoch's first step), seconds, plus whatever ``eval_fn`` returned."""

    epochs: list[dict] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return float(sum(e["seconds"] for e in self.epochs))


def _sgd(params: list[nn.Parameter], config: TrainConfig, fused: bool) -> torch.optim.SGD:
    """SGD as configured; ``fused``: the one-kernel version where the device has it (else the default one)."""
    kwargs = dict(lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if fused:
        try:
            return torch.optim.SGD(params, fused=True, **kwargs)
        except RuntimeError:  # a device without fused kernels
            pass
    return torch.optim.SGD(params, **kwargs)


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    spec: DatasetSpec,
    config: TrainConfig,
    eval_fn: Callable[[nn.Module], dict] | None = None,
    *,
    device: torch.device | None = None,
    progress: bool | None = None,
) -> TrainHistory:
    """Train ``model`` in place on uint8 ``images`` (N, C, H, W) and int64 ``labels``.

    ``eval_fn(model)`` runs after each epoch (e.g. test ACC/ASR) and its dict is merged into the history.
    ``device`` / ``progress``: the run's (:class:`~otbr_plugin.runtime.RunSettings`); when given they take the
    place of ``config.device`` / ``config.progress``, which are used only by callers without settings.

    On an accelerator the step never waits for the host: the uint8 data and labels are moved to the device once,
    shuffling and augmentation draw from a generator on the device (seeded with ``config.seed``), the loss and
    accuracy are summed on the device and read once per epoch, and SGD is the fused kernel (which also lets the
    fp16 gradient scaler skip its per-step check on the host). On the CPU every step is computed exactly as
    before these changes (same random draws, same arithmetic): CPU results are bit-identical.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    device = resolve_device(config.device) if device is None else device
    show = config.progress if progress is None else progress
    gen = seed_everything(config.seed)
    on_cpu = device.type == "cpu"
    if not on_cpu:  # the data, the shuffling and the augmentation's random numbers live on the device
        gen = torch.Generator(device).manual_seed(config.seed)
        images = images.to(device)
    labels = labels.long().to(device)
    model.to(device)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    pre = Preprocess(spec, train=config.augment, device=device, generator=gen)
    opt = _sgd(list(model.parameters()), config, fused=not on_cpu)
    steps_per_epoch = math.ceil(images.shape[0] / config.batch_size)
    per_epoch = config.epoch_cosine_t_max is not None
    t_max = config.epoch_cosine_t_max if per_epoch else config.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max)
    use_scaler = config.amp and not config.bf16 and device.type != "cpu"
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    history = TrainHistory()
    for epoch in range(1, config.epochs + 1):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(images.shape[0], generator=gen, device=gen.device)
        # summed on the device, read once per epoch; float64 sums of the float32 losses give the same numbers as
        # summing Python floats did
        total_loss = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        epoch_lr = opt.param_groups[0]["lr"]
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{config.epochs}", disable=not show, leave=False)
        for step in bar:
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            x = pre(images[idx]).contiguous(memory_format=memory_format)
            y = labels[idx]
            with autocast_context(device, bf16=config.bf16, amp=config.amp):
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if not per_epoch:
                sched.step()
            total_loss += loss.detach().double() * len(idx)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(idx)
            if show and step % 20 == 0:  # reading the sums waits for the device: only for a visible bar
                bar.set_postfix(loss=f"{float(total_loss) / seen:.3f}", acc=f"{int(correct) / seen:.3f}")
        epoch_loss, epoch_correct = float(total_loss), int(correct)  # waits for the epoch's last step
        if per_epoch:  # after the epoch's updates, as BackdoorBench's trainers step it
            sched.step()
        record = {
            "epoch": epoch,
            "loss": epoch_loss / seen,
            "train_acc": epoch_correct / seen,
            "lr": opt.param_groups[0]["lr"],
            "epoch_lr": epoch_lr,
            "seconds": time.perf_counter() - start,
        }
        if eval_fn is not None:
            record.update(eval_fn(model))
        history.epochs.append(record)
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    return history
