"""The data-free OTBR options: gamma/lam 'auto' and the repair step (BN inversion + distillation).

Invariants: no dataset is ever read (the context holds none and loading one fails the test), inputs are never
modified, the pruned neurons stay at zero through the repair, same seed gives the same model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import otbr_plugin.data as data_pkg
import otbr_plugin.data.datasets as datasets_mod
from otbr_plugin.data import Normalizer
from otbr_plugin.defenses import build_context, get_defense
from otbr_plugin.models import create_model
from otbr_plugin.otbr.auto import auto_gamma, robust_z
from otbr_plugin.otbr.repair import agreement, bn_inversion, distill, recalibrate_bn

NORM = Normalizer((0.5,), (0.25,))


def small(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model("preactresnet18", 10, 1, 12, 0.0625)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_bn_inversion_matches_statistics_and_leaves_the_model_alone():
    # running statistics of a known input distribution (dark images with a bright horizontal band)
    data = torch.rand(256, 1, 12, 12, generator=torch.Generator().manual_seed(3)) * 0.2
    data[:, :, 4:8, :] += 0.7
    model = recalibrate_bn(small(), data, NORM)
    before = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(0)
    x0 = torch.sigmoid(torch.randn((16, 1, 12, 12), generator=torch.Generator().manual_seed(0)) * 0.5)
    x = bn_inversion(model, num_images=16, input_shape=(1, 12, 12), normalizer=NORM, num_classes=10, steps=60,
                     batch_size=16, generator=g)
    assert x.shape == (16, 1, 12, 12) and x.min() >= 0 and x.max() <= 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    def bn_gap(images):
        gaps = []
        hooks = [m.register_forward_hook(lambda mod, i, o: gaps.append(float((i[0].mean((0, 2, 3)) - mod.running_mean).norm())))
                 for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        with torch.no_grad():
            model(NORM(images))
        for h in hooks:
            h.remove()
        return sum(gaps)

    assert bn_gap(x) < 0.8 * bn_gap(x0)  # the optimized images match the stored statistics better than noise
    again = bn_inversion(model, num_images=16, input_shape=(1, 12, 12), normalizer=NORM, num_classes=10, steps=60,
                         batch_size=16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, again)


def test_distill_moves_the_student_towards_the_teacher_and_holds_frozen_rows_at_zero():
    teacher, student = small(0), small(1)
    images = torch.rand(64, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    frozen = {"layer2.0.conv1": torch.zeros(8, dtype=torch.bool)}
    frozen["layer2.0.conv1"][[1, 5]] = True
    s_before = copy.deepcopy(student.state_dict())
    def kl(s):
        with torch.no_grad():
            t = torch.log_softmax(teacher(NORM(images)), 1)
            return float(torch.nn.functional.kl_div(torch.log_softmax(s(NORM(images)), 1), t, log_target=True,
                                                    reduction="batchmean"))

    out = distill(student, teacher, images, normalizer=NORM, steps=60, batch_size=32, lr=0.05, frozen=frozen)
    assert kl(out.model) < 0.5 * kl(student)
    w = dict(out.model.named_modules())["layer2.0.conv1"].weight
    assert bool((w[[1, 5]] == 0).all()) and bool((w[[0, 2]] != 0).any())
    for k, v in student.state_dict().items():  # the input student is untouched
        assert torch.equal(v, s_before[k]), k
    for k in ("layer1.0.bn1.running_mean", "layer1.0.bn1.running_var"):  # BN statistics are not overwritten
        assert torch.equal(out.model.state_dict()[k], student.state_dict()[k])


def test_recalibrate_bn_changes_only_running_statistics():
    model = small()
    images = torch.rand(32, 1, 12, 12)
    out = recalibrate_bn(model, images, NORM)
    for k, v in model.state_dict().items():
        if "running" in k:
            continue
        if "num_batches_tracked" in k:
            continue
        assert torch.equal(out.state_dict()[k], v), k
    assert not torch.equal(out.state_dict()["layer1.0.bn1.running_mean"], model.state_dict()["layer1.0.bn1.running_mean"])


def test_auto_gamma_counts_per_layer_outliers():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.exp(torch.randn(100, generator=g, dtype=torch.float64) * 0.1),
              "b": torch.exp(torch.randn(100, generator=g, dtype=torch.float64) * 0.1) * 50}
    gamma, info = auto_gamma(scores, z=3.5)
    assert gamma == pytest.approx(1 / 200)  # no outliers: one neuron's share (the layers' scale does not count)
    scores["b"][:6] *= 20
    gamma, info = auto_gamma(scores, z=3.5)
    assert info["outliers_per_layer"] == {"b": 6} and gamma == pytest.approx(6 / 200)
    assert auto_gamma(scores, z=3.5, max_gamma=0.01)[0] == pytest.approx(0.01)
    assert robust_z(torch.tensor([1.0, 1.0, 1.0, 2.0], dtype=torch.float64))[-1] > 3


def test_datafree_otbr_never_reads_a_dataset(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a data-free defense read a dataset")

    monkeypatch.setattr(datasets_mod, "load_dataset", refuse)
    monkeypatch.setattr(data_pkg, "load_dataset", refuse)
    d = get_defense("otbr")(gamma="auto", lam="auto", repair="distill", unlearn_steps=2, unlearn_batch_size=8,
                            repair_images=16, repair_inversion_steps=5, repair_steps=5, repair_batch_size=8)
    assert d.needs_clean_data is False
    model = small()
    before = copy.deepcopy(model.state_dict())
    ctx = build_context(d, num_classes=10, input_shape=(1, 12, 12), normalizer=NORM, device=torch.device("cpu"),
                        seed=0, progress=False, clean_data=None)
    assert ctx.clean_data is None and ctx.data_used() == "none"
    out = d.mitigate(model, ctx)
    diag = out.diagnostics
    assert 0 < diag["gamma_used"] <= 0.3 and diag["lam_used"] == 1.0
    assert diag["repair"]["mode"] == "distill" and diag["repair"]["surrogate_images"] == 16
    assert {"repair_synthesis", "repair"} <= set(out.stage_seconds)
    mods = dict(out.model.named_modules())
    for name, idx in diag["pruned_neurons"].items():  # the pruned neurons stay pruned through the repair
        assert bool((mods[name].weight[idx] == 0).all()), name
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    again = d.mitigate(model, ctx).model.state_dict()
    assert all(torch.equal(again[k], v) for k, v in out.model.state_dict().items())  # same seed, same model


def test_invalid_auto_and_repair_options_are_clear():
    with pytest.raises(ValueError, match="gamma.*'auto'"):
        get_defense("otbr")(gamma="sometimes")
    with pytest.raises(ValueError, match="repair"):
        get_defense("otbr")(repair="finetune")
    with pytest.raises(ValueError, match="repair_steps"):
        get_defense("otbr")(repair_steps=0)
