"""Attack registry (timm-style): ``register_attack``, ``get_attack``, ``create_attack``, ``list_attacks``."""

from __future__ import annotations

from typing import Any, Mapping

from .base import Attack, AttackConfig

__all__ = ["register_attack", "get_attack", "create_attack", "list_attacks"]

_REGISTRY: dict[str, type[Attack]] = {}


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator: register an :class:`Attack` subclass under its ``name``."""
    name = getattr(cls, "name", "")
    if not name:
        raise ValueError(f"{cls.__name__} has no 'name'")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"attack {name!r} is already registered")
    _REGISTRY[name] = cls
    return cls


def list_attacks() -> list[str]:
    """Names of all registered attacks, sorted."""
    return sorted(_REGISTRY)


def get_attack(name: str) -> type[Attack]:
    """The attack class registered under ``name`` (case-insensitive)."""
    key = str(name).lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown attack {name!r}; available: {', '.join(list_attacks())}")
    return _REGISTRY[key]


def create_attack(name: str, config: AttackConfig | Mapping[str, Any] | None = None, **overrides: Any) -> Attack:
    """Build attack ``name`` from a config object or mapping (validated), plus keyword overrides."""
    return get_attack(name)(config, **overrides)
