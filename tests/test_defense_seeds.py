"""The defense_seeds grid axis: cells per defense seed, records that keep both seeds, resume, and grids without the
axis unchanged (record names and fingerprints as before)."""

import numpy as np
import pytest
import torch
import yaml

from otbr_plugin.aggregate.records import read_record, record_filename, run_fingerprint
from otbr_plugin.aggregate.regress import compare, load_baseline, make_baseline
from otbr_plugin.aggregate.tables import comparison_table, load_records
from otbr_plugin.bench.executors import run_grid
from otbr_plugin.bench.grid import (Task, attack_fingerprint_config, cell_fingerprint, grid_data, load_grid,
                                    plan_tasks, _defense_fingerprint_config)
from otbr_plugin.defenses import Defense, register_defense
from test_grid import ExplodingConfig, grid_file


@register_defense
class SeedEcho(Defense):
    """Leaves the model as it is and reports the seed its context got."""

    name = "test_seed_echo"
    config_class = ExplodingConfig  # no options

    def mitigate(self, model, context):
        from otbr_plugin.defenses.base import DefenseOutcome

        return DefenseOutcome(model=self.copy_model(model, context.device), diagnostics={"seed": context.seed},
                              units_removed=0)


def _with_dseeds(tmp_path, dseeds):
    path = grid_file(tmp_path, ["none", "test_seed_echo"])
    data = yaml.safe_load(path.read_text())
    if dseeds is not None:
        data["defense_seeds"] = dseeds
    path.write_text(yaml.safe_dump(data))
    return path


def test_task_keys_round_trip():
    for task in (Task("cell", "badnets", 0, "otbr", 2), Task("cell", "badnets", 1, "otbr"), Task("train", "a", 3)):
        assert Task.from_key(task.key) == task
    assert Task("cell", "badnets", 0, "otbr", 2).key == "cell/badnets/otbr/seed0/dseed2"
    with pytest.raises(ValueError):
        Task("train", "badnets", 0, "", 1)


@pytest.mark.parametrize("bad", [[], [0, 0], [-1], "012", [True]])
def test_bad_defense_seeds_are_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="defense_seeds"):
        load_grid(_with_dseeds(tmp_path, bad))


def test_without_the_axis_names_and_fingerprints_are_unchanged(tmp_path):
    grid = load_grid(_with_dseeds(tmp_path, None))
    assert grid.cell_defense_seeds("test_seed_echo") == [None]
    assert record_filename("d", "m", "a", "x", 0) == "d__m__a__x__seed0.json"
    cfg = attack_fingerprint_config(grid, "badnets", 0)
    data = grid_data(grid)
    # the fingerprint a record had before the axis existed: no defense_seed in it
    old = run_fingerprint(cfg, _defense_fingerprint_config(grid, "test_seed_echo"), "ab" * 32,
                          {"clean_ratio": grid.clean_ratio,
                           "data": {s: {k: data[s][k] for k in ("num_samples", "sha256")} for s in ("train", "test")}})
    assert cell_fingerprint(grid, cfg, "test_seed_echo", "ab" * 32, data=data) == old
    assert cell_fingerprint(grid, cfg, "test_seed_echo", "ab" * 32, data=data, dseed=0) != old


def test_grid_runs_each_defense_seed_and_resumes(tmp_path):
    grid = load_grid(_with_dseeds(tmp_path, [0, 5, 7]))
    out = tmp_path / "out"
    results = run_grid(grid, out, progress=False, log=lambda s: None)
    assert sorted((r.defense, r.dseed, r.status) for r in results) == [
        ("none", 0, "ok"), ("test_seed_echo", 0, "ok"), ("test_seed_echo", 5, "ok"), ("test_seed_echo", 7, "ok")]
    for d in (0, 5, 7):
        r = read_record(out / "records" / f"fashion_mnist__smallcnn__badnets__test_seed_echo__seed0__dseed{d}.json")
        assert (r.seed, r.defense_seed, r.diagnostics["seed"]) == (0, d, d)  # the defense ran with the defense seed
        assert r.grid_order == {"attacks": ["badnets"], "defenses": ["none", "test_seed_echo"]}
    records = load_records(out)
    assert len({r.fingerprint for r in records}) == 4
    mean, std = comparison_table(records)
    assert mean.at["badnets", ("test_seed_echo", "acc")] == mean.at["badnets", ("none", "acc")]
    assert std.at["badnets", ("test_seed_echo", "acc")] == 0  # three defense seeds: a std, zero for an identity
    # resume: nothing left to do
    assert plan_tasks(grid, out, out / "bundles", torch.device("cpu")).cells == []
    again = run_grid(grid, out, progress=False, log=lambda s: None)
    assert {r.status for r in again} == {"skipped"}
    # a baseline over defense seeds: one cell per (attack, defense, training seed), the mean over defense seeds
    base = make_baseline(records, tmp_path / "b.json")
    cells = load_baseline(base).cells
    echo = [c for c in cells if c["defense"] == "test_seed_echo"]
    assert len(echo) == 1 and echo[0]["defense_seeds"] == [0, 5, 7] and "ci_half" in echo[0]
    assert all(row.status == "ok" for row in compare(load_baseline(base), records))


def test_regress_ci_factor_allows_test_set_noise(tmp_path):
    from test_bootstrap import AFTER_A, AFTER_B, _samples, rec_from

    base_rec = rec_from(AFTER_A)
    # a current run 1.25 points lower in ACC (5 of 400 images): beyond the 1-point default, within the interval
    clean = AFTER_A.clean.numpy().copy()
    clean[np.flatnonzero(clean)[:5]] = False
    cur = rec_from(_samples(clean, AFTER_A.target, AFTER_A.true))
    assert cur.metrics_after["acc"] == pytest.approx(base_rec.metrics_after["acc"] - 0.0125)
    path = make_baseline([base_rec], tmp_path / "b.json")
    baseline = load_baseline(path)
    assert compare(baseline, [cur])[0].status == "regressed"
    row = compare(baseline, [cur], ci_factor=1.0)[0]
    assert row.status == "ok" and row.checks["acc"].ci_half > 0.0125
    assert "CI half width" in row.checks["acc"].describe()
    # far beyond the noise still fails
    assert compare(baseline, [rec_from(AFTER_B)], ci_factor=1.0)[0].status == "regressed"


def test_a_worker_or_job_runs_the_cell_with_its_defense_seed(tmp_path):
    """The path of local workers and Slurm jobs: a task key names the defense seed, the record keeps it."""
    from otbr_plugin.bench.jobs import run_task

    grid = load_grid(_with_dseeds(tmp_path, [3, 4]))
    out, bundles = tmp_path / "out", tmp_path / "out" / "bundles"
    assert run_task(grid, Task("train", "badnets", 0), str(out), str(bundles), "cpu", echo=False) == "trained"
    task = Task.from_key("cell/badnets/test_seed_echo/seed0/dseed4")
    assert run_task(grid, task, str(out), str(bundles), "cpu", echo=False) == "ok"
    r = read_record(out / "records" / "fashion_mnist__smallcnn__badnets__test_seed_echo__seed0__dseed4.json")
    assert (r.seed, r.defense_seed, r.diagnostics["seed"]) == (0, 4, 4) and r.per_sample is not None
    assert run_task(grid, task, str(out), str(bundles), "cpu", echo=False) == "skipped"  # resume
    left = [t.key for t in plan_tasks(grid, out, bundles, torch.device("cpu")).cells]
    assert left == ["cell/badnets/none/seed0/dseed3", "cell/badnets/test_seed_echo/seed0/dseed3"]
