"""The Python API: defend any ``nn.Module`` and evaluate it, without bundles, files or the CLI.

``defend`` resolves and validates the config exactly as ``otbr-bench defend`` does
(:func:`~otbr_plugin.config.resolve_config`: built-in defaults < the packaged YAML of ``dataset`` < ``config``
< keyword overrides) and runs :func:`~otbr_plugin.bench.runner.defend_model`, the function under the CLI, the
grid and the BackdoorBench face. ``evaluate`` is :func:`~otbr_plugin.metrics.evaluate_backdoor` on tensors.

Images are uint8 pixels (N, C, H, W) as tensors or numpy arrays; the model takes them normalized with
``mean``/``std`` (as BackdoorBench's models do), which the API applies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .bench import runner
from .config import resolve_config
from .data.subsets import CleanData
from .data.transforms import Normalizer
from .defenses import get_defense
from .defenses.base import DefenseOutcome
from .metrics import BackdoorMetrics, evaluate_backdoor
from .runtime import RunSettings

__all__ = ["defend", "evaluate"]

ArrayLike = torch.Tensor | np.ndarray


def _images(x: ArrayLike, what: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dtype != torch.uint8 or t.dim() != 4:
        raise ValueError(f"{what} must be uint8 pixels of shape (N, C, H, W), got {t.dtype} {tuple(t.shape)}")
    return t.cpu()


def _labels(y: ArrayLike, n: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(y)
    if t.shape != (n,) or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{what} must be {n} integer labels, got {t.dtype} {tuple(t.shape)}")
    return t.long().cpu()


def _normalizer(mean: Sequence[float], std: Sequence[float], channels: int | None = None) -> Normalizer:
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != len(std) or (channels is not None and len(mean) != channels):
        raise ValueError(f"mean {mean} and std {std} need one value per input channel ({channels})")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {std}")
    return Normalizer(mean, std)


def defend(
    model: nn.Module,
    defense: str = "otbr",
    *,
    input_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: str | torch.device = "auto",
    clean_data: CleanData | tuple[ArrayLike, ArrayLike] | None = None,
    seed: int = 0,
    progress: bool = False,
    dataset: str | None = None,
    config: str | Path | Mapping[str, Any] | None = None,
    **overrides: Any,
) -> DefenseOutcome:
    """Run a registered defense on ``model`` (left untouched) and return the outcome: ``outcome.model`` (the
    defended copy, eval mode, on ``device``), ``outcome.diagnostics``, ``outcome.tables``,
    ``outcome.stage_seconds`` and ``outcome.seconds``.

    ``input_shape``: (C, H, W) of one image; ``mean``/``std``: the normalization the model expects (per channel).
    ``clean_data``: ``(images uint8 (N, C, H, W), labels)`` from the *training* split, for the defenses that
    need it (fp, anp); the data-free ones (otbr, clp) refuse it. ``dataset``: a dataset name whose packaged
    config layer applies (as on the CLI); ``config``: a YAML file or mapping; ``overrides``: config fields
    (e.g. ``gamma=0.1``), validated like ``--set``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    resolved = resolve_config("defense", defense, dataset, config, dict(overrides))
    d = get_defense(defense)(resolved.values)
    if clean_data is not None and not isinstance(clean_data, CleanData):
        images, labels = clean_data
        images = _images(images, "clean_data images")
        clean_data = CleanData(images, _labels(labels, images.shape[0], "clean_data labels"))
    settings = RunSettings.from_args(device=device, seed=seed, progress=progress, apply=False)
    return runner.defend_model(model, d, num_classes=num_classes, input_shape=shape,  # type: ignore[arg-type]
                               normalizer=_normalizer(mean, std, shape[0]), device=settings.device,
                               seed=settings.seed, progress=settings.progress, clean_data=clean_data, dataset=dataset)


def evaluate(
    model: nn.Module,
    *,
    clean: tuple[ArrayLike, ArrayLike],
    poisoned: tuple[ArrayLike, ArrayLike, ArrayLike],
    mean: Sequence[float],
    std: Sequence[float],
    device: str | torch.device = "auto",
    batch_size: int | None = None,
) -> BackdoorMetrics:
    """ACC on ``clean = (images, labels)``; ASR (share predicted as the target) and RA (share predicted as the
    true label) on ``poisoned = (images, targets, true_labels)``. Images uint8 (N, C, H, W); fractions in [0, 1].
    ``batch_size``: default the harness's for the device (:func:`~otbr_plugin.metrics.predict`)."""
    images, labels = clean
    images = _images(images, "clean images")
    labels = _labels(labels, images.shape[0], "clean labels")
    bd_images, targets, true_labels = poisoned
    bd_images = _images(bd_images, "poisoned images")
    n = bd_images.shape[0]
    settings = RunSettings.from_args(device=device, apply=False)
    return evaluate_backdoor(model, images, labels, bd_images, _labels(targets, n, "poisoned targets"),
                             _labels(true_labels, n, "poisoned true labels"),
                             _normalizer(mean, std, images.shape[1]), batch_size, device=settings.device)
