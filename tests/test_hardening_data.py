"""Issue 26, part B: the data a result was made on (defects 5, 10), tampered baselines (8), non-finite models (11),
unreadable records in tables (12), and the rough edges around YAML, plots, table formats, oracle CSVs, leaderboard
submissions and CLP. Each test fails on the code before the fix."""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmark_adapters.backdoorbench.clean_test import resolve_data_root
from benchmark_adapters.bundle import BundleError, load_bundle
from conftest import write_mnist_like
from otbr_plugin.bench import grid as grid_module
from otbr_plugin.bench.executors import run_grid
from otbr_plugin.bench.grid import load_grid
from otbr_plugin.aggregate.leaderboard import entries_digest, export_submission, validate_submission
from otbr_plugin.aggregate.records import read_record
from otbr_plugin.aggregate.regress import load_baseline, make_baseline
from otbr_plugin.aggregate.report import render_report
from otbr_plugin.bench.runner import run_defense
from otbr_plugin.aggregate.tables import comparison_table, format_table, load_records, oracle_table, plot_acc_vs_asr
from otbr_plugin.cli import main
from otbr_plugin.config import dataclass_from_dict, load_yaml
from otbr_plugin.data import Normalizer, find_dataset
from otbr_plugin.defenses import create_defense
from otbr_plugin.defenses.base import build_context
from otbr_plugin.defenses.clp import CLPConfig
from otbr_plugin.metrics import evaluate_backdoor
from otbr_plugin.models import ModelConfig
from test_grid import grid_file

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "results" / "fashion_mnist" / "records"


def _copy_results(tmp_path: Path) -> Path:
    """A copy of the committed reference records and oracle sweeps (8 attacks x 11 defenses)."""
    dest = tmp_path / "results"
    shutil.copytree(COMMITTED, dest / "records")
    shutil.copytree(COMMITTED.parent / "oracle", dest / "oracle")
    return dest


# ----------------------------------------------------------------------------------------------------------
# 5. A BackdoorBench record's data_path is only a fallback, inside its tree; the run record says what data it used
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def bb_tree(tmp_path, monkeypatch):
    monkeypatch.delenv("OTBR_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "BB"
    record = root / "record" / "attack1"
    record.mkdir(parents=True)
    write_mnist_like(root / "data" / "mnist", seed=0)
    write_mnist_like(tmp_path / "outside" / "mnist", seed=1)
    return root, record, tmp_path / "outside"


def test_record_data_path_outside_the_tree_is_never_used(bb_tree):
    root, record, outside = bb_tree
    inside = resolve_data_root(record, "mnist", "./data/mnist")
    assert inside is not None and inside.resolve() == (root / "data" / "mnist").resolve()
    for data_path in (str(outside / "mnist"), "../../outside/mnist", "./data/../../outside/mnist"):
        found = resolve_data_root(record, "mnist", data_path)
        assert found is not None and outside.resolve() not in [found.resolve(), *found.resolve().parents], data_path
    (root / "evil").symlink_to(outside, target_is_directory=True)  # a symlink inside the tree that leads out
    found = resolve_data_root(record, "mnist", "./evil/mnist")
    assert outside.resolve() not in [found.resolve(), *found.resolve().parents]


def test_user_data_root_and_otbr_data_win_over_the_record(bb_tree, monkeypatch, tmp_path):
    root, record, outside = bb_tree
    user = tmp_path / "user"
    write_mnist_like(user / "mnist", seed=2)
    assert resolve_data_root(record, "mnist", "./data/mnist", user) == user
    monkeypatch.setenv("OTBR_DATA", str(user))
    assert resolve_data_root(record, "mnist", "./data/mnist") == user


def test_run_record_names_the_data_root_and_the_clean_set(tiny_fashion_bundle):
    bundle_path, root = tiny_fashion_bundle
    run = run_defense(load_bundle(bundle_path), create_defense("none"), data_root=root, device="cpu", progress=False)
    record = run.record()
    assert Path(record.data["root"]).resolve() == (root / "fashion_mnist").resolve()
    assert record.data["test"]["num_samples"] == 24 and len(record.data["test"]["sha256"]) == 64
    assert record.fingerprint and len(record.fingerprint) == 64
    # other clean data (here: one test image changed) gives another identity and another fingerprint
    images = root / "fashion_mnist" / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(images.read_bytes()))
    raw[-1] ^= 0xFF
    images.write_bytes(gzip.compress(bytes(raw)))
    other = run_defense(load_bundle(bundle_path), create_defense("none"), data_root=root, device="cpu",
                        progress=False).record()
    assert other.data["test"]["num_samples"] == 24 and other.data["test"]["sha256"] != record.data["test"]["sha256"]
    assert other.fingerprint != record.fingerprint


