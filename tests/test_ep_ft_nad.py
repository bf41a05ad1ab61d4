"""EP (data-free), FT and NAD: the method steps against independent derivations on hand-built models, and the
data rules (EP gets no data; FT and NAD only the clean defense subset; none of them a test-set scorer)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from otbr_plugin.data import Normalizer
from otbr_plugin.defenses import CleanData, DefenseContext, build_context, create_defense, get_defense
from otbr_plugin.defenses.common import preprocess_batch
from otbr_plugin.defenses.nad import attention_loss, attention_map, default_attention_layers
from otbr_plugin.metrics import BackdoorMetrics
from otbr_plugin.models import create_model

NORM = Normalizer((0.5,), (0.5,))


def clean_subset(n: int = 24, classes: int = 4, size: int = 8, seed: int = 0) -> CleanData:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g)
    return CleanData(images, torch.arange(n) % classes)


def context_for(defense, clean: CleanData | None = None, size: int = 8) -> DefenseContext:
    return build_context(defense, num_classes=4, input_shape=(1, size, size), normalizer=NORM,
                         device=torch.device("cpu"), seed=0, progress=False, clean_data=clean, dataset=None)


def bn_net() -> nn.Module:
    """conv -> BN(20) -> ReLU -> conv -> BN(10) -> ReLU -> pool -> linear, with hand-set BN statistics."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 20, 3, padding=1), nn.BatchNorm2d(20), nn.ReLU(),
                        nn.Conv2d(20, 10, 3, padding=1), nn.BatchNorm2d(10), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(10, 4)).eval()
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.running_var.fill_(1.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(0.1, 0.5)
    return net


# ---------------------------------------------------------------- EP

def z_score_of_single_spike(n: int) -> float:
    """n - 1 equal values and one different value: the different one lies (n - 1) / sqrt(n) unbiased standard
    deviations from the mean, whatever the two values are (mean = a + d / n, var = d^2 / n)."""
    return (n - 1) / math.sqrt(n)


def test_ep_prunes_exactly_the_bn_outliers_by_its_rule():
    assert z_score_of_single_spike(20) > 3 > z_score_of_single_spike(10)  # 4.25 and 2.85
    net = bn_net()
    with torch.no_grad():
        net[1].running_var[7] = 50.0    # a spike among 20 neurons: beyond mean + 3 std -> pruned
        net[1].running_var[3] = 0.5     # a dip: an outlier of the lower tail only (for a small u)
        net[4].running_var[2] = 1000.0  # a spike among 10 neurons can never pass 3 std (2.85 < 3): kept
    # with two distinct deviations in layer 1 the spike's z-score is computed directly
    ent = 0.5 * torch.log(2 * math.pi * math.e * (net[1].running_var.double() + net[1].eps))
    z = (ent - ent.mean()) / ent.std()
    assert z[7] > 3 and z[3] > -3 and (z.abs() < 3).sum() == 19  # the independent derivation: only 7 beyond 3 std
    before = copy.deepcopy(net.state_dict())
    ep = create_defense("ep")
    out = ep.mitigate(net, context_for(ep))
    after = out.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"1.weight"}  # the BN weight only (official code); nothing else moves
    assert torch.nonzero(after["1.weight"] != before["1.weight"]).flatten().tolist() == [7]
    assert after["1.weight"][7] == 0 and after["1.bias"][7] == before["1.bias"][7]
    assert out.units_removed == 1 and out.data_used == "none"
    assert [l["pruned"] for l in out.diagnostics["layers"]] == [[7], []]
    assert torch.equal(net.state_dict()["1.weight"], before["1.weight"])  # the input model is untouched

    # both tails: the dip is below mean - u * std for a smaller u; zero_bias also clears the bias
    lower = (ent.mean() - ent[3]) / ent.std()
    u = float(lower) - 0.1
    both = create_defense("ep", u=u, tail="both", zero_bias=True).mitigate(net, context_for(ep)).model.state_dict()
    assert sorted(torch.nonzero(both["1.weight"] == 0).flatten().tolist()) == [3, 7]
    assert both["1.bias"][3] == 0 and both["1.bias"][7] == 0
    low = create_defense("ep", u=u, tail="lower").mitigate(net, context_for(ep)).model.state_dict()
    assert torch.nonzero(low["1.weight"] == 0).flatten().tolist() == [3]


