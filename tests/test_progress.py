"""Progress and an honest ETA in the grid (issue 27 item 3): training epochs show in the grid (a bar with progress,
one line per finished epoch with --no-progress), and the ETA comes from measured rates, not a cell count."""

from __future__ import annotations

from otbr_plugin.bench.executors import _Eta, _JobsEta, _recorded_cell_seconds, run_grid
from otbr_plugin.bench.grid import Task, load_grid, plan_tasks
from otbr_plugin.cli import main
from otbr_plugin.runtime import RunSettings
from test_grid import grid_file


def test_eta_from_measured_rates_of_each_defense_and_training_steps():
    eta = _Eta(["none", "anp", "anp", "otbr"], {("badnets", 0): (2, 100), ("blended", 0): (2, 50)},
               {"otbr": [30.0, 50.0]})  # otbr's seconds per cell read from existing records
    assert eta.seconds() == (40.0, False) and str(eta) == "ETA > 00:40"  # a lower bound while rates are unknown
    assert str(_Eta(["none"], {})) == "ETA ?"
    # 10 of badnets' 20 steps (1000 samples, batch 100, 2 epochs) in 10 s: 1 s per step; blended has 40 steps
    eta.training_progress(("badnets", 0), 10.0, 10, 1000)
    assert eta.seconds() == (40.0 + 10 * 1.0 + 40 * 1.0, False)
    eta.training_done(("badnets", 0), 24.0)  # 20 steps in 24 s in all: 1.2 s per step
    assert eta.seconds() == (40.0 + 40 * 1.2, False)
    eta.cell_done("none", 5.0)
    eta.cell_done("anp", 100.0)  # one anp cell left: 100 s, not the mean over all defenses
    assert eta.seconds() == (100.0 + 40.0 + 48.0, True) and str(eta) == "ETA 03:08"
    eta.training_done(("blended", 0), None)  # failed: no rate from it, nothing left to train
    eta.cell_done("anp", None)  # a failed cell counts as done, without a time
    assert eta.seconds() == (40.0, True)
    eta.cell_done("otbr", 60.0)
    assert eta.seconds() == (0.0, True) and str(eta) == "ETA 00:00"


def test_parallel_eta_from_measured_seconds_per_kind_of_task():
    """Workers and Slurm: each unfinished task costs its kind's mean measured seconds, shared by the tasks that run
    at once, never less than the longest task left."""
    train = [Task("train", a, 0) for a in ("badnets", "blended")]
    cells = [Task("cell", a, 0, d) for a in ("badnets", "blended") for d in ("none", "anp")]
    eta = _JobsEta(train + cells, 2, {"anp": [80.0]})  # anp's seconds per cell from existing records
    assert eta.seconds() == (80.0, False) and str(eta) == "ETA > 01:20"  # the two anp cells alone: a lower bound
    assert str(_JobsEta(train, 2)) == "ETA ?"
    eta.done(train[0], 100.0)
    eta.done(cells[0], 10.0)  # badnets/none
    eta.done(cells[1], None)  # a failed or skipped cell: done, no rate from it
    # left: blended's training (100), blended/none (10), blended/anp (80) on 2 workers: 95 s, the longest 100 s
    assert eta.seconds() == (100.0, True) and str(eta) == "ETA 01:40"
    eta.done(train[1], 140.0)  # training now 120 s on average; nothing left to train
    assert eta.seconds() == (max(90.0 / 2, 80.0), True)
    eta.parallel = 1  # Slurm: one job running now
    assert eta.seconds() == (90.0, True)
    eta.done(cells[2], 12.0)
    eta.done(cells[3], 70.0)
    assert eta.seconds() == (0.0, True) and str(eta) == "ETA 00:00"


def test_a_cached_bundle_gives_no_training_rate():
    eta = _Eta(["none"], {("badnets", 0): (1, 10)}, {"none": [2.0]})
    eta.training_done(("badnets", 0), 0.5)  # found cached: no progress was seen, no steps counted
    assert eta.train_steps == 0 and eta.seconds() == (2.0, True)


def test_no_progress_logs_one_line_per_finished_epoch_and_cell(tmp_path, capsys):
    path = grid_file(tmp_path, ["none", "test_exploding"])
    assert main(["bench", str(path), "--out", str(tmp_path / "o"), "--no-progress",
                 "--set", "attack_overrides.train.epochs=2"]) == 1  # test_exploding fails
    lines = capsys.readouterr().out.splitlines()
    epochs = [s for s in lines if s.startswith("training ")]
    assert [s.split(" done")[0] for s in epochs] == ["training badnets/seed0: epoch 1/2",
                                                     "training badnets/seed0: epoch 2/2"]
    assert all(" s, " in s and "steps" in s and "ACC" in s for s in epochs)
    assert len([s for s in lines if s.startswith("badnets/none/seed0: ACC")]) == 1
    assert len([s for s in lines if s.startswith("FAILED badnets/test_exploding/seed0")
                or "badnets/test_exploding/seed0: FAILED" in s]) >= 1


def test_progress_shows_the_training_bar_in_the_grid(tmp_path, capsys):
    grid = load_grid(grid_file(tmp_path, ["none"]))  # the attack config says train.progress: false
    run_grid(grid, tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "1/1" in err and "ETA" in err


def test_existing_records_give_each_defense_its_seconds_per_cell(tmp_path):
    grid = load_grid(grid_file(tmp_path, ["none", "test_exploding"]))
    out = tmp_path / "out"
    settings = RunSettings.from_args("cpu", threads=1, progress=False, apply=False)
    run_grid(grid, out, log=lambda s: None, settings=settings)
    plan = plan_tasks(grid, out, out / "bundles", settings.device)
    seconds = _recorded_cell_seconds(grid, out, plan.skipped)
    assert list(seconds) == ["none"] and len(seconds["none"]) == 1 and seconds["none"][0] > 0  # failed: no rate


def test_slurm_bar_shows_the_eta_from_the_jobs_seen_running(tmp_path, monkeypatch, capsys):
    """The Slurm bar's ETA: a job's seconds from when it was first seen running until it left the queue."""
    from otbr_plugin.bench import executors
    from otbr_plugin.bench.slurm import JobState

    grid = load_grid(grid_file(tmp_path, ["none"]))
    train, other = Task("train", "badnets", 0), Task("train", "blended", 0)
    polls = iter([{"101": "running", "102": "pending"}, {"102": "pending"}, {"102": "running"}, {}])
    monkeypatch.setattr(executors, "live_jobs", lambda ids: next(polls))
    monkeypatch.setattr(executors, "finished_outcome", lambda folder, job_id, key: JobState("done"))
    jobs = {train.key: {"job_id": "101"}, other.key: {"job_id": "102"}}
    executors._wait_slurm(grid, tmp_path / "o", jobs, tmp_path / "o" / "jobs", 0.01, True, lambda s: None)
    err = capsys.readouterr().err
    assert "ETA ?" in err  # nothing measured while the first job runs
    assert "ETA 00:00" in err and "2/2" in err  # the first job's time is the second's estimate; then none left
