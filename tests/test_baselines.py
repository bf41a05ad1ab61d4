"""Baselines CLP, FP and ANP: the method steps against hand-computed values and planted structure, and the
data rules (no test data through the context; FP's stopping rule reads only the defense subset)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import otbr_plugin.data as data_pkg
import otbr_plugin.data.datasets as datasets_mod
from otbr_plugin.data import Normalizer
from otbr_plugin.defenses import CleanData, DefenseContext, build_context, create_defense, get_defense, list_defenses
from otbr_plugin.defenses import anp as anp_mod
from otbr_plugin.defenses import fp as fp_mod
from otbr_plugin.defenses.clp import channel_lipschitz, clp_scores, outlier_channels
from otbr_plugin.defenses.common import split_holdout
from otbr_plugin.defenses.structure import backdoorbench_pairs, feature_site, structural_pairs
from otbr_plugin.models import create_model

NORM = Normalizer((0.5,), (0.5,))


def tiny_cnn(num_classes: int = 4, size: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return create_model("smallcnn", num_classes, 1, size, 0.25).eval()  # 4, 8, 16 channels


def tiny_preact(size: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return create_model("preactresnet18", 4, 1, size, 0.0625).eval()  # 4, 8, 16, 32 channels


def tiny_resnet18(size: int = 8) -> nn.Module:
    torch.manual_seed(0)
    model = create_model("resnet18", 4, 1, size, 0.25, stem="cifar").eval()  # 16, 32, 64, 128 channels
    with torch.no_grad():  # trained-looking BN statistics, so that the BN scale matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.8, 1.2)
    return model


def clean_subset(n: int = 80, classes: int = 4, size: int = 8, seed: int = 0) -> CleanData:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g)
    return CleanData(images, torch.arange(n) % classes)


def context_for(defense, clean: CleanData | None = None, size: int = 8, classes: int = 4) -> DefenseContext:
    return build_context(defense, num_classes=classes, input_shape=(1, size, size), normalizer=NORM,
                         device=torch.device("cpu"), seed=0, progress=False, clean_data=clean, dataset=None)


@pytest.fixture(autouse=True)
def no_dataset_loading(monkeypatch):
    """No baseline may load any dataset (test or otherwise): everything comes through the context."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a defense tried to load a dataset: {args} {kwargs}")
    monkeypatch.setattr(datasets_mod, "load_dataset", refuse)
    monkeypatch.setattr(data_pkg, "load_dataset", refuse)


def test_registered_with_data_flags():
    assert {"clp", "fp", "anp"} <= set(list_defenses())
    assert get_defense("clp").needs_clean_data is False
    assert get_defense("fp").needs_clean_data is True
    assert get_defense("anp").needs_clean_data is True


def test_configs_validate():
    with pytest.raises(ValueError, match="pairing"):
        create_defense("clp", pairing="order")
    with pytest.raises(ValueError, match="acc_ratio"):
        create_defense("fp", acc_ratio=1.5)
    with pytest.raises(ValueError, match="unknown key"):
        create_defense("anp", {"epsilon": 0.4})
    with pytest.raises(ValueError, match="select_threshold"):
        create_defense("anp", select_threshold=True, pruning_by="number")
    assert create_defense("anp").config.eps == 0.4 and create_defense("clp").config.u == 3.0


# ---------------------------------------------------------------- context: no test data, ever

def test_context_has_no_test_data_and_data_free_gets_none():
    fields = {f.name for f in dataclasses.fields(DefenseContext)}
    assert not any("test" in f for f in fields)
    clean = clean_subset()
    clp = create_defense("clp")
    ctx = context_for(clp, clean)
    assert ctx.clean_data is None and ctx.data_used() == "none"
    fp = create_defense("fp")
    assert context_for(fp, clean).clean_data is clean
    with pytest.raises(ValueError, match="needs clean data"):
        context_for(fp, None)
    with pytest.raises(ValueError, match="training split"):
        CleanData(clean.images, clean.labels, source="test")


