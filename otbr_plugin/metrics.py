"""ACC / ASR / RA (fractions in [0, 1]) and DER, computed batched under no_grad on any device."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .data.transforms import Normalizer, to_float
from .runtime import resolve_device

__all__ = ["BackdoorMetrics", "predict", "accuracy", "evaluate_backdoor", "defense_effectiveness_rating"]


def _on_device(model: nn.Module, device: torch.device) -> bool:
    """Whether every parameter and buffer of ``model`` is on ``device`` ("cuda" matches any "cuda:N")."""
    return all(t.device.type == device.type and (device.index is None or t.device.index == device.index)
               for t in (*model.parameters(), *model.buffers()))


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    normalizer: Normalizer,
    batch_size: int = 512,
    *,
    device: torch.device | str,
) -> torch.Tensor:
    """Predicted class (int64, on CPU) for each uint8 image, computed on ``device`` (the run's device, from
    :class:`~otbr_plugin.runtime.RunSettings`). The caller's model is left where it was and in the mode it was in:
    a model already on ``device`` is used in place (eval mode, restored after), any other is evaluated as a
    copy moved to ``device``."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    net = model if _on_device(model, dev) else copy.deepcopy(model).to(dev)
    was_training = model.training
    net.eval()
    out = []
    try:
        for start in range(0, images.shape[0], batch_size):
            x = normalizer(to_float(images[start : start + batch_size].to(dev)))
            out.append(net(x).argmax(1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


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


def evaluate_backdoor(
    model: nn.Module,
    clean_images: torch.Tensor,
    clean_labels: torch.Tensor,
    bd_images: torch.Tensor,
    bd_targets: torch.Tensor,
    bd_original_labels: torch.Tensor,
    normalizer: Normalizer,
    batch_size: int = 512,
    *,
    device: torch.device | str,
) -> BackdoorMetrics:
    """ACC on the clean test set; ASR = share of poisoned samples predicted as their target; RA = share
    predicted as their true label. ``device``: where to compute (the caller's model is not moved)."""
    clean_pred = predict(model, clean_images, normalizer, batch_size, device=device)
    bd_pred = predict(model, bd_images, normalizer, batch_size, device=device)
    return BackdoorMetrics(
        acc=accuracy(clean_pred, clean_labels.cpu()),
        asr=accuracy(bd_pred, bd_targets.cpu()),
        ra=accuracy(bd_pred, bd_original_labels.cpu()),
    )


def defense_effectiveness_rating(before: BackdoorMetrics, after: BackdoorMetrics) -> float:
    """DER = (max(0, ASR_bd - ASR_def) - max(0, ACC_bd - ACC_def) + 1) / 2, in [0, 1]."""
    return (max(0.0, before.asr - after.asr) - max(0.0, before.acc - after.acc) + 1.0) / 2.0
