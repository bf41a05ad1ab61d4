"""Small helpers shared by the data-dependent baselines (FP, ANP): splitting the clean defense subset,
the dataset spec with the context's normalization, batched preprocessing."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from ..data.specs import DatasetSpec, get_dataset_spec
from ..data.subsets import stratified_indices
from ..data.transforms import crop_at, random_crop, random_hflip, to_float, torchvision_crop_flip_draws
from .base import CleanData, DefenseContext

__all__ = ["split_holdout", "context_spec", "preprocess_batch", "fill_setting", "FollowsSetting", "bb_tolerance_ok"]


def fill_setting(config: object, settings: dict[str, dict[str, object]]) -> None:
    """Fill the setting-dependent fields of ``config`` that are None from ``settings[config.setting]`` (in
    place); an unknown setting is a ValueError naming the valid ones."""
    name = getattr(config, "setting")
    if name not in settings:
        raise ValueError(f"{type(config).__name__}.setting must be one of {', '.join(map(repr, settings))}, "
                         f"got {name!r}")
    for key, value in settings[name].items():
        if getattr(config, key) is None:
            setattr(config, key, value)


class FollowsSetting:
    """Mixin for a defense config with a ``setting`` field and options declared None that follow it: the
    subclass sets ``SETTINGS`` (setting -> {option: value}); construction fills the options left at None, and
    :meth:`replace` re-derives them when ``setting`` changes (unless they are changed too)."""

    SETTINGS: ClassVar[dict[str, dict[str, Any]]] = {}

    def __post_init__(self) -> None:
        fill_setting(self, self.SETTINGS)
        super().__post_init__()  # type: ignore[misc]

    def replace(self, **changes: Any):
        data = self.to_dict()  # type: ignore[attr-defined]
        if "setting" in changes and changes["setting"] != getattr(self, "setting"):
            for key in next(iter(self.SETTINGS.values())):
                data[key] = None
        return self.from_dict({**data, **changes})  # type: ignore[attr-defined]


def bb_tolerance_ok(acc: float, acc_ori: float, acc_ratio: float) -> bool:
    """BackdoorBench's accuracy tolerance (FP's stopping rule, ANP's threshold choice): the relative change
    ``|acc - acc_ori| / acc_ori`` is strictly below ``acc_ratio`` -- two-sided (a rise stops it too) and strict.
    An unpruned accuracy of 0 makes the ratio undefined: only an unchanged accuracy passes then."""
    if acc_ori == 0:
        return acc == acc_ori and acc_ratio > 0
    return abs(acc - acc_ori) / acc_ori < acc_ratio


def split_holdout(clean: CleanData, ratio: float, seed: int) -> tuple[CleanData, CleanData]:
    """Split the clean defense subset into (fit, held-out) parts, stratified and seeded; ``ratio`` is the
    held-out share. Both parts come from the defense subset (the training split), never from test data."""
    if not 0 < ratio < 1:
        raise ValueError(f"held-out ratio must be in (0, 1), got {ratio!r}")
    if len(clean) < 2:
        raise ValueError(f"the clean defense subset has {len(clean)} sample(s); at least 2 are needed to hold some out")
    hold = stratified_indices(clean.labels, ratio, seed)
    if len(hold) >= len(clean):  # tiny subsets: keep at least one sample to fit on
        hold = hold[: len(clean) - 1]
    keep = torch.ones(len(clean), dtype=torch.bool)
    keep[hold] = False
    fit_idx = torch.nonzero(keep).flatten()
    return (CleanData(clean.images[fit_idx], clean.labels[fit_idx], clean.source),
            CleanData(clean.images[hold], clean.labels[hold], clean.source))


def context_spec(context: DefenseContext) -> DatasetSpec:
    """The dataset spec for training-style transforms, with the context's (the checkpoint's) normalization.

    Known dataset: its spec (crop padding, flip) with mean/std replaced; unknown: a spec from the context
    alone with crop padding 4 and no flip."""
    c, h, w = context.input_shape
    if context.dataset is not None:
        spec = get_dataset_spec(context.dataset)
    else:
        spec = DatasetSpec("custom", context.num_classes, c, h, context.normalizer.mean, context.normalizer.std,
                           hflip=False)
    return dataclasses.replace(spec, mean=tuple(context.normalizer.mean), std=tuple(context.normalizer.std))


def preprocess_batch(images: torch.Tensor, context: DefenseContext, augment: bool,
                     generator: torch.Generator | None = None, per_image: bool = False) -> torch.Tensor:
    """uint8 batch -> normalized float batch on the context's device; ``augment`` adds the dataset's random
    crop (and flip where the dataset allows it), as the training transforms of the reference code do.
    ``per_image``: draw the crop (and flip) image by image as torchvision's transforms in a data loader do
    (:func:`torchvision_crop_flip_draws`, on the CPU ``generator``); otherwise all row offsets, then all column
    offsets, then the flips, for the whole batch. Padding is zero in [0, 1] pixel space, before normalization,
    as torchvision's ``RandomCrop(padding=...)`` pads the image before ``ToTensor`` and ``Normalize``."""
    x = to_float(images.to(context.device))
    if augment:
        spec = context_spec(context)
        if per_image:
            oy, ox, flip = torchvision_crop_flip_draws(x.shape[0], spec.crop_padding, spec.hflip, generator)
            x = crop_at(x, spec.crop_padding, oy, ox)
            if spec.hflip:
                x = torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
        else:
            x = random_crop(x, spec.crop_padding, generator)
            if spec.hflip:
                x = random_hflip(x, 0.5, generator)
    return context.normalizer(x)


@torch.no_grad()
def clean_accuracy(model: "torch.nn.Module", data: CleanData, context: DefenseContext, batch_size: int) -> float:
    """Accuracy of ``model`` on clean defense data (never test data), in eval mode, batched."""
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        x = preprocess_batch(data.images[start:start + batch_size], context, augment=False)
        correct += int((model(x).argmax(1).cpu() == data.labels[start:start + batch_size]).sum())
    return correct / len(data)


@torch.no_grad()
def zero_channels(module: "torch.nn.Module", channels) -> None:
    """Zero the weight and bias (where present) of output ``channels`` of a conv or BN layer, in place."""
    for param in (getattr(module, "weight", None), getattr(module, "bias", None)):
        if param is not None:
            param[channels] = 0
