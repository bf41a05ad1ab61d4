"""Data-free mean compensation after pruning or fusion (beyond the paper): BatchNorm statistics say what a layer's
output averaged over the training set, so the shift a defense causes in every batch norm's input can be computed
from the weights alone and taken out of that batch norm's running mean.

Why it matters. Zeroing a conv's output channel does not make it silent downstream: a batch norm reading the
channel now normalizes 0 with the old running mean ``mu`` and emits the constant ``beta - gamma * mu / sigma``
instead of values around ``beta``; on a residual stream every later block sees the sum shifted by the pruned
channel's mean. :func:`compensate_means` estimates each conv output's mean as ``sum W[c, k] * E[relu(BN_k)]``
(the conv reads ``relu(bn(.))``; ``E[relu(g z + b)]`` for ``z ~ N(0, 1)`` from the feeding batch norm's weight
and bias), once for the original and once for the defended model, and moves the running mean of every batch norm
whose input is a sum of conv outputs (through residual additions) by the difference. A pruned channel then
contributes its average, the "mean replacement" of pruning (Evci et al. 2018), without any data. With
``variance=True`` a batch norm that reads a single conv also rescales its running variance by the estimated change
of that conv's output variance (independent input channels), the data-free analogue of REPAIR (Jordan et al.
2022) for the variance collapse of interpolated neurons. The shifts are constants: they add no input-dependent
signal, but restoring a layer's operating point can re-enable a trigger path that pruning only disturbed
(measured in docs/otbr.md).

Pure: the defended model is copied, never modified; no dataset is read.
"""

from __future__ import annotations

import copy
import math
from typing import Mapping

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..graph import is_add, trace

__all__ = ["relu_gaussian_mean", "expected_conv_outputs", "compensate_means"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_PASS_MODULES = (nn.Identity, nn.Dropout)


def _normal_terms(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``|w|``, ``b`` (float64), ``Phi(b/|w|)`` and ``phi(b/|w|)`` (``w`` = 0 treated as 1; callers mask it)."""
    w, b = weight.double().abs(), bias.double()
    t = b / torch.where(w > 0, w, torch.ones_like(w))
    return w, b, 0.5 * (1 + torch.erf(t / math.sqrt(2))), torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)


def relu_gaussian_mean(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``E[relu(w z + b)]`` for ``z ~ N(0, 1)``, elementwise: ``b Phi(b/|w|) + |w| phi(b/|w|)`` (``relu(b)`` where
    ``w`` is 0)."""
    w, b, cdf, pdf = _normal_terms(weight, bias)
    return torch.where(w > 0, b * cdf + w * pdf, b.clamp_min(0))


def relu_gaussian_var(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``Var[relu(w z + b)]`` for ``z ~ N(0, 1)``, elementwise."""
    w, b, cdf, pdf = _normal_terms(weight, bias)
    second = (b * b + w * w) * cdf + b * w * pdf
    mean = b * cdf + w * pdf
    return torch.where(w > 0, (second - mean * mean).clamp_min(0), torch.zeros_like(b))


def _is_relu(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    return ((node.op == "call_module" and isinstance(modules[node.target], nn.ReLU))
            or (node.op == "call_function" and node.target in (F.relu, torch.relu))
            or (node.op == "call_method" and node.target == "relu"))


def _input_moments(node: fx.Node, modules: Mapping[str, nn.Module]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel mean and variance of a conv's input when it is ``relu(bn(.))`` or ``bn(.)``; None otherwise."""
    relu = _is_relu(node, modules)
    if relu:
        node = node.args[0]
    if not (node.op == "call_module" and isinstance(modules[node.target], _BN)):
        return None
    bn = modules[node.target]
    if bn.weight is None:  # on the model's device, like everything computed here
        ref = bn.running_mean if bn.running_mean is not None else torch.empty(0)
        w = torch.ones(bn.num_features, device=ref.device)
        b = torch.zeros_like(w)
    else:
        w, b = bn.weight.detach(), bn.bias.detach()
    if relu:
        return relu_gaussian_mean(w, b), relu_gaussian_var(w, b)
    return b.double(), w.double() ** 2


def expected_conv_outputs(model: nn.Module, graph: fx.Graph | None = None
                          ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The estimated per-channel mean and variance (float64) of the output of every ``Conv2d`` whose input is
    ``[relu](bn(.))``; the variance assumes independent input channels, each constant over a kernel window."""
    graph = graph if graph is not None else trace(model, "mean compensation follows the graph").graph
    modules = dict(model.named_modules())
    means = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.Conv2d):
            continue
        conv = modules[node.target]
        moments = _input_moments(node.args[0], modules)
        if moments is None or conv.groups != 1 or moments[0].numel() != conv.in_channels:
            continue
        kernel = conv.weight.detach().double().sum(dim=(2, 3))
        out = kernel @ moments[0] + (conv.bias.detach().double() if conv.bias is not None else 0.0)
        means[node.target] = (out, (kernel * kernel) @ moments[1])
    return means


def _linear_sources(node: fx.Node, modules: Mapping[str, nn.Module]) -> list[str]:
    """Convs whose outputs add up (through residual additions and identities) to ``node``; other terms omitted."""
    if node.op == "call_module":
        mod = modules[node.target]
        if isinstance(mod, nn.Conv2d):
            return [node.target]
        if isinstance(mod, _PASS_MODULES):
            return _linear_sources(node.args[0], modules)
        return []
    if is_add(node):
        return [s for a in node.args if isinstance(a, fx.Node) for s in _linear_sources(a, modules)]
    return []


def compensate_means(original: nn.Module, defended: nn.Module, variance: bool = False
                     ) -> tuple[nn.Module, dict[str, float]]:
    """A copy of ``defended`` whose batch norms' running means absorb the change in their inputs' expected value
    caused by the defense (estimated from each model's weights and batch-norm parameters); returns it and, per
    batch norm moved, the largest shift. A batch norm whose running mean the defense already changed (OTBR
    transports the statistics attached to a fused layer) is left alone. Models of the same architecture; no data
    is used."""
    repaired = copy.deepcopy(defended)
    graph = trace(repaired, "mean compensation follows the graph").graph
    before = expected_conv_outputs(original, graph)
    after = expected_conv_outputs(repaired, graph)
    modules = dict(repaired.named_modules())
    kept = dict(original.named_modules())
    shifts: dict[str, float] = {}
    with torch.no_grad():
        for node in graph.nodes:
            if node.op != "call_module" or not isinstance(modules[node.target], _BN):
                continue
            bn = modules[node.target]
            if bn.running_mean is None or not torch.equal(bn.running_mean, kept[node.target].running_mean):
                continue  # statistics the defense rewrote itself (OTBR's transported BNs) are left as they are
            delta = torch.zeros(bn.num_features, dtype=torch.float64, device=bn.running_mean.device)
            sources = [s for s in _linear_sources(node.args[0], modules)
                       if s in before and s in after and before[s][0].numel() == bn.num_features]
            for src in sources:
                delta += after[src][0] - before[src][0]
            if variance and bn.running_var is not None and sources == [node.args[0].target]:
                ratio = after[sources[0]][1] / before[sources[0]][1].clamp_min(1e-12)
                ratio = torch.where(after[sources[0]][1] > 0, ratio, torch.ones_like(ratio))
                bn.running_var.mul_(ratio.to(bn.running_var.dtype))
            if bool(delta.abs().gt(0).any()):
                bn.running_mean.add_(delta.to(bn.running_mean.dtype))
                shifts[node.target] = float(delta.abs().max())
    return repaired, shifts