def test_ep_dead_neuron_and_broken_statistics():
    net = bn_net()
    with torch.no_grad():
        net[1].running_var[5] = 0.0  # a dead neuron: the BN's eps keeps its entropy finite (and low)
    out = create_defense("ep", tail="lower").mitigate(net, context_for(create_defense("ep")))
    assert out.diagnostics["layers"][0]["pruned"] == [5]
    with torch.no_grad():
        net[1].running_var[5] = float("nan")
    with pytest.raises(ValueError, match="running variances"):
        create_defense("ep").mitigate(net, context_for(create_defense("ep")))
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        create_defense("ep").mitigate(nn.Sequential(nn.Conv2d(1, 2, 3)), context_for(create_defense("ep")))


# ---------------------------------------------------------------- FT

def test_ft_is_one_hand_written_sgd_step_on_the_subset_and_keeps_the_architecture():
    torch.manual_seed(0)
    model = create_model("smallcnn", 4, 1, 8, 0.25).eval()
    clean = clean_subset()
    ft = create_defense("ft", epochs=1, batch_size=len(clean), lr=0.05, momentum=0.9, weight_decay=5e-4,
                        augment=False)
    ctx = context_for(ft, clean)
    out = ft.mitigate(model, ctx)

    # by hand: one SGD step on the whole subset in one batch (train mode: BN uses and updates batch statistics);
    # the first momentum step equals plain SGD with the decayed gradient; the cosine schedule starts at lr
    ref = copy.deepcopy(model).train()
    x = preprocess_batch(clean.images, ctx, augment=False)
    F.cross_entropy(ref(x), clean.labels).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.05 * (p.grad + 5e-4 * p)
    got, want = out.model.state_dict(), ref.state_dict()
    assert [type(m) for m in out.model.modules()] == [type(m) for m in model.modules()]
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in model.state_dict().items()}
    for k in want:
        assert torch.allclose(got[k].float(), want[k].float(), atol=1e-5), k
    assert any(not torch.equal(got[k], model.state_dict()[k]) for k in got)  # it did move
    assert out.units_removed == 0 and out.data_used == f"clean subset of {len(clean)}"
    # another subset, another step: the weights come from the subset handed over
    other = ft.mitigate(model, context_for(ft, clean_subset(seed=1))).model.state_dict()
    assert any(not torch.allclose(other[k].float(), got[k].float()) for k in got)


# ---------------------------------------------------------------- NAD

def test_nad_attention_loss_equals_the_papers_formula_on_a_hand_checked_example():
    # student: channels [1, 2] and [2, 0] -> a = [1 + 4, 4 + 0] = [5, 4], A = [5, 4] / sqrt(41)
    # teacher: channels [0, 1] and [0, 0] -> a = [0, 1], A = [0, 1]
    s = torch.tensor([[[[1.0, 2.0]], [[2.0, 0.0]]]])
    t = torch.tensor([[[[0.0, 1.0]], [[0.0, 0.0]]]])
    a_s = torch.tensor([5.0, 4.0]) / (math.sqrt(41) + 1e-6)
    assert torch.allclose(attention_map(s)[0], a_s)
    assert torch.allclose(attention_map(t)[0], torch.tensor([0.0, 1.0]), atol=1e-6)
    # unit vectors: ||A_S - A_T||^2 = 2 - 2 * (4 / sqrt(41)) = 0.750610
    sq = 2 - 2 * 4 / math.sqrt(41)
    assert float(attention_loss(s, t, distance="l2")) == pytest.approx(math.sqrt(sq), rel=1e-5)  # paper's Eq. 3
    assert float(attention_loss(s, t, distance="mse")) == pytest.approx(sq / 2, rel=1e-5)  # official code's mean
    # p = 1: a = [1 + 2, 2 + 0] = [3, 2]
    assert torch.allclose(attention_map(s, p=1)[0], torch.tensor([3.0, 2.0]) / (math.sqrt(13) + 1e-6))
    # a batch: the paper's loss is the mean of the per-sample distances; identical maps give 0 (scale-free)
    batch_s, batch_t = torch.cat([s, t]), torch.cat([t, 3 * t])
    assert float(attention_loss(batch_s, batch_t, distance="l2")) == pytest.approx(math.sqrt(sq) / 2, rel=1e-5)


