"""otbr-bench diagnose: the pure analyses (otbr/diagnostics.py) on tiny inputs, and the command end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from otbr_plugin.otbr.diagnostics import (
    data_unlearning,
    neuron_table,
    nwc_correlation,
    pruned_counts,
    top_neuron_auc,
    weight_norms,
)
from otbr_plugin.otbr.unlearning import neuron_weight_change, random_unlearning, target_layer_names


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(6, 3))


def nwc_map(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.rand(8, generator=g, dtype=torch.float64), "b": torch.rand(12, generator=g, dtype=torch.float64)}


# ---------------------------------------------------------------------------------------------------------
# correlation and AUC
# ---------------------------------------------------------------------------------------------------------
def test_correlation_of_identical_nwcs_is_one():
    a = nwc_map()
    t = nwc_correlation(a, {k: v.clone() for k, v in a.items()})
    assert t["layer"].tolist() == ["a", "b", "overall"]
    assert t["neurons"].tolist() == [8, 12, 20]
    assert np.allclose(t["pearson"], 1.0) and np.allclose(t["spearman"], 1.0)


def test_correlation_invariants():
    a = nwc_map()
    # a monotone (non-linear) transform keeps Spearman at 1, not Pearson; a reversal gives -1
    t = nwc_correlation(a, {k: v ** 5 for k, v in a.items()}).set_index("layer")
    assert t.loc["overall", "spearman"] == pytest.approx(1.0) and t.loc["overall", "pearson"] < 1.0
    t = nwc_correlation(a, {k: -v for k, v in a.items()}).set_index("layer")
    assert t.loc["a", "pearson"] == pytest.approx(-1.0) and t.loc["a", "spearman"] == pytest.approx(-1.0)
    # against scipy on random data
    from scipy import stats

    b = nwc_map(1)
    t = nwc_correlation(a, b).set_index("layer")
    x, y = torch.cat(list(a.values())).numpy(), torch.cat(list(b.values())).numpy()
    assert t.loc["overall", "pearson"] == pytest.approx(stats.pearsonr(x, y)[0])
    assert t.loc["overall", "spearman"] == pytest.approx(stats.spearmanr(x, y)[0])
    # undefined (constant side, single neuron) is NaN, not an error
    t = nwc_correlation({"c": torch.ones(4), "d": torch.tensor([2.0])}, {"c": torch.rand(4), "d": torch.tensor([2.0])})
    assert t["pearson"].isna().tolist() == [True, True, False]
    with pytest.raises(KeyError):
        nwc_correlation({"a": torch.ones(2)}, {"b": torch.ones(2)})


def test_auc_of_a_perfect_ranking_is_one():
    ref = {"a": torch.arange(40, dtype=torch.float64), "b": torch.arange(40, 80, dtype=torch.float64)}
    out = top_neuron_auc({k: v * 3 + 1 for k, v in ref.items()}, ref, top=0.05)
    assert out["auc"] == pytest.approx(1.0) and out["positives"] == 4 and out["neurons"] == 80
    assert out["precision_at_k"] == pytest.approx(1.0)
    reverse = top_neuron_auc({k: -v for k, v in ref.items()}, ref, top=0.05)
    assert reverse["auc"] == pytest.approx(0.0)
    with pytest.raises(ValueError):
        top_neuron_auc(ref, ref, top=0.0)


# ---------------------------------------------------------------------------------------------------------
# the data-unlearning loop
# ---------------------------------------------------------------------------------------------------------
def test_data_unlearning_changes_weights_and_never_its_input():
    model = tiny_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 1, 8, 8, generator=g), torch.randint(0, 3, (20,), generator=g)
    out = data_unlearning(model, x, y, steps=5, batch_size=8, lr=0.05, momentum=0.9)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is untouched
    layers = target_layer_names(model)
    nwc = neuron_weight_change(model, out.model, layers)
    assert all(bool((v > 0).all()) for v in nwc.values())
    assert len(out.losses) == 5 and int(out.label_counts.sum()) == 5 * 8
    # ascent: the loss on the data rises (BN in eval mode, so the models are compared on the same footing)
    up = data_unlearning(model, x, y, steps=5, batch_size=20, lr=0.05, momentum=0.9, bn_mode="eval")
    with torch.no_grad():
        ce = lambda m: float(nn.functional.cross_entropy(m.eval()(x), y))  # noqa: E731
        assert ce(up.model) > ce(model)
    # same seed, same result; fewer samples than a batch uses all of them each step
    again = data_unlearning(model, x, y, steps=5, batch_size=8, lr=0.05, momentum=0.9)
    assert all(torch.equal(a, b) for a, b in zip(out.model.state_dict().values(), again.model.state_dict().values()))
    small = data_unlearning(model, x[:3], y[:3], steps=2, batch_size=8, lr=0.05)
    assert int(small.label_counts.sum()) == 6
    with pytest.raises(ValueError):
        data_unlearning(model, x[:0], y[:0], steps=1)


def test_random_unlearning_unchanged_by_the_shared_loop():
    """random_unlearning now runs on the shared gradient_ascent loop; it must be the loop it was: one SGD ascent
    step per noise batch, drawn from the generator in order."""
    from otbr_plugin.data import Normalizer

    model = tiny_net()
    norm = Normalizer((0.5,), (0.5,))
    res = random_unlearning(model, num_classes=3, input_shape=(1, 8, 8), normalizer=norm, steps=3, batch_size=4,
                            lr=0.01, generator=torch.Generator().manual_seed(5))
    # the same loop by hand
    from otbr_plugin.otbr.unlearning import sample_unlearning_batch
    import copy
    import torch.nn.functional as F

    ref = copy.deepcopy(model).train()
    opt = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        x, y = sample_unlearning_batch(4, (1, 8, 8), 3, g, norm)
        opt.zero_grad()
        (-F.cross_entropy(ref(x), y)).backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(res.model.state_dict().values(), ref.state_dict().values()))
    assert int(res.label_counts.sum()) == 12


def test_weight_norms_neuron_table_and_pruned_counts():
    model = tiny_net()
    layers = target_layer_names(model)
    zeroed = tiny_net()
    with torch.no_grad():
        zeroed[0].weight[1] = 0
    t = weight_norms({"a": model, "b": zeroed}, layers)
    assert len(t) == 2 * (4 + 6)
    row = t[(t.model == "b") & (t.layer == "0") & (t.neuron == 1)]
    assert float(row.norm.iloc[0]) == 0.0
    expected = model[3].weight.detach().double().flatten(1).norm(dim=1)
    assert np.allclose(t[(t.model == "a") & (t.layer == "3")].norm, expected.numpy())
    nt = neuron_table({"random": {"0": torch.ones(4), "3": torch.zeros(6)}, "poison": {"0": torch.ones(4), "3": torch.ones(6)}}, layers)
    assert list(nt.columns) == ["layer", "neuron", "nwc_random", "nwc_poison"] and len(nt) == 10
    pc = pruned_counts({"0": torch.tensor([True, False, False, False]), "3": torch.zeros(6, dtype=torch.bool)}, layers)
    assert pc["pruned"].tolist() == [1, 0] and pc["share"].tolist() == [0.25, 0.0]


def test_diagnostics_is_pure():
    import ast

    src = Path(__file__).parents[1] / "otbr_plugin" / "otbr" / "diagnostics.py"
    tree = ast.parse(src.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = ("." * node.level) + (node.module or "")
            assert not any(x in mod for x in ("defenses", "bench", "commands", "benchmark_adapters")), mod


# ---------------------------------------------------------------------------------------------------------
# the command end to end
# ---------------------------------------------------------------------------------------------------------
def _tiny_bundle(tmp_path: Path) -> tuple[Path, Path]:
    """A Fashion-MNIST-shaped root (60 train / 30 test) and a width-0.0625 preactresnet18 BadNets bundle on it
    (untrained weights: the analyses only need a model, its attack config and its poisoned indices)."""
    from conftest import write_mnist_like

    from benchmark_adapters.bundle import Bundle, save_bundle
    from otbr_plugin.attacks import create_attack
    from otbr_plugin.data import Normalizer
    from otbr_plugin.models import ModelConfig

    data = write_mnist_like(tmp_path / "data" / "fashion_mnist", n_train=60, n_test=30)
    train_y = torch.from_numpy(data["train"][1].astype(np.int64))
    test_x = torch.from_numpy(data["test"][0]).unsqueeze(1)
    test_y = torch.from_numpy(data["test"][1].astype(np.int64))
    attack = create_attack("badnets", {"poison_ratio": 0.2, "seed": 1})
    idx = attack.select_indices(train_y)
    cfg = ModelConfig("preactresnet18", 10, 1, 28, 0.0625)
    torch.manual_seed(0)
    bundle = Bundle(cfg, cfg.build().state_dict(), "fashion_mnist", Normalizer((0.5,), (0.5,)),
                    attack.poison_test(test_x, test_y, 10),
                    {**attack.params(), "clean_label": False, "poison_count": int(idx.numel())},
                    {"acc": 0.1, "asr": 0.1, "ra": 0.1}, tensors={"poison_indices": idx})
    return tmp_path / "data", save_bundle(bundle, tmp_path / "bundle")


FAST = ["--set", "unlearn_steps=2", "--set", "unlearn_batch_size=8", "--device", "cpu", "--no-progress",
        "--gammas", "0.05,0.2", "--lams", "0.5,1.0", "--threads", "1"]


def test_diagnose_command_end_to_end(tmp_path, capsys):
    from otbr_plugin.cli import main

    root, bundle = _tiny_bundle(tmp_path)
    out = tmp_path / "diag"
    assert main(["diagnose", str(bundle), "--out", str(out), "--data-root", str(root), *FAST]) == 0
    printed = capsys.readouterr().out
    files = {p.name for p in out.iterdir()}
    for name in ("nwc.csv", "nwc_correlation.csv", "nwc_top_auc.csv", "nwc_scatter.png", "nwc_scatter_layers.png",
                 "oracle_diagnostic_test_set_grid.csv", "oracle_diagnostic_test_set_heatmaps.png",
                 "pruned_per_layer.csv", "pruned_per_layer.png", "weight_norms.csv", "weight_norms.png",
                 "summary.md", "summary.json"):
        assert name in files and (out / name).stat().st_size > 0, name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".diag")]  # no temp folder left behind

    summary = json.loads((out / "summary.json").read_text())
    corr = summary["correlation_overall"]
    assert set(corr) == {"random_vs_poison", "random_vs_clean", "clean_vs_poison"}
    md = (out / "summary.md").read_text()
    assert "ORACLE DIAGNOSTIC (test set)" in md
    assert f"{corr['random_vs_poison']['pearson']:.3f}" in md and f"{corr['random_vs_poison']['spearman']:.3f}" in md
    assert f"{summary['auc'][0]['auc']:.3f}" in md
    assert "random_vs_poison: Pearson" in printed.replace("NWC ", "")

    grid = pd.read_csv(out / "oracle_diagnostic_test_set_grid.csv")
    assert len(grid) == 2 * 2 * 2 and set(grid.model) == {"pruned", "fused"}
    assert (grid.diagnostic == "ORACLE DIAGNOSTIC (test set)").all()
    # the pruned model does not depend on lambda
    pr = grid[grid.model == "pruned"]
    assert pr.groupby("gamma")[["acc", "asr", "ra"]].nunique().max().max() == 1
    nwc = pd.read_csv(out / "nwc.csv")
    assert {"nwc_random", "nwc_poison", "nwc_clean"} <= set(nwc.columns) and (nwc.nwc_poison > 0).any()
    corr_t = pd.read_csv(out / "nwc_correlation.csv")
    assert "overall" in set(corr_t.layer)
    pruned = pd.read_csv(out / "pruned_per_layer.csv")
    assert set(pruned.gamma) == {0.05, 0.2}  # the config's gamma (0.05) and the grid's
    at = pruned[pruned.gamma == 0.2]
    assert at.pruned.sum() == grid[(grid.gamma == 0.2)].pruned_neurons.iloc[0] == int(0.2 * at.neurons.sum())
    norms = pd.read_csv(out / "weight_norms.csv")
    assert set(norms.model) == {"backdoored", "pruned", "fused"}
    assert (norms[norms.model == "pruned"].norm == 0).sum() >= int(0.05 * at.neurons.sum())

    # same seed, same numbers; a non-empty --out is refused unless --overwrite
    assert main(["diagnose", str(bundle), "--out", str(out), "--data-root", str(root), *FAST]) == 1
    assert main(["diagnose", str(bundle), "--out", str(out), "--data-root", str(root), "--overwrite", *FAST]) == 0
    assert json.loads((out / "summary.json").read_text())["correlation_overall"] == corr


def test_diagnose_command_options_and_errors(tmp_path, capsys):
    from otbr_plugin.cli import main

    root, bundle = _tiny_bundle(tmp_path)
    out = tmp_path / "ref"
    assert main(["diagnose", str(bundle), "--out", str(out), "--data-root", str(root), "--setting", "reference",
                 "--unlearn-samples", "5", "--eval-samples", "10", *FAST]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluated_on"].startswith("10 of 30 clean and 10 of ")
    assert summary["config"]["setting"] == "reference" and summary["config"]["cost"] == "unaligned"
    assert summary["unlearning_samples"]["poison"].startswith("5 of 12")
    assert main(["diagnose", str(bundle), "--out", str(tmp_path / "x"), "--gammas", "1.5"]) == 1
    assert main(["diagnose", str(bundle), "--out", str(tmp_path / "x"), "--set", "gamma=2"]) == 1
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        main(["diagnose", "--help"])
    assert "ORACLE DIAGNOSTIC" in capsys.readouterr().out


def test_diagnose_backdoorbench_record_without_poisoned_train_samples(tmp_path, capsys):
    from test_backdoorbench import make_bb_tree

    from otbr_plugin.cli import main

    bb = make_bb_tree(tmp_path / "bb")  # its bd_train holds no poisoned sample
    out = tmp_path / "diag"
    assert main(["diagnose", str(bb["record"]), "--out", str(out), *FAST]) == 0
    md = (out / "summary.md").read_text()
    assert "poison unlearning skipped" in md and "ORACLE DIAGNOSTIC (test set)" in md
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["correlation_overall"]) == {"random_vs_clean"} and summary["auc"] == []
