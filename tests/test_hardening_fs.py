"""Issue 26, part A: no code execution from results folders, no write or read outside them. One test per probe;
each reproduces the probe as reported and fails on the code before the fix (a planted pickle that runs, a lock that
truncates a victim file, a symlinked file in the report, a label that escapes --out, an --overwrite that deletes a
folder that is not a bundle, a conversion that destroys its source or drops tensors, an orphaned worker's record
shown as the new run's, a FIFO that hangs, 0600 bundle files)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from benchmark_adapters.backdoorbench import load_attack_result
from benchmark_adapters.backdoorbench.writer import write_attack_result
from benchmark_adapters.bundle import load_bundle, save_bundle
from otbr_plugin.aggregate.report import diagnose_html
from otbr_plugin.aggregate.tables import load_records
from otbr_plugin.bench import executors
from otbr_plugin.bench.executors import run_grid
from otbr_plugin.bench.grid import current_records, load_grid
from otbr_plugin.bench.jobs import Task
from otbr_plugin.bench.slurm import finished_outcome, write_outcome
from otbr_plugin.cli import main
from otbr_plugin.io import FolderLockedError, file_lock, folder_lock
from otbr_plugin.runtime import RunSettings
from test_bundle import make_bundle
from test_cluster import _one_thread  # noqa: F401 - the autouse fixture: one torch thread per test
from test_grid import grid_file

REPO = Path(__file__).resolve().parents[1]


class _Payload:
    """A pickle that makes a folder when it is loaded: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _slurm_out(tmp_path: Path, jobs: dict) -> Path:
    out = tmp_path / "out"
    (out / "jobs").mkdir(parents=True)
    (out / "jobs" / "jobs.json").write_text(json.dumps({"executor": "slurm", "grid": "g", "jobs": jobs}))
    return out


# ----------------------------------------------------------------------------------------------------------
# 1. status and a Slurm resume never unpickle from the results folder; job ids are checked
# ----------------------------------------------------------------------------------------------------------
def test_status_never_unpickles_a_planted_result_pickle(tmp_path, monkeypatch, capsys):
    out = _slurm_out(tmp_path, {"cell/badnets/none/seed0": {
        "job_id": "7", "record": "records/fashion_mnist__smallcnn__badnets__none__seed0.json"}})
    job = out.resolve() / "jobs" / "slurm" / "7"
    job.mkdir(parents=True)
    marker = tmp_path / "code_ran"
    (job / "7_0_result.pkl").write_bytes(pickle.dumps(("success", _Payload(marker))))
    monkeypatch.setattr(executors, "live_jobs", lambda ids: {})  # the job has left the queue
    assert main(["status", str(out)]) == 1
    assert not marker.exists(), "status unpickled the planted result file"
    printed = capsys.readouterr().out
    assert "FAILED cell/badnets/none/seed0" in printed and "without a result" in printed
    # the resume's path reads the same way
    assert finished_outcome(job.parent, "7").state == "failed" and not marker.exists()


@pytest.mark.parametrize("entry, message", [
    ({"job_id": "../../../../tmp/evil"}, "must be a Slurm job id"),
    ({"job_id": "7; rm -rf ~"}, "must be a Slurm job id"),
    ({"job_id": 7}, "must be a Slurm job id"),
    ({"job_id": "7\n"}, "must be a Slurm job id"),
    ({"job_id": "7", "record": "../../../etc/passwd"}, "record must be records/<file>.json"),
    ({"job_id": "7", "record": "/etc/passwd"}, "record must be records/<file>.json"),
])
def test_jobs_file_entries_are_checked(tmp_path, monkeypatch, capsys, entry, message):
    out = _slurm_out(tmp_path, {"cell/badnets/none/seed0": entry})
    monkeypatch.setattr(executors, "live_jobs", lambda ids: {})
    assert main(["status", str(out)]) == 1
    err = capsys.readouterr().err
    assert message in err and "jobs.json" in err and len(err.strip().splitlines()) == 1