# ----------------------------------------------------------------------------------------------------------
# 10. The data's identity is part of the fingerprint of cells and bundles
# ----------------------------------------------------------------------------------------------------------
def test_cells_and_bundles_made_on_other_data_are_not_reused(tmp_path):
    path = grid_file(tmp_path, ["none"])
    out = tmp_path / "out"
    run_grid(load_grid(path), out, progress=False, log=lambda s: None)
    record = read_record(out / "records" / "fashion_mnist__smallcnn__badnets__none__seed0.json")
    assert record.data["test"]["num_samples"] == 60 and record.data["train"]["num_samples"] == 120
    assert run_grid(load_grid(path), out, progress=False, log=lambda s: None)[0].status == "skipped"

    subset = tmp_path / "subset"
    write_mnist_like(subset / "fashion_mnist", n_train=120, n_test=30)  # a smaller test set
    logs: list[str] = []
    results = run_grid(load_grid(path, {"data_root": str(subset)}), out, progress=False, log=logs.append)
    assert [r.status for r in results] == ["ok"], results
    assert any("data changed" in line and "test 60 -> 30" in line for line in logs), logs
    assert any("trained with another config" in line and "data" in line for line in logs), logs
    again = read_record(out / "records" / "fashion_mnist__smallcnn__badnets__none__seed0.json")
    assert again.data["test"]["num_samples"] == 30 and again.fingerprint != record.fingerprint
    bundle = load_bundle(out / "bundles" / "badnets-seed0")
    assert bundle.extra["data"]["test"]["num_samples"] == 30


@pytest.mark.skipif(find_dataset("fashion_mnist") is None, reason="Fashion-MNIST (dataset-fashion-mnist) not installed")
def test_committed_records_carry_the_identity_of_the_full_fashion_mnist():
    """The migrated records name the full Fashion-MNIST (60000 + 10000) and their fingerprints include it: the
    migration script finds nothing left to change, and a record claiming a subset is not reused."""
    import subprocess
    import sys

    folders = [str(REPO / "results" / n) for n in ("fashion_mnist", "fashion_mnist_otbr_variants",
                                                     "fashion_mnist_resnet18")]
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "migrate_data_identity.py"), "--check", *folders],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 record(s) to change, 0 problem(s)" in done.stdout  # stale-by-config records are not problems
    rec = read_record(COMMITTED / "fashion_mnist__preactresnet18__badnets__otbr__seed0.json")
    assert (rec.data["train"]["num_samples"], rec.data["test"]["num_samples"]) == (60000, 10000)


def test_a_record_made_on_a_subset_is_stale(tmp_path):
    grid = load_grid(REPO / "configs" / "bench" / "fashion_mnist.yaml")
    if isinstance(grid_module.grid_data(grid), str):
        pytest.skip("Fashion-MNIST not installed")
    src = COMMITTED / "fashion_mnist__preactresnet18__badnets__otbr__seed0.json"
    path = tmp_path / src.name
    cfg = grid_module.attack_fingerprint_config(grid, "badnets", 0)
    shutil.copy(src, path)
    assert grid_module.stale_reason(grid, path, cfg, "otbr", None) is None
    rec = json.loads(src.read_text())
    rec["data"]["test"]["num_samples"] = 1000  # a record that says it was made on a 1000-image subset
    path.write_text(json.dumps(rec))
    reason = grid_module.stale_reason(grid, path, cfg, "otbr", None)
    assert reason and "test 1000 -> 10000 samples" in reason
    del rec["data"]  # or does not say: not reused either
    path.write_text(json.dumps(rec))
    assert "does not say what data" in grid_module.stale_reason(grid, path, cfg, "otbr", None)


