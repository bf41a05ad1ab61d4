"""A timm-style model registry."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Protocol

from torch import nn

from ..registry import Registry

__all__ = ["MODELS", "register_model", "create_model", "list_models", "ModelConfig"]


class ModelFactory(Protocol):
    def __call__(self, num_classes: int, in_channels: int, image_size: int, width: float) -> nn.Module: ...


MODELS: Registry[ModelFactory] = Registry("model", builtins={
    "preactresnet18": "otbr_plugin.models.preact_resnet", "vgg19_bn": "otbr_plugin.models.vgg",
    "smallcnn": "otbr_plugin.models.small"})


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: register ``factory(num_classes, in_channels, image_size, width)`` under ``name``."""
    return MODELS.register(name)


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return MODELS.list()


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a zoo model; stored in bundles and run records."""

    name: str
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    width: float = 1.0

    def build(self) -> nn.Module:
        return create_model(self.name, self.num_classes, self.in_channels, self.image_size, self.width)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {k: data[k] for k in ("name", "num_classes", "in_channels", "image_size", "width") if k in data}
        if "name" not in known:
            raise ValueError("model config needs a 'name'")
        return cls(**known)


def create_model(
    name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: float = 1.0
) -> nn.Module:
    """Build a registered model.

    Args:
        name: one of :func:`list_models`.
        num_classes: size of the output layer.
        in_channels: 1 (grey) or 3 (colour) input channels.
        image_size: input height = width in pixels (the model must be able to take it).
        width: channel multiplier; 1.0 is the published architecture, 0.25 a CPU-sized one.
    """
    factory = MODELS.get(name)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    if not (0 < float(width) <= 4):
        raise ValueError(f"width must be in (0, 4], got {width!r}")
    return factory(num_classes=num_classes, in_channels=in_channels, image_size=image_size, width=float(width))


def scaled(channels: int, width: float) -> int:
    """Channel count after the width multiplier (at least 1)."""
    return max(1, int(round(channels * width)))
