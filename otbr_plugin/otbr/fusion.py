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
(``layerX.Y.conv1`` after the first block, shortcut/downsample convs and the classifier, in pre- and
post-activation ResNets alike) or the network input uses the identity -- the stream adds branches aligned by
different maps, so no single map describes it, and the identity is the natural correspondence between a pruned
model and the backdoored model it was cut from. ``residual="chain"`` (the published code) uses the previous
target layer's map whatever the graph is. A model the graph analysis cannot follow (``torch.fx`` fails in some
layer) or a target layer whose neurons cannot be re-ordered (a grouped convolution) is refused with the layer
named (:func:`check_fusable`); only ``"chain"`` runs without a graph.

``cost="aligned"`` measures the cost on the input-aligned pruned weights (Singh & Jaggi); ``"unaligned"``
(the published code) measures it on the raw pruned weights but still projects the input-aligned ones.

``attached="transport"`` carries the parameters that belong to an aligned neuron along with it: the layer's
bias and the batch norm that normalizes only this layer's output channels (affine and running statistics),
fused with the same ``lam`` (in a post-activation ResNet every conv has one: its BN right after it). ``"keep"`` (the published code) keeps the backdoored model's bias and BN.

The network's output layer (class logits), if it is a target layer, is never re-ordered: only its input side
is aligned.

``arithmetic="float64"``: all transport and fusion arithmetic runs in float64 on the CPU; results are cast back.
``"published"`` (the reference setting) computes each layer the way the published code does, operation by
operation, so that the same inputs give the same cost matrix to the last bit and therefore the same transport
plan (the exact plan is not unique when pruned neurons tie, and the solver's choice follows the cost's last
bits: docs/otbr.md). On the weights' own device, in float32: the cost is ``torch.cdist`` of the flattened
weights; the input-side map ``T diag(1/b)`` and the projection ``diag(1/b) T^T`` are formed in float64 numpy as
products with the reciprocal masses and then cast to float32; a conv's input side is aligned by a batched matrix
product over its kernel taps; the projection is one float32 matrix product; the mix ``lam * A + (1 - lam) * W``
is float32. The first fused layer's input map is the identity. See :func:`published_layer`.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

import numpy as np
import ot
import torch
import torch.fx
from torch import nn

from ..graph import trace, walk_back

__all__ = [
    "LayerLink",
    "check_fusable",
    "trace_links",
    "target_masses",
    "transport_plan",
    "transport_map",
    "align_input",
    "LayerPlan",
    "plan_layer",
    "project_weights",
    "fuse_tensor",
    "published_input_map",
    "published_layer",
    "attached_parameters",
    "FusionResult",
    "fuse_models",
]

CostMode = Literal["aligned", "unaligned"]
ResidualMode = Literal["block", "chain"]
AttachedMode = Literal["transport", "keep"]
Solver = Literal["emd", "sinkhorn"]
MassMode = Literal["nwc", "uniform"]
Arithmetic = Literal["float64", "published"]

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


def check_fusable(model: nn.Module, layers: Sequence[str]) -> None:
    """Refuse target layers whose output neurons cannot be re-ordered one by one, naming the layer: a grouped
    convolution (``groups > 1``, e.g. depthwise) ties each output channel to one group of input channels, so
    transporting a neuron into another's place would make it read the wrong inputs."""
    modules = dict(model.named_modules())
    for name in layers:
        mod = modules.get(name)
        if mod is None:
            raise ValueError(f"OTBR target layer {name!r} is not a module of {type(model).__name__}")
        if not isinstance(mod, (nn.Conv2d, nn.Linear)):
            raise ValueError(f"OTBR cannot fuse layer {name!r} ({type(mod).__name__}): only Conv2d and Linear "
                             "neurons are aligned")
        if isinstance(mod, nn.Conv2d) and mod.groups != 1:
            raise ValueError(f"OTBR cannot fuse layer {name!r} (Conv2d with groups={mod.groups}): the output "
                             "channels of a grouped convolution cannot be re-ordered independently of its input "
                             "groups")