# ----------------------------------------------------------------------------------------------------------
# 8. A tampered regression baseline is refused, with a one-line error naming the file and the cell
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def baseline(tmp_path) -> Path:
    records = [read_record(p) for p in sorted(COMMITTED.glob("*badnets*.json"))]
    return make_baseline(records, tmp_path / "baseline.json")


@pytest.mark.parametrize("tamper, expect", [
    (lambda c: c[0].update(acc=float("nan")), "'acc' must be a finite fraction"),
    (lambda c: c[0].update(asr=1.5), "'asr' must be a finite fraction"),
    (lambda c: c[0].update(der=-0.2), "'der' must be a finite fraction"),
    (lambda c: c[0].update(acc="0.9"), "'acc' must be a finite fraction"),
    (lambda c: c[0].update(seed="0"), "'seed' must be a non-negative integer"),
    (lambda c: c[0].update(seed=True), "'seed' must be a non-negative integer"),
    (lambda c: c[0].update(defense=["otbr"]), "'defense' must be a non-empty string"),
    (lambda c: c[0].update(acc={"x": [1] * 10000}), "'acc' must be a finite fraction"),
    (lambda c: c.extend([dict(c[0], acc=0.0)] * 20), "repeats cell 0"),
])
def test_tampered_baseline_is_refused(baseline, tamper, expect, capsys, tmp_path):
    data = json.loads(baseline.read_text())
    tamper(data["cells"])
    baseline.write_text(json.dumps(data, allow_nan=True))
    with pytest.raises(ValueError) as err:
        load_baseline(baseline)
    text = str(err.value)
    assert expect in text and str(baseline) in text and "cell 0" in text and "\n" not in text and len(text) < 400
    rc = main(["regress", "--baseline", str(baseline), "--current", str(COMMITTED)])
    assert rc != 0
    out = capsys.readouterr()
    assert expect in out.err and "Traceback" not in out.err


def test_deeply_nested_baseline_is_a_clear_error(tmp_path):
    path = tmp_path / "b.json"
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match="nested too deeply|not a regression baseline"):
        load_baseline(path)


# ----------------------------------------------------------------------------------------------------------
# 11. Non-finite logits or weights are an error naming the checkpoint; normalizer stats are range-checked
# ----------------------------------------------------------------------------------------------------------
class _NaNModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 10), float("nan")) + self.w


def test_nan_logits_are_not_scored_as_predictions():
    images = torch.zeros(8, 1, 28, 28, dtype=torch.uint8)
    labels = torch.ones(8, dtype=torch.long)
    with pytest.raises(ValueError, match="non-finite"):
        evaluate_backdoor(_NaNModel(), images, labels, images, torch.zeros(8, dtype=torch.long), labels,
                          Normalizer((0.5,), (0.5,)), device="cpu")


def test_non_finite_weights_are_an_error_naming_the_checkpoint(tiny_fashion_bundle):
    bundle_path, root = tiny_fashion_bundle
    bundle = load_bundle(bundle_path)
    name = next(k for k, v in bundle.state_dict.items() if v.is_floating_point())
    bundle.state_dict[name] = bundle.state_dict[name].clone().fill_(float("inf"))
    with pytest.raises(BundleError, match="NaN or infinite") as err:
        run_defense(bundle, create_defense("none"), data_root=root, device="cpu", progress=False)
    assert str(bundle_path) in str(err.value) and name in str(err.value)


@pytest.mark.parametrize("mean, std", [((0.5,), (1e-300,)), ((1e308,), (0.5,)), ((0.5,), (float("inf"),)),
                                       ((float("nan"),), (0.5,)), ((0.5,), (1e6,))])
def test_normalizer_stats_are_range_checked(mean, std, tiny_fashion_bundle):
    with pytest.raises(ValueError, match="out of range"):
        Normalizer(mean, std)
    bundle_path, _ = tiny_fashion_bundle
    meta = json.loads((bundle_path / "meta.json").read_text())
    meta["dataset"]["mean"], meta["dataset"]["std"] = list(mean), list(std)
    (bundle_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="out of range|finite"):
        load_bundle(bundle_path)
    Normalizer((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))  # CIFAR-10's stay valid


