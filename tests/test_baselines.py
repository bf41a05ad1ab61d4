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


# ---------------------------------------------------------------- setting: backdoorbench (BackdoorBench's fp.py / anp.py)
from otbr_plugin.defenses.base import ORACLE_LABEL  # noqa: E402
from otbr_plugin.metrics import BackdoorMetrics  # noqa: E402


def test_fp_backdoorbench_step_prunes_6_channels_per_step_with_the_off_by_one():
    steps = fp_mod.prune_schedule(512, 0.01, off_by_one=True, max_prune_ratio=1.0)
    assert steps[:4] == [(0, 0), (6, 5), (12, 11), (18, 17)]  # ceil(512 * 0.01) = 6; seq_sort[0:n-1]
    assert steps[-1] == (510, 509) and len(steps) == 86  # range(0, 512, 6), no cap
    assert fp_mod.prune_schedule(512, 0.01, off_by_one=False, max_prune_ratio=1.0)[1] == (6, 6)
    default = fp_mod.prune_schedule(512)
    assert default == [(n, n) for n in range(0, int(0.95 * 512) + 1)]  # one channel per step, capped at 95%
    assert fp_mod.prune_schedule(16, 0.0, max_prune_ratio=1.0)[-1] == (15, 15)  # no cap: all but one channel
    # the setting fills them in; an explicit value wins
    bb = fp_mod.FPConfig(setting="backdoorbench")
    assert (bb.prune_step_ratio, bb.step_off_by_one, bb.max_prune_ratio, bb.epochs, bb.batch_size) == (0.01, True, 1.0, 100, 256)
    assert fp_mod.FPConfig(setting="backdoorbench", epochs=3).epochs == 3
    assert fp_mod.FPConfig(setting="backdoorbench").replace(setting="default").prune_step_ratio == 0.0


def test_fp_backdoorbench_stopping_rule_on_a_synthetic_sequence():
    accs = [0.9, 0.92, 0.85, 1.0, 0.5]
    # BackdoorBench: |acc - acc_0| / acc_0 < 0.1, two-sided: the rise to 1.0 (+11%) stops it
    assert fp_mod.stopping_index(accs, 0.1, "backdoorbench") == (2, 3)
    assert fp_mod.stopping_index(accs, 0.1, "sequential") == (3, 4)  # ours: only a drop below 0.81 stops
    assert fp_mod.stopping_index([1.0, 0.75], 0.25, "backdoorbench") == (0, 1)  # strict
    assert fp_mod.stopping_index([1.0, 0.75], 0.25, "sequential") == (1, None)  # inclusive floor
    assert fp_mod.stopping_index([1.0, 1.0], 0.0, "backdoorbench") == (0, 0)  # step 0 is tested too
    assert fp_mod.stopping_index([0.9, 0.9, 0.9], 0.1, "backdoorbench") == (2, None)


def _curve_stub(monkeypatch, accs):
    """FP's held-out pruning curve replaced by ``accs`` (indexed by the number of channels pruned)."""
    def curve(tail, features, labels, order, max_count, *args, **kwargs):
        return [accs[min(n, len(accs) - 1)] for n in range(max_count + 1)]
    monkeypatch.setattr(fp_mod, "pruning_curve", curve)


@pytest.mark.parametrize("alias, expected", [(True, 7), (False, 3)])
def test_fp_last_net_alias_fine_tunes_one_step_past_tolerance(monkeypatch, alias, expected):
    # 16 channels, step ceil(16 * 0.2) = 4 with the off-by-one: 0, 3, 7, 11 channels; the drop comes at 7
    _curve_stub(monkeypatch, [1.0] * 7 + [0.5] * 10)
    fp = create_defense("fp", setting="backdoorbench", prune_step_ratio=0.2, epochs=0, last_net_alias=alias)
    out = fp.mitigate(_feature_model(), context_for(fp, clean_subset()))
    assert out.diagnostics["pruned_channels"] == expected
    log = out.tables["prune_log"]
    assert list(log["num_pruned"]) == [0, 4, 8, 12] and list(log["channels_pruned"]) == [0, 3, 7, 11]
    assert list(log["within_tolerance"]) == [True, True, False, False]
    assert int(log[log["chosen"]]["channels_pruned"].iloc[0]) == expected
    assert "holdout_acc" in log and "test_acc" not in log  # no oracle: scored on held-out clean training data


def test_fp_backdoorbench_options_change_what_they_say():
    clean = clean_subset(n=100)
    fit, _ = split_holdout(clean, 0.2, seed=0)
    base = dict(setting="backdoorbench", epochs=1, batch_size=32, prune_step_ratio=0.25)
    # fine-tuning on the whole subset vs. its fit part
    for data, n in (("all", len(clean)), ("fit", len(fit))):
        fp = create_defense("fp", **base, finetune_data=data)
        assert fp.mitigate(tiny_cnn(), context_for(fp, clean)).diagnostics["finetune_samples"] == n
    # ranking on augmented images changes the activations it ranks by
    acts = {}
    for aug in (True, False):
        fp = create_defense("fp", **{**base, "epochs": 0}, rank_augment=aug)
        acts[aug] = fp.mitigate(tiny_cnn(), context_for(fp, clean)).tables["activations"]["mean_activation"]
    assert not acts[True].equals(acts[False])
    # the subset sampling the harness is asked for
    assert create_defense("fp", setting="backdoorbench").clean_subset_sampling() == "uniform"
    assert create_defense("fp").clean_subset_sampling() == "stratified"


