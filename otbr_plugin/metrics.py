"""ACC / ASR / RA (fractions in [0, 1]) and DER, computed batched under ``torch.inference_mode`` on any device."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .data.transforms import Normalizer, to_float
from .runtime import resolve_device

__all__ = ["NonFiniteOutputError", "BackdoorMetrics", "SampleCorrectness", "predict", "accuracy", "evaluate_backdoor",
           "defense_effectiveness_rating"]


class NonFiniteOutputError(ValueError):
    """A model produced NaN or infinite logits: an error, never a prediction (NaN argmaxes to class 0)."""


CPU_EVAL_BATCH = 512
"""Evaluation batch on the CPU (the batch every committed CPU result was computed with)."""
ACCELERATOR_EVAL_BATCH = 2048
"""Evaluation batch on an accelerator: larger batches keep it busy (inference holds no activations for backward)."""


def _on_device(model: nn.Module, device: torch.device) -> bool:
    """Whether every parameter and buffer of ``model`` is on ``device`` ("cuda" matches any "cuda:N")."""
    return all(t.device.type == device.type and (device.index is None or t.device.index == device.index)
               for t in (*model.parameters(), *model.buffers()))


def predict(
    model: nn.Module,
    images: torch.Tensor,
    normalizer: Normalizer,
    batch_size: int | None = None,
    *,
    device: torch.device | str,
    channels_last: bool | None = None,
) -> torch.Tensor:
    """Predicted class (int64, on CPU) for each uint8 image, computed on ``device`` (the run's device, from
    :class:`~otbr_plugin.runtime.RunSettings`). The caller's model is left where it was and in the mode it was in:
    a model already on ``device`` is used in place (eval mode, restored after), any other is evaluated as a
    copy moved to ``device``.

    ``batch_size``: default 512 on the CPU, :data:`ACCELERATOR_EVAL_BATCH` on an accelerator. ``channels_last``:
    evaluate a channels-last copy of the model on channels-last batches; default on an accelerator, off on the CPU
    (where it is faster too, but computes with other kernels: off keeps CPU results bit-identical). The images are
    moved to ``device`` once (uint8) and the predictions come back once, so an accelerator never waits for the host
    between batches. Always float32 (no autocast): metrics do not depend on a training precision. Runs under
    ``torch.inference_mode`` (the same kernels as ``no_grad``, so the same numbers, without autograd bookkeeping);
    the predictions returned are an ordinary tensor."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if batch_size is None:
        batch_size = CPU_EVAL_BATCH if dev.type == "cpu" else ACCELERATOR_EVAL_BATCH
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if channels_last is None:
        channels_last = dev.type != "cpu"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:  # a copy: the caller's model keeps its memory format
        net = copy.deepcopy(model).to(dev, memory_format=fmt)
    else:
        net = model if _on_device(model, dev) else copy.deepcopy(model).to(dev)
    was_training = model.training
    net.eval()
    normalize = normalizer.on(dev)
    data = images.to(dev)
    out = []
    finite = torch.ones((), dtype=torch.bool, device=dev)  # checked once at the end: no host sync per batch
    try:
        with torch.inference_mode():
            for start in range(0, data.shape[0], batch_size):
                x = normalize(to_float(data[start : start + batch_size])).contiguous(memory_format=fmt)
                logits = net(x)
                finite &= torch.isfinite(logits).all()
                out.append(logits.argmax(1))
            preds = torch.cat(out).cpu() if out else torch.empty(0, dtype=torch.long)
            ok = bool(finite)
    finally:
        model.train(was_training)
    if not ok:
        raise NonFiniteOutputError("the model produced non-finite (NaN or infinite) logits; they are not scored "
                                   "as predictions")
    return preds.clone()  # outside inference mode: an ordinary tensor callers may modify in place


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of ``preds`` equal to ``labels``; an empty set is an error (a metric over nothing is undefined)."""
    if preds.shape != labels.shape:
        raise ValueError(f"preds {tuple(preds.shape)} and labels {tuple(labels.shape)} differ in shape")
    if preds.numel() == 0:
        raise ValueError("cannot compute a rate over zero samples")
    return float((preds == labels).float().mean())


@dataclass(frozen=True)
class BackdoorMetrics:
    """Clean accuracy, attack success rate and robust accuracy, each a fraction in [0, 1]."""

    acc: float
    asr: float
    ra: float

    def __post_init__(self) -> None:
        for name, v in asdict(self).items():
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a fraction in [0, 1], got {v}")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class SampleCorrectness:
    """Per-sample outcomes behind :class:`BackdoorMetrics` (bool tensors on the CPU, in the test sets' order):
    ``clean[i]`` = clean test sample i classified correctly; ``target[j]`` / ``true[j]`` = poisoned test sample j
    classified as the attack's target / as its true label. Their means are ACC, ASR and RA; bootstrap intervals
    (:mod:`otbr_plugin.aggregate.bootstrap`) resample them without running a model again."""

    clean: torch.Tensor
    target: torch.Tensor
    true: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("clean", "target", "true"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.bool or t.dim() != 1:
                raise ValueError(f"SampleCorrectness.{name} must be a 1-D bool tensor")
        if self.target.shape != self.true.shape:
            raise ValueError("SampleCorrectness.target and .true must cover the same poisoned samples")


def evaluate_backdoor(
    model: nn.Module,
    clean_images: torch.Tensor,
    clean_labels: torch.Tensor,
    bd_images: torch.Tensor,
    bd_targets: torch.Tensor,
    bd_original_labels: torch.Tensor,
    normalizer: Normalizer,
    batch_size: int | None = None,
    *,
    device: torch.device | str,
    channels_last: bool | None = None,
    return_samples: bool = False,
) -> BackdoorMetrics | tuple[BackdoorMetrics, SampleCorrectness]:
    """ACC on the clean test set; ASR = share of poisoned samples predicted as their target; RA = share
    predicted as their true label. ``device``: where to compute (the caller's model is not moved);
    ``batch_size`` / ``channels_last``: see :func:`predict`. ``return_samples``: also return the per-sample outcomes
    the rates are the means of (:class:`SampleCorrectness`, from the same predictions)."""
    clean_pred = predict(model, clean_images, normalizer, batch_size, device=device, channels_last=channels_last)
    bd_pred = predict(model, bd_images, normalizer, batch_size, device=device, channels_last=channels_last)
    labels, targets, original = clean_labels.cpu(), bd_targets.cpu(), bd_original_labels.cpu()
    metrics = BackdoorMetrics(acc=accuracy(clean_pred, labels), asr=accuracy(bd_pred, targets),
                              ra=accuracy(bd_pred, original))
    if not return_samples:
        return metrics
    return metrics, SampleCorrectness(clean_pred == labels, bd_pred == targets, bd_pred == original)


def defense_effectiveness_rating(before: BackdoorMetrics, after: BackdoorMetrics) -> float:
    """DER = (max(0, ASR_bd - ASR_def) - max(0, ACC_bd - ACC_def) + 1) / 2, in [0, 1]."""
    return (max(0.0, before.asr - after.asr) - max(0.0, before.acc - after.acc) + 1.0) / 2.0