def _trace_graph_links(model: nn.Module, layers: Sequence[str]) -> dict[str, LayerLink]:
    graph = trace(model, "OTBR's fusion needs it to follow residual streams (residual='chain' uses module "
                         "order instead, as the published code).").graph
    modules = dict(model.named_modules())
    producer: dict[str, str | None] = {}
    attached: dict[str, list[str]] = {n: [] for n in layers}
    outputs: set[str] = set()
    for node in graph.nodes:
        if node.op == "call_module":
            mod = modules[node.target]
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                src, _ = walk_back(node.args[0], modules)
                if node.target in producer and producer[node.target] != src and node.target in attached:
                    raise ValueError(
                        f"OTBR cannot fuse layer {node.target!r}: it is called more than once with inputs from "
                        f"different layers ({producer[node.target] or 'a residual sum or the input'} and "
                        f"{src or 'a residual sum or the input'}), so no single input alignment fits it")
                producer[node.target] = src
            elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                src, bns = walk_back(node.args[0], modules)
                if src in attached and not bns:  # BN directly (modulo activations) on a single target layer
                    attached[src].append(node.target)
        elif node.op == "output":
            args = node.args[0]
            for a in args if isinstance(args, (tuple, list)) else [args]:
                if isinstance(a, torch.fx.Node):
                    src, _ = walk_back(a, modules)
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

    ``residual="block"`` traces the model with ``torch.fx``; a model it cannot follow is a ``ValueError``
    naming the layer it fails in (a guessed input alignment would silently mix unrelated channels).
    ``"chain"`` uses module order for the input side (the published behaviour: each layer reads the previous
    target layer when the shapes fit) and takes attached BNs from the graph when it can be traced.
    """
    if residual not in ("block", "chain"):
        raise ValueError(f"residual must be 'block' or 'chain', got {residual!r}")
    check_fusable(model, layers)
    modules = dict(model.named_modules())
    if residual == "block":
        return _trace_graph_links(model, layers), "graph"
    try:
        graph_links: dict[str, LayerLink] | None = _trace_graph_links(model, layers)
    except ValueError as err:  # the published chaining needs no graph; only attached BNs come from it
        warnings.warn(f"OTBR: {err} Using module order.", stacklevel=2)
        graph_links = None
    links = {}
    prev: str | None = None
    for name in layers:
        repeat = _repeat(modules, prev, name)
        src = prev if repeat is not None else None
        g = graph_links[name] if graph_links else LayerLink(name)
        links[name] = LayerLink(name, src, repeat or 1, g.attached, g.is_output)
        prev = name
    return links, "module order"


def target_masses(scores: torch.Tensor, mode: MassMode = "nwc", floor: float = 1e-3, layer: str = "") -> np.ndarray:
    """Target (backdoored-side) transport masses for one layer, summing to 1.

    ``"nwc"`` with ``floor > 0``: proportional to ``max(score, floor * mean(score))`` so no neuron has zero
    mass (a zero mass would divide by zero in the projection); all-zero scores give uniform masses.
    ``"nwc"`` with ``floor = 0``: exactly ``score / sum(score)`` as the published code; a zero mass raises a
    ValueError naming ``layer`` and the neuron (the published code divides by zero there).
    ``"uniform"``: 1/n each.
    """
    s = scores.detach().to("cpu", torch.float64).numpy().copy()
    n = s.size
    where = f" in layer {layer}" if layer else ""
    if mode == "uniform":
        return np.full(n, 1.0 / n)
    if mode != "nwc":
        raise ValueError(f"target_mass must be 'nwc' or 'uniform', got {mode!r}")
    if not 0 <= floor <= 1:
        raise ValueError(f"mass floor must be in [0, 1], got {floor}")
    if np.any(s < 0) or not np.all(np.isfinite(s)):
        raise ValueError(f"NWC scores{where} must be finite and non-negative")
    if floor == 0:
        zero = np.flatnonzero(s == 0)
        if zero.size:
            raise ValueError(
                f"OTBR transport mass is zero for neuron(s) {zero[:10].tolist()}{where} (their NWC is 0, e.g. "
                "rounded away to 4 decimals): the published code divides by zero here. Use mass_floor > 0 "
                "(setting 'fixed') or nwc_precision 'full'.")
        return s / s.sum()
    mean = s.mean()
    if mean <= 0:
        return np.full(n, 1.0 / n)
    s = np.maximum(s, floor * mean)
    return s / s.sum()


def transport_plan(a: np.ndarray, b: np.ndarray, cost: np.ndarray, solver: Solver = "emd",
                   reg: float = 0.01, max_iter: int = 10_000_000,
                   warnings_out: list[str] | None = None, renormalize: bool = True) -> np.ndarray:
    """Optimal transport plan between masses ``a`` (rows) and ``b`` (columns) for ``cost``.

    ``"emd"``: exact (POT's network simplex, ``ot.emd``) with at most ``max_iter`` iterations (POT's own
    default, used by the published code, is 100000). If the solver stops early its message is appended to
    ``warnings_out`` when given (the plan is then feasible but not optimal, as in the published code),
    otherwise a RuntimeError is raised. ``"sinkhorn"``: entropic (``ot.sinkhorn``) with regularization ``reg``
    relative to the largest cost; faster on very wide layers, marginals approximate. ``renormalize=False``
    passes the masses to the solver exactly as given (the published code's call).
    """
    a = np.ascontiguousarray(a, dtype=np.float64)
    b = np.ascontiguousarray(b, dtype=np.float64)
    # renormalize only when needed: the exact solver's choice among equally optimal plans follows the inputs'
    # last bits, so masses that already sum to 1 are passed on untouched (as the published code does)
    if renormalize:
        a = a if abs(a.sum() - 1.0) < 1e-12 else a / a.sum()
        b = b if abs(b.sum() - 1.0) < 1e-12 else b / b.sum()
    cost = np.ascontiguousarray(cost, dtype=np.float64)
    if solver == "emd":
        plan, log = ot.emd(a, b, cost, numItermax=int(max_iter), log=True)
        if log.get("warning"):
            if warnings_out is None:
                raise RuntimeError(f"exact OT did not converge: {log['warning']}")
            warnings_out.append(str(log["warning"]))
        return plan
    if solver == "sinkhorn":
        scale = cost.max() if cost.size and cost.max() > 0 else 1.0
        return ot.sinkhorn(a, b, cost / scale, reg, numItermax=100_000, stopThr=1e-9)
    raise ValueError(f"solver must be 'emd' or 'sinkhorn', got {solver!r}")


def transport_map(plan: np.ndarray, b: np.ndarray | None = None) -> torch.Tensor:
    """The column-normalized plan ``T diag(1/b)`` (n_pruned x n_backdoored): column j holds the share of each
    pruned neuron in backdoored neuron j. ``b`` = the plan's target masses (exact OT: its column sums, as the
    published code divides by them); None = divide by the plan's own column sums (entropic OT)."""
    t = torch.from_numpy(np.asarray(plan, dtype=np.float64))
    col = t.sum(0) if b is None else torch.from_numpy(np.asarray(b, dtype=np.float64))
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


