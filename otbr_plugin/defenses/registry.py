"""Defense registry: ``register_defense``, ``get_defense``, ``create_defense``, ``list_defenses``.

The built-in defenses are imported on first use. OTBR needs POT: where it is missing, ``list_defenses()`` still
lists ``otbr`` (``unavailable_defenses()`` says why) and ``get_defense("otbr")`` fails naming the package.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..registry import Registry
from .base import Defense, DefenseConfig

__all__ = ["DEFENSES", "register_defense", "get_defense", "create_defense", "list_defenses", "unavailable_defenses"]

DEFENSES: Registry[type[Defense]] = Registry("defense", builtins={
    "ibau": "otbr_plugin.defenses.ibau", "rnp": "otbr_plugin.defenses.rnp", "sau": "otbr_plugin.defenses.sau",
    "none": "otbr_plugin.defenses.none", "otbr": "otbr_plugin.defenses.otbr", "clp": "otbr_plugin.defenses.clp",
    "fp": "otbr_plugin.defenses.fp", "anp": "otbr_plugin.defenses.anp",
    "ep": "otbr_plugin.defenses.ep", "ft": "otbr_plugin.defenses.ft", "nad": "otbr_plugin.defenses.nad",
})


def register_defense(cls: type[Defense]) -> type[Defense]:
    """Class decorator: register a :class:`Defense` subclass under its ``name``."""
    return DEFENSES.register(cls)


def list_defenses() -> list[str]:
    """Every defense name, including those whose optional dependency is missing."""
    return DEFENSES.list()


def unavailable_defenses() -> dict[str, str]:
    """Defenses that cannot run here, with the package to install."""
    return DEFENSES.unavailable()


def get_defense(name: str) -> type[Defense]:
    return DEFENSES.get(name)


def create_defense(name: str, config: DefenseConfig | Mapping[str, Any] | None = None, **overrides: Any) -> Defense:
    return get_defense(name)(config, **overrides)