# ----------------------------------------------------------------------------------------------------------
# 12. Unreadable records are named, and the average row averages over the same attacks for every defense
# ----------------------------------------------------------------------------------------------------------
def test_unreadable_record_is_named_and_the_average_is_over_common_attacks(tmp_path, capsys):
    folder = _copy_results(tmp_path)
    broken = folder / "records" / "fashion_mnist__preactresnet18__wanet__clp__seed0.json"
    broken.write_text(broken.read_text()[:200])  # truncated
    assert main(["table", str(folder)]) == 0
    out = capsys.readouterr()
    assert broken.name in out.err and "could not be read" in out.err
    n = len({p.name.split("__")[2] for p in (folder / "records").glob("*.json")})  # the committed attacks
    label = f"average ({n - 1} of {n} attacks every defense has)"
    assert f"| {label} |" in out.out
    records = load_records(folder)
    mean, _ = comparison_table(records)
    common = [a for a in mean.index if a not in ("wanet", label)]
    for d in ("none", "otbr", "clp", "fp", "anp"):
        assert math.isclose(mean.at[label, (d, "acc")], mean.loc[common, (d, "acc")].mean())
    page = render_report(folder)
    assert "Failed cells" in page and "unreadable record" in page and broken.name in page


def test_complete_tables_keep_their_plain_average_row():
    mean, _ = comparison_table(load_records(COMMITTED))
    assert "average" in mean.index


# ----------------------------------------------------------------------------------------------------------
# Rough edges
# ----------------------------------------------------------------------------------------------------------
BOMB = "\n".join(["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
                 + [f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9) + "]" for p, c in zip("abcdefgh", "bcdefghi")]) + "\n"


def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(BOMB) < 400
    start = time.perf_counter()
    with pytest.raises(ValueError, match="aliases"):
        load_yaml(path)
    assert time.perf_counter() - start < 5
    grid = tmp_path / "grid.yaml"
    grid.write_text(BOMB.replace("i: &i", "defenses: &i"))
    with pytest.raises(ValueError, match="aliases"):
        load_grid(grid)
    big = tmp_path / "big.yaml"
    big.write_text("x: " + "y" * (2 << 20) + "\n")
    with pytest.raises(ValueError, match="at most"):
        load_yaml(big)
    anchors = tmp_path / "ok.yaml"  # an ordinary anchor still works
    anchors.write_text("base: &b {gamma: 0.1}\notbr: *b\n")
    assert load_yaml(anchors)["otbr"] == {"gamma": 0.1}


def test_config_errors_truncate_echoed_values():
    with pytest.raises(ValueError) as err:
        dataclass_from_dict(CLPConfig, {"u": "x" * 100000})
    assert len(str(err.value)) < 300


def test_mathtext_in_labels_is_plotted_as_plain_text(tmp_path, capsys):
    folder = _copy_results(tmp_path)
    for path in (folder / "records").glob("*badnets*.json"):
        data = json.loads(path.read_text())
        data["attack"]["label"] = r"$\frac{unclosed$"
        path.write_text(json.dumps(data))
    records = load_records(folder)
    plot_acc_vs_asr(records, tmp_path / "plot.png", title=r"$\bad{$")
    assert (tmp_path / "plot.png").stat().st_size > 0
    assert main(["table", str(folder), "--plot", str(tmp_path / "p2.png")]) == 0
    assert r"$\frac{unclosed$" in render_report(folder)


def _renamed(tmp_path: Path, label: str) -> list:
    folder = _copy_results(tmp_path)
    for path in (folder / "records").glob("*badnets*.json"):
        data = json.loads(path.read_text())
        data["attack"]["label"] = label
        path.write_text(json.dumps(data))
    return load_records(folder)


def test_latex_table_escapes_every_special_character(tmp_path):
    mean, std = comparison_table(_renamed(tmp_path, "a&b\\input{/etc/passwd}%#$x^~_"))
    text = format_table(mean, std, "latex")
    assert "\\input{" not in text
    assert "a\\&b\\textbackslash{}input\\{/etc/passwd\\}\\%\\#\\$x\\textasciicircum{}\\textasciitilde{}\\_" in text