def test_nad_distils_the_last_three_stages_of_a_preact_resnet():
    torch.manual_seed(0)
    model = create_model("preactresnet18", 4, 1, 8, 0.0625).eval()
    assert default_attention_layers(model) == ["layer2", "layer3", "layer4"]
    with pytest.raises(ValueError, match="attention_layers"):
        default_attention_layers(create_model("smallcnn", 4, 1, 8, 0.25))
    clean = clean_subset()
    nad = create_defense("nad", teacher_epochs=1, epochs=2, batch_size=8, lr_milestones=[1], lr_values=[0.01])
    out = nad.mitigate(model, context_for(nad, clean))
    d = out.diagnostics
    assert d["attention_layers"] == ["layer2", "layer3", "layer4"] and len(d["teacher_finetune"]) == 1
    assert [e["lr"] for e in d["distillation"]] == [0.1, 0.01]
    assert all(e["attention_loss"] == 0 for e in d["teacher_finetune"])  # the teacher: CE only (betas 0)
    assert d["distillation"][0]["attention_loss"] > 0
    assert out.data_used == f"clean subset of {len(clean)}" and out.units_removed == 0
    assert {k: v.shape for k, v in out.model.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_nad_with_zero_betas_is_the_teacher_schedule():
    """betas 0: the distillation adds nothing, so the student trained with the teacher's stream equals the teacher."""
    from otbr_plugin.defenses.nad import nad_train

    torch.manual_seed(0)
    model = create_model("preactresnet18", 4, 1, 8, 0.0625).eval()
    clean = clean_subset()
    nad = create_defense("nad", betas=[0.0, 0.0, 0.0], epochs=1, batch_size=8, augment=False)
    ctx = context_for(nad, clean)
    a, b, teacher = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    nad_train(a, None, clean, ctx, nad.config, ["layer2", "layer3", "layer4"], 1, 7)
    nad_train(b, teacher.eval(), clean, ctx, nad.config, ["layer2", "layer3", "layer4"], 1, 7)
    for k, v in a.state_dict().items():
        assert torch.allclose(v.float(), b.state_dict()[k].float(), atol=1e-6), k


# ---------------------------------------------------------------- data rules and configs

def test_data_rules():
    assert get_defense("ep").needs_clean_data is False
    assert get_defense("ft").needs_clean_data is True and get_defense("nad").needs_clean_data is True
    clean = clean_subset()
    assert context_for(create_defense("ep"), clean).clean_data is None  # data-free: handed nothing
    scorer = lambda m: BackdoorMetrics(acc=1.0, asr=0.0, ra=1.0)  # noqa: E731  a test-set scorer
    for name in ("ep", "ft", "nad"):
        d = create_defense(name)
        with pytest.raises(ValueError, match="oracle"):
            build_context(d, num_classes=4, input_shape=(1, 8, 8), normalizer=NORM, device=torch.device("cpu"),
                          clean_data=clean, oracle=scorer)
    sneaked = DefenseContext(num_classes=4, input_shape=(1, 8, 8), normalizer=NORM, progress=False, oracle=scorer)
    with pytest.raises(ValueError, match="test-set scorer"):
        create_defense("ep").mitigate(bn_net(), sneaked)
    bare = DefenseContext(num_classes=4, input_shape=(1, 8, 8), normalizer=NORM, progress=False)
    for name in ("ft", "nad"):
        with pytest.raises(ValueError, match="needs clean data"):
            context_for(create_defense(name), None)
        with pytest.raises(ValueError, match="needs a clean defense subset"):
            create_defense(name).mitigate(bn_net(), bare)
        with_oracle = DefenseContext(num_classes=4, input_shape=(1, 8, 8), normalizer=NORM, progress=False,
                                     clean_data=clean, oracle=scorer)
        with pytest.raises(ValueError, match="test-set scorer"):
            create_defense(name).mitigate(bn_net(), with_oracle)
    with pytest.raises(ValueError, match="training split"):
        CleanData(clean.images, clean.labels, source="test")


@pytest.mark.parametrize("name, change, message", [
    ("ep", {"u": -1}, "u must be"), ("ep", {"u": float("nan")}, "u must be"), ("ep", {"tail": "top"}, "tail must"),
    ("ep", {"zero_bias": "yes"}, "zero_bias"),
    ("ft", {"epochs": -1}, "epochs must"), ("ft", {"lr": 0}, "lr must"), ("ft", {"momentum": 1.0}, "momentum"),
    ("ft", {"batch_size": 0}, "batch_size"), ("ft", {"weight_decay": -1e-4}, "weight_decay"),
    ("nad", {"betas": []}, "betas"), ("nad", {"betas": [1.0, -2.0, 3.0]}, "betas"), ("nad", {"p": 0}, "p must"),
    ("nad", {"distance": "l1"}, "distance"), ("nad", {"attention_layers": ["layer4"]}, "one beta per layer"),
    ("nad", {"lr_milestones": [20, 2]}, "lr_milestones"), ("nad", {"lr_values": [0.01]}, "lr_values"),
    ("nad", {"teacher_epochs": 1.5}, "teacher_epochs"), ("nad", {"warmup": 1}, "unknown key"),
])
def test_configs_refuse_bad_values(name, change, message):
    with pytest.raises(ValueError, match=message):
        create_defense(name, change) if "warmup" in change else create_defense(name, **change)


def test_defaults_follow_the_papers():
    ep, ft, nad = (create_defense(n).config for n in ("ep", "ft", "nad"))
    assert ep.u == 3.0 and ep.zero_bias is False
    assert (ft.epochs, ft.batch_size, ft.lr, ft.momentum, ft.weight_decay) == (100, 256, 0.01, 0.9, 5e-4)
    assert nad.betas == [500.0, 1000.0, 1000.0] and nad.p == 2.0 and nad.distance == "mse"
    assert (nad.epochs, nad.batch_size, nad.lr, nad.weight_decay, nad.teacher_epochs) == (20, 64, 0.1, 1e-4, 10)
    assert [nad.lr_at(e) for e in (0, 1, 2, 19, 20)] == [0.1, 0.1, 0.01, 0.01, 0.0001]


# ---------------------------------------------------------------- BackdoorBench drop-ins and flags

def test_backdoorbench_flags_of_ep_ft_nad():
    from benchmark_adapters.backdoorbench.bb_args import translate_bb

    nad = translate_bb("nad", {"te_epochs": 3, "beta1": 1, "beta2": 2, "beta3": 3, "lr": 0.01, "sgd_momentum": 0.8,
                               "wd": 5e-4, "momentum": 0.9, "weight_decay": 1e-4, "epochs": 100, "teacher_model_loc": ""})
    assert nad.fields == {"teacher_epochs": 3, "betas": [1.0, 2.0, 3.0], "lr": 0.01, "momentum": 0.8,
                          "weight_decay": 5e-4}
    assert {"momentum", "weight_decay", "epochs", "teacher_model_loc"} <= set(nad.ignored)  # declared, never read
    create_defense("nad", nad.fields)  # the translated fields are a valid config
    with pytest.raises(ValueError, match="beta3"):
        translate_bb("nad", {"beta1": 1, "beta2": 2})
    assert translate_bb("nad", {"beta1": 1, "beta2": 2}, {"beta3": 5}).fields["betas"] == [1.0, 2.0, 5.0]
    with pytest.raises(ValueError, match="teacher_model_loc"):
        translate_bb("nad", {"teacher_model_loc": "teacher.pt"})
    ft = translate_bb("ft", {"epochs": 7, "lr": 0.02, "sgd_momentum": 0.9, "wd": 1e-3, "ratio": 0.05})
    assert ft.fields == {"epochs": 7, "lr": 0.02, "momentum": 0.9, "weight_decay": 1e-3}
    with pytest.raises(ValueError, match="otbr_ft"):
        translate_bb("ft", {"client_optimizer": "adam"})
    ep = translate_bb("ep", {"u": 2.5, "u_min": 0, "u_max": 10, "u_num": 21, "epochs": 100})
    assert ep.fields == {"u": 2.5} and ep.sweep == {"u_min": 0.0, "u_max": 10.0, "u_num": 21} and "epochs" in ep.ignored


@pytest.mark.parametrize("save, quick", [("otbr_ep", []), ("otbr_ft", ["--epochs", "1", "--ratio", "0.5"]),
                                         ("otbr_nad", ["--teacher_epochs", "1", "--epochs", "1", "--ratio", "0.5"])])
def test_dropin_script_runs_its_defense(tmp_path, save, quick, monkeypatch):
    from test_backdoorbench import make_bb_tree, run_installed_dropin

    run_installed_dropin(make_bb_tree(tmp_path / "BackdoorBench")["root"], save, quick, monkeypatch)