def test_data_dependent_baselines_refuse_a_context_without_data():
    model = tiny_cnn()
    bare = DefenseContext(num_classes=4, input_shape=(1, 8, 8), normalizer=NORM, progress=False)
    for name in ("fp", "anp"):
        with pytest.raises(ValueError, match="needs a clean defense subset"):
            create_defense(name).mitigate(model, bare)


# ---------------------------------------------------------------- CLP

def test_clp_bound_matches_hand_computed_value():
    conv = nn.Conv2d(2, 2, kernel_size=(1, 2), bias=False)
    bn = nn.BatchNorm2d(2, eps=0.0)
    with torch.no_grad():
        # channel 0: kernel as (C_in, kh*kw) = [[3, 0], [0, 4]] -> largest singular value 4
        conv.weight[0] = torch.tensor([[[3.0, 0.0]], [[0.0, 4.0]]])
        # channel 1: [[1, 1], [1, 1]] -> largest singular value 2
        conv.weight[1] = torch.ones(2, 1, 2)
        bn.weight.copy_(torch.tensor([-3.0, 1.0]))
        bn.running_var.copy_(torch.tensor([4.0, 1.0]))
    # UCLC = sigma_max * |gamma| / sqrt(var): 4 * 3 / 2 = 6 and 2 * 1 / 1 = 2
    model = nn.Sequential(conv, bn, nn.ReLU()).eval()
    (pair, uclc), = clp_scores(model, "structural")
    assert (pair.conv, pair.bn, pair.exclusive) == ("0", "1", True)
    torch.testing.assert_close(uclc, torch.tensor([6.0, 2.0]))
    torch.testing.assert_close(channel_lipschitz(conv.weight), torch.tensor([4.0, 2.0]))
    mask, mean, std, thr = outlier_channels(torch.tensor([1.0, 1.0, 1.0, 5.0]), u=1.0)
    assert mask.tolist() == [False, False, False, True] and thr == pytest.approx(2.0 + 2.0)


def _plant(conv: nn.Conv2d, outlier: int, big: float = 10.0) -> None:
    """Give every channel a single-entry kernel (spectral norm = that entry), evenly spread in [1, 1.2]
    (no natural outliers), and channel ``outlier`` a large one."""
    with torch.no_grad():
        conv.weight.zero_()
        n = conv.out_channels
        for k, s in enumerate(torch.linspace(1.0, 1.2, n)):
            conv.weight[k, k % conv.in_channels, 0, 0] = big if k == outlier else s


