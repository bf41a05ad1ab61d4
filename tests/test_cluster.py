"""Issue 12: grids on local worker processes and on a real one-node Slurm cluster (submitit); the records equal a
sequential run's. The Slurm tests start munged + slurmctld + slurmd (tests/slurm_cluster.py) and are skipped, with
the reason, where the daemons are not installed or do not come up."""

from __future__ import annotations

import json
import pickle
import threading
from pathlib import Path

import pytest
import yaml

from otbr_plugin.bench import jobs as jobs_module
from otbr_plugin.bench.executors import run_grid, run_local_workers
from otbr_plugin.bench.grid import Task, load_grid, plan_tasks
from otbr_plugin.aggregate.records import read_record
from otbr_plugin.bench.slurm import SlurmOptions, finished_outcome
from otbr_plugin.aggregate.tables import load_records
from otbr_plugin.cli import main
from otbr_plugin.runtime import RunSettings
from slurm_cluster import start_one_node_slurm
from test_grid import grid_file

SMALL_OTBR = {"unlearn_steps": 1, "unlearn_batch_size": 8}


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_grid(tmp_path: Path, seeds=(0,)) -> Path:
    """The tiny grid of test_grid (smallcnn, 120 training images, 1 epoch) with none and a small OTBR."""
    path = grid_file(tmp_path, ["none"])
    raw = yaml.safe_load(path.read_text())
    raw["defenses"] = {"none": {}, "otbr": SMALL_OTBR}
    raw["seeds"] = list(seeds)
    path.write_text(yaml.safe_dump(raw))
    return path


