"""Attacks that build backdoored checkpoints: BadNets, Blended, SIG, WaNet (fixed triggers) and InputAware, LF,
TrojanNN, SSBA (learned triggers).

``create_attack(name, config)`` builds one; ``attack.prepare(context)`` computes a learned trigger from the clean
training set; ``attack.poison_train(images, labels, K)`` gives the poisoned training set (with its poisoned
indices) and ``attack.poison_test(images, labels, K)`` the poisoned test set; ``restore_attack(meta, tensors)``
rebuilds an attack, learned trigger included, from a bundle. Triggers are pure functions in
:mod:`otbr_plugin.attacks.triggers`.
"""

from .base import (LABEL_MODES, STATE_PREFIX, Attack, AttackConfig, AttackContext, PoisonedTrainSet, attack_targets,
                   select_poison_indices)
from .registry import create_attack, get_attack, list_attacks, register_attack, restore_attack
from . import badnets, blended, inputaware, lf, sig, ssba, trojannn, wanet  # noqa: F401  (registers the attacks)
from .badnets import BadNets, BadNetsConfig
from .blended import Blended, BlendedConfig
from .inputaware import InputAware, InputAwareConfig
from .lf import LF, LFConfig
from .sig import SIG, SIGConfig
from .ssba import SSBA, SSBAConfig
from .trojannn import TrojanNN, TrojanNNConfig
from .wanet import WaNet, WaNetConfig

__all__ = [
    "Attack", "AttackConfig", "AttackContext", "PoisonedTrainSet", "attack_targets", "select_poison_indices",
    "LABEL_MODES", "STATE_PREFIX",
    "register_attack", "get_attack", "create_attack", "list_attacks", "restore_attack",
    "BadNets", "BadNetsConfig", "Blended", "BlendedConfig", "SIG", "SIGConfig", "WaNet", "WaNetConfig",
    "InputAware", "InputAwareConfig", "LF", "LFConfig", "TrojanNN", "TrojanNNConfig",
    "SSBA", "SSBAConfig",
]
