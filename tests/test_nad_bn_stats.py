"""NAD's ``bn_stats`` option: "reestimate" resets the student's BatchNorm running statistics after the
distillation and re-estimates them from one un-augmented training-mode pass over the clean subset (a cumulative
average over the batches); the default "training" keeps the statistics the distillation left (the official NAD)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from otbr_plugin.data import Normalizer
from otbr_plugin.defenses import CleanData, build_context, create_defense
from otbr_plugin.defenses.common import preprocess_batch
from otbr_plugin.models import create_model

NORM = Normalizer((0.5,), (0.5,))


def clean_subset(n: int = 24, classes: int = 4, size: int = 8) -> CleanData:
    g = torch.Generator().manual_seed(3)
    return CleanData(torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g),
                     torch.arange(n) % classes)


def run_nad(clean: CleanData, **cfg):
    torch.manual_seed(0)
    model = create_model("preactresnet18", 4, 1, 8, 0.0625).eval()
    nad = create_defense("nad", teacher_epochs=1, epochs=2, batch_size=8, lr_milestones=[1], lr_values=[0.01], **cfg)
    ctx = build_context(nad, num_classes=4, input_shape=(1, 8, 8), normalizer=NORM, device=torch.device("cpu"),
                        seed=0, progress=False, clean_data=clean, dataset=None)
    return nad.mitigate(model, ctx), ctx


def batch_stats_by_hand(model: nn.Module, clean: CleanData, ctx, batch_size: int) -> dict[str, tuple]:
    """Per BN: the mean over the batches of each batch's per-channel input mean and unbiased variance (what a
    cumulative average of BN updates over those batches gives), from the BN inputs of a training-mode pass."""
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    seen: dict[str, list] = {n: [] for n in bns}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: seen[n].append(args[0].detach().clone()))
             for n, m in bns.items()]
    model.train()
    with torch.no_grad():
        for start in range(0, len(clean), batch_size):
            model(preprocess_batch(clean.images[start:start + batch_size], ctx, augment=False))
    for h in hooks:
        h.remove()
    model.eval()
    out = {}
    for n, xs in seen.items():
        means = torch.stack([x.transpose(0, 1).flatten(1).mean(1) for x in xs])
        varis = torch.stack([x.transpose(0, 1).flatten(1).var(1, unbiased=True) for x in xs])
        out[n] = (means.mean(0), varis.mean(0))
    return out


@pytest.mark.parametrize("batch_size_eval", [512, 10])  # one batch (the subset's own statistics); 10, 10, 4
def test_reestimate_is_a_cumulative_average_over_the_clean_subset_and_leaves_weights(batch_size_eval):
    clean = clean_subset()
    kept, _ = run_nad(clean, batch_size_eval=batch_size_eval)
    redone, ctx = run_nad(clean, batch_size_eval=batch_size_eval, bn_stats="reestimate")
    assert kept.diagnostics["bn_stats"] == "training" and redone.diagnostics["bn_stats"] == "reestimate"
    assert kept.diagnostics["student_subset_acc_before_bn_reestimate"] is None
    # the re-estimate draws nothing from the random stream: the distilled student before it is the same
    assert redone.diagnostics["student_subset_acc_before_bn_reestimate"] == kept.diagnostics["student_subset_acc"]
    a, b = kept.model.state_dict(), redone.model.state_dict()
    stats = ("running_mean", "running_var", "num_batches_tracked")
    for k in a:
        if not k.endswith(stats):
            assert torch.equal(a[k], b[k]), f"{k}: a weight changed"
    expected = batch_stats_by_hand(kept.model, clean, ctx, batch_size_eval)
    moved = 0
    for name, bn in redone.model.named_modules():
        if isinstance(bn, nn.BatchNorm2d):
            mean, var = expected[name]
            assert torch.allclose(bn.running_mean, mean, rtol=1e-4, atol=1e-5), name
            assert torch.allclose(bn.running_var, var, rtol=1e-4, atol=1e-5), name
            assert bn.momentum == 0.1  # the model's own momentum again after the cumulative pass
            moved += not torch.allclose(a[f"{name}.running_mean"], mean, atol=1e-3)
    assert moved > 0  # the distillation's statistics were not already these
    assert not redone.model.training


def test_off_by_default_and_refuses_bad_values():
    assert create_defense("nad").config.bn_stats == "training"
    for bad in ("recompute", "", True, None):
        with pytest.raises(ValueError, match="bn_stats must be one of 'training', 'reestimate'"):
            create_defense("nad", bn_stats=bad)