def test_clp_prunes_exactly_the_planted_channel_conv_bn():
    model = tiny_cnn()
    for conv in (model.features[0], model.features[3], model.features[7]):
        _plant(conv, outlier=-1)
    _plant(model.features[7], outlier=5)  # 16 channels: one outlier among n can reach (n-1)/sqrt(n) > 3 stds
    with torch.no_grad():
        model.features[8].bias.fill_(0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clp = create_defense("clp")
    out = clp.mitigate(model, context_for(clp))
    layers = {l["layer"]: l["pruned"] for l in out.diagnostics["layers"]}
    assert layers == {"features.0": [], "features.3": [], "features.7": [5]}
    sd = out.model.state_dict()
    assert torch.all(sd["features.7.weight"][5] == 0) and sd["features.8.weight"][5] == 0 and sd["features.8.bias"][5] == 0
    changed = [k for k in sd if not torch.equal(sd[k], before[k])]
    assert sorted(changed) == ["features.7.weight", "features.8.bias", "features.8.weight"]
    torch.testing.assert_close(model.state_dict()["features.7.weight"], before["features.7.weight"])  # input untouched
    table = out.tables["uclc"]
    assert len(table) == 4 + 8 + 16 and table["pruned"].sum() == 1


def test_clp_pairing_on_preact_blocks():
    model = tiny_preact()
    s = {p.conv: (p.bn, p.exclusive) for p in structural_pairs(model)}
    assert s["conv1"] == ("layer1.0.bn1", True)  # BN reads the stem directly (the identity shortcut too)
    assert s["layer1.0.conv1"] == ("layer1.0.bn2", True)
    assert s["layer1.0.conv2"] == ("layer1.1.bn1", False)  # after the residual add
    assert s["layer2.0.shortcut.0"] == ("layer2.1.bn1", False)
    assert s["layer4.1.conv2"] == (None, False)  # no BN follows: weight alone
    b = {p.bn: p.conv for p in backdoorbench_pairs(model)}
    assert b["layer2.1.bn1"] == "layer2.0.shortcut.0"  # module order, as BackdoorBench
    assert b["layer2.0.bn2"] == "layer2.0.conv1"
    assert len(b) == 16  # every BN (conv1 precedes them all)


def test_clp_preact_planted_outliers_exclusive_and_residual():
    model = tiny_preact()
    with torch.no_grad():
        model.layer3[0].conv1.weight[3] *= 50  # conv1 -> bn2: exclusive
        model.layer4[0].conv2.weight[6] *= 50  # conv2 -> add -> layer4.1.bn1: residual
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clp = create_defense("clp")
    out = clp.mitigate(model, context_for(clp))
    layers = {l["layer"]: l["pruned"] for l in out.diagnostics["layers"]}
    assert layers["layer3.0.conv1"] == [3] and layers["layer4.0.conv2"] == [6]
    sd = out.model.state_dict()
    assert torch.all(sd["layer3.0.conv1.weight"][3] == 0)
    assert sd["layer3.0.bn2.weight"][3] == 0 and sd["layer3.0.bn2.bias"][3] == 0
    assert torch.all(sd["layer4.0.conv2.weight"][6] == 0)
    for key in ("layer4.1.bn1.weight", "layer4.1.bn1.bias"):  # the BN after the add also sees the shortcut
        torch.testing.assert_close(sd[key], before[key])
    bb = create_defense("clp", pairing="backdoorbench")
    out_bb = bb.mitigate(model, context_for(bb))
    layers_bb = {l["layer"]: l["pruned"] for l in out_bb.diagnostics["layers"]}
    assert layers_bb["layer3.0.bn2"] == [3]
    sd_bb = out_bb.model.state_dict()
    assert sd_bb["layer3.0.bn2.weight"][3] == 0 and torch.equal(sd_bb["layer3.0.conv1.weight"], before["layer3.0.conv1.weight"])


def test_clp_stem_outlier_prunes_the_bn_path_not_the_residual_stream():
    torch.manual_seed(0)
    model = create_model("preactresnet18", 4, 1, 8, 0.25).eval()  # 16 stem channels
    with torch.no_grad():
        model.conv1.weight[2] *= 50
        model.layer1[0].bn1.bias.fill_(0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pair = next(p for p in structural_pairs(model) if p.conv == "conv1")
    assert pair.exclusive and pair.shared_output  # feeds layer1.0.bn1 and the identity shortcut
    clp = create_defense("clp")
    out = clp.mitigate(model, context_for(clp))
    assert {l["layer"]: l["pruned"] for l in out.diagnostics["layers"]}["conv1"] == [2]
    sd = out.model.state_dict()
    assert sd["layer1.0.bn1.weight"][2] == 0 and sd["layer1.0.bn1.bias"][2] == 0
    assert torch.equal(sd["conv1.weight"], before["conv1.weight"])  # the identity path keeps the channel


def test_clp_pairing_on_post_activation_resnet18():
    """torchvision-style blocks put a BN right after every conv (stem, both convs of a block, the downsample
    projection): every pair is exclusive, and module order (BackdoorBench's pairing) agrees with the graph."""
    model = tiny_resnet18()
    pairs = structural_pairs(model)
    s = {p.conv: (p.bn, p.exclusive, p.shared_output) for p in pairs}
    assert len(pairs) == 20
    assert s["conv1"] == ("bn1", True, False)
    assert s["layer1.0.conv2"] == ("layer1.0.bn2", True, False)
    assert s["layer3.0.downsample.0"] == ("layer3.0.downsample.1", True, False)
    assert s["layer4.1.conv2"] == ("layer4.1.bn2", True, False)
    assert {(p.conv, p.bn) for p in backdoorbench_pairs(model)} == {(p.conv, p.bn) for p in pairs}


def test_clp_resnet18_planted_outlier_silences_the_branch_not_the_stream():
    model = tiny_resnet18()
    with torch.no_grad():
        model.layer3[0].conv2.weight[5] *= 50  # conv2 -> bn2 -> (+ shortcut)
        model.layer2[0].conv1.weight[7] *= 50  # conv1 -> bn1 -> relu -> conv2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clp = create_defense("clp")
    out = clp.mitigate(model, context_for(clp))
    layers = {l["layer"]: l["pruned"] for l in out.diagnostics["layers"]}
    assert layers["layer3.0.conv2"] == [5] and layers["layer2.0.conv1"] == [7]
    sd = out.model.state_dict()
    for conv, bn, k in (("layer3.0.conv2", "layer3.0.bn2", 5), ("layer2.0.conv1", "layer2.0.bn1", 7)):
        assert torch.all(sd[f"{conv}.weight"][k] == 0) and sd[f"{bn}.weight"][k] == 0 and sd[f"{bn}.bias"][k] == 0
    # the pruned channel of the residual branch is exactly 0 after its BN; the shortcut still carries the channel
    seen = {}
    out.model.layer3[0].bn2.register_forward_hook(lambda m, a, o: seen.update(bn2=o.clone()))
    out.model.layer3[0].downsample.register_forward_hook(lambda m, a, o: seen.update(short=o.clone()))
    with torch.no_grad():
        out.model(torch.randn(3, 1, 8, 8))
    assert torch.all(seen["bn2"][:, 5] == 0) and seen["short"][:, 5].abs().sum() > 0
    assert torch.equal(model.state_dict()["layer3.0.conv2.weight"], before["layer3.0.conv2.weight"])


class _Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x  # data-dependent control flow: torch.fx cannot follow it


def test_clp_on_any_module_names_the_layer_it_cannot_follow():
    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), _Gate(),
                             nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, 4)).eval()

    clp = create_defense("clp")
    with pytest.raises(ValueError, match=r"layer '3' \(_Gate\).*pairing='backdoorbench'"):
        clp.mitigate(net(), context_for(clp))
    out = create_defense("clp", pairing="backdoorbench").mitigate(net(), context_for(clp))
    assert out.diagnostics["scored_channels"] == 12
    # a traceable custom module works with the structural pairing
    traceable = nn.Sequential(*[m for i, m in enumerate(net()) if i != 3])
    assert create_defense("clp").mitigate(traceable, context_for(clp)).diagnostics["scored_channels"] == 12


