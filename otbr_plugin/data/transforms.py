"""Batched image transforms that run on tensors on the model's device.

Images stay uint8 (N, C, H, W) until the last moment; :class:`Preprocess` turns a uint8 batch into the
model's normalized float input, with random crop + flip for training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .specs import DatasetSpec

__all__ = ["to_float", "normalize", "denormalize", "random_crop", "crop_at", "torchvision_crop_flip_draws",
           "random_hflip", "Normalizer", "DeviceNormalizer", "Preprocess"]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return images.float().div_(255.0)


def _stats(values: Sequence[float], x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    if t.shape[1] not in (1, x.shape[1]):
        raise ValueError(f"{t.shape[1]} normalization values for {x.shape[1]} channels")
    return t


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel."""
    return (x - _stats(mean, x)) / _stats(std, x)


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Inverse of :func:`normalize`."""
    return x * _stats(std, x) + _stats(mean, x)


def _draw_device(generator: torch.Generator | None) -> torch.device:
    """Where random numbers are drawn: on the generator's device (the default generator's: the CPU)."""
    return generator.device if generator is not None else torch.device("cpu")


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop back to the original size at a random offset per image.

    The offsets are drawn on ``generator``'s device (a generator on the images' device keeps the step off the
    host) and moved to the images' device."""
    if padding <= 0:
        return x
    n = x.shape[0]
    src = _draw_device(generator)
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=src)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=src)
    return crop_at(x, padding, oy, ox)


def crop_at(x: torch.Tensor, padding: int, oy: torch.Tensor, ox: torch.Tensor) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop back to the original size, image i at row offset ``oy[i]`` and column
    offset ``ox[i]`` (each in [0, 2 * padding]) of the padded image."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    oy, ox = oy.to(x.device), ox.to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device)[None])[:, None, :, None]  # (n,1,h,1)
    cols = (ox[:, None] + torch.arange(w, device=x.device)[None])[:, None, None, :]  # (n,1,1,w)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def torchvision_crop_flip_draws(n: int, padding: int, hflip: bool, generator: torch.Generator
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The draws of torchvision's ``RandomCrop(size, padding)`` (then ``RandomHorizontalFlip()`` when ``hflip``)
    applied image by image, as a training transform in a data loader makes them: per image a row offset, a column
    offset (each ``torch.randint(0, 2 * padding + 1, (1,))``) and, with ``hflip``, one ``torch.rand(1)`` (flip when
    < 0.5), all on the CPU ``generator`` in that order. Returns (row offsets, column offsets, flips) for
    :func:`crop_at`. No crop draws for ``padding`` 0 (torchvision draws none when the crop is the whole image)."""
    oy, ox = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    flip = torch.zeros(n, dtype=torch.bool)
    for i in range(n):
        if padding > 0:
            oy[i] = torch.randint(0, 2 * padding + 1, (1,), generator=generator)
            ox[i] = torch.randint(0, 2 * padding + 1, (1,), generator=generator)
        if hflip:
            flip[i] = bool(torch.rand(1, generator=generator) < 0.5)
    return oy, ox, flip


def random_hflip(x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image left-right with probability ``p`` (drawn on ``generator``'s device)."""
    flip = torch.rand(x.shape[0], generator=generator, device=_draw_device(generator)) < p
    flip = flip.to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


MEAN_BOUND = 10.0
"""Largest |mean| accepted: inputs are in [0, 1], so a mean beyond +-10 is not a normalization of them."""
STD_BOUNDS = (1e-3, 10.0)
"""Accepted range of each std: below 1e-3 a pixel step of 1/255 becomes > 3.9 units (an input blown up, or a
std of 1e-300 that overflows to inf), above 10 the inputs are squashed to nothing. Every dataset's BackdoorBench
value lies in [0.19, 0.31]."""


def check_normalization(mean: Sequence[float], std: Sequence[float]) -> None:
    """Mean and std of a normalization: same length >= 1, finite numbers, |mean| <= :data:`MEAN_BOUND` and std
    within :data:`STD_BOUNDS` (ValueError saying which value is wrong and what is expected)."""
    try:
        m, s = [float(v) for v in mean], [float(v) for v in std]
    except (TypeError, ValueError):
        raise ValueError(f"normalization mean/std must be lists of numbers, got {mean!r:.60} / {std!r:.60}") from None
    if not m or len(m) != len(s):
        raise ValueError(f"normalization mean and std must have the same length >= 1, got {len(m)} and {len(s)}")
    for v in m:
        if not math.isfinite(v) or abs(v) > MEAN_BOUND:
            raise ValueError(f"normalization mean {v:g} is out of range: expected a finite number in "
                             f"[-{MEAN_BOUND:g}, {MEAN_BOUND:g}] (inputs are in [0, 1])")
    for v in s:
        if not math.isfinite(v) or not STD_BOUNDS[0] <= v <= STD_BOUNDS[1]:
            raise ValueError(f"normalization std {v:g} is out of range: expected a finite number in "
                             f"[{STD_BOUNDS[0]:g}, {STD_BOUNDS[1]:g}]")


@dataclass(frozen=True)
class Normalizer:
    """The model's input normalization (mean/std per channel); part of every defense context."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        check_normalization(self.mean, self.std)

    @classmethod
    def for_dataset(cls, spec: DatasetSpec) -> "Normalizer":
        return cls(tuple(spec.mean), tuple(spec.std))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.mean, self.std)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return denormalize(x, self.mean, self.std)

    def on(self, device: torch.device | str) -> "DeviceNormalizer":
        """The same normalization with its constants made once on ``device``, for loops over batches (building
        them per batch is a host-to-device copy that makes an accelerator wait)."""
        return DeviceNormalizer(self, torch.device(device))


class DeviceNormalizer:
    """A :class:`Normalizer` whose float32 mean/std tensors are already on one device; same results."""

    def __init__(self, normalizer: Normalizer, device: torch.device) -> None:
        self.normalizer = normalizer
        self.mean = torch.as_tensor(normalizer.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.as_tensor(normalizer.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device != self.mean.device or x.dtype != self.mean.dtype or self.mean.shape[1] not in (1, x.shape[1]):
            return self.normalizer(x)  # another device or dtype: the plain path (and its checks)
        return (x - self.mean) / self.std


class Preprocess:
    """uint8 batch -> normalized float batch on ``device``; ``train=True`` adds crop (+ flip if allowed)."""

    def __init__(self, spec: DatasetSpec, train: bool, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> None:
        self.spec = spec
        self.train = train
        self.device = torch.device(device)
        self.generator = generator
        self.normalizer = Normalizer.for_dataset(spec)
        self._normalize = self.normalizer.on(self.device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = to_float(images.to(self.device, non_blocking=True))
        if self.train:
            x = random_crop(x, self.spec.crop_padding, self.generator)
            if self.spec.hflip:
                x = random_hflip(x, 0.5, self.generator)
        return self._normalize(x)
