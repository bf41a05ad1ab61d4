"""OTBR (Lin et al., AAAI 2025, arXiv 2408.15861): data-free backdoor mitigation.

Pure functions for each stage -- :mod:`.unlearning` (random unlearning on noise, NWC), :mod:`.pruning`
(global NWC ranking, zeroing the top gamma), :mod:`.fusion` (pruned-to-backdoored OT fusion), :mod:`.diagnostics` (the paper's
analyses: data unlearning, NWC correlation, AUC, weight norms). Tensors and
modules in, tensors and modules out: this package imports nothing from the harness. The thin defense class
registered as ``"otbr"`` is :class:`otbr_plugin.defenses.otbr.OTBRDefense`.
"""

from .fusion import FusionResult, LayerLink, align_input, fuse_models, target_masses, trace_links, transport_plan
from .pruning import global_ranking, num_to_prune, nwc_table, prune_neurons, select_top_neurons
from .unlearning import (
    UnlearningResult,
    gradient_ascent,
    neuron_weight_change,
    nwc_scores,
    random_unlearning,
    sample_unlearning_batch,
    target_layer_names,
)

__all__ = [
    "sample_unlearning_batch", "random_unlearning", "gradient_ascent", "UnlearningResult", "target_layer_names",
    "neuron_weight_change", "nwc_scores",
    "num_to_prune", "global_ranking", "select_top_neurons", "prune_neurons", "nwc_table",
    "LayerLink", "trace_links", "target_masses", "transport_plan", "align_input", "fuse_models", "FusionResult",
]
