"""Attacks that build backdoored checkpoints: BadNets, Blended, SIG, WaNet.

``create_attack(name, config)`` builds one; ``attack.poison_train(images, labels, K)`` gives the poisoned
training set (with its poisoned indices) and ``attack.poison_test(images, labels, K)`` the poisoned test set.
Triggers are pure functions in :mod:`otbr_plugin.attacks.triggers`.
"""

from .base import LABEL_MODES, Attack, AttackConfig, PoisonedTrainSet, attack_targets, select_poison_indices
from .registry import create_attack, get_attack, list_attacks, register_attack
from . import badnets, blended, sig, wanet  # noqa: F401  (registers the attacks)
from .badnets import BadNets, BadNetsConfig
from .blended import Blended, BlendedConfig
from .sig import SIG, SIGConfig
from .wanet import WaNet, WaNetConfig

__all__ = [
    "Attack", "AttackConfig", "PoisonedTrainSet", "attack_targets", "select_poison_indices", "LABEL_MODES",
    "register_attack", "get_attack", "create_attack", "list_attacks",
    "BadNets", "BadNetsConfig", "Blended", "BlendedConfig", "SIG", "SIGConfig", "WaNet", "WaNetConfig",
]