def test_fp_saves_the_pruning_reparametrisation_as_backdoorbench():
    from torch.nn.utils import prune

    model = tiny_preact()
    fp = create_defense("fp", setting="backdoorbench", prune_ratio=0.25, epochs=1, batch_size=16)
    out = fp.mitigate(model, context_for(fp, clean_subset(n=40)))
    state = out.export_state
    assert "linear.weight" not in state and {"linear.weight_orig", "linear.weight_mask"} <= set(state)
    pruned = out.diagnostics["pruned"]
    assert torch.all(state["linear.weight_mask"][:, pruned] == 0) and state["linear.weight_mask"].sum() == 4 * 24
    torch.testing.assert_close(state["linear.weight_orig"] * state["linear.weight_mask"], out.model.linear.weight)
    # BackdoorBench's file: loads into a model carrying torch's pruning reparametrisation, and computes the same
    fresh = create_model("preactresnet18", 4, 1, 8, 0.0625)
    prune.identity(fresh.linear, "weight")
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), out.model(x))
    plain = create_defense("fp", setting="backdoorbench", prune_ratio=0.25, epochs=0, save_reparametrisation=False)
    assert plain.mitigate(model, context_for(plain, clean_subset(n=40))).export_state is None


def _scorer(metric):
    calls = []

    def score(model):
        calls.append(model)
        return metric(model, len(calls))
    return score, calls