# ---------------------------------------------------------------- FP

def test_fp_stopping_rule_is_sequential():
    accs = [0.9, 0.9, 0.89, 0.85, 0.7, 0.88]
    assert fp_mod.stopping_count(accs, 0.1, "relative") == 3  # floor 0.81; stops at the first violation
    assert fp_mod.stopping_count(accs, 0.02, "absolute") == 2  # floor 0.88
    assert fp_mod.stopping_count(accs, 0.5, "relative", max_count=2) == 2
    assert fp_mod.stopping_count(accs, 0.0, "relative") == 1


def _feature_model() -> nn.Module:
    """smallcnn whose last BN has weight 0 and distinct biases: feature channel k = relu(bias_k) for every input."""
    model = tiny_cnn()
    with torch.no_grad():
        bn = model.features[8]
        bn.weight.zero_()
        bn.bias.copy_(torch.tensor([5, 3, 9, 1, 7, 2, 8, 4, 6, 0.5, 11, 13, 12, 10, 14, 15], dtype=torch.float))
    return model


def test_fp_prunes_in_order_of_activation_and_bakes_the_mask():
    model = _feature_model()
    fp = create_defense("fp", prune_ratio=0.25, epochs=0)
    out = fp.mitigate(model, context_for(fp, clean_subset()))
    bias = model.features[8].bias.detach()
    expected = torch.argsort(bias)[:4].tolist()  # 0.5, 1, 2, 3 -> channels 9, 3, 5, 1
    assert out.diagnostics["pruned"] == expected
    acts = out.tables["activations"].set_index("channel")["mean_activation"]
    torch.testing.assert_close(torch.tensor(acts.values, dtype=torch.float), torch.relu(bias))
    sd = out.model.state_dict()
    assert torch.all(sd["linear.weight"][:, expected] == 0)
    assert torch.all(sd["features.7.weight"][expected] == 0) and torch.all(sd["features.8.bias"][expected] == 0)
    keep = [c for c in range(16) if c not in expected]
    torch.testing.assert_close(sd["linear.weight"][:, keep], model.linear.weight[:, keep])


