"""The grid runner on tiny synthetic data: records, caching, resume, failures recorded and the grid going on."""

from dataclasses import dataclass

import pytest
import yaml

from conftest import write_mnist_like
from otbr_plugin.bench.executors import run_grid
from otbr_plugin.bench.grid import load_grid
from otbr_plugin.aggregate.records import read_record
from otbr_plugin.cli import main
from otbr_plugin.defenses import Defense, DefenseConfig, register_defense


@dataclass
class ExplodingConfig(DefenseConfig):
    pass


@register_defense
class Exploding(Defense):
    """A defense that always fails, to check that the grid records the failure and goes on."""

    name = "test_exploding"
    config_class = ExplodingConfig

    def mitigate(self, model, context):
        raise RuntimeError("boom")


def grid_file(tmp_path, defenses):
    write_mnist_like(tmp_path / "data" / "fashion_mnist", n_train=120, n_test=60)
    attack = {"attack": {"name": "badnets", "target_class": 0, "poison_ratio": 0.1},
              "dataset": "fashion_mnist", "model": {"name": "smallcnn", "width": 0.25},
              "train": {"epochs": 1, "batch_size": 32, "progress": False, "device": "cpu"}}
    grid = {"name": "tiny", "dataset": "fashion_mnist", "data_root": str(tmp_path / "data"),
            "attacks": {"badnets": attack}, "defenses": {d: {} for d in defenses}, "seeds": [0], "device": "cpu"}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_grid_runs_records_resumes_and_survives_failures(tmp_path):
    path = grid_file(tmp_path, ["none", "test_exploding"])
    grid = load_grid(path)
    out = tmp_path / "out"
    logs = []
    results = run_grid(grid, out, progress=False, log=logs.append)
    assert {(r.defense, r.status) for r in results} == {("none", "ok"), ("test_exploding", "failed")}
    assert "boom" in [r for r in results if r.status == "failed"][0].error
    recs = {p.name: read_record(p) for p in (out / "records").glob("*.json")}
    assert len(recs) == 2
    ok = recs["fashion_mnist__smallcnn__badnets__none__seed0.json"]
    assert ok.status == "ok" and ok.metrics_after == ok.metrics_before and ok.der == 0.5
    assert ok.data_used == "none" and len(ok.checkpoint_sha256) == 64
    failed = recs["fashion_mnist__smallcnn__badnets__test_exploding__seed0.json"]
    assert failed.status == "failed" and "RuntimeError: boom" in failed.error
    assert (out / "bundles" / "badnets-seed0" / "meta.json").exists()

    # resume: the ok cell is skipped, the bundle is reused, the failed cell is tried again
    logs.clear()
    again = run_grid(grid, out, progress=False, log=logs.append)
    assert {(r.defense, r.status) for r in again} == {("none", "skipped"), ("test_exploding", "failed")}
    assert any("using cached bundle" in line for line in logs)