def _solve_layer(name: str, target_mass: np.ndarray | None, cost: np.ndarray, **solver_options
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source masses ``1/n``, target masses, plan) of one layer for ``cost`` (n x n); ``target_mass`` None: the
    identity plan (the output layer keeps its order). ``solver_options`` go to :func:`transport_plan`."""
    n = cost.shape[0]
    a = np.ones(n) / n
    if target_mass is None:
        return a, a.copy(), np.diag(a)
    b = np.asarray(target_mass, dtype=np.float64)
    if b.shape != (n,):
        raise ValueError(f"{name}: {b.shape} target masses for {n} neurons")
    return a, b, transport_plan(a, b, cost, **solver_options)


@dataclass
class LayerPlan:
    """Step 1 of fusing one layer: the transport plan between pruned (rows) and backdoored (columns) neurons."""

    name: str
    plan: np.ndarray
    source_mass: np.ndarray
    target_mass: np.ndarray
    cost: float
    tmap: torch.Tensor  # transport_map(plan): n_pruned x n_backdoored
    aligned_pruned: torch.Tensor  # the pruned weights with their input side in the producer's backdoored order


def plan_layer(
    name: str,
    pruned_weight: torch.Tensor,
    backdoored_weight: torch.Tensor,
    target_mass: np.ndarray | None,
    *,
    input_map: torch.Tensor | None = None,
    input_repeat: int = 1,
    cost: CostMode = "aligned",
    solver: Solver = "emd",
    sinkhorn_reg: float = 0.01,
    max_iter: int = 10_000_000,
    warnings_out: list[str] | None = None,
) -> LayerPlan:
    """Align one layer's pruned neurons to its backdoored neurons (float64, CPU).

    ``input_map``: the producer layer's transport map, applied to the pruned weights' input side first
    (None: the input side is already in the backdoored order). ``target_mass`` None keeps the neurons'
    order (identity plan: the network's output layer). Source mass is uniform; the cost is the Euclidean
    distance between neuron weight vectors, of the input-aligned (``cost="aligned"``) or raw
    (``"unaligned"``, the published code) pruned weights.
    """
    wp = pruned_weight.detach().to("cpu", torch.float64)
    wb = backdoored_weight.detach().to("cpu", torch.float64)
    if wp.shape != wb.shape:
        raise ValueError(f"{name}: pruned and backdoored weights differ in shape ({tuple(wp.shape)} vs {tuple(wb.shape)})")
    if cost not in ("aligned", "unaligned"):
        raise ValueError(f"cost must be 'aligned' or 'unaligned', got {cost!r}")
    n = wb.shape[0]
    wp_in = wp if input_map is None else align_input(wp, input_map, input_repeat)
    x = wp_in if cost == "aligned" else wp
    c = torch.cdist(x.reshape(n, -1), wb.reshape(n, -1)).numpy()
    a, b, plan = _solve_layer(name, target_mass, c, solver=solver, reg=sinkhorn_reg, max_iter=max_iter,
                              warnings_out=warnings_out)
    tmap = transport_map(plan, b if solver == "emd" else None)
    return LayerPlan(name, plan, a, b, float((plan * c).sum()), tmap, wp_in)


def project_weights(layer_plan: LayerPlan) -> torch.Tensor:
    """Step 2: the pruned weights expressed in the backdoored neuron order, ``diag(1/b) T^T W_aligned``: each
    backdoored neuron receives the transport-weighted mean of the pruned neurons sent to it."""
    w = layer_plan.aligned_pruned
    n = w.shape[0]
    return (layer_plan.tmap.T @ w.reshape(n, -1)).reshape(w.shape)


def fuse_tensor(projected: torch.Tensor, backdoored: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam * projected + (1 - lam) * backdoored`` (computed in float64), in ``backdoored``'s dtype/device."""
    b = backdoored.detach()
    return (lam * projected.to("cpu", torch.float64) + (1.0 - lam) * b.to("cpu", torch.float64)).to(b.device, b.dtype)


def published_input_map(plan: np.ndarray, mass: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """The input-side map the published code hands to the next layer: ``T diag(1/b)`` formed in float64 as the
    product of the plan with the *reciprocal* masses (``T[i, j] * (1 / b[j])``, which can differ in the last bit
    from ``T[i, j] / b[j]``), then cast to float32 on ``device``."""
    plan = np.asarray(plan, dtype=np.float64)
    recip = 1.0 / np.asarray(mass, dtype=np.float64)
    return torch.tensor(plan * recip[None, :], dtype=torch.float32, device=device)


def _published_align(weight: torch.Tensor, map32: torch.Tensor, repeat: int) -> torch.Tensor:
    """Input side of a float32 weight aligned with a float32 map, as the published code does it: a conv by one
    batched matrix product per kernel tap (``bmm`` of (taps, out, in) with the map repeated over the taps),
    returned as (out, in', taps); a linear layer by one matrix product."""
    if weight.dim() == 4:
        w = weight.flatten(2)
        taps = w.shape[2]
        return torch.bmm(w.permute(2, 0, 1), map32.unsqueeze(0).repeat(taps, 1, 1)).permute(1, 2, 0)
    if repeat > 1:  # a linear layer reading a flattened C x H x W map (the published code cannot run this case)
        map32 = torch.kron(map32, torch.eye(repeat, dtype=map32.dtype, device=map32.device))
    return weight @ map32


def published_layer(
    name: str,
    pruned_weight: torch.Tensor,
    backdoored_weight: torch.Tensor,
    target_mass: np.ndarray | None,
    lam: float,
    *,
    input_map: torch.Tensor | None = None,
    input_repeat: int = 1,
    cost: CostMode = "unaligned",
    max_iter: int = 100_000,
    warnings_out: list[str] | None = None,
) -> tuple[LayerPlan, torch.Tensor, torch.Tensor]:
    """One layer of the fusion in the published code's arithmetic (``arithmetic="published"``): returns the
    plan, the fused weight and the float32 map the next layer's input side is aligned with.

    On the weights' device, in float32: input side aligned with ``input_map`` (a float32 map from
    :func:`published_input_map`; None: the identity); cost ``torch.cdist`` of the flattened raw (``cost=
    "unaligned"``) or input-aligned pruned weights against the backdoored ones; exact OT (``ot.emd``) with
    source mass ``1/n`` and ``target_mass`` passed unchanged; projection ``diag(1/b) T^T`` formed in float64 with
    the reciprocal masses, cast to float32 and applied by one matrix product; ``lam * A + (1 - lam) * W`` in
    float32. ``target_mass`` None keeps the neurons' order (the network's output layer)."""
    wp = pruned_weight.detach().float()
    wb = backdoored_weight.detach().float()
    if wp.shape != wb.shape:
        raise ValueError(f"{name}: pruned and backdoored weights differ in shape ({tuple(wp.shape)} vs {tuple(wb.shape)})")
    if cost not in ("aligned", "unaligned"):
        raise ValueError(f"cost must be 'aligned' or 'unaligned', got {cost!r}")
    n = wb.shape[0]
    n_in = wp.shape[1] // (input_repeat if wp.dim() == 2 else 1)
    if input_map is None:
        input_map = torch.eye(n_in, dtype=torch.float32, device=wp.device)
    aligned = _published_align(wp, input_map.to(wp.device, torch.float32), input_repeat)
    x = wp if cost == "unaligned" else aligned
    c = torch.cdist(x.flatten(1), wb.flatten(1), p=2).cpu().numpy()
    a, b, plan = _solve_layer(name, target_mass, c, solver="emd", max_iter=max_iter, warnings_out=warnings_out,
                              renormalize=False)
    projection = torch.tensor((1.0 / b)[:, None] * np.asarray(plan, dtype=np.float64).T, dtype=torch.float32,
                              device=wp.device)
    projected = torch.matmul(projection, aligned.flatten(1)).view(wb.shape)
    fused = lam * projected + (1 - lam) * wb
    lp = LayerPlan(name, plan, a, b, float((plan * c.astype(np.float64)).sum()), transport_map(plan, b),
                   aligned.reshape(wb.shape))
    return lp, fused.to(backdoored_weight.dtype), published_input_map(plan, b, wp.device)


def attached_parameters(pruned: Mapping[str, nn.Module], backdoored: Mapping[str, nn.Module], layer: str,
                        link: "LayerLink", tmap: torch.Tensor, lam: float) -> dict[str, torch.Tensor]:
    """Step 3 (``attached="transport"``): the layer's bias and the batch norms that normalize only its output
    channels (affine and running statistics), transported like the neurons and fused with the same ``lam``.
    Returns ``{module.param: fused tensor}``."""
    out: dict[str, torch.Tensor] = {}
    pairs = [(layer, ("bias",))] + [(bn, ("weight", "bias", "running_mean", "running_var")) for bn in link.attached]
    for module, pnames in pairs:
        for pname in pnames:
            tb = getattr(backdoored[module], pname, None)
            if tb is None:
                continue
            tp = getattr(pruned[module], pname).detach().to("cpu", torch.float64)
            out[f"{module}.{pname}"] = fuse_tensor(tmap.T @ tp, tb, lam)
    return out


@dataclass
class FusionResult:
    """The fused model, per fused layer the transport plan, its cost and the masses used, and any solver
    warnings (exact OT stopped at its iteration limit)."""

    model: nn.Module
    fused_layers: list[str]
    plans: dict[str, np.ndarray] = field(default_factory=dict)
    costs: dict[str, float] = field(default_factory=dict)
    source_mass: dict[str, np.ndarray] = field(default_factory=dict)
    target_mass: dict[str, np.ndarray] = field(default_factory=dict)
    links: dict[str, LayerLink] = field(default_factory=dict)
    link_source: str = "graph"
    warnings: list[str] = field(default_factory=list)


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
    max_iter: int = 10_000_000,
    strict_solver: bool = True,
    arithmetic: Arithmetic = "float64",
) -> FusionResult:
    """Fuse ``pruned`` into ``backdoored`` (same architecture) over ``layers[start:]``; returns a new model.

    Per layer: :func:`plan_layer` (input side aligned with the producer's map, OT plan), :func:`project_weights`,
    :func:`fuse_tensor`, and with ``attached="transport"`` :func:`attached_parameters`.
    ``masses[layer]``: target masses over the backdoored layer's neurons (see :func:`target_masses`).
    ``start``: first layer to fuse (default: the first of ``layers``). ``strict_solver=False`` records an exact
    OT that stopped at ``max_iter`` in ``warnings`` instead of raising (the published code's behaviour).
    ``lam = 0`` returns the backdoored weights exactly. ``arithmetic``: "float64" (CPU, float64) or "published"
    (the published code's float32 operations on the weights' device, :func:`published_layer`; exact OT only).
    """
    if arithmetic not in ("float64", "published"):
        raise ValueError(f"arithmetic must be 'float64' or 'published', got {arithmetic!r}")
    if arithmetic == "published" and solver != "emd":
        raise ValueError(f"arithmetic 'published' runs the exact solver only (solver 'emd'), got solver {solver!r}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda (fusion weight of the pruned model) must be in [0, 1], got {lam}")
    if attached not in ("transport", "keep"):
        raise ValueError(f"attached must be 'transport' or 'keep', got {attached!r}")
    layers = list(layers)
    if start is not None and start not in layers:
        raise ValueError(f"fusion start {start!r} is not a target layer")
    fused_layers = layers[(0 if start is None else layers.index(start)):]
    links, how = trace_links(backdoored, layers, residual)
    result_model = copy.deepcopy(backdoored)
    mod_p, mod_b = dict(pruned.named_modules()), dict(backdoored.named_modules())
    params_f = dict(result_model.named_parameters()) | dict(result_model.named_buffers())
    result = FusionResult(model=result_model, fused_layers=fused_layers, links=links, link_source=how)
    maps: dict[str, torch.Tensor] = {}
    maps32: dict[str, torch.Tensor] = {}  # arithmetic "published": the float32 maps handed on
    warn_list = None if strict_solver else result.warnings
    with torch.no_grad():
        for name in fused_layers:
            link = links[name]
            mass = None if link.is_output else masses[name]  # class logits keep their order
            if arithmetic == "published":
                lp, fused, maps32[name] = published_layer(
                    name, mod_p[name].weight, mod_b[name].weight, mass, lam,
                    input_map=maps32.get(link.input_from) if link.input_from else None,
                    input_repeat=link.input_repeat, cost=cost, max_iter=max_iter, warnings_out=warn_list)
            else:
                lp = plan_layer(name, mod_p[name].weight, mod_b[name].weight, mass,
                                input_map=maps.get(link.input_from) if link.input_from else None,
                                input_repeat=link.input_repeat, cost=cost, solver=solver, sinkhorn_reg=sinkhorn_reg,
                                max_iter=max_iter, warnings_out=warn_list)
                fused = fuse_tensor(project_weights(lp), mod_b[name].weight, lam)
            updates = {f"{name}.weight": fused}
            if attached == "transport":
                updates |= attached_parameters(mod_p, mod_b, name, link, lp.tmap, lam)
            for key, value in updates.items():
                params_f[key].copy_(value)
            maps[name] = lp.tmap
            result.plans[name] = lp.plan
            result.costs[name] = lp.cost
            result.source_mass[name] = lp.source_mass
            result.target_mass[name] = lp.target_mass
    return result
