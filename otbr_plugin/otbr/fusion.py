"""OTBR stage 4: pruned-to-backdoored optimal-transport fusion.

Layer by layer (from the first layer holding a pruned neuron to the last target layer), the pruned model's
neurons are aligned to the backdoored model's neurons by an optimal transport plan ``T`` (source mass
uniform, target mass proportional to the backdoored neurons' NWC, cost = Euclidean distance between neuron
weight vectors). The pruned weights are projected into the backdoored model's neuron order,
``A = diag(1 / T.sum(0)) T^T W_pruned`` (each backdoored neuron receives the transport-weighted mean of the
pruned neurons sent to it), and fused: ``W = lam * A + (1 - lam) * W_backdoored``. Because every fused layer
is expressed in the backdoored model's order, layers outside the fused range keep the backdoored weights.

Input side. Before a layer is aligned, its input dimension is re-expressed in the order its *producer* was
mapped to: ``W_pruned <- W_pruned @ T_prev / T_prev.sum(0)`` (Singh & Jaggi 2020, "OT fusion").
``residual="block"`` finds the producer from the traced graph: a layer whose input comes straight (through
BN/ReLU/pooling/flatten) from one conv/linear uses that layer's map; a layer whose input is a residual sum
(pre-activation ResNet's ``layerX.Y.conv1``, shortcut convs, the classifier) or the network input uses the
identity -- the stream adds branches aligned by different maps, so no single map describes it, and the
identity is the natural correspondence between a pruned model and the backdoored model it was cut from.
``residual="chain"`` (the published code) uses the previous target layer's map whatever the graph is.

``cost="aligned"`` measures the cost on the input-aligned pruned weights (Singh & Jaggi); ``"unaligned"``
(the published code) measures it on the raw pruned weights but still projects the input-aligned ones.

``attached="transport"`` carries the parameters that belong to an aligned neuron along with it: the layer's
bias and the batch norm that normalizes only this layer's output channels (affine and running statistics),
fused with the same ``lam``. ``"keep"`` (the published code) keeps the backdoored model's bias and BN.

The network's output layer (class logits), if it is a target layer, is never re-ordered: only its input side
is aligned. All transport and fusion arithmetic runs in float64 on the CPU; results are cast back.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

import numpy as np
import ot
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LayerLink",
    "trace_links",
    "target_masses",
    "transport_plan",
    "align_input",
    "FusionResult",
    "fuse_models",
]

CostMode = Literal["aligned", "unaligned"]
ResidualMode = Literal["block", "chain"]
AttachedMode = Literal["transport", "keep"]
Solver = Literal["emd", "sinkhorn"]
MassMode = Literal["nwc", "uniform"]

_PASS_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.MaxPool2d,
                 nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Identity, nn.Flatten)
_PASS_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu, F.gelu, F.silu, torch.flatten, F.max_pool2d, F.avg_pool2d,
                   F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout}
_PASS_METHODS = {"relu", "flatten", "view", "reshape", "contiguous"}


@dataclass(frozen=True)
class LayerLink:
    """How a target layer connects to the others.

    ``input_from``: the conv/linear whose output channels are this layer's input channels, or None (network
    input, a residual sum, anything else). ``input_repeat``: input features per producer channel (a Linear
    reading a flattened C x H x W map has H*W). ``attached``: batch norms that normalize exactly this layer's
    output channels. ``is_output``: the layer's outputs are the network's outputs.
    """

    name: str
    input_from: str | None = None
    input_repeat: int = 1
    attached: tuple[str, ...] = ()
    is_output: bool = False


def _walk_back(node, modules: Mapping[str, nn.Module]) -> tuple[str | None, list[str]]:
    """From ``node`` walk back through channel-wise ops; return the producing conv/linear (or None) and the
    batch norms passed on the way."""
    bns: list[str] = []
    while True:
        if node.op == "call_module":
            mod = modules[node.target]
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                return node.target, bns
            if isinstance(mod, _PASS_MODULES):
                if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                    bns.append(node.target)
                node = node.args[0]
                continue
            return None, bns
        if node.op == "call_function" and node.target in _PASS_FUNCTIONS:
            node = node.args[0]
            continue
        if node.op == "call_method" and node.target in _PASS_METHODS:
            node = node.args[0]
            continue
        return None, bns


def _trace_graph_links(model: nn.Module, layers: Sequence[str]) -> dict[str, LayerLink]:
    import torch.fx as fx

    graph = fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    producer: dict[str, str | None] = {}
    attached: dict[str, list[str]] = {n: [] for n in layers}
    outputs: set[str] = set()
    for node in graph.nodes:
        if node.op == "call_module":
            mod = modules[node.target]
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                src, _ = _walk_back(node.args[0], modules)
                producer[node.target] = src
            elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                src, bns = _walk_back(node.args[0], modules)
                if src in attached and not bns:  # BN directly (modulo activations) on a single target layer
                    attached[src].append(node.target)
        elif node.op == "output":
            args = node.args[0]
            for a in args if isinstance(args, (tuple, list)) else [args]:
                if isinstance(a, fx.Node):
                    src, _ = _walk_back(a, modules)
                    if src is not None:
                        outputs.add(src)
    links = {}
    for name in layers:
        src = producer.get(name)
        repeat = _repeat(modules, src, name)
        if repeat is None:
            src, repeat = None, 1
        links[name] = LayerLink(name, src, repeat, tuple(attached[name]), name in outputs)
    return links


def _repeat(modules: Mapping[str, nn.Module], src: str | None, dst: str) -> int | None:
    """Input features of ``dst`` per output channel of ``src``; None if they do not fit together."""
    if src is None:
        return 1
    out_ch = modules[src].weight.shape[0]
    in_feat = modules[dst].weight.shape[1]
    if in_feat % out_ch:
        return None
    return in_feat // out_ch


def trace_links(model: nn.Module, layers: Sequence[str], residual: ResidualMode = "block") -> tuple[dict[str, LayerLink], str]:
    """The :class:`LayerLink` of each target layer and how it was found ("graph" or "module order").

    ``residual="block"`` traces the model with ``torch.fx``; if tracing fails it falls back to module order
    (each layer reads the previous target layer when the shapes fit). ``"chain"`` always uses module order
    for the input side (the published behaviour) but still takes attached BNs from the graph when it can.
    """
    modules = dict(model.named_modules())
    try:
        graph_links = _trace_graph_links(model, layers)
        how = "graph"
    except Exception as err:  # noqa: BLE001 - any model fx cannot trace falls back to module order
        warnings.warn(f"OTBR: could not trace {type(model).__name__} ({err}); using module order", stacklevel=2)
        graph_links, how = None, "module order"
    if residual == "block" and graph_links is not None:
        return graph_links, how
    if residual not in ("block", "chain"):
        raise ValueError(f"residual must be 'block' or 'chain', got {residual!r}")
    links = {}
    prev: str | None = None
    for name in layers:
        repeat = _repeat(modules, prev, name)
        src = prev if repeat is not None else None
        g = graph_links[name] if graph_links else LayerLink(name)
        links[name] = LayerLink(name, src, repeat or 1, g.attached, g.is_output)
        prev = name
    return links, ("module order" if residual == "chain" else how)


def target_masses(scores: torch.Tensor, mode: MassMode = "nwc", floor: float = 1e-3) -> np.ndarray:
    """Target (backdoored-side) transport masses for one layer, summing to 1.

    ``"nwc"``: proportional to ``max(score, floor * mean(score))`` so no neuron has zero mass (a zero mass
    would divide by zero in the projection); all-zero scores give uniform masses. ``"uniform"``: 1/n each.
    """
    s = scores.detach().to("cpu", torch.float64).numpy().copy()
    n = s.size
    if mode == "uniform":
        return np.full(n, 1.0 / n)
    if mode != "nwc":
        raise ValueError(f"target_mass must be 'nwc' or 'uniform', got {mode!r}")
    if not 0 < floor <= 1:
        raise ValueError(f"mass floor must be in (0, 1], got {floor}")
    if np.any(s < 0) or not np.all(np.isfinite(s)):
        raise ValueError("NWC scores must be finite and non-negative")
    mean = s.mean()
    if mean <= 0:
        return np.full(n, 1.0 / n)
    s = np.maximum(s, floor * mean)
    return s / s.sum()


def transport_plan(a: np.ndarray, b: np.ndarray, cost: np.ndarray, solver: Solver = "emd",
                   reg: float = 0.01) -> np.ndarray:
    """Optimal transport plan between masses ``a`` (rows) and ``b`` (columns) for ``cost``.

    ``"emd"``: exact (POT's network simplex, ``ot.emd``). ``"sinkhorn"``: entropic (``ot.sinkhorn``) with
    regularization ``reg`` relative to the largest cost; faster on very wide layers, marginals approximate.
    """
    a = np.ascontiguousarray(a, dtype=np.float64)
    b = np.ascontiguousarray(b, dtype=np.float64)
    a, b = a / a.sum(), b / b.sum()
    cost = np.ascontiguousarray(cost, dtype=np.float64)
    if solver == "emd":
        plan, log = ot.emd(a, b, cost, numItermax=10_000_000, log=True)
        if log.get("warning"):
            raise RuntimeError(f"exact OT did not converge: {log['warning']}")
        return plan
    if solver == "sinkhorn":
        scale = cost.max() if cost.size and cost.max() > 0 else 1.0
        return ot.sinkhorn(a, b, cost / scale, reg, numItermax=100_000, stopThr=1e-9)
    raise ValueError(f"solver must be 'emd' or 'sinkhorn', got {solver!r}")


def _column_normalized(plan: np.ndarray) -> torch.Tensor:
    """``T / T.sum(0)``: column j holds the share of each source neuron in target neuron j."""
    t = torch.from_numpy(plan)
    col = t.sum(0)
    return t / col.clamp_min(torch.finfo(torch.float64).tiny)


def align_input(weight: torch.Tensor, tmap: torch.Tensor, repeat: int = 1) -> torch.Tensor:
    """Re-express the input dimension (dim 1) of ``weight`` in the producer's target order:
    ``w'[:, j] = sum_i w[:, i] tmap[i, j]``; with ``repeat`` > 1 each producer channel spans ``repeat``
    consecutive inputs (channel-major flatten)."""
    if repeat > 1 and weight.dim() != 2:
        raise ValueError("input repeat only applies to linear layers")
    if weight.shape[1] != tmap.shape[0] * repeat:
        raise ValueError(f"weight has {weight.shape[1]} inputs, the map covers {tmap.shape[0]} x {repeat}")
    out = weight.shape[0]
    w = weight.reshape(out, tmap.shape[0], -1)  # (out, C, rest): rest = kernel taps (conv) or repeat (linear)
    aligned = torch.einsum("ocr,cd->odr", w, tmap.to(w.dtype))
    if weight.dim() == 2:
        return aligned.reshape(out, -1)
    return aligned.reshape(out, tmap.shape[1], *weight.shape[2:])


@dataclass
class FusionResult:
    """The fused model, per fused layer the transport plan, its cost and the masses used."""

    model: nn.Module
    fused_layers: list[str]
    plans: dict[str, np.ndarray] = field(default_factory=dict)
    costs: dict[str, float] = field(default_factory=dict)
    source_mass: dict[str, np.ndarray] = field(default_factory=dict)
    target_mass: dict[str, np.ndarray] = field(default_factory=dict)
    links: dict[str, LayerLink] = field(default_factory=dict)
    link_source: str = "graph"


def fuse_models(
    pruned: nn.Module,
    backdoored: nn.Module,
    layers: Sequence[str],
    masses: Mapping[str, np.ndarray],
    *,
    start: str | None = None,
    lam: float = 0.5,
    cost: CostMode = "aligned",
    residual: ResidualMode = "block",
    attached: AttachedMode = "transport",
    solver: Solver = "emd",
    sinkhorn_reg: float = 0.01,
) -> FusionResult:
    """Fuse ``pruned`` into ``backdoored`` (same architecture) over ``layers[start:]``; returns a new model.

    ``masses[layer]``: target masses over the backdoored layer's neurons (see :func:`target_masses`).
    ``start``: first layer to fuse (default: the first of ``layers``). See the module docstring for the
    options. ``lam = 0`` returns the backdoored weights exactly.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda (fusion weight of the pruned model) must be in [0, 1], got {lam}")
    if cost not in ("aligned", "unaligned"):
        raise ValueError(f"cost must be 'aligned' or 'unaligned', got {cost!r}")
    if attached not in ("transport", "keep"):
        raise ValueError(f"attached must be 'transport' or 'keep', got {attached!r}")
    layers = list(layers)
    start_idx = 0 if start is None else layers.index(start)
    fused_layers = layers[start_idx:]
    links, how = trace_links(backdoored, layers, residual)
    result_model = copy.deepcopy(backdoored)
    mod_p, mod_b, mod_f = (dict(m.named_modules()) for m in (pruned, backdoored, result_model))
    result = FusionResult(model=result_model, fused_layers=fused_layers, links=links, link_source=how)
    maps: dict[str, torch.Tensor] = {}

    def f64(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float64)

    def mix(a: torch.Tensor, b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (lam * a + (1.0 - lam) * b).to(like.device, like.dtype)

    with torch.no_grad():
        for name in fused_layers:
            link = links[name]
            wp, wb = f64(mod_p[name].weight), f64(mod_b[name].weight)
            if wp.shape != wb.shape:
                raise ValueError(f"{name}: pruned and backdoored weights differ in shape")
            n = wb.shape[0]
            wp_in = wp
            if link.input_from in maps:
                wp_in = align_input(wp, maps[link.input_from], link.input_repeat)
            x = wp_in if cost == "aligned" else wp
            a = np.full(n, 1.0 / n)
            c = torch.cdist(x.reshape(n, -1), wb.reshape(n, -1)).numpy()
            if link.is_output:  # class logits keep their order
                b = a.copy()
                plan = np.diag(a)
            else:
                b = np.asarray(masses[name], dtype=np.float64)
                if b.shape != (n,):
                    raise ValueError(f"{name}: {b.shape} target masses for {n} neurons")
                plan = transport_plan(a, b, c, solver, sinkhorn_reg)
            tmap = _column_normalized(plan)  # (n_pruned, n_backdoored)
            projected = (tmap.T @ wp_in.reshape(n, -1)).reshape(wb.shape)
            target = mod_f[name]
            target.weight.copy_(mix(projected, wb, target.weight))
            if attached == "transport":
                if getattr(target, "bias", None) is not None:
                    target.bias.copy_(mix(tmap.T @ f64(mod_p[name].bias), f64(mod_b[name].bias), target.bias))
                for bn in link.attached:
                    for pname in ("weight", "bias", "running_mean", "running_var"):
                        tb = getattr(mod_b[bn], pname, None)
                        if tb is None:
                            continue
                        tp = f64(getattr(mod_p[bn], pname))
                        getattr(mod_f[bn], pname).copy_(mix(tmap.T @ tp, f64(tb), tb))
            maps[name] = tmap
            result.plans[name] = plan
            result.costs[name] = float((plan * c).sum())
            result.source_mass[name] = a
            result.target_mass[name] = b
    return result
