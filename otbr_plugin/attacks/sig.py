"""SIG (Barni et al., 2019): clean-label; a horizontal sinusoid added to target-class training images."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Attack, AttackConfig
from .registry import register_attack
from .triggers import apply_sig, check_images


@dataclass
class SIGConfig(AttackConfig):
    """``delta`` 20 (on the 0..255 scale) and ``frequency`` 6 (periods across the image width), the SIG paper's
    sinusoidal setting. Only target-class training samples are poisoned and their labels are unchanged; the
    number poisoned is ``round(poison_ratio * N)`` (BackdoorBench's rule), so it cannot exceed the size of the
    target class. ``delta_test`` (null: same as ``delta``) is the amplitude used on test images (the paper
    allows a stronger test-time signal); it changes nothing in training."""

    delta: float = 20.0
    frequency: float = 6.0
    delta_test: float | None = None

    def validate(self) -> None:
        super().validate()
        if self.label_mode != "all2one":
            raise ValueError("SIG is a clean-label attack and supports only label_mode 'all2one'")
        for name in ("delta", "frequency"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 255:
                raise ValueError(f"{name} must be a number in (0, 255], got {v!r}")
        if self.delta_test is not None and (isinstance(self.delta_test, bool) or not 0 < self.delta_test <= 255):
            raise ValueError(f"delta_test must be a number in (0, 255] or null, got {self.delta_test!r}")


@register_attack
class SIG(Attack):
    name = "sig"
    config_cls = SIGConfig
    clean_label = True
    description = "clean-label horizontal sinusoid on target-class images (Barni et al. 2019)"

    def poison_train_images(self, images: torch.Tensor) -> torch.Tensor:
        cfg: SIGConfig = self.config  # type: ignore[assignment]
        return apply_sig(images, float(cfg.delta), float(cfg.frequency))

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        cfg: SIGConfig = self.config  # type: ignore[assignment]
        delta = cfg.delta if cfg.delta_test is None else cfg.delta_test
        return apply_sig(images, float(delta), float(cfg.frequency))