def test_fp_stopping_rule_reads_only_the_holdout_of_the_defense_subset(monkeypatch):
    clean = clean_subset(n=100)
    fit, hold = split_holdout(clean, 0.2, seed=0)
    seen = []
    real_curve = fp_mod.pruning_curve

    def spy(tail, features, labels, *args, **kwargs):
        seen.append((features.shape[0], labels.clone()))
        return real_curve(tail, features, labels, *args, **kwargs)

    monkeypatch.setattr(fp_mod, "pruning_curve", spy)
    model = tiny_cnn()
    fp = create_defense("fp", epochs=1, batch_size=32)
    out = fp.mitigate(model, context_for(fp, clean))
    assert len(seen) == 1 and seen[0][0] == len(hold) and torch.equal(seen[0][1], hold.labels)
    assert out.diagnostics["holdout_samples"] == len(hold) and out.diagnostics["fit_samples"] == len(fit)
    assert out.data_used == "clean subset of 100"
    curve = out.tables["pruning_curve"]
    n = out.diagnostics["pruned_channels"]
    assert bool(curve.loc[n, "chosen"]) and n == fp_mod.stopping_count(curve["holdout_acc"].tolist(), 0.1,
                                                                        "relative", len(curve) - 1)


def test_fp_on_residual_net_masks_channels_in_the_classifier():
    model = tiny_preact()
    site = feature_site(model)
    assert site.producer is None and site.last_conv == "layer4.1.conv2"
    fp = create_defense("fp", prune_ratio=0.25, epochs=0)
    ctx = context_for(fp, clean_subset(n=40))
    out = fp.mitigate(model, ctx)
    pruned = out.diagnostics["pruned"]
    assert len(pruned) == 8
    mask = torch.ones(32)
    mask[pruned] = 0
    handle = model.avgpool.register_forward_pre_hook(lambda m, a: (a[0] * mask.view(1, -1, 1, 1),))
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
        handle.remove()
        torch.testing.assert_close(out.model(x), expected)  # the saved weights reproduce the mask


def test_fp_on_resnet18_masks_the_block_output_in_the_classifier():
    model = tiny_resnet18()
    site = feature_site(model)
    assert site.pool == "avgpool" and site.classifier == "fc"
    assert site.producer is None and site.last_conv == "layer4.1.conv2"  # the feature map is relu(bn2 + shortcut)
    fp = create_defense("fp", prune_ratio=0.25, epochs=0)
    out = fp.mitigate(model, context_for(fp, clean_subset(n=40)))
    pruned = out.diagnostics["pruned"]
    assert len(pruned) == 32
    mask = torch.ones(128)
    mask[pruned] = 0
    handle = model.avgpool.register_forward_pre_hook(lambda m, a: (a[0] * mask.view(1, -1, 1, 1),))
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
        handle.remove()
        torch.testing.assert_close(out.model(x), expected)


