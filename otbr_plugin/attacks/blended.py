"""Blended (Chen et al., 2017): blend a fixed trigger image into the input with alpha 0.2, dirty label."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Attack, AttackConfig
from .registry import register_attack
from .triggers import blend, check_images, load_trigger_image, noise_pattern


@dataclass
class BlendedConfig(AttackConfig):
    """``alpha`` 0.2 (BackdoorBench). The trigger is ``trigger_image`` (a file, converted to the dataset's
    channels and resized) or, when that is null, a uniform random-noise pattern generated from
    ``pattern_seed`` (the Blended paper's random-pattern key)."""

    alpha: float = 0.2
    trigger_image: str | None = None
    pattern_seed: int = 0

    def validate(self) -> None:
        super().validate()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be a number in (0, 1], got {self.alpha!r}")
        if self.trigger_image is not None and (not isinstance(self.trigger_image, str) or not self.trigger_image):
            raise ValueError(f"trigger_image must be a path or null, got {self.trigger_image!r}")
        if isinstance(self.pattern_seed, bool) or not isinstance(self.pattern_seed, int) or self.pattern_seed < 0:
            raise ValueError(f"pattern_seed must be a non-negative integer, got {self.pattern_seed!r}")


@register_attack
class Blended(Attack):
    name = "blended"
    config_cls = BlendedConfig
    description = "alpha-blend a fixed noise pattern or image (Chen et al. 2017)"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._patterns: dict[tuple[int, int, int], torch.Tensor] = {}

    def pattern(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """The trigger image, uint8 (C, H, W), for inputs of ``shape``."""
        shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
        if shape not in self._patterns:
            cfg: BlendedConfig = self.config  # type: ignore[assignment]
            if cfg.trigger_image is not None:
                self._patterns[shape] = load_trigger_image(cfg.trigger_image, shape)
            else:
                self._patterns[shape] = noise_pattern(shape, cfg.pattern_seed)
        return self._patterns[shape]

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        return blend(images, self.pattern(tuple(images.shape[1:])), float(self.config.alpha))  # type: ignore[attr-defined]