def test_bench_command_exit_status_and_table(tmp_path, capsys):
    path = grid_file(tmp_path, ["none"])
    assert main(["bench", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| badnets |" in out and (tmp_path / "o" / "table.md").exists()
    path = grid_file(tmp_path, ["none", "test_exploding"])
    assert main(["bench", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    assert "FAILED badnets/test_exploding/seed0" in capsys.readouterr().out


def test_cached_bundle_with_other_config_is_trained_again(tmp_path):
    path = grid_file(tmp_path, ["none"])
    out = tmp_path / "out"
    run_grid(load_grid(path), out, progress=False, log=lambda s: None)
    grid = load_grid(path, {"attack_overrides": {"attack": {"poison_ratio": 0.2}}})
    (out / "records" / "fashion_mnist__smallcnn__badnets__none__seed0.json").unlink()
    logs = []
    results = run_grid(grid, out, progress=False, log=logs.append)
    assert results[0].status == "ok"
    assert any("another config" in line and "poison_ratio" in line for line in logs)
    from benchmark_adapters.bundle import load_bundle

    assert load_bundle(out / "bundles" / "badnets-seed0").extra["resolved_config"]["attack"]["poison_ratio"] == 0.2


def test_grid_validation(tmp_path):
    path = grid_file(tmp_path, ["none"])
    bad = yaml.safe_load(path.read_text())
    bad["defenses"] = {"nonexistent": {}}
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="unknown defense"):
        load_grid(path)
    bad["defenses"] = {"none": {}}
    bad["colour"] = "blue"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="unknown key"):
        load_grid(path)


def test_oracle_sweep_is_written_apart_and_labelled(tmp_path, capsys):
    path = grid_file(tmp_path, ["otbr"])
    grid = yaml.safe_load(path.read_text())
    grid["defenses"] = {"otbr": {"unlearn_batch_size": 16, "unlearn_steps": 2}}
    grid["oracle_sweeps"] = {"otbr": {"gamma": [0.0, 0.1]}}
    path.write_text(yaml.safe_dump(grid))
    out = tmp_path / "o"
    assert main(["bench", str(path), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    csv = out / "oracle" / "badnets__otbr__seed0" / "oracle_sweep_gamma.csv"
    assert csv.exists() and (csv.parent / "oracle_sweep_gamma.png").exists()
    assert "ORACLE DIAGNOSTIC" in printed and "ORACLE DIAGNOSTIC" in (out / "oracle_table.md").read_text()
    # the reported record keeps the configured gamma, whatever the sweep found
    record = read_record(out / "records" / "fashion_mnist__smallcnn__badnets__otbr__seed0.json")
    from otbr_plugin.defenses import get_defense

    assert record.defense_config["gamma"] == get_defense("otbr")().config.gamma
    assert "ORACLE" not in (out / "table.md").read_text()
    grid["oracle_sweeps"] = {"otbr": {"no_such_field": [1]}}
    path.write_text(yaml.safe_dump(grid))
    with pytest.raises(ValueError, match="oracle_sweeps"):
        load_grid(path)


def test_grid_variants_of_one_defense_run_side_by_side(tmp_path):
    path = grid_file(tmp_path, ["none"])
    raw = yaml.safe_load(path.read_text())
    small = {"unlearn_steps": 1, "unlearn_batch_size": 8}
    raw["defenses"] = {"otbr": small,
                       "otbr_reference": {"defense": "otbr", "config": None, "set": {**small, "setting": "reference", "mass_floor": 0.001}},
                       "otbr_g2": {"defense": "otbr", "set": {**small, "gamma": 0.2, "lam": 1.0}}}
    path.write_text(yaml.safe_dump(raw))
    grid = load_grid(path)
    assert grid.defense_names == {"otbr": "otbr", "otbr_reference": "otbr", "otbr_g2": "otbr"}
    assert grid.defenses["otbr_reference"]["setting"] == "reference" and grid.defenses["otbr_g2"]["gamma"] == 0.2
    results = run_grid(grid, tmp_path / "out", progress=False, log=lambda s: None)
    assert {(r.defense, r.status) for r in results} == {("otbr", "ok"), ("otbr_reference", "ok"), ("otbr_g2", "ok")}
    recs = {r.defense: r for r in map(read_record, (tmp_path / "out" / "records").glob("*.json"))}
    assert recs["otbr_g2"].defense_name == "otbr" and recs["otbr"].defense_name is None
    assert recs["otbr_g2"].diagnostics["gamma_used"] == 0.2 and recs["otbr_reference"].diagnostics["setting"] == "reference"
    # a malformed variant is refused with the expected keys named
    raw["defenses"] = {"otbr_x": {"defense": "otbr", "gamma": 0.1}}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="variant takes 'defense', 'config'"):
        load_grid(path)


@pytest.mark.parametrize("defense", ["fp", "anp"])
def test_committed_records_survive_options_that_follow_a_setting(defense):
    """FP and ANP gained `setting` and options that follow it (declared None); a record written before them, whose
    run they reproduce at the default setting, is still reused (the OTBR-variants table's BadNets records are such)."""
    from pathlib import Path

    from otbr_plugin.bench.grid import attack_fingerprint_config, stale_reason
    from otbr_plugin.bench.jobs import cell_record_path

    root = Path(__file__).resolve().parents[1]
    grid = load_grid(root / "configs" / "bench" / "fashion_mnist_otbr_variants.yaml", check_device=False)
    path = cell_record_path(grid, root / "results" / "fashion_mnist_otbr_variants", "badnets", defense, 0)
    record = read_record(path)
    assert record.fingerprint is not None  # a fingerprinted record: reuse goes through the config's defaults
    assert "stop_rule" not in record.defense_config and "bb_selection" not in record.defense_config
    assert stale_reason(grid, path, attack_fingerprint_config(grid, "badnets", 0), defense, None) is None
    changed = {**(grid.defenses.get(defense) or {}), "setting": "backdoorbench"}
    grid.defenses[defense] = changed
    assert "defense config changed" in stale_reason(grid, path, attack_fingerprint_config(grid, "badnets", 0),
                                                     defense, None)
