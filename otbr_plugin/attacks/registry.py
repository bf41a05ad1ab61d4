"""Attack registry (timm-style): ``register_attack``, ``get_attack``, ``create_attack``, ``list_attacks``."""

from __future__ import annotations

from typing import Any, Mapping

from ..registry import Registry
from .base import Attack, AttackConfig

__all__ = ["ATTACKS", "register_attack", "get_attack", "create_attack", "list_attacks"]

ATTACKS: Registry[type[Attack]] = Registry("attack", case_insensitive=True, builtins={
    name: f"otbr_plugin.attacks.{name}" for name in ("badnets", "blended", "sig", "wanet")})


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator: register an :class:`Attack` subclass under its ``name``."""
    return ATTACKS.register(cls)


def list_attacks() -> list[str]:
    """Names of all registered attacks, sorted."""
    return ATTACKS.list()


def get_attack(name: str) -> type[Attack]:
    """The attack class registered under ``name`` (case-insensitive)."""
    return ATTACKS.get(name)


def create_attack(name: str, config: AttackConfig | Mapping[str, Any] | None = None, **overrides: Any) -> Attack:
    """Build attack ``name`` from a config object or mapping (validated), plus keyword overrides."""
    return get_attack(name)(config, **overrides)
