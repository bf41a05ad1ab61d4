"""A timm-style model registry."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

from torch import nn

from ..registry import Registry

__all__ = ["MODELS", "register_model", "create_model", "list_models", "model_options", "ModelConfig"]


class ModelFactory(Protocol):
    def __call__(self, num_classes: int, in_channels: int, image_size: int, width: float,
                 **args: Any) -> nn.Module: ...


MODELS: Registry[ModelFactory] = Registry("model", builtins={
    "preactresnet18": "otbr_plugin.models.preact_resnet", "vgg19_bn": "otbr_plugin.models.vgg",
    "smallcnn": "otbr_plugin.models.small", "resnet18": "otbr_plugin.models.resnet"})
_SHAPE_ARGS = ("num_classes", "in_channels", "image_size", "width")


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: register ``factory(num_classes, in_channels, image_size, width, **model_args)`` under ``name``;
    keyword parameters beyond the four shape arguments are the model's own options (e.g. resnet18's ``stem``)."""
    return MODELS.register(name)


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return MODELS.list()


def model_options(name: str) -> dict[str, Any]:
    """The model's own options (keyword parameters beyond the shape arguments) with their defaults."""
    params = inspect.signature(MODELS.get(name)).parameters
    return {k: p.default for k, p in params.items()
            if k not in _SHAPE_ARGS and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a zoo model; stored in bundles and run records. ``args``: the model's own
    options (e.g. ``{"stem": "cifar"}`` for resnet18); empty means the defaults, and is left out of
    :meth:`to_dict` so configs without options look as they always did."""

    name: str
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    width: float = 1.0
    args: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def build(self) -> nn.Module:
        return create_model(self.name, self.num_classes, self.in_channels, self.image_size, self.width,
                            **dict(self.args))

    def to_dict(self) -> dict:
        out = {"name": self.name, "num_classes": self.num_classes, "in_channels": self.in_channels,
               "image_size": self.image_size, "width": self.width}
        if self.args:
            out["args"] = dict(self.args)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        known = {k: data[k] for k in ("name", "num_classes", "in_channels", "image_size", "width") if k in data}
        if "name" not in known:
            raise ValueError("model config needs a 'name'")
        args = data.get("args") or {}
        if not isinstance(args, Mapping):
            raise ValueError(f"model args must be a mapping of option: value, got {args!r}")
        return cls(**known, args=dict(args))


def create_model(
    name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: float = 1.0,
    **args: Any,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: one of :func:`list_models`.
        num_classes: size of the output layer.
        in_channels: 1 (grey) or 3 (colour) input channels.
        image_size: input height = width in pixels (the model must be able to take it).
        width: channel multiplier; 1.0 is the published architecture, 0.25 a CPU-sized one.
        args: the model's own options (:func:`model_options`), e.g. ``stem="cifar"`` for resnet18.
    """
    factory = MODELS.get(name)
    known = model_options(name)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values())
    unknown = [] if takes_any else sorted(set(args) - set(known))
    if unknown:
        raise ValueError(f"model {name!r} has no option(s) {', '.join(unknown)}; its options: "
                         f"{', '.join(f'{k} (default {v!r})' for k, v in known.items()) or '(none)'}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    if not (0 < float(width) <= 4):
        raise ValueError(f"width must be in (0, 4], got {width!r}")
    return factory(num_classes=num_classes, in_channels=in_channels, image_size=image_size, width=float(width), **args)


def scaled(channels: int, width: float) -> int:
    """Channel count after the width multiplier (at least 1)."""
    return max(1, int(round(channels * width)))
