"""OTBR: invariants of each stage (unlearning, NWC, pruning, OT fusion), the defense, and the oracle sweep."""

from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from otbr_plugin.data import Normalizer
from otbr_plugin.defenses import build_context, get_defense, list_defenses
from otbr_plugin.models import create_model
from otbr_plugin.defenses.otbr import OTBRConfig, OTBRDefense
from otbr_plugin.otbr import (
    fuse_models,
    global_ranking,
    neuron_weight_change,
    num_to_prune,
    nwc_scores,
    prune_neurons,
    random_unlearning,
    sample_unlearning_batch,
    select_top_neurons,
    target_layer_names,
    target_masses,
    trace_links,
    transport_plan,
)

os.environ.setdefault("OTBR_OFFLINE", "1")
CPU = torch.device("cpu")


def small(name="smallcnn", channels=1, size=12, width=0.5, classes=10, seed=0, **args) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(name, classes, channels, size, width, **args)
    # non-trivial BN statistics so that BN handling matters
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def context(defense, shape=(1, 12, 12), classes=10, seed=0):
    c = shape[0]
    return build_context(defense, num_classes=classes, input_shape=shape, normalizer=Normalizer((0.5,) * c, (0.25,) * c),
                         device=CPU, seed=seed, progress=False)


def uniform_masses(model, layers):
    mods = dict(model.named_modules())
    return {n: np.full(mods[n].weight.shape[0], 1.0 / mods[n].weight.shape[0]) for n in layers}


# ----------------------------------------------------------------------------- unlearning and NWC

def test_unlearning_labels_cover_all_classes_and_noise_has_real_shape():
    g = torch.Generator().manual_seed(0)
    norm = Normalizer((0.5,), (0.25,))
    x, y = sample_unlearning_batch(512, (1, 20, 24), 7, g, norm, "pixel", "all")
    assert x.shape == (512, 1, 20, 24)
    assert set(y.tolist()) == set(range(7))
    pix = norm.inverse(x)  # pixel noise: U[0,1] before normalization
    assert pix.min() >= 0 and pix.max() <= 1 and x.min() < 0  # normalized: (0 - 0.5) / 0.25 = -2
    x2, y2 = sample_unlearning_batch(512, (3, 8, 8), 7, g, None, "normalized", "k_minus_1")
    assert x2.min() >= 0 and x2.max() <= 1
    assert set(y2.tolist()) == set(range(6))  # the published code never draws the last class


def test_random_unlearning_ascends_and_leaves_the_input_model_alone():
    model = small()
    before = copy.deepcopy(model.state_dict())
    res = random_unlearning(model, num_classes=10, input_shape=(1, 12, 12), normalizer=Normalizer((0.5,), (0.25,)),
                            steps=5, batch_size=32, lr=0.05, generator=torch.Generator().manual_seed(1))
    assert res.losses[-1] > res.losses[0]  # gradient ascent raises the cross-entropy
    assert int(res.label_counts.sum()) == 5 * 32 and bool((res.label_counts > 0).all())
    for k, v in model.state_dict().items():  # weights and BN running stats of the caller's model untouched
        assert torch.equal(v, before[k]), k
    nwc = neuron_weight_change(model, res.model, target_layer_names(model))
    assert all(bool((v > 0).any()) for v in nwc.values())


def test_nwc_equals_hand_computed_l1_change():
    torch.manual_seed(3)
    w0 = {"a.weight": torch.randn(4, 2, 3, 3), "b.weight": torch.randn(5, 4, 3, 3)}
    w1 = {k: v + 0.1 * torch.randn_like(v) for k, v in w0.items()}
    nwc = neuron_weight_change(w0, w1, ["a", "b"])
    for layer in ("a", "b"):
        for k in range(w0[f"{layer}.weight"].shape[0]):
            manual = sum(abs(float(p) - float(q)) for p, q in zip(w1[f"{layer}.weight"][k].flatten(),
                                                               w0[f"{layer}.weight"][k].flatten()))
            assert nwc[layer][k].item() == pytest.approx(manual, rel=1e-6)
        assert nwc[layer].dtype == torch.float64
    fan = {"a": 18, "b": 36}
    normed = nwc_scores(nwc, fan, norm="fan_in")
    assert torch.allclose(normed["b"], nwc["b"] / 36)
    rounded = nwc_scores({"a": torch.tensor([0.123456, 0.00004])}, precision="round4")
    assert rounded["a"].tolist() == [0.1235, 0.0]


