"""Structure of a network read from its dataflow graph (``torch.fx``): which BatchNorm acts on which conv
channel, and where the last convolutional feature map meets the classifier.

Used by the pruning baselines (CLP, FP). Module order alone cannot tell these facts in residual networks:
in a pre-activation ResNet the BN that follows ``conv2`` belongs to the *next* block and sees the sum of
``conv2`` and the shortcut, so the graph is traced instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from ..graph import is_add
from ..graph import trace as _trace

__all__ = [
    "ConvBNPair",
    "FeatureSite",
    "trace",
    "structural_pairs",
    "backdoorbench_pairs",
    "feature_site",
    "tail_module",
]

_RELU_FUNCS = {torch.relu, torch.nn.functional.relu, torch.relu_}
_FLATTEN_FUNCS = {torch.flatten}
_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d)
_CHANNELWISE_MODULES = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Identity)


@dataclass(frozen=True)
class ConvBNPair:
    """A conv layer and the BatchNorm whose per-channel scale acts on its output channels.

    ``bn`` is None when no BN acts on the conv's output (e.g. the last conv of a pre-activation ResNet).
    ``exclusive``: the BN's input is this conv's output alone (conv -> BN), so BN channel k belongs to conv
    channel k; False when a residual addition lies between them (the BN also sees the shortcut).
    ``shared_output``: the conv's output also feeds something besides that path (e.g. the stem conv of a
    pre-activation ResNet feeds ``layer1.0.bn1`` and the identity shortcut).
    """

    conv: str
    bn: str | None
    exclusive: bool
    shared_output: bool = False


def trace(model: nn.Module) -> fx.GraphModule:
    """:func:`otbr_plugin.graph.trace` with the baselines' way out."""
    return _trace(model, "For CLP use pairing='backdoorbench'.")


def _modules(gm: fx.GraphModule) -> dict[str, nn.Module]:
    return dict(gm.named_modules())


def structural_pairs(model: nn.Module) -> list[ConvBNPair]:
    """For every ``Conv2d`` (in graph order), the first BatchNorm2d its output reaches through residual
    additions only.

    Plain conv -> BN (VGG, small CNN, ``conv1 -> bn2`` in a pre-activation block) gives an exclusive pair.
    In a pre-activation ResNet, ``conv2`` and the projection shortcut are added and the sum enters the next
    block's ``bn1``: that BN's scale acts on their channels, but it also sees the other summand, so the pair
    is not exclusive. A conv whose output reaches no BN that way (the network's last conv) gets ``bn=None``.
    """
    gm = trace(model)
    mods = _modules(gm)
    pairs: list[ConvBNPair] = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods[node.target], nn.Conv2d):
            continue
        conv: nn.Conv2d = mods[node.target]
        frontier, seen, found, depth = [node], {node}, None, 0
        while frontier and found is None:
            depth += 1
            nxt: list[fx.Node] = []
            for cur in frontier:
                for user in cur.users:
                    if user in seen:
                        continue
                    seen.add(user)
                    if user.op == "call_module" and isinstance(mods[user.target], nn.BatchNorm2d):
                        if found is None and mods[user.target].num_features == conv.out_channels:
                            found = (user.target, depth == 1)
                    elif is_add(user):
                        nxt.append(user)
            frontier = nxt
        pairs.append(ConvBNPair(node.target, found[0] if found else None, bool(found and found[1]),
                                shared_output=len(node.users) > 1))
    return pairs


def backdoorbench_pairs(model: nn.Module) -> list[ConvBNPair]:
    """BackdoorBench's (and the CLP reference code's) pairing: walking ``named_modules()`` in registration
    order, each BatchNorm2d is paired with the most recently registered Conv2d. A BN seen before any conv is
    skipped. This is what published CLP numbers on pre-activation ResNets use, even where it pairs a BN with
    a conv that does not feed it (e.g. a block's ``bn1`` with the previous block's shortcut conv)."""
    pairs: list[ConvBNPair] = []
    last: tuple[str, nn.Conv2d] | None = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            last = (name, m)
        elif isinstance(m, nn.BatchNorm2d) and last is not None:
            if last[1].out_channels != m.num_features:
                raise ValueError(f"backdoorbench pairing: BN {name!r} has {m.num_features} channels but the conv "
                                 f"before it, {last[0]!r}, has {last[1].out_channels} outputs")
            pairs.append(ConvBNPair(last[0], name, True, shared_output=False))
    return pairs