def test_oracle_switch_is_refused_without_a_scorer_and_a_scorer_without_it():
    fp = create_defense("fp", setting="backdoorbench", oracle=True)
    with pytest.raises(ValueError, match="oracle: true selects on the TEST set.*drop-in with --oracle true"):
        context_for(fp, clean_subset())
    plain = create_defense("fp", setting="backdoorbench")
    score, _ = _scorer(lambda m, i: BackdoorMetrics(1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="oracle: true"):
        build_context(plain, num_classes=4, input_shape=(1, 8, 8), normalizer=NORM, device=torch.device("cpu"),
                      clean_data=clean_subset(), oracle=score)
    with pytest.raises(ValueError, match="bb_selection"):
        create_defense("anp", oracle=True)  # ANP's oracle scores BackdoorBench's threshold choice only


def _oracle_context(defense, score, clean):
    return build_context(defense, num_classes=4, input_shape=(1, 8, 8), normalizer=NORM, device=torch.device("cpu"),
                         seed=0, progress=False, clean_data=clean, oracle=score)


def test_fp_oracle_stops_on_the_scorer_and_is_labelled():
    # the scorer (the harness's test set) sees each step's model; accuracy drops at the third step
    score, calls = _scorer(lambda m, i: BackdoorMetrics(1.0 if i < 3 else 0.5, 0.9, 0.1))
    fp = create_defense("fp", setting="backdoorbench", oracle=True, prune_step_ratio=0.2, epochs=0)
    clean = clean_subset()
    out = fp.mitigate(_feature_model(), _oracle_context(fp, score, clean))
    assert len(calls) == 3  # scored until the rule stops, as BackdoorBench's loop
    assert out.diagnostics["pruned_channels"] == 7  # the first step beyond tolerance (last_net aliasing)
    assert out.diagnostics["oracle"] == ORACLE_LABEL and "TEST set" in out.data_used
    assert out.diagnostics["holdout_samples"] == 0 and out.diagnostics["fit_samples"] == len(clean)
    log = out.tables["prune_log"]
    assert list(log["test_acc"]) == [1.0, 1.0, 0.5] and set(log["diagnostic"]) == {ORACLE_LABEL}
    assert "pruning_curve" not in out.tables


def test_anp_backdoorbench_threshold_scan_on_a_hand_made_mask_table():
    masks = {"a": torch.tensor([0.0, 0.050004, 0.5]), "b": torch.tensor([0.1, 0.95])}
    # at 4 decimals 0.050004 is 0.05 and float32 0.1 is 0.1: both within their threshold; at full precision not
    for precision, counts in (("round4", [1, 2, 3]), ("full", [1, 1, 2])):
        cands = anp_mod.bb_candidates(anp_mod.mask_table(masks, precision), "threshold", 0.9, 0.05)
        assert len(cands) == 19 and cands[0]["threshold"] == 0.0  # numpy.arange(0, 0.95, 0.05)
        assert [len(c["neurons"]) for c in cands[:3]] == counts
        assert cands[-1]["neurons"] == [("a", 0), ("a", 1), ("b", 0), ("a", 2)]  # 0.95 stays
    by_number = anp_mod.bb_candidates(anp_mod.mask_table(masks), "number", 3, 2)
    assert [c["number"] for c in by_number] == [0, 2] and [len(c["neurons"]) for c in by_number] == [2, 4]


def test_anp_backdoorbench_choice_rule_on_a_hand_made_metric_table():
    rows = [{"acc": 0.95, "asr": 0.9}, {"acc": 0.93, "asr": 0.5}, {"acc": 0.80, "asr": 0.1},
            {"acc": 0.89, "asr": 0.2}, {"acc": 0.91, "asr": 0.3}, {"acc": 0.99, "asr": 0.3}]
    # lowest ASR among |acc - 1.0| / 1.0 < 0.1; rows 2 and 3 are out; the later tie (row 5) does not win
    assert anp_mod.bb_choice(rows, 1.0, 0.95, 0.1) == 4
    assert anp_mod.bb_choice(rows, 1.0, 0.05, 0.1) is None  # none beats the unpruned model's ASR
    assert anp_mod.bb_choice(rows, 1.0, None, 0.1) == 5  # no ASR (clean held-out data): the most pruned within
    assert anp_mod.bb_choice([{"acc": 1.2, "asr": 0.0}], 1.0, 0.9, 0.1) is None  # two-sided


def test_anp_backdoorbench_setting_with_and_without_oracle():
    clean = clean_subset(n=100)

    def zeroed(m):
        return sum(int((mod.weight == 0).sum()) for mod in m.modules() if isinstance(mod, nn.BatchNorm2d))

    # ASR falls with every pruned neuron, accuracy holds up to 6: the choice is the 6-neuron candidate
    score, calls = _scorer(lambda m, i: BackdoorMetrics(1.0 if zeroed(m) <= 6 else 0.5, 1 - zeroed(m) / 28, 0.0))
    anp = create_defense("anp", setting="backdoorbench", oracle=True, iterations=2, batch_size=16,
                         pruning_by="number", pruning_max=6, pruning_step=2)
    out = anp.mitigate(tiny_cnn(), _oracle_context(anp, score, clean))
    table = out.tables["number_df"]
    assert list(table["pruned"]) == [2, 4, 6, 8] and len(calls) == 5  # unpruned + 4 candidates
    assert out.diagnostics["pruned_neurons"] == 6 and list(table["chosen"]) == [False, False, True, False]
    assert set(table["diagnostic"]) == {ORACLE_LABEL} and out.diagnostics["holdout_samples"] == 0
    plain = create_defense("anp", setting="backdoorbench", iterations=2, batch_size=16)
    out = plain.mitigate(tiny_cnn(), context_for(plain, clean))
    table = out.tables["threshold_df"]
    assert "holdout_acc" in table and "test_acc" not in table and "diagnostic" not in table
    assert out.diagnostics["holdout_samples"] == 20 and out.diagnostics["threshold_selected_on_clean_holdout"]
    assert plain.config.mask_lr == 0.01 and anp_mod.ANPConfig(setting="backdoorbench").batch_size == 256


def test_anp_backdoorbench_mask_lr_moves_masks_less():
    model, clean = tiny_cnn(), clean_subset()
    ctx = context_for(create_defense("anp"), clean)
    moved = {}
    for lr in (0.2, 0.01):
        cfg = anp_mod.ANPConfig(iterations=4, batch_size=16, mask_lr=lr)
        masks, _ = anp_mod.optimize_masks(anp_mod.ANP.copy_model(model, ctx.device), clean.images, clean.labels,
                                          ctx, cfg)
        moved[lr] = float((1 - torch.cat(list(masks.values()))).sum())
    assert 0 < moved[0.01] < moved[0.2]


def test_fp_cos_t_max_follows_the_setting_and_reaches_the_trainer(monkeypatch):
    assert create_defense("fp").config.cos_t_max == 0  # ours: cosine over all fine-tuning steps
    assert create_defense("fp", setting="backdoorbench").config.cos_t_max == 100  # BackdoorBench's T_max
    assert create_defense("fp", setting="backdoorbench", cos_t_max=0).config.cos_t_max == 0
    with pytest.raises(ValueError, match="cos_t_max must be an integer >= 1"):
        create_defense("fp", cos_t_max=-1)
    for bad in (2.5, "100"):
        with pytest.raises(ValueError, match="cos_t_max"):
            create_defense("fp", cos_t_max=bad)
    seen = []
    real = fp_mod.train_classifier

    def spy(model, images, labels, spec, config, *args, **kwargs):
        seen.append(config.epoch_cosine_t_max)
        return real(model, images, labels, spec, config, *args, **kwargs)

    monkeypatch.setattr(fp_mod, "train_classifier", spy)
    for t_max, expected in ((0, None), (7, 7)):
        fp = create_defense("fp", epochs=1, batch_size=32, cos_t_max=t_max)
        out = fp.mitigate(tiny_cnn(), context_for(fp, clean_subset()))
        assert seen[-1] == expected
        assert [e["epoch_lr"] for e in out.diagnostics["finetune"]] == [0.01]  # epoch 0: the full lr either way