def test_target_layers_exclude_shortcuts_by_default():
    m = small("preactresnet18", 3, 8, 0.0625)
    layers = target_layer_names(m)
    assert len(layers) == 17 and not any("shortcut" in n for n in layers) and layers[0] == "conv1"
    assert len(target_layer_names(m, include_shortcut=True)) == 20
    assert target_layer_names(m, include_linear=True)[-1] == "linear"


# ----------------------------------------------------------------------------- pruning

def test_pruning_zeroes_exactly_the_global_top_k():
    model = small()
    layers = target_layer_names(model)
    g = torch.Generator().manual_seed(5)
    mods = dict(model.named_modules())
    scores = {n: torch.rand(mods[n].weight.shape[0], generator=g, dtype=torch.float64) for n in layers}
    n_total = sum(v.numel() for v in scores.values())
    gamma = 0.2
    masks = select_top_neurons(scores, gamma)
    k = math.floor(gamma * n_total)
    flat = sorted(((float(v[i]), n, i) for n, v in scores.items() for i in range(v.numel())), reverse=True)
    expected = {(n, i) for _, n, i in flat[:k]}
    got = {(n, i) for n, m in masks.items() for i in torch.nonzero(m).flatten().tolist()}
    assert got == expected and len(got) == k
    assert len({n for n, _ in got}) > 1  # the ranking is global, across layers
    pruned = prune_neurons(model, masks)
    pm = dict(pruned.named_modules())
    for n in layers:
        w, w0 = pm[n].weight, mods[n].weight
        for i in range(w.shape[0]):
            if masks[n][i]:
                assert bool((w[i] == 0).all())
            else:
                assert torch.equal(w[i], w0[i])
    for k_, v in model.state_dict().items():  # BN and non-target parameters are not touched
        if not any(k_ == f"{n}.weight" for n in layers):
            assert torch.equal(pruned.state_dict()[k_], v)


def test_layer_ranking_prunes_the_top_share_of_each_layer():
    model = small("preactresnet18", 3, 10, 0.125)
    layers = target_layer_names(model)
    g = torch.Generator().manual_seed(6)
    mods = dict(model.named_modules())
    # deeper layers get larger scores, so a global ranking would take them only
    scores = {n: torch.rand(mods[n].weight.shape[0], generator=g, dtype=torch.float64) + 10 * i
              for i, n in enumerate(layers)}
    masks = select_top_neurons(scores, 0.25, ranking="layer")
    for n in layers:
        k = math.floor(0.25 * scores[n].numel())
        assert int(masks[n].sum()) == k
        assert set(torch.nonzero(masks[n]).flatten().tolist()) == set(torch.argsort(-scores[n])[:k].tolist())
    assert sum(bool(m.any()) for m in select_top_neurons(scores, 0.25).values()) < len(layers)
    ties = select_top_neurons({"a": torch.tensor([1.0, 2.0, 2.0, 0.5])}, 0.5, ranking="layer")
    assert ties["a"].tolist() == [False, True, True, False]
    with pytest.raises(ValueError, match="ranking"):
        select_top_neurons(scores, 0.1, ranking="local")
    d = get_defense("otbr")(gamma=0.25, ranking="layer", unlearn_steps=1, unlearn_batch_size=8)
    out = d.mitigate(model, context(d, (3, 10, 10)))
    assert out.diagnostics["pruned_per_layer"] == {n: math.floor(0.25 * scores[n].numel()) for n in layers}
    # fuse: false is the pruned model alone: pruned rows zero, every other parameter the backdoored one
    d = get_defense("otbr")(gamma=0.25, ranking="layer", fuse=False, unlearn_steps=1, unlearn_batch_size=8)
    out = d.mitigate(model, context(d, (3, 10, 10)))
    assert out.diagnostics["fused_layers"] == [] and out.diagnostics["fusion_start"] is None
    got, want = out.model.state_dict(), model.state_dict()
    for k, v in want.items():
        layer = k.rsplit(".", 1)[0]
        if k.endswith(".weight") and layer in out.diagnostics["pruned_neurons"]:
            rows = out.diagnostics["pruned_neurons"][layer]
            assert bool((got[k][rows] == 0).all())
            keep = [i for i in range(v.shape[0]) if i not in rows]
            assert torch.equal(got[k][keep], v[keep])
        else:
            assert torch.equal(got[k], v), k