def test_csv_table_neutralises_formulas(tmp_path):
    mean, std = comparison_table(_renamed(tmp_path, '=HYPERLINK("http://evil","x")'))
    rows = list(csv.reader(io.StringIO(format_table(mean, std, "csv"))))
    assert all(not cell.startswith(("=", "+", "@")) for row in rows for cell in row)
    assert any(cell.startswith("'=HYPERLINK") for row in rows for cell in row)
    assert all(len(row) == len(rows[0]) for row in rows)


def test_html_table_on_stdout_holds_only_the_table(tmp_path, capsys):
    folder = _copy_results(tmp_path)
    failed = json.loads((folder / "records" / "fashion_mnist__preactresnet18__lf__anp__seed0.json").read_text())
    failed.update(status="failed", error="boom", metrics_after=None, der=None)
    (folder / "records" / "fashion_mnist__preactresnet18__lf__anp__seed0.json").write_text(json.dumps(failed))
    assert main(["table", str(folder), "--format", "html"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("<table>") and out.out.rstrip().endswith("</table>")
    assert "note:" in out.err and "ORACLE" not in out.out


def test_bad_oracle_csv_error_names_the_file(tmp_path):
    bad = tmp_path / "oracle" / "x" / "oracle_sweep_gamma.csv"
    bad.parent.mkdir(parents=True)
    bad.write_text("attack,defense,seed,gamma,acc,asr,ra,der\nbadnets,otbr,0,0.1,abc,0.1,0.1,0.5\n")
    with pytest.raises(ValueError, match="oracle_sweep_gamma.csv"):
        oracle_table(tmp_path)
    bad.write_text('a,b\n"unclosed,1\n1,2,3,4\n')
    with pytest.raises(ValueError) as err:
        oracle_table(tmp_path)
    assert str(bad) in str(err.value)


@pytest.fixture
def submission(tmp_path) -> dict:
    path = export_submission([read_record(p) for p in sorted(COMMITTED.glob("*badnets*.json"))],
                             tmp_path / "sub.json", "me", "otbr")
    return json.loads(path.read_text())


@pytest.mark.parametrize("field, value", [("model", {"name": ["x"]}), ("model", {}), ("attack", {"name": ""}),
                                          ("attack", {"name": {"a": 1}})])
def test_leaderboard_validate_requires_typed_names(submission, field, value):
    submission["entries"][0][field] = value
    submission["entries_sha256"] = entries_digest(submission["entries"])
    problems = validate_submission(submission)
    assert any(f"entries[0].{field}.name" in p for p in problems), problems


def test_leaderboard_schema_requires_string_names():
    schema = json.loads((REPO / "otbr_plugin" / "aggregate" / "leaderboard_schema.json").read_text())
    item = schema["properties"]["entries"]["items"]["properties"]
    for field in ("model", "attack"):
        assert item[field]["properties"]["name"] == {"type": "string", "minLength": 1}


def test_clp_on_nan_weights_is_a_clear_error():
    model = ModelConfig("smallcnn", 10, 1, 28, 0.25).build()
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    defense = create_defense("clp")
    ctx = build_context(defense, num_classes=10, input_shape=(1, 28, 28), normalizer=Normalizer((0.5,), (0.5,)),
                        device=torch.device("cpu"), seed=0, progress=False)
    with pytest.raises(ValueError, match="NaN or infinite"):
        defense.mitigate(model, ctx)


@pytest.mark.parametrize("u", [-1, -0.5, float("inf"), float("nan")])
def test_clp_u_is_validated(u):
    with pytest.raises(ValueError, match="u must be a finite number >= 0"):
        create_defense("clp", u=u)
    create_defense("clp", u=0)


# ----------------------------------------------------------------------------------------------------------
# Docs: the threat model
# ----------------------------------------------------------------------------------------------------------
def test_threat_model_is_documented_and_linked():
    text = (REPO / "docs" / "security.md").read_text()
    for word in ("trust", "checkpoints", "records", "results folders", "baselines", "submissions", "grid files",
                 "integrity", "authenticity", "sha256"):
        assert word in text.lower(), word
    assert "docs/security.md" in (REPO / "README.md").read_text()
