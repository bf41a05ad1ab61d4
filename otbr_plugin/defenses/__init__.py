"""Defenses behind one interface, and their registry."""

from .base import CleanData, Defense, DefenseConfig, DefenseContext, DefenseOutcome, StageTimer, build_context
from .registry import create_defense, get_defense, list_defenses, register_defense, unavailable_defenses

__all__ = [
    "CleanData", "Defense", "DefenseConfig", "DefenseContext", "DefenseOutcome", "StageTimer", "build_context",
    "create_defense", "get_defense", "list_defenses", "register_defense", "unavailable_defenses",
]
