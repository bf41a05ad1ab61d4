"""BadNets (Gu et al., 2017): a white square patch in a corner, dirty label."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .base import Attack, AttackConfig
from .registry import register_attack
from .triggers import CORNERS, apply_patch, check_images, scaled_patch_size


@dataclass
class BadNetsConfig(AttackConfig):
    """BackdoorBench's default: a 3x3 white (255) square flush in the bottom-right corner at 32x32.

    ``patch_size`` None scales the side with the image (``round(3 * H / 32)``: 3 at 28 and 32, 6 at 64).
    """

    patch_size: int | None = None
    patch_value: int = 255
    corner: Literal["bottom_right", "bottom_left", "top_right", "top_left"] = "bottom_right"
    margin: int = 0

    def validate(self) -> None:
        super().validate()
        if self.patch_size is not None and (isinstance(self.patch_size, bool) or self.patch_size < 1):
            raise ValueError(f"patch_size must be an integer >= 1 or null (scaled), got {self.patch_size!r}")
        if isinstance(self.patch_value, bool) or not isinstance(self.patch_value, int) or not 0 <= self.patch_value <= 255:
            raise ValueError(f"patch_value must be an integer in 0..255, got {self.patch_value!r}")
        if self.corner not in CORNERS:
            raise ValueError(f"corner must be one of {', '.join(CORNERS)}, got {self.corner!r}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, int) or self.margin < 0:
            raise ValueError(f"margin must be a non-negative integer, got {self.margin!r}")


@register_attack
class BadNets(Attack):
    name = "badnets"
    config_cls = BadNetsConfig
    description = "white square patch in a corner (Gu et al. 2017)"

    def patch_size_for(self, image_size: int) -> int:
        cfg: BadNetsConfig = self.config  # type: ignore[assignment]
        return cfg.patch_size if cfg.patch_size is not None else scaled_patch_size(image_size)

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        cfg: BadNetsConfig = self.config  # type: ignore[assignment]
        size = self.patch_size_for(min(images.shape[2], images.shape[3]))
        return apply_patch(images, size, cfg.patch_value, cfg.corner, cfg.margin)