def test_num_to_prune_and_tie_breaking():
    assert num_to_prune(100, 0.29) == 29  # 0.29 * 100 = 28.999999999999996 in floating point
    assert num_to_prune(10, 0.0) == 0
    ranked, _ = global_ranking({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([2.0, 1.0])})
    assert ranked == [("a", 1), ("b", 0), ("a", 0), ("b", 1)]


# ----------------------------------------------------------------------------- transport and fusion

@pytest.mark.parametrize("solver", ["emd", "sinkhorn"])
def test_transport_plan_has_requested_marginals(solver):
    rng = np.random.default_rng(0)
    a = np.full(7, 1 / 7)
    b = target_masses(torch.tensor([0.0, 0.3, 1.2, 0.05, 0.0, 2.0, 0.4]))
    cost = rng.random((7, 7))
    plan = transport_plan(a, b, cost, solver, reg=0.05)
    tol = 1e-10 if solver == "emd" else 1e-6
    assert np.allclose(plan.sum(1), a, atol=tol) and np.allclose(plan.sum(0), b, atol=tol)
    assert (plan >= 0).all()


def test_target_masses_never_zero():
    b = target_masses(torch.tensor([0.0, 0.0, 3.0]), floor=1e-3)
    assert (b > 0).all() and b.sum() == pytest.approx(1.0)
    assert np.allclose(target_masses(torch.zeros(4)), 0.25)  # all-zero NWC (e.g. rounded away): uniform
    assert np.allclose(target_masses(torch.tensor([1.0, 3.0]), "uniform"), 0.5)


def test_lambda_zero_returns_backdoored_weights_exactly():
    bd = small()
    layers = target_layer_names(bd)
    scores = {n: torch.rand(dict(bd.named_modules())[n].weight.shape[0], dtype=torch.float64) for n in layers}
    pruned = prune_neurons(bd, select_top_neurons(scores, 0.3))
    masses = {n: target_masses(scores[n]) for n in layers}
    fused = fuse_models(pruned, bd, layers, masses, lam=0.0).model
    for k, v in bd.state_dict().items():
        assert torch.equal(fused.state_dict()[k], v), k


def permute_channels(model: nn.Module, chain: list[tuple[str, list[str], str]], seed=0) -> nn.Module:
    """Function-preserving permutation: for (conv, its BNs, consumer) permute conv outputs, BNs, consumer inputs."""
    out = copy.deepcopy(model)
    mods = dict(out.named_modules())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv, bns, consumer in chain:
            perm = torch.randperm(mods[conv].weight.shape[0], generator=g)
            mods[conv].weight.copy_(mods[conv].weight[perm])
            if mods[conv].bias is not None:
                mods[conv].bias.copy_(mods[conv].bias[perm])
            for bn in bns:
                for p in ("weight", "bias", "running_mean", "running_var"):
                    getattr(mods[bn], p).copy_(getattr(mods[bn], p)[perm])
            w = mods[consumer].weight
            if w.dim() == 2 and w.shape[1] != perm.numel():  # flattened C x H x W input
                r = w.shape[1] // perm.numel()
                idx = (perm[:, None] * r + torch.arange(r)).flatten()
                w.copy_(w[:, idx])
            else:
                w.copy_(w[:, perm])
    return out