@dataclass(frozen=True)
class FeatureSite:
    """Where the last convolutional feature map enters the classifier head.

    ``pool``: the global pooling module whose *input* is that feature map (a forward pre-hook there masks
    channels). ``classifier``: the first Linear after it; feature channel k feeds its input columns
    ``k * positions ... (k + 1) * positions - 1`` (``positions`` = spatial size after pooling, known once
    shapes are seen). ``producer``: the conv (and BNs) whose output channel k *is* feature channel k, when
    only channel-wise layers (BN, ReLU, max/avg pool, dropout) lie between them; None when a residual
    addition does (pre-activation ResNet), in which case no single conv owns the channel.
    ``last_conv``: the last conv in graph order before the feature map (for reporting).
    """

    node: str
    pool: str
    classifier: str
    producer: tuple[str, ...] | None
    last_conv: str | None


def feature_site(model: nn.Module) -> FeatureSite:
    """Find the feature map that FP prunes: the input of the global pooling feeding the first Linear."""
    gm = trace(model)
    mods = _modules(gm)
    nodes = list(gm.graph.nodes)
    linear = next((n for n in nodes if n.op == "call_module" and isinstance(mods[n.target], nn.Linear)), None)
    if linear is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier: cannot locate the last feature map")
    cur = linear.args[0]
    pool = None
    while isinstance(cur, fx.Node):
        if cur.op == "call_module" and isinstance(mods[cur.target], _GLOBAL_POOLS):
            pool = cur
            break
        is_flat = (cur.op == "call_function" and cur.target in _FLATTEN_FUNCS) or (
            cur.op == "call_method" and cur.target in ("flatten", "view", "reshape"))
        if not is_flat:
            break
        cur = cur.args[0]
    if pool is None:
        raise ValueError(f"{type(model).__name__}: expected global pooling module (AdaptiveAvgPool2d, ...) -> "
                         f"flatten -> Linear before {linear.target!r}; cannot locate the last feature map")
    feat = pool.args[0]
    # walk back through channel-wise layers to the conv that produces the feature map, if one alone does
    producer: list[str] = []
    cur = feat
    owner: str | None = None
    while isinstance(cur, fx.Node) and len(cur.users) == 1:  # a branching node shares its channels
        if cur.op == "call_module":
            m = mods[cur.target]
            if isinstance(m, nn.Conv2d):
                owner = cur.target
                break
            if isinstance(m, nn.BatchNorm2d):
                producer.append(cur.target)
            elif not isinstance(m, _CHANNELWISE_MODULES):
                break
        elif not (cur.op == "call_function" and cur.target in _RELU_FUNCS):
            break
        cur = cur.args[0]
    convs_before = [n.target for n in nodes[: nodes.index(feat) + 1]
                    if n.op == "call_module" and isinstance(mods[n.target], nn.Conv2d)]
    return FeatureSite(
        node=feat.name,
        pool=pool.target,
        classifier=linear.target,
        producer=(owner, *reversed(producer)) if owner is not None else None,
        last_conv=convs_before[-1] if convs_before else None,
    )


def tail_module(model: nn.Module, node_name: str) -> fx.GraphModule:
    """The part of ``model`` after graph node ``node_name``, as a module taking that node's value.

    Lets FP evaluate many channel masks on cached feature maps instead of re-running the whole network.
    Raises when a later node depends on anything before the cut other than parameters (no skip across it).
    """
    gm = trace(model)
    nodes = list(gm.graph.nodes)
    names = [n.name for n in nodes]
    if node_name not in names:
        raise ValueError(f"no graph node {node_name!r}")
    cut = names.index(node_name)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {nodes[cut]: graph.placeholder("features")}

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:
            if n.op == "get_attr":
                env[n] = graph.node_copy(n, lookup)
            else:
                raise ValueError(f"node {n.name!r} before the cut {node_name!r} is used after it: not a cut point")
        return env[n]

    for n in nodes[cut + 1:]:
        if n.op == "placeholder":
            raise ValueError("unexpected placeholder after the cut")
        env[n] = graph.node_copy(n, lookup)
    return fx.GraphModule(gm, graph)