def test_jobs_file_task_keys_are_checked(tmp_path, monkeypatch, capsys):
    for key in ("cell/../../victim/none/seed0", "cell/..victim/none/seed0"):
        out = _slurm_out(tmp_path / key.replace("/", "_"), {key: {"job_id": "7"}})
        monkeypatch.setattr(executors, "live_jobs", lambda ids: {})
        assert main(["status", str(out)]) == 1
        err = capsys.readouterr().err
        assert "jobs.json" in err and ("not a safe name" in err or "not a task key" in err)


def test_job_outcome_is_json_written_by_the_job_and_checked_on_reading(tmp_path, monkeypatch):
    folder = tmp_path / "out" / "jobs" / "slurm"
    write_outcome(folder, "12", "cell/badnets/none/seed0", "done", result="ok", record="records/x.json")
    assert finished_outcome(folder, "12", "cell/badnets/none/seed0").state == "done"
    # another task's outcome, or another job's, is not this job's
    assert "not the outcome of this job" in finished_outcome(folder, "12", "cell/badnets/otbr/seed0").error
    write_outcome(folder, "13", "train/badnets/seed0", "failed", error="x" * 5000 + "\nValueError: bad value")
    assert len(json.loads((folder / "13" / "outcome.json").read_text())["error"]) <= 2000  # its tail
    state = finished_outcome(folder, "13", "train/badnets/seed0")
    assert state.state == "failed" and state.error == "Slurm job 13 raised: ValueError: bad value"
    # a planted outcome that is a symlink out of the folder, a FIFO or bad JSON: a failed job, read without blocking
    (folder / "14").mkdir()
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"job_id": "14", "status": "done", "task": "x"}))
    (folder / "14" / "outcome.json").symlink_to(secret)
    assert "outside" in finished_outcome(folder, "14").error
    (folder / "15").mkdir()
    os.mkfifo(folder / "15" / "outcome.json")
    assert "FIFO" in finished_outcome(folder, "15").error
    (folder / "16").mkdir()
    (folder / "16" / "outcome.json").write_text("{")
    assert "cannot be read" in finished_outcome(folder, "16").error
    with pytest.raises(ValueError, match="Slurm job id"):
        finished_outcome(folder, "../16")
    # the job body writes its outcome (done, or failed with the error, and raises on)
    monkeypatch.setenv("SLURM_JOB_ID", "21")
    grid = load_grid(grid_file(tmp_path, ["none"]))
    out = tmp_path / "o"
    monkeypatch.setattr(executors, "run_task", lambda *a, **k: "ok")
    assert executors.slurm_job(grid, Task("cell", "badnets", 0, "none"), str(out), str(out / "bundles")) == "ok"
    data = json.loads((out / "jobs" / "slurm" / "21" / "outcome.json").read_text())
    assert data["status"] == "done" and data["record"] == "records/fashion_mnist__smallcnn__badnets__none__seed0.json"

    def boom(*a, **k):
        raise RuntimeError("training exploded")

    monkeypatch.setenv("SLURM_JOB_ID", "22")
    monkeypatch.setattr(executors, "run_task", boom)
    with pytest.raises(RuntimeError):
        executors.slurm_job(grid, Task("train", "badnets", 0), str(out), str(out / "bundles"))
    state = finished_outcome(out / "jobs" / "slurm", "22", "train/badnets/seed0")
    assert state.state == "failed" and "RuntimeError: training exploded" in state.error