@pytest.mark.parametrize("arch", ["smallcnn", "preactresnet18", "vgg19_bn", "resnet18"])
def test_alignment_recovers_a_permutation(arch):
    """Uniform masses, lambda=1: fusing a model into a channel-permuted copy of itself reproduces its outputs
    (the OT plan is the permutation), both with gamma=0 (fusing the model with itself) and across a permutation."""
    if arch == "smallcnn":
        model, shape = small(), (1, 12, 12)
        chain = [("features.0", ["features.1"], "features.3"), ("features.3", ["features.4"], "features.7"),
                 ("features.7", ["features.8"], "linear")]
    elif arch == "preactresnet18":
        model, shape = small(arch, 3, 8, 0.0625), (3, 8, 8)
        chain = [(f"layer{s}.{b}.conv1", [f"layer{s}.{b}.bn2"], f"layer{s}.{b}.conv2") for s in range(1, 5) for b in (0, 1)]
    elif arch == "resnet18":  # post-activation: conv1 -> bn1 (attached, transported) -> relu -> conv2
        model, shape = small(arch, 3, 8, 0.0625, stem="cifar"), (3, 8, 8)
        chain = [(f"layer{s}.{b}.conv1", [f"layer{s}.{b}.bn1"], f"layer{s}.{b}.conv2") for s in range(1, 5) for b in (0, 1)]
    else:
        model, shape = small(arch, 3, 32, 0.0625), (3, 32, 32)
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        chain = [(c, [f"features.{int(c.split('.')[1]) + 1}"], nxt) for c, nxt in zip(convs, convs[1:] + ["classifier.0"])]
    layers = target_layer_names(model)
    x = torch.randn(6, *shape)
    with torch.no_grad():
        y = model(x)
        same = fuse_models(model, model, layers, uniform_masses(model, layers), lam=1.0).model
        assert torch.allclose(same(x), y, atol=1e-5)
        permuted = permute_channels(model, chain)
        assert torch.allclose(permuted(x), y, atol=1e-4)  # the permutation preserves the function
        fused = fuse_models(model, permuted, layers, uniform_masses(model, layers), lam=1.0)
        assert torch.allclose(fused.model(x), y, atol=1e-4)
        for n, plan in fused.plans.items():  # each plan is a (scaled) permutation
            assert np.allclose(np.sort(plan.max(1)), 1 / plan.shape[0]) and ((plan > 1e-12).sum(1) == 1).all(), n
        # a mixed model (lam=0.5) of a model and its permuted copy is again the same function
        half = fuse_models(model, permuted, layers, uniform_masses(model, layers), lam=0.5).model
        assert torch.allclose(half(x), y, atol=1e-4)


def test_trace_links_follow_the_residual_structure():
    m = small("preactresnet18", 3, 8, 0.0625)
    links, how = trace_links(m, target_layer_names(m, include_linear=True), "block")
    assert how == "graph"
    assert links["layer1.0.conv2"].input_from == "layer1.0.conv1"
    assert links["layer1.0.conv1"].attached == ("layer1.0.bn2",)
    assert links["layer1.1.conv1"].input_from is None  # reads the residual sum
    assert links["layer1.0.conv2"].attached == ()  # the next BN normalizes a residual sum, not this conv alone
    assert links["linear"].is_output and links["linear"].input_from is None
    chain, _ = trace_links(m, target_layer_names(m), "chain")
    assert chain["layer1.1.conv1"].input_from == "layer1.0.conv2"  # the published code's chaining
    v = small("vgg19_bn", 3, 32, 0.0625)
    vl, _ = trace_links(v, target_layer_names(v, include_linear=True), "block")
    assert vl["classifier.0"].input_from == "features.49" and vl["classifier.0"].input_repeat == 49
    assert vl["features.3"].attached == ("features.4",)


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_trace_links_on_post_activation_resnet18(stem):
    """torchvision-style blocks: every conv has its own BN right after it (attached, so it moves with the
    conv's neurons); block outputs are residual sums (identity input map), the stem feeds layer1.0.conv1
    through bn1, ReLU and the max-pool."""
    m = small("resnet18", 3, 16, 0.0625, stem=stem)
    layers = target_layer_names(m, include_shortcut=True, include_linear=True)
    assert "layer2.0.downsample.0" in layers and "layer2.0.downsample.0" not in target_layer_names(m)
    links, how = trace_links(m, layers, "block")
    assert how == "graph"
    assert links["conv1"].attached == ("bn1",) and links["conv1"].input_from is None
    assert links["layer1.0.conv1"].input_from == "conv1"  # stem -> bn1 -> relu -> maxpool -> conv1
    assert links["layer1.0.conv1"].attached == ("layer1.0.bn1",)
    assert links["layer1.0.conv2"].input_from == "layer1.0.conv1" and links["layer1.0.conv2"].attached == ("layer1.0.bn2",)
    for name in ("layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0", "layer4.1.conv1", "fc"):
        assert links[name].input_from is None, name  # they read a residual sum
    assert links["layer2.0.downsample.0"].attached == ("layer2.0.downsample.1",)
    assert links["fc"].is_output and not links["layer4.1.conv2"].is_output


