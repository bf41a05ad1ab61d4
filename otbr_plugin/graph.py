"""Graph facts of a network read from its ``torch.fx`` dataflow graph, shared by the method and the baselines.

One place for tracing (with a clear error), for the set of channel-wise operations (they keep channel k in
channel k), for residual additions, and for walking back from a node to the conv/linear that produces its
channels. OTBR's fusion (:mod:`otbr_plugin.otbr.fusion`) and the baselines' structure analysis
(:mod:`otbr_plugin.defenses.structure`) both build on it.
"""

from __future__ import annotations

import operator
from typing import Mapping

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["trace", "is_add", "walk_back", "CHANNELWISE_MODULES", "CHANNELWISE_FUNCTIONS", "CHANNELWISE_METHODS"]

#: modules, functions and tensor methods that keep channel k in channel k (flatten keeps it channel-major)
CHANNELWISE_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.GELU, nn.SiLU,
                       nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout,
                       nn.Identity, nn.Flatten)
CHANNELWISE_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu, F.gelu, F.silu, torch.flatten, F.max_pool2d,
                         F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout}
CHANNELWISE_METHODS = {"relu", "flatten", "view", "reshape", "contiguous"}
_ADD_TARGETS = {operator.add, operator.iadd, torch.add}


class _NamingTracer(fx.Tracer):
    """``torch.fx`` tracer that remembers which submodule's ``forward`` it is in, so a failure can name it."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m))
        result = super().call_module(m, forward, args, kwargs)
        self.stack.pop()
        return result


def trace(model: nn.Module, hint: str = "") -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` with an error that says what is wrong: the innermost layer (module name and
    type) whose ``forward`` could not be followed, and ``hint`` (what the caller can do)."""
    tracer = _NamingTracer()
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises many kinds of errors on data-dependent control flow
        mods = dict(model.named_modules())
        layer = tracer.stack[-1] if tracer.stack else ""
        where = (f"layer {layer!r} ({type(mods[layer]).__name__})" if layer in mods
                 else f"the top-level forward of {type(model).__name__}")
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(
            f"cannot follow {type(model).__name__} with torch.fx: {where} fails to trace ({type(err).__name__}: "
            f"{first}); the graph analysis needs a traceable forward (no data-dependent control flow)."
            f"{' ' + hint if hint else ''}"
        ) from err
    return fx.GraphModule(model, graph, type(model).__name__)


def is_add(node: fx.Node) -> bool:
    """A residual addition (``a + b``, ``torch.add``, ``a.add(b)``)."""
    return (node.op == "call_function" and node.target in _ADD_TARGETS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )


def walk_back(node: fx.Node, modules: Mapping[str, nn.Module]) -> tuple[str | None, list[str]]:
    """From ``node`` walk back through channel-wise operations; return the conv/linear that produces its
    channels (None: the network input, a residual sum or any other operation) and the batch norms passed."""
    bns: list[str] = []
    while True:
        if node.op == "call_module":
            mod = modules[node.target]
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                return node.target, bns
            if isinstance(mod, CHANNELWISE_MODULES):
                if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                    bns.append(node.target)
                node = node.args[0]
                continue
            return None, bns
        if node.op == "call_function" and node.target in CHANNELWISE_FUNCTIONS:
            node = node.args[0]
            continue
        if node.op == "call_method" and node.target in CHANNELWISE_METHODS:
            node = node.args[0]
            continue
        return None, bns
