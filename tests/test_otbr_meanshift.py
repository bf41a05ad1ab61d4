"""Data-free mean compensation (``repair: mean``): the Gaussian moments, the estimate of a conv's output
mean against sampled activations, the effect on the batch norms that read a pruned channel (directly and through a
residual sum), purity, and the defense end to end without any dataset."""

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
from otbr_plugin.otbr.meanshift import (compensate_means, expected_conv_outputs, relu_gaussian_mean,
                                        relu_gaussian_var)


class Tiny(nn.Module):
    """bn0 -> relu -> conv_a -> bn_a, and a residual sum conv_a + conv_b read by bn_sum (1x1 convs: no borders)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(4)
        self.conv_a = nn.Conv2d(4, 6, 1, bias=False)
        self.conv_b = nn.Conv2d(4, 6, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(6)
        self.bn_sum = nn.BatchNorm2d(6)

    def forward(self, x):
        h = torch.relu(self.bn0(x))
        a = self.conv_a(h)
        return self.bn_a(a), self.bn_sum(a + self.conv_b(h))


def _fitted_tiny() -> tuple[Tiny, torch.Tensor]:
    """A Tiny whose running statistics are those of its Gaussian inputs (bn0 sees N(0, 1) after normalization)."""
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        model.bn0.weight.uniform_(0.5, 1.5)
        model.bn0.bias.uniform_(-0.5, 0.5)
    x = torch.randn(4000, 4, 2, 2) * 2 + 1
    model.train()
    for bn in (model.bn0, model.bn_a, model.bn_sum):
        bn.momentum = None  # cumulative average: exact statistics of the pass below
    with torch.no_grad():
        model(x)
    return model.eval(), x


def test_gaussian_relu_moments_match_sampling():
    w = torch.tensor([0.5, 1.0, 2.0, 0.0, 1.5])
    b = torch.tensor([-1.0, 0.0, 0.7, 0.3, -3.0])
    z = torch.randn(2_000_000, 1, generator=torch.Generator().manual_seed(0)).double()
    sampled = torch.relu(w.double() * z + b.double())
    assert torch.allclose(relu_gaussian_mean(w, b), sampled.mean(0), atol=3e-3)
    assert torch.allclose(relu_gaussian_var(w, b), sampled.var(0), atol=5e-3)
    assert float(relu_gaussian_mean(w, b)[3]) == pytest.approx(0.3)  # w = 0: relu(b)
    assert float(relu_gaussian_var(w, b)[3]) == 0.0


def test_expected_conv_output_matches_the_measured_running_mean():
    model, _ = _fitted_tiny()
    est = expected_conv_outputs(model)
    assert set(est) == {"conv_a", "conv_b"}
    mean, var = est["conv_a"]
    assert torch.allclose(mean.float(), model.bn_a.running_mean, atol=0.05)
    assert torch.allclose(var.float(), model.bn_a.running_var, rtol=0.1)  # 1x1 conv: independent channels


def test_a_pruned_channel_passes_its_mean_directly_and_through_a_residual_sum():
    model, x = _fitted_tiny()
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        pruned.conv_a.weight[2] = 0
    before = copy.deepcopy(pruned.state_dict())
    repaired, shifts = compensate_means(model, pruned)
    assert set(shifts) == {"bn_a", "bn_sum"}
    for k, v in pruned.state_dict().items():  # pure: the defended model is not touched
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        (orig_a, orig_sum), (naive_a, naive_sum), (rep_a, rep_sum) = (m(x) for m in (model, pruned, repaired))
    channel_mean = lambda t: t.mean(dim=(0, 2, 3))  # noqa: E731
    # the pruned channel: naively a constant far from the original mean; repaired, the original mean
    assert abs(float(channel_mean(naive_a)[2] - channel_mean(orig_a)[2])) > 0.5
    assert float(channel_mean(rep_a)[2] - channel_mean(orig_a)[2]) == pytest.approx(0, abs=0.05)
    assert abs(float(channel_mean(naive_sum)[2] - channel_mean(orig_sum)[2])) > 0.15
    assert float(channel_mean(rep_sum)[2] - channel_mean(orig_sum)[2]) == pytest.approx(0, abs=0.02)
    others = [c for c in range(6) if c != 2]  # channels nothing changed for keep their statistics
    assert torch.equal(repaired.bn_a.running_mean[others], model.bn_a.running_mean[others])
    assert torch.equal(repaired.bn_a.running_var, model.bn_a.running_var)  # means only by default
    moved, _ = compensate_means(model, pruned, variance=True)
    assert torch.equal(moved.bn_a.running_var[others], model.bn_a.running_var[others])
    assert torch.equal(moved.bn_a.running_var[2], model.bn_a.running_var[2])  # zero variance: left alone


def test_nothing_changed_nothing_moves():
    model = create_model("preactresnet18", 10, 1, 12, 0.0625).eval()
    repaired, shifts = compensate_means(model, model, variance=True)
    assert shifts == {}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in repaired.state_dict().items())


def test_mean_repair_in_the_defense_reads_no_data(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a data-free defense read a dataset")

    monkeypatch.setattr(datasets_mod, "load_dataset", refuse)
    monkeypatch.setattr(data_pkg, "load_dataset", refuse)
    torch.manual_seed(0)
    model = create_model("preactresnet18", 10, 1, 12, 0.0625).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.bias.data.uniform_(-0.5, 0.5)
    d = get_defense("otbr")(gamma=0.1, lam=1.0, repair="mean", unlearn_steps=2, unlearn_batch_size=8)
    ctx = build_context(d, num_classes=10, input_shape=(1, 12, 12), normalizer=Normalizer((0.5,), (0.25,)),
                        device=torch.device("cpu"), seed=0, progress=False, clean_data=None)
    out = d.mitigate(model, ctx)
    plain = get_defense("otbr")(gamma=0.1, lam=1.0, unlearn_steps=2, unlearn_batch_size=8).mitigate(model, ctx)
    info = out.diagnostics["repair"]
    assert info["mode"] == "mean" and info["batch_norms_moved"] > 0 and info["largest_mean_shift"] > 0
    assert "repair" in out.stage_seconds
    got, ref = out.model.state_dict(), plain.model.state_dict()
    changed = {k for k in got if not torch.equal(got[k], ref[k])}
    assert changed and all(k.endswith("running_mean") for k in changed), changed
    fused = {k for k in ref if not torch.equal(ref[k], model.state_dict()[k])}
    assert not changed & fused  # statistics OTBR transported itself are left as they are