def test_fused_resnet18_keeps_the_residual_stream_in_the_backdoored_order():
    """Fusing a resnet18 into itself with a pruned copy at lam=0 is the identity; at lam=1 with nothing pruned
    (gamma=0 scores) it reproduces the function; each fused BN moved with its conv."""
    model = small("resnet18", 1, 12, 0.125, stem="cifar")
    layers = target_layer_names(model)
    x = torch.randn(4, 1, 12, 12)
    res = fuse_models(model, model, layers, uniform_masses(model, layers), lam=1.0)
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), model(x), atol=1e-5, rtol=1e-5)
    assert res.links["layer3.1.conv2"].attached == ("layer3.1.bn2",)
    mods = dict(model.named_modules())
    scores = {n: torch.rand(mods[n].weight.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
              for n in layers}
    pruned = prune_neurons(model, select_top_neurons(scores, 0.2))
    half = fuse_models(pruned, model, layers, {n: target_masses(scores[n]) for n in layers}, lam=0.5).model
    with torch.no_grad():
        assert torch.isfinite(half(x)).all() and not torch.allclose(half(x), model(x))


class _Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x  # data-dependent control flow: torch.fx cannot follow it


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.gate = _Gate()
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.gate(torch.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn2(self.conv2(x)))), 1))


class _Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn2(self.dw(x)))), 1))


def test_otbr_on_any_module_fails_naming_the_layer_it_cannot_handle():
    d = get_defense("otbr")(gamma=0.2, unlearn_steps=1, unlearn_batch_size=4)
    with pytest.raises(ValueError, match=r"layer 'gate' \(_Gate\) fails to trace"):
        d.mitigate(_Untraceable().eval(), context(d))
    with pytest.raises(ValueError, match=r"cannot fuse layer 'dw' \(Conv2d with groups=8\)"):
        d.mitigate(_Depthwise().eval(), context(d))
    # the published chaining needs no graph: the reference setting still runs (with a warning)
    ref = get_defense("otbr")(setting="reference", mass_floor=1e-3, gamma=0.2, unlearn_steps=1, unlearn_batch_size=4)
    with pytest.warns(UserWarning, match="layer 'gate'"):
        out = ref.mitigate(_Untraceable().eval(), context(ref))
    assert out.diagnostics["link_source"] == "module order"
    # any module the graph can follow works (here a plain nn.Sequential, not from the zoo)
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    out = d.mitigate(seq, context(d))
    assert out.diagnostics["link_source"] == "graph"  # "3", the last target layer, is always fused
    assert out.diagnostics["input_links"]["3"] == "0" and out.diagnostics["attached_bn"]["3"] == ["4"]


def test_output_layer_is_never_reordered():
    model = small()
    layers = target_layer_names(model, include_linear=True)
    scores = {n: torch.rand(dict(model.named_modules())[n].weight.shape[0], dtype=torch.float64) for n in layers}
    res = fuse_models(prune_neurons(model, select_top_neurons(scores, 0.2)), model, layers,
                      {n: target_masses(scores[n]) for n in layers}, start="features.0")
    plan = res.plans["linear"]
    assert np.allclose(plan, np.diag(np.diag(plan)))