def test_slurm_jobs_run_the_outcome_writing_body(tmp_path, monkeypatch):
    from otbr_plugin.bench.slurm import SlurmOptions

    submitted = []

    class FakeSubmitter:
        def __init__(self, folder, options):
            pass

        def submit(self, name, fn, args, after=None):
            submitted.append(fn)
            return str(100 + len(submitted))

    monkeypatch.setattr(executors, "Submitter", FakeSubmitter)
    monkeypatch.setattr(executors, "require_slurm", lambda: None)
    monkeypatch.setattr(executors, "live_jobs", lambda ids: {})
    out = tmp_path / "out"
    grid = load_grid(grid_file(tmp_path, ["none"]))
    assert executors.run_slurm(grid, out, out / "bundles", options=SlurmOptions(), device="cpu", progress=False,
                               detach=True, log=lambda s: None) is None
    assert len(submitted) == 2 and all(fn is executors.slurm_job for fn in submitted)
    jobs = json.loads((out / "jobs" / "jobs.json").read_text())["jobs"]
    assert {e["job_id"] for e in jobs.values()} == {"101", "102"}


# ----------------------------------------------------------------------------------------------------------
# 2. a planted .lock never truncates or writes another file
# ----------------------------------------------------------------------------------------------------------
def test_a_planted_lock_symlink_truncates_nothing(tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").symlink_to(victim)
    path = grid_file(tmp_path, ["none"])
    assert main(["bench", str(path), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "lock file" in err and "symlink" in err
    assert victim.read_text() == "precious\n"
    (out / ".lock").unlink()
    (out / ".lock").symlink_to(tmp_path / "nowhere")  # a dangling one creates nothing either
    with pytest.raises(ValueError, match="symlink"):
        with folder_lock(out):
            pass
    assert not (tmp_path / "nowhere").exists()


def test_a_lock_that_is_not_a_pid_file_is_never_truncated(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    lock = tmp_path / "records" / ".cell.lock"
    lock.parent.mkdir()
    os.link(victim, lock)  # a hard link: a regular file, but not one the tool created
    with file_lock(lock):
        pass
    assert victim.read_text() == "precious\n"
    os.mkfifo(tmp_path / ".fifo.lock")
    with pytest.raises(ValueError, match="FIFO"):
        with file_lock(tmp_path / ".fifo.lock"):
            pass
    # the tool's own lock files still carry the holder's pid, and a held lock says who holds it
    mine = tmp_path / ".mine.lock"
    with file_lock(mine):
        assert mine.read_text().strip() == str(os.getpid())
        with pytest.raises(FolderLockedError, match=f"pid {os.getpid()}"):
            with file_lock(mine):
                pass


# ----------------------------------------------------------------------------------------------------------
# 3. the report embeds only regular files inside the folder
# ----------------------------------------------------------------------------------------------------------
def test_report_does_not_embed_files_reached_through_symlinks(tmp_path):
    private = tmp_path / "private"
    private.mkdir()
    (private / "summary.md").write_text("# PRIVATE-SUMMARY\n")
    from PIL import Image

    Image.new("RGB", (4, 4), (255, 0, 0)).save(private / "secret.png")
    out = tmp_path / "out"
    good = out / "diagnose_ok"
    good.mkdir(parents=True)
    (good / "summary.md").write_text("# honest diagnosis\n")
    (good / "leak.png").symlink_to(private / "secret.png")
    linked = out / "diagnose_linked"
    linked.mkdir()
    (linked / "summary.md").symlink_to(private / "summary.md")
    (out / "diagnose_dir").symlink_to(private)  # a whole folder
    os.mkfifo(good / "fifo.png")
    pages = []  # in a thread: a report that opens the FIFO blocks forever
    reader = threading.Thread(target=lambda: pages.append(diagnose_html(out)), daemon=True)
    reader.start()
    reader.join(120)
    assert pages, "the report blocked on a FIFO"
    page = pages[0]
    assert "honest diagnosis" in page
    assert "PRIVATE-SUMMARY" not in page and "leak.png" not in page and "fifo.png" not in page


# ----------------------------------------------------------------------------------------------------------
# 4. grid labels are safe path parts
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where, label", [("attacks", "../../victim"), ("defenses", "../../../../escaped"),
                                          ("defenses", ".hidden"), ("attacks", "a/b"), ("attacks", "badnets\n")])
def test_grid_labels_that_escape_the_folder_are_refused(tmp_path, capsys, where, label):
    path = grid_file(tmp_path, ["none"])
    raw = yaml.safe_load(path.read_text())
    if where == "attacks":
        raw["attacks"] = {label: raw["attacks"]["badnets"]}
    else:
        raw["defenses"] = {label: {"defense": "none", "config": None, "set": {}}}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="not a safe name"):
        load_grid(path)
    assert main(["bench", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "not a safe name" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() and not (tmp_path / "victim").exists()


def test_safe_labels_still_load(tmp_path):
    path = grid_file(tmp_path, ["none"])
    raw = yaml.safe_load(path.read_text())
    raw["attacks"] = {"badnets-5pct_v1.2": raw["attacks"]["badnets"]}
    raw["defenses"] = {"none": {}, "none_variant-2": {"defense": "none", "config": None, "set": {}}}
    path.write_text(yaml.safe_dump(raw))
    grid = load_grid(path)
    assert set(grid.attacks) == {"badnets-5pct_v1.2"} and set(grid.defenses) == {"none", "none_variant-2"}


# ----------------------------------------------------------------------------------------------------------
# 6. --overwrite replaces only a bundle
# ----------------------------------------------------------------------------------------------------------
def test_overwrite_replaces_only_a_bundle(tmp_path, capsys):
    folder = tmp_path / "thesis"
    (folder / "chapter1").mkdir(parents=True)
    (folder / "notes.txt").write_text("years of work")
    with pytest.raises(FileExistsError, match="notes.txt"):
        save_bundle(make_bundle(), folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "years of work" and (folder / "chapter1").is_dir()
    # the command refuses before it trains
    config = tmp_path / "attack.yaml"
    config.write_text(yaml.safe_dump({"attack": {"name": "badnets"}, "dataset": "fashion_mnist",
                                      "model": {"name": "smallcnn", "width": 0.25}, "train": {"epochs": 1}}))
    assert main(["attack", str(config), "--out", str(folder), "--overwrite", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "not a bundle folder" in err and "chapter1/" in err and "notes.txt" in err
    assert (folder / "notes.txt").exists()
    # a bundle is still replaced
    bundle = save_bundle(make_bundle(), tmp_path / "b")
    save_bundle(make_bundle(with_tensors=False), bundle, overwrite=True)
    assert not load_bundle(bundle).tensors


# ----------------------------------------------------------------------------------------------------------
# 7. convert never destroys its source and keeps extra tensors
# ----------------------------------------------------------------------------------------------------------
def test_convert_refuses_its_source_as_destination(tmp_path, capsys):
    src = save_bundle(make_bundle(), tmp_path / "b")
    before = sorted(p.name for p in src.iterdir())
    link = tmp_path / "alias"
    link.symlink_to(src)
    for dst in (src, link, tmp_path):
        assert main(["convert", str(src), str(dst), "--overwrite"]) == 1
        assert "would replace the source" in capsys.readouterr().err
    assert sorted(p.name for p in src.iterdir()) == before
    load_bundle(src)


def test_convert_round_trip_keeps_extra_tensors(tmp_path):
    original = make_bundle()
    src = save_bundle(original, tmp_path / "b")
    record = tmp_path / "record" / "r"
    assert main(["convert", str(src), str(record)]) == 0
    back = tmp_path / "back"
    assert main(["convert", str(record), str(back)]) == 0
    tensors = load_bundle(back).tensors
    assert set(tensors) == {"poison_indices"} and torch.equal(tensors["poison_indices"],
                                                              original.tensors["poison_indices"])
    # the kept tensors are checked like the rest: a changed file is an error, not silently dropped
    data = bytearray((record / "extra.safetensors").read_bytes())
    data[-1] ^= 1
    (record / "extra.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="extra.safetensors"):
        load_attack_result(record)
    # and --overwrite of a record folder replaces only what convert writes
    (record / "defense_results").mkdir()
    with pytest.raises(FileExistsError, match="defense_results"):
        write_attack_result(make_bundle(), record, overwrite=True)


# ----------------------------------------------------------------------------------------------------------
# 9. workers die with their coordinator; a resume never reports another config's record
# ----------------------------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    return state not in ("Z", "X")


def _kill_and_survivors(proc: subprocess.Popen, workers: list[int], grace_s: float = 15.0) -> list[int]:
    """SIGKILL ``proc``; the ``workers`` still alive ``grace_s`` seconds later (killed too, so nothing is left)."""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + grace_s
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [w for w in workers if _alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    return left


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_local_workers_die_with_a_killed_coordinator(tmp_path):
    pids = tmp_path / "pids"
    coordinator = textwrap.dedent(f"""
        import multiprocessing, os, time
        from concurrent.futures import ProcessPoolExecutor
        from otbr_plugin.bench import executors
        if __name__ == "__main__":
            ctx = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(2, mp_context=ctx, initializer=executors._init_worker,
                                       initargs=(ctx.Value("i", 0), [], os.getpid()))
            workers = {{pool.submit(os.getpid).result() for _ in range(8)}}
            pool.submit(time.sleep, 120)
            open({str(pids)!r}, "w").write(" ".join(map(str, workers)))
            time.sleep(120)
    """)
    script = tmp_path / "coordinator.py"
    script.write_text(coordinator)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 240
        while not pids.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert pids.exists(), "the coordinator did not start its workers"
        workers = [int(p) for p in pids.read_text().split()]
        assert workers and all(_alive(p) for p in workers)
        assert not _kill_and_survivors(proc, workers), "orphaned workers outlived their coordinator"
    finally:
        if proc.poll() is None:
            proc.kill()


def _children(pid: int) -> list[int]:
    """The live child processes of ``pid`` that are workers (not multiprocessing's resource tracker)."""
    try:
        kids = [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    except OSError:
        return []
    return [k for k in kids if _alive(k) and b"resource_tracker" not in Path(f"/proc/{k}/cmdline").read_bytes()]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to find the workers")
def test_bench_workers_do_not_outlive_a_sigkilled_bench(tmp_path):
    """The probe as reported: SIGKILL `bench --executor local --workers 2` while its workers run; none survives."""
    path = grid_file(tmp_path, ["none"])
    raw = yaml.safe_load(path.read_text())
    raw["attacks"]["badnets"]["train"]["epochs"] = 50  # long enough to be killed mid-training
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen([sys.executable, "-m", "otbr_plugin.cli", "bench", str(path), "--out", str(tmp_path / "o"),
                             "--workers", "2", "--threads", "1", "--no-progress", "--no-report"], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while not workers and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            workers = _children(proc.pid)
        assert workers, "bench started no worker"
        time.sleep(3)  # the worker is importing torch or training
        workers = _children(proc.pid) or workers
        assert not _kill_and_survivors(proc, workers), "workers outlived the killed bench"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_resume_never_reports_a_record_with_another_fingerprint(tmp_path, capsys):
    path = grid_file(tmp_path, ["none"])
    out = tmp_path / "out"
    run_grid(load_grid(path), out, log=lambda s: None, settings=RunSettings.from_args("cpu", threads=1,
                                                                                     progress=False))
    # the resume changes the config; the old run's record (an orphaned worker's) is still in the folder
    changed = load_grid(path, {"clean_ratio": 0.2})
    cell = Task("cell", "badnets", 0, "none")
    [result] = executors._cell_results(changed, out, [cell])
    assert result.status == "failed" and "another config" in result.error
    lines = []
    executors._log_cell(changed, out, cell, lines.append)
    assert lines[0].startswith("cell/badnets/none/seed0: FAILED") and "ACC" not in lines[0]
    # nor is it in the run's table
    shown, stale = current_records(changed, out, load_records(out / "records"))
    assert not shown and [r.defense for r in stale] == ["none"]
    # with the config it was written for, it is reported
    [same] = executors._cell_results(load_grid(path), out, [cell])
    assert same.status == "ok"
    assert len(current_records(load_grid(path), out, load_records(out / "records"))[0]) == 1


# ----------------------------------------------------------------------------------------------------------
# rough edges
# ----------------------------------------------------------------------------------------------------------
def test_records_folder_with_a_fifo_or_dev_zero_neither_hangs_nor_exhausts_memory(tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    os.mkfifo(records / "fifo.json")
    (records / "zero.json").symlink_to("/dev/zero")
    (records / "big.json").write_bytes(b" " * (40 << 20))  # over the record size bound: not read as a record
    code = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from otbr_plugin.aggregate.tables import load_records
        from otbr_plugin.aggregate.records import read_record
        print(len(load_records({str(records)!r})))
        for name in ("fifo.json", "zero.json", "big.json"):
            try:
                read_record({str(records)!r} + "/" + name)
            except ValueError as err:
                print(str(err).splitlines()[0][-60:])
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "0"
    assert "FIFO" in lines[1] and "character device" in lines[2] and "more than" in lines[3]


def test_an_external_bundles_folder_in_use_by_another_run_is_locked(tmp_path, monkeypatch):
    grid = load_grid(grid_file(tmp_path, ["none"]))
    settings = RunSettings.from_args("cpu", threads=1, progress=False)
    a, b = tmp_path / "A", tmp_path / "B"
    seen = []

    def inner(grid_, out, bundles, settings_, log):
        if out == a:  # run 1 (out A, its default bundles A/bundles) is running: run 2 asks for A/bundles
            try:
                run_grid(grid, b, bundles_dir=a / "bundles", settings=settings)
                seen.append("ran")
            except FolderLockedError as err:
                seen.append(str(err))
        return []

    monkeypatch.setattr(executors, "_run_grid", inner)
    run_grid(grid, a, settings=settings)
    assert len(seen) == 1 and "in use" in seen[0] and "bundles" in seen[0]


def test_a_directory_or_fifo_given_as_checkpoint_says_what_it_is(tmp_path, capsys):
    from benchmark_adapters.checkpoints import load_checkpoint
    from benchmark_adapters.plain import read_state_dict

    folder = tmp_path / "weights.pt"
    folder.mkdir()
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="is a directory"):
        read_state_dict(folder)
    with pytest.raises(ValueError, match="is a FIFO"):
        read_state_dict(fifo)
    with pytest.raises(ValueError, match="is a FIFO"):
        load_checkpoint(fifo)
    assert main(["defend", str(fifo), "--defense", "none", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "is a FIFO" in err and "does not exist" not in err


def test_bundle_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        folder = save_bundle(make_bundle(), tmp_path / "b")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert set(modes) == {"meta.json", "model.safetensors", "bd_test.safetensors", "extra.safetensors"}
    assert set(modes.values()) == {0o644}, modes


def test_oracle_table_refuses_a_fifo_and_a_symlink_out_of_the_folder(tmp_path):
    """`table`/`bench` read oracle sweeps as untrusted files: a FIFO named like one must not block."""
    import os

    from otbr_plugin.aggregate.tables import oracle_table

    oracle = tmp_path / "oracle" / "badnets__otbr__seed0"
    oracle.mkdir(parents=True)
    os.mkfifo(oracle / "oracle_sweep_gamma.csv")
    with pytest.raises(ValueError, match="oracle_sweep_gamma.csv.*(FIFO|regular)"):
        oracle_table(tmp_path / "oracle")
    (oracle / "oracle_sweep_gamma.csv").unlink()
    secret = tmp_path / "secret.csv"
    secret.write_text("gamma,acc,asr,ra,der\n0.1,0.5,0.5,0.5,0.5\n")
    (oracle / "oracle_sweep_gamma.csv").symlink_to(secret)
    with pytest.raises(ValueError, match="oracle_sweep_gamma.csv"):
        oracle_table(tmp_path / "oracle")