def corrupt_training_data(tmp_path: Path) -> None:
    """Training fails (DatasetFormatError) while the grid still loads: the train images are not IDX."""
    (tmp_path / "data" / "fashion_mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"not an IDX file")


def results(out: Path) -> dict:
    """What must not depend on where a cell ran: metrics, DER, checkpoint, fingerprint, status, per cell."""
    return {r.key(): (r.status, r.metrics_before, r.metrics_after, r.der, r.checkpoint_sha256, r.fingerprint)
            for r in load_records(out / "records")}


def sequential(path: Path, out: Path) -> dict:
    run_grid(load_grid(path), out, log=lambda s: None,
             settings=RunSettings.from_args("cpu", threads=1, progress=False))
    return results(out)


# ------------------------------------------------------------------------------------------------------------------
# local workers
# ------------------------------------------------------------------------------------------------------------------
def test_local_workers_give_the_sequential_records(tmp_path, capsys):
    path = tiny_grid(tmp_path)
    expected = sequential(path, tmp_path / "seq")
    assert len(expected) == 2 and all(v[0] == "ok" for v in expected.values())
    out = tmp_path / "workers"
    capsys.readouterr()
    cells = run_local_workers(load_grid(path), out, out / "bundles", workers=2,
                              device=RunSettings.from_args("cpu", apply=False).device, threads=1, progress=True,
                              log=lambda s: None)
    assert sorted((c.attack, c.defense, c.seed, c.status) for c in cells) == sorted(
        ("badnets", d, 0, "ok") for d in ["none", "otbr"])
    assert results(out) == expected
    bar = capsys.readouterr().err  # the bar's ETA from measured seconds per task: all measured, none left at the end
    assert "ETA ?" in bar and "ETA 00:00" in bar  # unknown until a task of each kind left has ended
    # a rerun finds every record and starts no worker
    again = run_local_workers(load_grid(path), out, out / "bundles", workers=2,
                              device=RunSettings.from_args("cpu", apply=False).device, threads=1, progress=False)
    assert {c.status for c in again} == {"skipped"}


def test_local_workers_record_a_training_failure_in_every_cell(tmp_path, capsys):
    path = tiny_grid(tmp_path)
    corrupt_training_data(tmp_path)
    out = tmp_path / "o"
    assert main(["bench", str(path), "--out", str(out), "--workers", "2", "--threads", "1", "--no-progress"]) == 1
    printed = capsys.readouterr().out
    assert "FAILED badnets/none/seed0" in printed and "FAILED badnets/otbr/seed0" in printed
    for record in load_records(out / "records"):
        assert record.status == "failed"
        assert "training it failed" in record.error and "DatasetFormatError" in record.error


def test_one_bundle_is_trained_once_by_concurrent_runs(tmp_path, monkeypatch):
    grid = load_grid(tiny_grid(tmp_path))
    trained = []
    real = jobs_module.run_attack

    def counting(*args, **kwargs):
        trained.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs_module, "run_attack", counting)
    settings = RunSettings.from_args("cpu", threads=1, progress=False)
    bundles = tmp_path / "shared_bundles"
    got = []
    threads = [threading.Thread(target=lambda: got.append(jobs_module.bundle_for(
        grid, "badnets", 0, bundles, lambda s: None, settings).model_sha256)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(trained) == 1 and len(got) == 3 and len(set(got)) == 1


def test_plan_lists_each_training_before_its_cells_and_skips_done_cells(tmp_path):
    path = tiny_grid(tmp_path)
    grid = load_grid(path)
    out = tmp_path / "o"
    cpu = RunSettings.from_args("cpu", apply=False).device
    plan = plan_tasks(grid, out, out / "bundles", cpu)
    assert [t.key for t in plan.tasks] == ["train/badnets/seed0", "cell/badnets/none/seed0", "cell/badnets/otbr/seed0"]
    assert all(Task.from_key(t.key) == t for t in plan.tasks)
    run_grid(grid, out, log=lambda s: None, settings=RunSettings.from_args("cpu", threads=1, progress=False))
    (out / "records" / "fashion_mnist__smallcnn__badnets__otbr__seed0.json").unlink()
    plan = plan_tasks(grid, out, out / "bundles", cpu)  # the bundle is cached: no training task
    assert [t.key for t in plan.tasks] == ["cell/badnets/otbr/seed0"] and len(plan.skipped) == 1


# ------------------------------------------------------------------------------------------------------------------
# options and errors that need no cluster
# ------------------------------------------------------------------------------------------------------------------
def test_slurm_options_from_the_grid_and_the_command_line(tmp_path):
    path = tiny_grid(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["slurm"] = {"partition": "gpu", "time": "2:00:00", "gpus_per_task": 1, "sbatch": {"account": "lab"},
                    "setup": "module load cuda"}
    path.write_text(yaml.safe_dump(raw))
    options = load_grid(path).slurm
    assert options == SlurmOptions(partition="gpu", time="2:00:00", gpus_per_task=1, sbatch={"account": "lab"},
                                   setup=("module load cuda",))
    params = options.updated(mem="16G", sbatch={"qos": "high"}).submitit_parameters()
    assert params == {"time": 120, "cpus_per_task": 1, "partition": "gpu", "gpus_per_task": 1, "mem": "16G",
                      "additional_parameters": {"account": "lab", "qos": "high"}, "setup": ["module load cuda"]}
    for bad, message in (({"time": "two hours"}, "slurm.time must be"), ({"gpus": 1}, "unknown key"),
                         ({"mem": "lots"}, "slurm.mem must be"), ({"cpus_per_task": 0}, "cpus_per_task must be")):
        raw["slurm"] = bad
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(ValueError, match=message):
            load_grid(path)


@pytest.mark.parametrize("argv, message", [
    (["--detach"], "--detach only apply to --executor slurm"),
    (["--partition", "gpu"], "--partition only apply to --executor slurm"),
    (["--executor", "slurm", "--workers", "2"], "--workers applies to --executor local"),
    (["--workers", "0"], "--workers must be an integer >= 1"),
])
def test_executor_options_that_do_not_apply_are_one_line_errors(tmp_path, capsys, argv, message):
    path = tiny_grid(tmp_path)
    assert main(["bench", str(path), "--out", str(tmp_path / "o"), "--no-progress", *argv]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "records").exists()


def test_a_job_that_left_no_result_is_failed_with_its_log(tmp_path):
    folder = tmp_path / "slurm"
    (folder / "7").mkdir(parents=True)
    (folder / "7" / "7_0_log.err").write_text("start\nslurmstepd: error: *** JOB 7 CANCELLED AT 2026 DUE TO TIME LIMIT ***\n")
    state = finished_outcome(folder, "7")
    assert state.state == "failed" and "without a result" in state.error and "TIME LIMIT" in state.error


# ------------------------------------------------------------------------------------------------------------------
# a real one-node Slurm
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_node_slurm(tmp_path_factory):
    try:
        cluster = start_one_node_slurm(tmp_path_factory.mktemp("slurm"))
    except RuntimeError as err:
        pytest.skip(f"no one-node Slurm cluster: {err}")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in cluster.env.items():
            mp.setenv(key, value)
        yield cluster
    cluster.stop()


def slurm_command(path: Path, out: Path) -> list[str]:
    return ["bench", str(path), "--out", str(out), "--executor", "slurm", "--threads", "1", "--cpus-per-task", "1",
            "--time", "10", "--poll", "0.5", "--no-progress", "--no-report"]


def test_slurm_grid_gives_the_sequential_records_detached_and_resumed(one_node_slurm, tmp_path, capsys):
    path = tiny_grid(tmp_path)
    out = tmp_path / "slurm"
    command = slurm_command(path, out)
    assert main(command + ["--detach"]) == 0
    jobs = json.loads((out / "jobs" / "jobs.json").read_text())["jobs"]
    assert set(jobs) == {"train/badnets/seed0", "cell/badnets/none/seed0", "cell/badnets/otbr/seed0"}
    assert main(["status", str(out)]) == 0
    assert "3 Slurm job(s)" in capsys.readouterr().out
    # while the jobs are queued, a local run on the folder is refused
    assert main(["bench", str(path), "--out", str(out), "--no-progress"]) == 1
    assert "still queued or running" in capsys.readouterr().err
    # the same command again waits for the submitted jobs (submits none) and prints the table
    assert main(command) == 0
    printed = capsys.readouterr().out
    with capsys.disabled():
        print(printed)
    assert "| badnets |" in printed and "2 cell(s) run, 0 skipped (already done), 0 failed" in printed
    assert json.loads((out / "jobs" / "jobs.json").read_text())["jobs"] == jobs
    expected = sequential(path, tmp_path / "seq")
    assert results(out) == expected and all(v[0] == "ok" for v in expected.values())
    # resumed: nothing left to submit
    assert main(command) == 0
    assert "0 cell(s) run, 2 skipped (already done), 0 failed" in capsys.readouterr().out
    assert json.loads((out / "jobs" / "jobs.json").read_text())["jobs"] == jobs
    assert main(["status", str(out)]) == 0
    assert "done 3, running 0, pending 0, failed 0" in capsys.readouterr().out
    # every job wrote its outcome as JSON; status reads only that: a pickle planted as submitit's result never runs
    marker = tmp_path / "code_ran"
    for key, entry in jobs.items():
        folder = out.resolve() / "jobs" / "slurm" / entry["job_id"]
        outcome = json.loads((folder / "outcome.json").read_text())
        assert (outcome["job_id"], outcome["task"], outcome["status"]) == (entry["job_id"], key, "done")
        assert outcome["record"] == entry.get("record")
        (folder / f"{entry['job_id']}_0_result.pkl").write_bytes(pickle.dumps(("success", _Payload(marker))))
    assert main(["status", str(out)]) == 0
    assert "done 3" in capsys.readouterr().out and not marker.exists()


class _Payload:
    """A pickle that makes a folder when it is loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.marker,))


def test_slurm_training_failure_is_in_every_cell_record(one_node_slurm, tmp_path, capsys):
    path = tiny_grid(tmp_path)
    corrupt_training_data(tmp_path)
    out = tmp_path / "slurm"
    assert main(slurm_command(path, out)) == 1
    printed = capsys.readouterr().out
    with capsys.disabled():
        print(printed)
    assert "FAILED badnets/none/seed0" in printed and "FAILED badnets/otbr/seed0" in printed
    for name in ("none", "otbr"):
        record = read_record(out / "records" / f"fashion_mnist__smallcnn__badnets__{name}__seed0.json")
        assert record.status == "failed" and "DatasetFormatError" in record.error
    assert main(["status", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "FAILED train/badnets/seed0" in printed and "DatasetFormatError" in printed