def test_zero_nwc_neuron_fuses_without_nan():
    model = small()
    layers = target_layer_names(model)
    mods = dict(model.named_modules())
    scores = {n: torch.rand(mods[n].weight.shape[0], dtype=torch.float64) for n in layers}
    scores[layers[1]][:3] = 0.0  # some zero NWCs
    scores[layers[2]][:] = 0.0  # a whole layer of zero NWCs
    masks = select_top_neurons(scores, 0.25)
    res = fuse_models(prune_neurons(model, masks), model, layers, {n: target_masses(scores[n]) for n in layers})
    for k, v in res.model.state_dict().items():
        assert torch.isfinite(v.float()).all(), k
    # the reference setting with NWCs that all round to 0.0000: the published code divides by zero; ours says so
    d = get_defense("otbr")(setting="reference", unlearn_lr=1e-12, unlearn_steps=1, unlearn_batch_size=8, gamma=0.1)
    with pytest.raises(ValueError, match="transport mass is zero.*divides by zero"):
        d.mitigate(model, context(d))
    # ... and with the repaired mass floor it yields a finite model
    d = get_defense("otbr")(setting="reference", mass_floor=1e-3, unlearn_lr=1e-12, unlearn_steps=1,
                            unlearn_batch_size=8, gamma=0.1)
    out = d.mitigate(model, context(d))
    assert (out.tables["nwc"]["score"] == 0).all()
    assert all(torch.isfinite(v.float()).all() for v in out.model.state_dict().values())


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("field,value,needle", [
    ("gamma", 1.0, "gamma"), ("gamma", -0.1, "gamma"), ("lam", 1.5, "lam"), ("lam", -0.01, "lam"),
    ("unlearn_steps", 0, "unlearn_steps"), ("unlearn_steps", 2.5, "unlearn_steps"), ("cost", "l2", "cost"),
    ("setting", "paper", "setting"), ("mass_floor", -0.1, "mass_floor"), ("ranking", "local", "ranking"),
])
def test_invalid_config_is_rejected_with_a_clear_message(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        OTBRConfig(**{field: value})


def test_config_from_mapping_rejects_unknown_keys_and_settings_resolve():
    with pytest.raises(ValueError, match="unknown key"):
        OTBRConfig.from_dict({"gama": 0.1})
    with pytest.raises(ValueError, match="gamma"):
        get_defense("otbr")(gamma=1.2)
    ref = OTBRConfig(setting="reference")
    assert (ref.noise_space, ref.label_range, ref.nwc_precision, ref.cost, ref.residual, ref.attached) == \
        ("normalized", "k_minus_1", "round4", "unaligned", "chain", "keep")
    assert ref.deviations_from_reference() == {}
    assert OTBRConfig().deviations_from_reference()["cost"] == "aligned"
    switched = OTBRConfig(cost="unaligned").replace(setting="reference", gamma=0.1)
    assert switched.label_range == "k_minus_1" and switched.gamma == 0.1
    mixed = OTBRConfig.from_dict({"setting": "reference", "label_range": "all"})  # one fix on top of reference
    assert mixed.label_range == "all" and mixed.cost == "unaligned"
    assert OTBRConfig.from_dict(ref.to_dict()) == ref


# ----------------------------------------------------------------------------- the defense

@pytest.mark.parametrize("arch,shape", [("smallcnn", (1, 12, 12)), ("preactresnet18", (3, 10, 10)),
                                        ("vgg19_bn", (1, 32, 32)), ("resnet18", (1, 12, 12))])
def test_defense_end_to_end(arch, shape):
    assert "otbr" in list_defenses() and get_defense("otbr") is OTBRDefense
    model = small(arch, shape[0], shape[1], 0.0625 if arch != "smallcnn" else 0.5)
    before = copy.deepcopy(model.state_dict())
    d = get_defense("otbr")(gamma=0.1, unlearn_steps=2, unlearn_batch_size=8)
    out = d.mitigate(model, context(d, shape))
    nwc = out.tables["nwc"]
    assert list(nwc.columns[:5]) == ["layer", "neuron", "nwc", "score", "rank"] and "pruned" in nwc
    n = len(nwc)
    assert out.diagnostics["num_pruned"] == int(nwc["pruned"].sum()) == math.floor(0.1 * n)
    assert set(nwc.loc[nwc["pruned"], "rank"]) == set(range(1, math.floor(0.1 * n) + 1))
    assert set(out.stage_seconds) == {"unlearning", "nwc", "auto", "prune_fuse"}
    assert out.data_used == "none" and d.needs_clean_data is False
    assert out.diagnostics["fusion_start"] == next(l for l in out.diagnostics["target_layers"]
                                                   if out.diagnostics["pruned_per_layer"][l] > 0)
    json.dumps(out.diagnostics)  # JSON-able
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    x = torch.randn(3, *shape)
    with torch.no_grad():
        assert torch.isfinite(out.model(x)).all()
        assert not torch.allclose(out.model(x), model(x))


def test_defense_is_deterministic_and_gamma_zero_is_identity():
    model = small()
    d = get_defense("otbr")(gamma=0.2, unlearn_steps=2, unlearn_batch_size=16)
    a = d.mitigate(model, context(d, seed=3)).model.state_dict()
    b = d.mitigate(model, context(d, seed=3)).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    d0 = get_defense("otbr")(gamma=0.0, lam=1.0, target_mass="uniform", unlearn_steps=1, unlearn_batch_size=8)
    out = d0.mitigate(model, context(d0))
    x = torch.randn(4, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(out.model(x), model(x))
    assert out.diagnostics["num_pruned"] == 0


# ----------------------------------------------------------------------------- CLI and the oracle sweep

def test_defend_cli_with_oracle_sweep(tmp_path, tiny_fashion_bundle):
    from benchmark_adapters.bundle import load_bundle
    from otbr_plugin.cli import main

    _, root = tiny_fashion_bundle
    out = tmp_path / "out"
    rc = main(["defend", str(tmp_path / "bundle"), "--defense", "otbr", "--data-root", str(root), "--device", "cpu",
               "--no-progress", "--set", "unlearn_steps=2", "--set", "unlearn_batch_size=8", "--set", "gamma=0.1",
               "--out", str(out), "--sweep", "gamma=0.0,0.2"])
    assert rc == 0
    record = json.loads((out / "record.json").read_text())
    assert record["defense_config"]["gamma"] == 0.1 and record["data_used"] == "none"
    nwc = pd.read_csv(out / "nwc.csv")
    assert nwc["pruned"].sum() == record["diagnostics"]["num_pruned"]
    sweep = pd.read_csv(out / "oracle_sweep_gamma.csv")
    assert sweep["gamma"].tolist() == [0.0, 0.2] and (sweep["diagnostic"] == "oracle diagnostic (test set)").all()
    assert (out / "oracle_sweep_gamma.png").stat().st_size > 0
    assert load_bundle(out / "model").defense["config"]["gamma"] == 0.1  # the sweep never touches the result
    # a bad sweep key fails before anything runs
    assert main(["defend", str(tmp_path / "bundle"), "--defense", "otbr", "--data-root", str(root),
                 "--out", str(tmp_path / "bad"), "--sweep", "gama=0.1"]) == 1
    assert not (tmp_path / "bad").exists()


def test_shared_nwc_gives_the_same_result_as_a_fresh_run():
    model = small()
    base = get_defense("otbr")(gamma=0.1, unlearn_steps=2, unlearn_batch_size=16)
    other = get_defense("otbr")(gamma=0.25, unlearn_steps=2, unlearn_batch_size=16)
    other.share_work_with(base)
    base.mitigate(model, context(base))
    shared = other.mitigate(model, context(other))
    fresh = get_defense("otbr")(gamma=0.25, unlearn_steps=2, unlearn_batch_size=16).mitigate(model, context(other))
    assert shared.diagnostics["unlearning_reused"] and not fresh.diagnostics["unlearning_reused"]
    a, b = shared.model.state_dict(), fresh.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    changed = get_defense("otbr")(gamma=0.25, unlearn_steps=3, unlearn_batch_size=16)  # unlearning differs: no reuse
    changed.share_work_with(base)
    assert not changed.mitigate(model, context(changed)).diagnostics["unlearning_reused"]
