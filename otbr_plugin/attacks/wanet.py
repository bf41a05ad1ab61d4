"""WaNet (Nguyen & Tran, 2021): an imperceptible smooth warp, dirty label, with the noise ("cross") mode.

The trigger is the fixed warping grid ``clip((I + s * P / H) * grid_rescale, -1, 1)`` where ``P`` is a
``k x k`` random field (seeded by ``trigger_seed``) upsampled bicubically; images are warped with bilinear
``grid_sample``. Defaults are the paper's and BackdoorBench's: k=4, s=0.5, grid_rescale=1, cross_ratio=2.

Training set, and how it differs from the reference implementations (a documented choice): WaNet and
BackdoorBench poison *on the fly*: in every batch the first ``pratio`` share of samples is warped and
relabelled and the next ``cross_ratio * pratio`` share is warped with the grid plus fresh random noise
(labels kept). Here the same composition is fixed once per seed, so the poisoned set is a plain tensor
that the shared training loop consumes, its poisoned indices can be recorded, and a seed reproduces it
exactly: ``round(poison_ratio * N)`` samples (drawn like BadNets) are warped and relabelled, and
``round(cross_ratio * that)`` *other* samples are warped with their own noise grid (drawn from
``seed``) and keep their label. Each epoch therefore sees the same expected 10% / 20% / 70% mix as the
on-the-fly version, with noise that is fixed per sample instead of redrawn per epoch.
Poisoned images are stored as uint8 (rounded), like every other attack here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Attack, AttackConfig, PoisonedTrainSet, select_poison_indices
from .registry import register_attack
from .triggers import check_images, cross_grids, wanet_grid, wanet_noise_grid, warp


@dataclass
class WaNetConfig(AttackConfig):
    """k: control-grid size; s: warping strength; grid_rescale: grid scale; noise_mode / cross_ratio: the
    noise-mode samples (``cross_ratio`` times the number of poisoned samples); trigger_seed: the warp field."""

    k: int = 4
    s: float = 0.5
    grid_rescale: float = 1.0
    noise_mode: bool = True
    cross_ratio: float = 2.0
    trigger_seed: int = 0

    def validate(self) -> None:
        super().validate()
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an integer >= 1, got {self.k!r}")
        if isinstance(self.s, bool) or not isinstance(self.s, (int, float)) or self.s < 0:
            raise ValueError(f"s must be a number >= 0, got {self.s!r}")
        if isinstance(self.grid_rescale, bool) or not isinstance(self.grid_rescale, (int, float)) \
                or self.grid_rescale <= 0:
            raise ValueError(f"grid_rescale must be a number > 0, got {self.grid_rescale!r}")
        if isinstance(self.cross_ratio, bool) or not isinstance(self.cross_ratio, (int, float)) or self.cross_ratio < 0:
            raise ValueError(f"cross_ratio must be a number >= 0, got {self.cross_ratio!r}")
        if isinstance(self.trigger_seed, bool) or not isinstance(self.trigger_seed, int) or self.trigger_seed < 0:
            raise ValueError(f"trigger_seed must be a non-negative integer, got {self.trigger_seed!r}")


@register_attack
class WaNet(Attack):
    name = "wanet"
    config_cls = WaNetConfig
    description = "smooth image warping with noise mode (Nguyen & Tran 2021)"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._grids: dict[tuple[int, int], torch.Tensor] = {}

    def grid(self, height: int, width: int) -> torch.Tensor:
        """The backdoor warping grid (1, H, W, 2) for images of H x W."""
        key = (int(height), int(width))
        if key not in self._grids:
            cfg: WaNetConfig = self.config  # type: ignore[assignment]
            noise = wanet_noise_grid(cfg.k, key[0], key[1], cfg.trigger_seed)
            self._grids[key] = wanet_grid(noise, float(cfg.s), float(cfg.grid_rescale))
        return self._grids[key]

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        return warp(images, self.grid(images.shape[2], images.shape[3]))

    def cross_count(self, poison_count: int) -> int:
        cfg: WaNetConfig = self.config  # type: ignore[assignment]
        return int(round(cfg.cross_ratio * poison_count)) if cfg.noise_mode else 0

    def poison_train(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> PoisonedTrainSet:
        """Warp + relabel the poisoned samples; warp the noise-mode samples with per-sample noise grids."""
        base = super().poison_train(images, labels, num_classes)
        n_cross = self.cross_count(base.poison_count)
        if n_cross == 0:
            return base
        rest = torch.ones(labels.shape[0], dtype=torch.bool)
        rest[base.poison_indices] = False
        pool = torch.nonzero(rest).flatten()
        if n_cross > pool.numel():
            raise ValueError(f"wanet: cross_ratio {self.config.cross_ratio} asks for {n_cross} noise-mode samples "  # type: ignore[attr-defined]
                             f"but only {pool.numel()} unpoisoned samples remain; lower cross_ratio or poison_ratio")
        seed = self.config.seed
        cross = select_poison_indices(labels, n_cross, seed + 1, pool)
        grids = cross_grids(self.grid(images.shape[2], images.shape[3]), n_cross, seed + 2)
        base.images[cross] = warp(images[cross], grids)
        base.cross_indices = cross
        return base
