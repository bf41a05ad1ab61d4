"""i-BAU, RNP and SAU: the method steps against independent computations on tiny models, and the data rules
(clean training subset only, never test data)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import test_baselines as baselines
from otbr_plugin.data import Normalizer
from otbr_plugin.defenses import CleanData, DefenseContext, create_defense, get_defense
from otbr_plugin.defenses import ibau as ibau_mod
from otbr_plugin.defenses import rnp as rnp_mod
from otbr_plugin.defenses import sau as sau_mod
from otbr_plugin.defenses.batches import shuffled_batches
from test_baselines import NORM, context_for, no_dataset_loading, tiny_cnn  # noqa: F401 (autouse fixture)

NAMES = ("ibau", "rnp", "sau")


def clean_subset(n: int = 48) -> CleanData:
    return baselines.clean_subset(n)


# ---------------------------------------------------------------- data rules and configs

@pytest.mark.parametrize("name", NAMES)
def test_needs_the_clean_training_subset_and_refuses_test_data(name):
    defense = create_defense(name)
    assert get_defense(name).needs_clean_data is True
    with pytest.raises(ValueError, match="needs clean data"):
        context_for(defense, None)
    bare = DefenseContext(num_classes=4, input_shape=(1, 8, 8), normalizer=NORM, progress=False)
    with pytest.raises(ValueError, match="needs a clean defense subset"):
        defense.mitigate(tiny_cnn(), bare)
    clean = clean_subset()
    with pytest.raises(ValueError, match="training split"):  # a test-split subset cannot even be built
        CleanData(clean.images, clean.labels, source="test")


@pytest.mark.parametrize("name, bad, match", [
    ("ibau", {"rounds": -1}, "rounds must be an integer >= 0"),
    ("ibau", {"fixed_point_iterations": 0}, "fixed_point_iterations must be an integer >= 1"),
    ("ibau", {"patch_portion": 1.5}, r"patch_portion must be in \[0, 1\]"),
    ("ibau", {"inner_batch": "last"}, "inner_batch must be one of 'first', 'current'"),
    ("ibau", {"setting": "paper"}, "setting must be one of"),
    ("ibau", {"lr": 0}, "lr must be > 0"),
    ("rnp", {"clean_threshold": 2}, r"clean_threshold must be in \[0, 1\]"),
    ("rnp", {"schedule": [0]}, "schedule must be a list of epochs"),
    ("rnp", {"pruning_by": "size"}, "pruning_by must be one of"),
    ("rnp", {"recovering_lr": -0.1}, "recovering_lr must be > 0"),
    ("sau", {"norm_type": "Linf"}, "norm_type must be one of"),
    ("sau", {"adv_steps": 1.5}, "adv_steps must be an integer"),
    ("sau", {"trigger_norm": 0}, "trigger_norm must be > 0"),
    ("sau", {"lmd_3": -1}, "lmd_3 must be >= 0"),
    ("sau", {"epsilon": 0.2}, "unknown key"),
])
def test_configs_reject_bad_values(name, bad, match):
    with pytest.raises(ValueError, match=match):
        create_defense(name, bad)


def test_defaults_follow_the_official_code():
    i = create_defense("ibau").config
    assert (i.rounds, i.fixed_point_iterations, i.inner_lr, i.lr, i.batch_size, i.patch_portion) == \
        (5, 5, 0.1, 0.001, 100, 0.01)
    bb = create_defense("ibau", setting="backdoorbench").config
    assert (bb.lr, bb.batch_size, bb.augment) == (0.0001, 256, True)
    r = create_defense("rnp").config
    assert (r.unlearning_lr, r.recovering_lr, r.alpha, r.clean_threshold, r.threshold) == (0.01, 0.2, 0.2, 0.2, 0.2)
    s = create_defense("sau").config
    assert (s.trigger_norm, s.adv_lr, s.adv_steps, s.beta_1, s.lmd_1, s.lmd_2, s.lmd_3) == (0.2, 0.2, 5, 0.01, 1, 0, 1)


def test_shuffled_batches_cover_every_sample_once():
    batches = shuffled_batches(10, 4, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))


# ---------------------------------------------------------------- i-BAU: implicit hypergradient

def _quadratic():
    """Inner G(d, t) = 1/2 d^T A d - d^T B t (fixed point of d - eta grad_d G: d* = A^-1 B t);
    outer L(d, t) = 1/2 ||d - c||^2 + e^T t."""
    A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    B = torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, 1.0]], dtype=torch.float64)
    c = torch.tensor([0.3, -0.7], dtype=torch.float64)
    e = torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64)
    return A, B, c, e


@pytest.mark.parametrize("K", [1, 3, 200])
def test_fixed_point_hypergradient_equals_the_neumann_series_and_the_linear_solve(K):
    A, B, c, e = _quadratic()
    eta = 0.3
    theta = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    d0 = torch.linalg.solve(A, B @ theta.detach())  # the inner optimum

    def phi(params):
        (d,) = params
        G = 0.5 * d @ A @ d - d @ (B @ theta)
        (g,) = torch.autograd.grad(G, [d], create_graph=True)
        return [d - eta * g]

    def loss(params):
        (d,) = params
        return 0.5 * ((d - c) ** 2).sum() + e @ theta

    (got,) = ibau_mod.fixed_point_hypergradient([d0], [theta], K, phi, loss, tol=0.0)
    # independent: explicit matrices. J = dPhi/dd = I - eta A, dPhi/dtheta = eta B
    J = torch.eye(2, dtype=torch.float64) - eta * A
    g_w = d0 - c
    v = sum(torch.linalg.matrix_power(J.T, k) @ g_w for k in range(K))
    expected = e + (eta * B).T @ v
    torch.testing.assert_close(got, expected)
    if K == 200:  # converged: the exact implicit derivative (A^-1 B)^T (d* - c) + e
        torch.testing.assert_close(got, e + torch.linalg.solve(A, B).T @ g_w)


def test_fixed_point_hypergradient_stops_at_tol():
    A, B, c, e = _quadratic()
    theta = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    d0 = torch.linalg.solve(A, B @ theta.detach())
    calls = []

    def phi(params):
        calls.append(1)
        return [params[0] * 0.0 + 0.0 * theta.sum()]  # J = 0: v stops moving after the second iteration

    def loss(params):
        return 0.5 * ((params[0] - c) ** 2).sum() + e @ theta

    (got,) = ibau_mod.fixed_point_hypergradient([d0], [theta], 50, phi, loss, tol=1e-12)
    torch.testing.assert_close(got, e)


def test_ibau_hypergradient_on_a_tiny_model_equals_explicit_jacobians():
    """The i-BAU maps on a real (tiny) network: the vector-Jacobian iteration equals the truncated Neumann
    series built from full Jacobian matrices (torch.autograd.functional.jacobian)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double().eval()
    x = torch.randn(5, 1, 2, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    xi, yi = torch.randn(4, 1, 2, 2, dtype=torch.float64), torch.tensor([2, 2, 1, 0])
    delta = 0.3 * torch.randn(1, 1, 2, 2, dtype=torch.float64)
    patched = torch.tensor([True, False, True, False, False])
    params = list(model.parameters())
    K, lr, reg = 4, 0.1, 0.001
    got = ibau_mod.fixed_point_hypergradient([delta], params, K, ibau_mod.inner_map(model, xi, yi, lr, reg),
                                             ibau_mod.outer_loss(model, x, y, patched), tol=0.0)

    # independent: functional forms over flat vectors
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    theta0 = torch.cat([p.detach().flatten() for p in params])

    def unflat(t):
        return [c.view(s) for c, s in zip(torch.split(t, sizes), shapes)]

    def net(theta, inp):
        w1, b1, w2, b2 = unflat(theta)
        return torch.tanh(inp.flatten(1) @ w1.T + b1) @ w2.T + b2

    def G(d, theta):
        return -F.cross_entropy(net(theta, xi + d.view(1, 1, 2, 2)), yi) + reg * (d ** 2).sum()

    def phi(d, theta):
        g = torch.autograd.grad(G(d, theta), d, create_graph=True)[0]
        return d - lr * g

    def L(d, theta):
        mask = patched.double().view(-1, 1, 1, 1)
        return F.cross_entropy(net(theta, x + mask * d.view(1, 1, 2, 2)), y)

    d0 = delta.flatten().clone().requires_grad_(True)
    th = theta0.clone().requires_grad_(True)
    Jd, Jt = torch.autograd.functional.jacobian(lambda d, t: phi(d, t), (d0, th), create_graph=False)
    gd, gt = torch.autograd.functional.jacobian(lambda d, t: L(d, t), (d0, th))
    v = sum(torch.linalg.matrix_power(Jd.T, k) @ gd for k in range(K))
    expected = gt + Jt.T @ v
    torch.testing.assert_close(torch.cat([g.flatten() for g in got]), expected)


def test_ibau_perturbation_raises_the_loss_and_mitigate_changes_only_weights():
    model = tiny_cnn()
    clean = clean_subset()
    defense = create_defense("ibau", rounds=1, batch_size=16)
    ctx = context_for(defense, clean)
    x = ((clean.images[:16].float() / 255) - 0.5) / 0.5
    pred = model(x).argmax(1)
    delta = ibau_mod.search_perturbation(model, [(x, pred)], lr=10.0, reg=0.001)
    with torch.no_grad():
        assert F.cross_entropy(model(x + delta), pred) > F.cross_entropy(model(x), pred)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = defense.mitigate(model, ctx)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is untouched
    after = out.model.state_dict()
    assert after.keys() == before.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    for k in before:  # eval mode throughout: BN running statistics never move
        if "running" in k:
            assert torch.equal(before[k], after[k]), k
    assert out.data_used == "clean subset of 48" and out.units_removed == 0
    assert out.diagnostics["outer_steps"] == 3


# ---------------------------------------------------------------- RNP: unlearn, recover, prune

def test_rnp_unlearning_is_gradient_ascent_and_stops_at_the_clean_threshold():
    clean = clean_subset()
    defense = create_defense("rnp")
    ctx = context_for(defense, clean)
    x = ((clean.images.float() / 255) - 0.5) / 0.5
    model = tiny_cnn().train()
    with torch.no_grad():
        loss0 = F.cross_entropy(model(x), clean.labels)
    hist = rnp_mod.unlearn(model, clean, ctx, defense.config.replace(unlearning_epochs=3, clean_threshold=0.0,
                                                                      unlearning_lr=0.05, augment=False))
    model.train()
    with torch.no_grad():
        assert F.cross_entropy(model(x), clean.labels) > loss0
    assert len(hist) == 3 or hist[-1]["train_acc"] == 0.0
    model = tiny_cnn()
    hist = rnp_mod.unlearn(model, clean, ctx, defense.config.replace(unlearning_epochs=5, clean_threshold=1.0))
    assert len(hist) == 1  # any accuracy is <= 1: stops after the first epoch


def test_rnp_unlearning_clips_the_gradient_and_refuses_a_diverged_loss():
    clean = clean_subset()
    defense = create_defense("rnp")
    ctx = context_for(defense, clean)
    one_step = defense.config.replace(unlearning_epochs=1, batch_size=len(clean), weight_decay=0.0, augment=False,
                                      unlearning_lr=0.1)
    moved = {}
    for clip in (None, 1e-3):
        model = tiny_cnn()
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        rnp_mod.unlearn(model, clean, ctx, one_step.replace(max_grad_norm=clip))
        moved[clip] = float((torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm())
    assert moved[1e-3] == pytest.approx(0.1 * 1e-3, rel=1e-3)  # one SGD step of the clipped gradient
    assert moved[None] > 10 * moved[1e-3]
    with pytest.raises(ValueError, match="RNP unlearning diverged: non-finite clean loss"):
        rnp_mod.unlearn(tiny_cnn(), clean, ctx, defense.config.replace(unlearning_lr=1e12, max_grad_norm=None,
                                                                       clean_threshold=0.0, unlearning_epochs=20))
    with pytest.raises(ValueError, match="max_grad_norm must be > 0 or null"):
        create_defense("rnp", max_grad_norm=0)


def test_rnp_recovery_moves_only_the_masks():
    clean = clean_subset()
    defense = create_defense("rnp")
    ctx = context_for(defense, clean)
    model = tiny_cnn()
    weights = {k: v.clone() for k, v in model.named_parameters()}
    masks, hist = rnp_mod.recover_masks(model, clean, ctx, defense.config.replace(recovering_epochs=3,
                                                                                   recovering_lr=1.0))
    bns = [n for n, m in tiny_cnn().named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert list(masks) == bns
    for name, p in model.named_parameters():
        if name.endswith(".mask"):
            continue
        if "noise" in name:
            assert torch.equal(p, torch.zeros_like(p)), name
            continue
        original = name.replace(".bn.", ".", 1) if ".bn." in name else name
        assert torch.equal(p, weights[original]), name  # frozen
        assert not p.requires_grad
    values = torch.cat(list(masks.values()))
    assert values.min() >= 0 and values.max() <= 1 and not torch.all(values == 1)
    assert len(hist) == 3


def test_rnp_prunes_exactly_the_masks_at_or_below_the_threshold(monkeypatch):
    model = tiny_cnn()
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    planted = {n: torch.ones(dict(model.named_modules())[n].num_features) for n in bns}
    planted[bns[0]][1] = 0.1
    planted[bns[-1]][3] = 0.2  # exactly at the threshold: pruned
    planted[bns[-1]][0] = 0.2001  # just above: kept
    monkeypatch.setattr(rnp_mod, "unlearn", lambda *a, **k: [{"train_acc": 0.1}])
    monkeypatch.setattr(rnp_mod, "recover_masks", lambda *a, **k: ({n: m.clone() for n, m in planted.items()}, []))
    defense = create_defense("rnp")
    out = defense.mitigate(model, context_for(defense, clean_subset()))
    mods = dict(out.model.named_modules())
    orig = dict(model.named_modules())
    zeroed = {(n, k) for n in bns for k in range(mods[n].num_features) if mods[n].weight[k] == 0}
    assert zeroed == {(bns[0], 1), (bns[-1], 3)}
    assert out.units_removed == 2
    for k, v in out.model.state_dict().items():  # everything else is the ORIGINAL model's, not the unlearned one
        if not k.endswith("weight") or not any(k == f"{n}.weight" for n in bns):
            assert torch.equal(v, model.state_dict()[k]), k
    assert torch.equal(mods[bns[0]].bias, orig[bns[0]].bias)  # the bias stays (official pruning)


# ---------------------------------------------------------------- SAU: shared adversarial examples

class Shift(nn.Module):
    """A 3-class linear model on the mean pixel value m: logits (0, s*(m - a), s*(m - b)); class 0 for small m."""

    def __init__(self, a: float, b: float, s: float = 50.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.0, s, s]))
        self.c = nn.Parameter(torch.tensor([0.0, -s * a, -s * b]))

    def forward(self, x):
        m = x.flatten(1).mean(1, keepdim=True)
        return m * self.w + self.c


def test_shared_adversarial_examples_flip_both_models_to_the_same_class():
    ident = Normalizer((0.0,), (1.0,))
    h, h0 = Shift(0.3, 0.9, 5.0), Shift(0.35, 0.95, 5.0)  # two different models, both class 1 for m in (0.35, 0.9)
    x = torch.full((3, 1, 2, 2), 0.1)  # class 0 for both; y = 0
    y = torch.zeros(3, dtype=torch.long)
    cfg = create_defense("sau", trigger_norm=0.5, adv_lr=0.1, adv_steps=10, pgd_init="min").config
    start = x - 0.5  # the start flips neither model: the steps must find the shared example
    assert torch.all(h(start).argmax(1) == 0) and torch.all(h0(start).argmax(1) == 0)
    pert = sau_mod.shared_pgd(h, h0, x, y, ident, cfg)
    adv = x + pert
    ph, ph0 = h(adv).argmax(1), h0(adv).argmax(1)
    assert torch.all(ph != h(x).argmax(1)) and torch.all(ph0 != h0(x).argmax(1)) and torch.all(ph == ph0)
    assert sau_mod.shared_mask(ph, ph0, h(x).argmax(1), h0(x).argmax(1)).all()
    assert pert.abs().max() <= 0.5 + 1e-6
    # a perturbation that flips only h is not shared
    only_h = torch.full_like(x, 0.22)  # m = 0.32: h says 1, h0 still 0
    assert h(x + only_h).argmax(1).tolist() == [1, 1, 1] and h0(x + only_h).argmax(1).tolist() == [0, 0, 0]
    assert not sau_mod.shared_mask(h(x + only_h).argmax(1), h0(x + only_h).argmax(1), h(x).argmax(1),
                                   h0(x).argmax(1)).any()


def test_pgd_stops_when_the_start_is_already_shared_and_projects():
    ident = Normalizer((0.0,), (1.0,))
    h, h0 = Shift(0.3, 0.9), Shift(0.35, 0.95)
    x = torch.full((2, 1, 2, 2), 0.1)
    cfg = create_defense("sau", trigger_norm=0.5, adv_lr=0.05, adv_steps=5).config  # init max: m = 0.6, shared
    pert = sau_mod.shared_pgd(h, h0, x, torch.zeros(2, dtype=torch.long), ident, cfg)
    # one step from +0.5, then the early stop: every entry moved by exactly adv_lr or was clipped at the bound
    assert torch.all((pert - 0.45).abs() < 1e-6) or torch.all((pert - 0.5).abs() < 1e-6)
    p = torch.tensor([[[[3.0, -4.0]]]])
    torch.testing.assert_close(sau_mod.project(p, "L2", 1.0), p / 5)
    torch.testing.assert_close(sau_mod.project(p, "L1", 1.0), p / 7)
    torch.testing.assert_close(sau_mod.project(p, "L_inf", 1.0), torch.tensor([[[[1.0, -1.0]]]]))


def test_sau_loss_matches_its_definition_on_a_hand_checked_batch():
    cfg = create_defense("sau").config
    y = torch.tensor([0, 0, 1])
    # h0 on clean x: predicts 0, 0, 1; on x + d: 2 (flipped, != y), 0 (not flipped), 2 (flipped, != y)
    ref_logits = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [0, 5.0, 0]])
    ref_adv = torch.tensor([[0, 0, 5.0], [5.0, 0, 0], [0, 0, 5.0]])
    # h on x + d: p(class 2) = 0.5 for sample 0 and 0.9995 for sample 2 (1 - p below the 0.999 clamp, p above 0.001)
    adv_logits = torch.tensor([[0.0, -1e4, 0.0], [0.0, 0.0, 0.0],
                               [math.log(0.00025), math.log(0.00025), math.log(0.9995)]])
    logits = torch.tensor([[2.0, 0, 0], [2.0, 0, 0], [0, 2.0, 0]])
    loss, parts = sau_mod.sau_loss(logits, adv_logits, ref_logits, ref_adv, y, cfg)
    p0 = 0.5
    p2 = 0.9995
    term0 = -(math.log(1e-6 + min(1 - p0, 0.999)) + math.log(1 + 1e-6 - max(p0, 0.001))) / 2
    term2 = -(math.log(1e-6 + min(1 - p2, 0.999)) + math.log(1 + 1e-6 - max(p2, 0.001))) / 2
    shared = (term0 + term2) / 3
    assert parts["potential"] == 2
    assert parts["shared"] == pytest.approx(shared, rel=1e-4)
    clean_ce = float(F.cross_entropy(logits, y))
    assert float(loss) == pytest.approx(cfg.lmd_1 * clean_ce + cfg.lmd_3 * shared, rel=1e-4)
    cfg2 = cfg.replace(lmd_1=0.0, lmd_2=1.0, lmd_3=0.0)
    assert float(sau_mod.sau_loss(logits, adv_logits, ref_logits, ref_adv, y, cfg2)[0]) == \
        pytest.approx(float(F.cross_entropy(adv_logits, y)), rel=1e-6)


def test_sau_mitigate_updates_the_model_and_keeps_the_reference_fixed():
    model = tiny_cnn()
    clean = clean_subset()
    defense = create_defense("sau", rounds=1, batch_size=16, lr=0.01)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = defense.mitigate(model, context_for(defense, clean))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    after = out.model.state_dict()
    assert after.keys() == before.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    assert out.data_used == "clean subset of 48" and len(out.diagnostics["history"]) == 1


def test_dataset_loading_is_refused_in_these_tests():
    import otbr_plugin.data.datasets as datasets_mod

    with pytest.raises(AssertionError, match="tried to load a dataset"):
        datasets_mod.load_dataset("fashion_mnist", split="test")
