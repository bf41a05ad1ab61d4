"""CLP against an independent derivation of its published rule (Zheng et al., ECCV 2022), in plain numpy.

The rule, re-derived here from the paper for this test: for a conv followed by BatchNorm, the upper bound of
output channel k's Lipschitz constant is UCLC_k = sigma_max(W_k as (C_in, kh*kw)) * |gamma_k / sqrt(var_k + eps)|;
within a layer, channels with UCLC_k > mean + u * std (std with Bessel's correction, strict ">") are pruned by
zeroing. Which conv goes with which BN, and what is zeroed, is written out here from the two pairings' definitions
(docs/baselines.md), not read from ``otbr_plugin.defenses.structure``:

- ``backdoorbench``: walking ``named_modules()``, each BatchNorm2d is scored with the most recently registered
  Conv2d; pruning zeroes that BN's weight and bias.
- ``structural`` on the pre-activation ResNet-18 (BN -> ReLU -> conv blocks): the stem conv is scored with
  ``layer1.0.bn1`` (BN zeroed; the stem output is also the identity path), a block's ``conv1`` with its ``bn2``
  (conv channel and BN zeroed), a block's ``conv2`` and its shortcut conv with the *next* block's ``bn1`` (only the
  conv channel zeroed: that BN also sees the other summand), the last ``conv2`` with no BN (weight alone, conv
  channel zeroed). On a conv -> BN -> ReLU network every conv is scored with its own BN, both zeroed.

Every pruned channel and every weight of the defended model is compared, for both pairings and several u.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from otbr_plugin.data import Normalizer
from otbr_plugin.defenses import build_context, create_defense
from otbr_plugin.models import create_model

NORM = Normalizer((0.5,), (0.5,))
US = (0.0, 0.5, 1.0, 2.0, 3.0)


# ------------------------------------------------------------------ the reference, in numpy

def uclc(weight: np.ndarray, gamma: np.ndarray | None, var: np.ndarray | None, eps: float) -> np.ndarray:
    """Per output channel: largest singular value of the (C_in, kh*kw) kernel times |gamma / sqrt(var + eps)|."""
    out = np.empty(weight.shape[0])
    for k in range(weight.shape[0]):
        out[k] = np.linalg.svd(weight[k].reshape(weight.shape[1], -1), compute_uv=False).max()
    if gamma is not None:
        out = out * np.abs(gamma / np.sqrt(var + eps))
    return out


def outliers(values: np.ndarray, u: float, ddof: int = 1) -> np.ndarray:
    """Indices with value > mean + u * std (``ddof=1``: Bessel's correction, as ``torch.std``)."""
    return np.flatnonzero(values > values.mean() + u * values.std(ddof=ddof))


def preact_structural_plan(model: nn.Module) -> list[tuple[str, str | None, tuple[str, ...]]]:
    """(scored conv, BN whose scale enters the bound or None, modules zeroed) of a pre-activation ResNet-18,
    from the architecture: BN -> ReLU -> conv1 -> BN -> ReLU -> conv2, plus an optional 1x1 shortcut conv,
    blocks added onto the residual stream."""
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    names = {n for n, _ in model.named_modules()}
    plan: list[tuple[str, str | None, tuple[str, ...]]] = [("conv1", "layer1.0.bn1", ("layer1.0.bn1",))]
    for i, blk in enumerate(blocks):
        nxt = f"{blocks[i + 1]}.bn1" if i + 1 < len(blocks) else None
        plan.append((f"{blk}.conv1", f"{blk}.bn2", (f"{blk}.conv1", f"{blk}.bn2")))
        plan.append((f"{blk}.conv2", nxt, (f"{blk}.conv2",)))
        if f"{blk}.shortcut.0" in names:
            plan.append((f"{blk}.shortcut.0", nxt, (f"{blk}.shortcut.0",)))
    return plan


def module_order_plan(model: nn.Module) -> list[tuple[str, str | None, tuple[str, ...]]]:
    """BackdoorBench's pairing: each BN with the most recently registered conv; the BN is zeroed."""
    plan, conv = [], None
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            conv = name
        elif isinstance(m, nn.BatchNorm2d) and conv is not None:
            plan.append((conv, name, (name,)))
    return plan


def conv_bn_plan(model: nn.Module) -> list[tuple[str, str | None, tuple[str, ...]]]:
    """conv -> BN -> ReLU networks: every conv with its own BN, both zeroed."""
    return [(c, b, (c, b)) for c, b, _ in module_order_plan(model)]


def reference_clp(model: nn.Module, plan, u: float, eps: float | None = None, ddof: int = 1
                  ) -> tuple[dict[str, list[int]], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Apply the rule to ``model``'s weights: (pruned channels and UCLC per scored pair, keyed "conv->bn", or
    "conv" when no BN enters the bound; the pruned state dict as float64 arrays). ``eps`` None: each BN's own."""
    state = {k: v.detach().double().numpy().copy() for k, v in model.state_dict().items()}
    mods = dict(model.named_modules())
    pruned, values = {}, {}
    for conv, bn, zeroed in plan:
        if bn is None:
            lips = uclc(state[conv + ".weight"], None, None, 0.0)
        else:
            e = mods[bn].eps if eps is None else eps
            lips = uclc(state[conv + ".weight"], state[bn + ".weight"], state[bn + ".running_var"], e)
        idx = outliers(lips, u, ddof)
        key = f"{conv}->{bn}" if bn else conv
        pruned[key], values[key] = idx.tolist(), lips
        for mod in zeroed:
            for p in ("weight", "bias"):
                if mod + "." + p in state:
                    state[mod + "." + p][idx] = 0.0
    return pruned, values, state


# ------------------------------------------------------------------ models with planted outliers

def trained_looking(model: nn.Module, seed: int) -> nn.Module:
    """BN statistics and affine parameters as after training (variances in [0.8, 1.2], scales of either sign with
    magnitude in [0.9, 1.1]) and conv biases where present, so that the BN scale matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_var.copy_(torch.rand(n, generator=g) * 0.4 + 0.8)
                sign = torch.where(torch.rand(n, generator=g) < 0.2, -1.0, 1.0)
                m.weight.copy_(sign * (torch.rand(n, generator=g) * 0.2 + 0.9))
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.copy_(torch.randn(m.out_channels, generator=g) * 0.1)
    return model


def planted_preact() -> nn.Module:
    """preactresnet18 at width 0.25 (16-128 channels) with trained-looking BN statistics and outlier channels
    planted through the kernel, the BN scale and the running variance, including convs only one pairing
    scores (``layer2.0.conv2``: BackdoorBench scores the shortcut against ``layer2.1.bn1`` instead;
    ``layer4.1.conv2``: no BN follows it)."""
    torch.manual_seed(0)
    model = trained_looking(create_model("preactresnet18", 4, 1, 8, 0.25).eval(), seed=1)
    with torch.no_grad():
        model.conv1.weight[5] *= 8                      # stem -> layer1.0.bn1
        model.layer1[1].conv1.weight[2] *= 6            # conv1 -> bn2
        model.layer2[0].conv2.weight[7] *= 9            # conv2 -> (add) -> layer2.1.bn1, structural only
        model.layer2[0].shortcut[0].weight[11] *= 9     # shortcut -> layer2.1.bn1, both pairings
        model.layer3[0].bn2.weight[4] = -9.0            # large (negative) BN scale on layer3.0.conv1's channel
        model.layer3[1].bn1.running_var[20] = 1e-3      # tiny variance: large scale on layer3.0.conv2's channel
        model.layer4[1].conv2.weight[[3, 50]] *= 7      # the last conv: no BN, structural only
    return model


def planted_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = trained_looking(create_model("smallcnn", 4, 1, 8, 0.5).eval(), seed=2)
    with torch.no_grad():
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        convs[-1].weight[9] *= 8
        convs[-2].weight[1] *= 6
    return model


def run_clp(model: nn.Module, u: float, pairing: str):
    clp = create_defense("clp", u=u, pairing=pairing)
    ctx = build_context(clp, num_classes=4, input_shape=(1, 8, 8), normalizer=NORM, device=torch.device("cpu"),
                        seed=0, progress=False, clean_data=None, dataset=None)
    return clp.mitigate(model, ctx)


def ours_by_key(out, pairing: str) -> tuple[dict[str, list[int]], dict[str, np.ndarray]]:
    pruned, values = {}, {}
    table = out.tables["uclc"]
    for layer in out.diagnostics["layers"]:
        conv, bn = layer["conv"], layer["bn"]
        key = f"{conv}->{bn}" if bn else conv
        pruned[key] = layer["pruned"]
        rows = table[(table["conv"] == conv) & (table["bn"] == (bn or ""))].sort_values("channel")
        values[key] = rows["uclc"].to_numpy()
    return pruned, values


def assert_same(model: nn.Module, plan, u: float, pairing: str) -> dict[str, list[int]]:
    ref_pruned, ref_values, ref_state = reference_clp(model, plan, u)
    # the comparison is decided by the rule, not by rounding: no UCLC lies within 1e-5 of its threshold
    for key, v in ref_values.items():
        thr = v.mean() + u * v.std(ddof=1)
        assert np.abs(v - thr).min() > 1e-5 * thr, key
    out = run_clp(model, u, pairing)
    pruned, values = ours_by_key(out, pairing)
    assert pruned == ref_pruned
    for key, v in ref_values.items():
        np.testing.assert_allclose(values[key], v, rtol=2e-6, err_msg=key)
    state = out.model.state_dict()
    assert set(state) == set(ref_state)
    for k, v in ref_state.items():  # every weight, bias and BN entry, to the bit (zeroing is exact)
        assert np.array_equal(state[k].double().numpy(), v), k
    return ref_pruned


# ------------------------------------------------------------------ the tests

@pytest.mark.parametrize("u", US)
def test_structural_pairing_matches_the_rule_on_preact(u):
    model = planted_preact()
    pruned = assert_same(model, preact_structural_plan(model), u, "structural")
    assert len(pruned) == 20  # every conv: stem, 16 block convs, 3 shortcuts
    if u == 3.0:  # the planted channels, and nothing else, at the paper's u
        assert {k.split("->")[0]: v for k, v in pruned.items() if v} == {
            "conv1": [5], "layer1.1.conv1": [2], "layer2.0.conv2": [7], "layer2.0.shortcut.0": [11],
            "layer3.0.conv1": [4], "layer3.0.conv2": [20], "layer3.0.shortcut.0": [20], "layer4.1.conv2": [3, 50]}


@pytest.mark.parametrize("u", US)
def test_backdoorbench_pairing_matches_the_rule_on_preact(u):
    model = planted_preact()
    plan = module_order_plan(model)
    pruned = assert_same(model, plan, u, "backdoorbench")
    assert len(pruned) == 16  # one per BN
    scored = {c for c, _, _ in plan}
    # module order never scores the last conv, nor a block's conv2 when a shortcut conv is registered after it
    assert scored.isdisjoint({"layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2", "layer4.1.conv2"})
    if u == 3.0:
        assert {k: v for k, v in pruned.items() if v} == {
            "conv1->layer1.0.bn1": [5], "layer1.1.conv1->layer1.1.bn2": [2],
            "layer2.0.shortcut.0->layer2.1.bn1": [11], "layer3.0.conv1->layer3.0.bn2": [4],
            "layer3.0.shortcut.0->layer3.1.bn1": [20]}


@pytest.mark.parametrize("u", US)
@pytest.mark.parametrize("pairing", ["structural", "backdoorbench"])
def test_both_pairings_match_the_rule_on_a_conv_bn_network(u, pairing):
    model = planted_cnn()
    plan = conv_bn_plan(model) if pairing == "structural" else module_order_plan(model)
    pruned = assert_same(model, plan, u, pairing)
    if u == 3.0:
        assert sum(len(v) for v in pruned.values()) == 2


def test_the_comparison_tells_the_std_convention_apart():
    """The preact comparisons above would catch a population std (no Bessel correction): over the tested u
    the two conventions prune different channels somewhere."""
    model = planted_preact()
    plans = (preact_structural_plan(model), module_order_plan(model))
    assert any(reference_clp(model, p, u)[0] != reference_clp(model, p, u, ddof=0)[0] for p in plans for u in US)


def test_strict_inequality_at_the_threshold():
    """A layer of identical channels has std 0 and every UCLC equal to the threshold: nothing is pruned
    (">" as published; ">=" would prune the whole layer)."""
    model = nn.Sequential(nn.Conv2d(1, 12, 3, bias=False), nn.BatchNorm2d(12, eps=0.0), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4)).eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[:, 0, 1, 1] = 1.0  # UCLC exactly 1 in every channel
    for pairing in ("structural", "backdoorbench"):
        out = run_clp(model, 0.0, pairing)
        assert out.diagnostics["pruned_channels"] == 0 and out.diagnostics["layers"][0]["threshold"] == 1.0
    assert reference_clp(model, conv_bn_plan(model), 0.0)[0] == {"0->1": []}


def test_published_arithmetic_selects_the_same_channels_here():
    """The published code (and BackdoorBench) computes in float32, scales the kernel before its SVD and omits
    BN's eps. On these models (running variances >= 1e-3, no channel near a threshold) that picks the same
    channels as the rule with eps."""
    for model in (planted_preact(), planted_cnn()):
        plan = module_order_plan(model)
        state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
        for u in US:
            ours = reference_clp(model, plan, u)[0]
            for conv, bn, _ in plan:
                w, gamma, var = state[conv + ".weight"], state[bn + ".weight"], state[bn + ".running_var"]
                scale = np.abs(gamma / np.sqrt(var)).astype(np.float32)
                lips = np.array([np.linalg.svd(w[k].reshape(w.shape[1], -1) * scale[k], compute_uv=False).max()
                                 for k in range(w.shape[0])], dtype=np.float32)
                thr = np.float32(lips.mean() + np.float32(u) * lips.std(ddof=1))
                assert np.flatnonzero(lips > thr).tolist() == ours[f"{conv}->{bn}"], (conv, bn, u)


def test_dead_channel_is_where_published_and_ours_differ():
    """A dead BN channel (weight 0, running variance 0): without eps its scale is 0/0 = nan, the layer's mean and
    std become nan and the published rule prunes nothing in that layer -- even a planted outlier. With eps the
    dead channel's UCLC is 0 and the outlier is pruned."""
    model = planted_cnn()
    conv_name, bn_name, _ = conv_bn_plan(model)[-1]
    mods = dict(model.named_modules())
    with torch.no_grad():
        mods[bn_name].weight[0] = 0.0
        mods[bn_name].running_var[0] = 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        published = reference_clp(model, module_order_plan(model), 3.0, eps=0.0)[0]
    assert published[f"{conv_name}->{bn_name}"] == []
    ours = {l["conv"]: l["pruned"] for l in run_clp(model, 3.0, "backdoorbench").diagnostics["layers"]}
    assert ours[conv_name] == [9] == reference_clp(model, module_order_plan(model), 3.0)[0][f"{conv_name}->{bn_name}"]