def test_anp_on_resnet18_perturbs_every_bn_neuron():
    model = tiny_resnet18()
    anp = create_defense("anp", iterations=2, batch_size=16, pruning_by="number", prune_number=6)
    out = anp.mitigate(model, context_for(anp, clean_subset()))
    table = out.tables["masks"]
    assert table["layer"].nunique() == 20 and "layer2.0.downsample.1" in set(table["layer"])
    assert out.diagnostics["pruned_neurons"] == 6


# ---------------------------------------------------------------- ANP

def test_anp_masks_move_under_perturbation():
    model = tiny_cnn()
    clean = clean_subset()
    cfg = anp_mod.ANPConfig(iterations=4, batch_size=16)
    ctx = context_for(create_defense("anp"), clean)
    masks, history = anp_mod.optimize_masks(anp_mod.ANP.copy_model(model, ctx.device), clean.images, clean.labels,
                                            ctx, cfg)
    values = torch.cat(list(masks.values()))
    assert set(masks) == {"features.1", "features.4", "features.8"} and values.numel() == 28
    assert values.min() >= 0 and values.max() <= 1 and (values < 1).sum() > 0
    calm, _ = anp_mod.optimize_masks(anp_mod.ANP.copy_model(model, ctx.device), clean.images, clean.labels, ctx,
                                     dataclasses.replace(cfg, eps=0.0))
    assert not torch.allclose(values, torch.cat(list(calm.values())))  # the perturbation changes the masks
    again, _ = anp_mod.optimize_masks(anp_mod.ANP.copy_model(model, ctx.device), clean.images, clean.labels, ctx, cfg)
    torch.testing.assert_close(values, torch.cat(list(again.values())))  # same seed, same masks
    assert len(history) >= 1


def test_anp_prunes_exactly_the_requested_count():
    model = tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    anp = create_defense("anp", iterations=3, batch_size=16, pruning_by="number", prune_number=5)
    out = anp.mitigate(model, context_for(anp, clean_subset()))
    assert out.diagnostics["pruned_neurons"] == 5
    sd = out.model.state_dict()
    zeroed = sum(int(((sd[f"{l}.weight"] == 0) & (before[f"{l}.weight"] != 0)).sum())
                 for l in ("features.1", "features.4", "features.8"))
    assert zeroed == 5
    table = out.tables["masks"]
    assert table["pruned"].sum() == 5
    assert table[table["pruned"]]["mask"].max() <= table[~table["pruned"]]["mask"].min()  # the smallest masks
    changed = {k for k in before if not torch.equal(sd[k], before[k])}
    assert changed <= {"features.1.weight", "features.4.weight", "features.8.weight"}  # BN weights only, as the reference
    frac = create_defense("anp", iterations=1, batch_size=16, pruning_by="fraction", prune_fraction=0.25)
    assert frac.mitigate(model, context_for(frac, clean_subset())).diagnostics["pruned_neurons"] == 7  # 0.25 * 28


def test_anp_threshold_selection_and_rule():
    masks = {"a": torch.tensor([0.0, 0.2, 0.5]), "b": torch.tensor([0.19, 1.0])}
    assert anp_mod.select_neurons(masks, "threshold", threshold=0.2) == [("a", 0), ("a", 1), ("b", 0)]
    assert anp_mod.select_neurons(masks, "number", number=2) == [("a", 0), ("b", 0)]
    anp = create_defense("anp", iterations=2, batch_size=16, select_threshold=True, threshold_grid=[0.1, 0.5, 0.9])
    out = anp.mitigate(tiny_cnn(), context_for(anp, clean_subset(n=100)))
    sel = out.tables["threshold_selection"]
    assert list(sel["threshold"]) == [0.1, 0.5, 0.9] and out.diagnostics["holdout_samples"] == 20
    within = sel[sel["within"]]["threshold"]
    assert out.diagnostics["threshold"] == (max(within) if len(within) else 0.0)
