"""The "no defense" row of every table: returns an unchanged copy of the model."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import Defense, DefenseConfig, DefenseContext, DefenseOutcome
from .registry import register_defense


@dataclass
class NoDefenseConfig(DefenseConfig):
    pass


@register_defense
class NoDefense(Defense):
    name = "none"
    config_class = NoDefenseConfig
    needs_clean_data = False
    description = "no defense (the backdoored model as it is)"

    def mitigate(self, model: nn.Module, context: DefenseContext) -> DefenseOutcome:
        return DefenseOutcome(model=self.copy_model(model, context.device), data_used="none", units_removed=0)
