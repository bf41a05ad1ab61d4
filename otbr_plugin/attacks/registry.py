"""Attack registry (timm-style): ``register_attack``, ``get_attack``, ``create_attack``, ``list_attacks``, and
``restore_attack`` (an attack rebuilt from a bundle's ``attack`` meta and state tensors)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

from ..registry import Registry
from .base import STATE_PREFIX, Attack, AttackConfig

__all__ = ["ATTACKS", "register_attack", "get_attack", "create_attack", "list_attacks", "restore_attack"]

BUILTIN_ATTACKS = ("badnets", "blended", "sig", "wanet", "inputaware", "lf", "trojannn", "ssba")
ATTACKS: Registry[type[Attack]] = Registry("attack", case_insensitive=True, builtins={
    name: f"otbr_plugin.attacks.{name}" for name in BUILTIN_ATTACKS})


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


def restore_attack(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> Attack:
    """The attack a bundle was made with: ``meta`` is the bundle's ``attack`` section (its ``name`` and config
    fields; bookkeeping keys such as ``poison_count`` are ignored) and ``tensors`` the bundle's extra tensors,
    of which those under ``attack.`` restore a learned trigger (LF's perturbation, TrojanNN's pattern,
    InputAware's generators)."""
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
        raise ValueError("restore_attack needs the bundle's attack section, a mapping with a 'name'")
    cls = get_attack(meta["name"])
    fields = {f.name for f in dataclasses.fields(cls.config_cls) if f.init}
    attack = cls({k: v for k, v in meta.items() if k in fields})
    state = {k[len(STATE_PREFIX):]: v for k, v in (tensors or {}).items() if k.startswith(STATE_PREFIX)}
    attack.load_state(state)
    return attack
