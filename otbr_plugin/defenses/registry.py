"""Defense registry: ``register_defense``, ``get_defense``, ``create_defense``, ``list_defenses``."""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from .base import Defense, DefenseConfig

__all__ = ["register_defense", "get_defense", "create_defense", "list_defenses"]

_REGISTRY: dict[str, type[Defense]] = {}

# modules that register built-in defenses when imported; a missing one is skipped
_BUILTIN_MODULES = ["otbr_plugin.defenses.none", "otbr_plugin.defenses.otbr", "otbr_plugin.defenses.clp",
                    "otbr_plugin.defenses.fp", "otbr_plugin.defenses.anp"]
_loaded = False


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name is None or not mod.startswith(err.name):  # a real import error inside an existing module: surface it
                raise


def register_defense(cls: type[Defense]) -> type[Defense]:
    """Class decorator: register a :class:`Defense` subclass under its ``name``."""
    name = getattr(cls, "name", None)
    if not name:
        raise ValueError(f"{cls.__name__} has no 'name'")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"defense {name!r} is already registered")
    _REGISTRY[name] = cls
    return cls


def list_defenses() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_defense(name: str) -> type[Defense]:
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown defense {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_defense(name: str, config: DefenseConfig | Mapping[str, Any] | None = None, **overrides: Any) -> Defense:
    return get_defense(name)(config, **overrides)
