"""Who runs a grid's tasks: this process, one after the other (:func:`run_grid`, ``--executor local``), local worker
processes (``--executor local --workers N``) or Slurm (``--executor slurm``, through submitit). All run the tasks
planned by :func:`~otbr_plugin.bench.grid.plan_tasks` through :mod:`otbr_plugin.bench.jobs`. Workers and Slurm start a model's
cells only after its training task has ended, show one progress bar over all jobs (done / running / pending /
failed) and return one :class:`~otbr_plugin.bench.grid.CellResult` per cell, read from the records.

Slurm jobs are written down in ``<out>/jobs/jobs.json`` when submitted, so ``--detach`` can return at once: a later
``bench`` on the same folder waits for the jobs still queued instead of submitting them again, and
``otbr-bench status OUT`` reports on them.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..attacks.runner import parse_attack_run
from ..data import load_dataset
from ..io import folder_lock, read_regular, safe_name, write_json
from ..runtime import RunSettings, auto_threads
from ..aggregate.records import RunRecord
from .grid import (CellResult, GridSpec, Task, attack_fingerprint_config, cell_record_path, plan_tasks,
                   planning_device, record_is_current)
from .jobs import bundle_for, cell_line, read_cell, record_failure, run_cell, run_oracle_sweeps, run_task
from .evalcache import before_evaluation
from .slurm import (JobState, SlurmOptions, Submitter, check_job_id, current_job_id, finished_outcome, live_jobs,
                    require_slurm, write_outcome)

__all__ = ["run_grid", "run_local_workers", "run_slurm", "JobTable", "job_table", "live_slurm_jobs", "worker_gpus"]

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
MAX_JOBS_BYTES = 16 << 20  # jobs.json: a few hundred bytes per job
VANISHED_GRACE_S = 30.0  # a job that left the queue gets this long for its outcome file to appear (shared folders)


# ----------------------------------------------------------------------------------------------------------------
# local workers
# ----------------------------------------------------------------------------------------------------------------
def worker_gpus(device: torch.device) -> list[str]:
    """The GPUs to spread local workers over, one per worker in turn: the visible CUDA devices when the run's
    device is CUDA and there are several (``CUDA_VISIBLE_DEVICES`` entries where it is set), else none."""
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    return ids[:torch.cuda.device_count()] if ids else [str(i) for i in range(torch.cuda.device_count())]


def die_with_parent(parent: int, poll_s: float = 1.0) -> None:
    """Make this process end when its parent ``parent`` (the coordinator) ends, also when that one is killed with
    SIGKILL: Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGKILL)`` through ctypes) and, everywhere, a
    daemon thread that checks every ``poll_s`` seconds whether the parent is still there. An orphaned worker would
    otherwise finish its cell with the old config, or wait forever on a pipe nobody reads."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the watchdog thread alone
            pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="otbr-parent-watch", daemon=True).start()


def _init_worker(counter: Any, gpus: list[str], parent: int | None = None) -> None:
    """Worker start-up: it dies with its coordinator ``parent`` (:func:`die_with_parent`); worker i sees only GPU i
    mod len(gpus) (before CUDA starts in it)."""
    if parent is not None:
        die_with_parent(parent)
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]


def run_local_workers(grid: GridSpec, out: str | Path, bundles: str | Path, *, workers: int, device: torch.device,
                      threads: int | None = None, progress: bool = True,
                      log: Callable[[str], None] | None = None) -> list[CellResult]:
    """Run a grid's tasks on ``workers`` local processes (spawned). A model's cells start once its training task
    has ended. With several GPUs, worker i gets GPU i mod #GPUs (``CUDA_VISIBLE_DEVICES``) and runs on "cuda".
    ``threads``: torch CPU threads per worker (default: :func:`~otbr_plugin.runtime.auto_threads` for the workers). The caller holds
    the output folder's lock."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers must be an integer >= 1, got {workers!r}")
    log = log or _default_log(progress)
    out, bundles = Path(out), Path(bundles)
    plan = plan_tasks(grid, out, bundles, device, log)
    gpus = worker_gpus(device)
    worker_device = device.type if gpus else str(device)
    threads = threads or auto_threads(workers)[0]
    waiting: dict[tuple[str, int], list[Task]] = {}
    for task in plan.tasks:  # cells and sweeps of a model being trained wait for it
        if task.kind != "train" and Task("train", task.attack, task.seed) in plan.tasks:
            waiting.setdefault((task.attack, task.seed), []).append(task)
    if not plan.tasks:
        return plan.skipped
    bar = _JobBar(len(plan.tasks), f"grid {grid.name} ({workers} workers)", progress)
    context = multiprocessing.get_context("spawn")  # no fork: torch's thread pools do not survive it
    errors: dict[Task, str] = {}
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(context.Value("i", 0), gpus, os.getpid())) as pool:
        running: dict[Future, Task] = {}

        def start(task: Task) -> None:
            try:
                running[pool.submit(run_task, grid, task, str(out), str(bundles), worker_device, threads, False)] = task
            except RuntimeError as err:  # the pool broke (a worker was killed): recorded below, the grid ends
                errors[task] = f"{type(err).__name__}: {err}"
                bar.finish(True)

        for task in plan.tasks:
            if not any(task in group for group in waiting.values()):
                start(task)
        bar.update(running=len(running), pending=len(plan.tasks) - len(running))
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                task = running.pop(future)
                try:
                    future.result()
                    failed = _cell_failed(grid, out, task)
                except Exception as err:  # noqa: BLE001 - a training error or a dead worker
                    errors[task] = f"{type(err).__name__}: {err}"
                    failed = True
                    if task.kind == "train":
                        log(f"{task.key}: FAILED {errors[task]}")
                if task.kind == "cell":
                    _log_cell(grid, out, task, log)
                for follower in waiting.pop((task.attack, task.seed), []) if task.kind == "train" else []:
                    start(follower)
                bar.finish(failed)
            bar.update(running=len(running), pending=bar.total - bar.finished - len(running))
    bar.close()
    for task, error in errors.items():  # a cell whose worker died has no record yet
        if task.kind == "cell" and read_cell(cell_record_path(grid, out, task.attack, task.defense, task.seed,
                                                              task.dseed)) is None:
            _record_lost(grid, out, task, f"its worker process ended without a record: {error}")
    return plan.skipped + _cell_results(grid, out, plan.cells)


# ----------------------------------------------------------------------------------------------------------------
# Slurm
# ----------------------------------------------------------------------------------------------------------------
def jobs_file(out: Path) -> Path:
    return Path(out) / "jobs" / "jobs.json"


def slurm_folder(out: Path) -> Path:
    return Path(out).resolve() / "jobs" / "slurm"


def _load_jobs(out: Path) -> dict[str, dict[str, Any]]:
    """The Slurm jobs submitted for ``out``: task key -> {"job_id", "submitted", "record" (cells)}. The file is
    untrusted input: every key must be a task key, every job id a Slurm job id and every record a file name in
    ``<out>/records``; anything else is an error naming the file and the entry."""
    path = jobs_file(out)
    if not path.exists():
        return {}
    try:
        data = json.loads(read_regular(path, MAX_JOBS_BYTES).decode())
        jobs = data["jobs"]
        assert isinstance(jobs, dict) and all(isinstance(v, dict) and "job_id" in v for v in jobs.values())
    except (OSError, ValueError, KeyError, TypeError, AssertionError, RecursionError) as err:
        raise ValueError(f"{path}: not a jobs file of otbr-bench ({err}); move it away to start afresh") from err
    for key, entry in jobs.items():
        try:
            Task.from_key(key)
            check_job_id(entry["job_id"], "job_id")
            record = entry.get("record")
            if record is not None and not (isinstance(record, str) and _record_entry(record)):
                raise ValueError(f"record must be records/<file>.json inside the output folder, got {str(record)[:80]!r}")
        except ValueError as err:
            raise ValueError(f"{path}: entry {str(key)[:80]!r}: {err}; move the file away to start afresh") from None
    return jobs


def _record_entry(record: str) -> bool:
    """Whether a jobs file's ``record`` is ``records/<safe name>.json`` (relative, no ``..``, no sub-folders)."""
    parts = Path(record).parts
    if len(parts) != 2 or parts[0] != "records" or not parts[1].endswith(".json"):
        return False
    try:
        safe_name(parts[1], "record")
    except ValueError:
        return False
    return True


def slurm_job(grid: GridSpec, task: Task, out: str, bundles: str, device: str = "auto",
              threads: int | None = None) -> str:
    """The body of one Slurm job: :func:`~otbr_plugin.bench.jobs.run_task`, then how it ended as JSON in the job's
    own folder (:func:`~otbr_plugin.bench.slurm.write_outcome`: status, error tail, record), which is all that
    ``status`` and a resume read back. A job that raises writes its outcome and raises on (the job fails)."""
    job_id = current_job_id()
    folder = slurm_folder(Path(out))
    record = (str(cell_record_path(grid, Path(out), task.attack, task.defense, task.seed, task.dseed).relative_to(out))
              if task.kind == "cell" else None)
    try:
        result = run_task(grid, task, out, bundles, device, threads)
    except BaseException as err:
        if job_id is not None:
            write_outcome(folder, job_id, task.key, "failed", error=f"{type(err).__name__}: {err}", record=record)
        raise
    if job_id is not None:
        write_outcome(folder, job_id, task.key, "done", result=result, record=record)
    else:
        print(f"{task.key}: no Slurm job id found (SLURM_JOB_ID); no outcome file written", flush=True)
    return result


def live_slurm_jobs(out: str | Path) -> dict[str, str]:
    """The jobs submitted for ``out`` that are still queued or running (task key -> job id); empty when none were
    submitted or this machine has no Slurm commands to ask."""
    jobs = _load_jobs(Path(out))
    if not jobs:
        return {}
    try:
        live = live_jobs([e["job_id"] for e in jobs.values()])
    except RuntimeError:
        return {}
    return {key: e["job_id"] for key, e in jobs.items() if e["job_id"] in live}


def run_slurm(grid: GridSpec, out: str | Path, bundles: str | Path, *, options: SlurmOptions, device: str,
              threads: int | None = None, progress: bool = True, detach: bool = False, poll_s: float = 10.0,
              log: Callable[[str], None] | None = None) -> list[CellResult] | None:
    """Submit a grid's tasks as Slurm jobs and wait for them (None with ``detach``: submitted, not waited for).

    Each task is one job: a model's training job first, its cells and sweeps with an ``afterany`` dependency on it.
    Jobs of an earlier submission still in the queue are waited for, not submitted again; a cell whose earlier job
    ended without a record (cancelled, out of time) gets a failed record with the job's log tail. ``device`` is
    resolved by each job on its node. ``threads`` defaults to the CPUs per task. The caller holds the output
    folder's lock."""
    require_slurm()
    log = log or _default_log(progress)
    out, bundles = Path(out).resolve(), Path(bundles).resolve()
    folder = slurm_folder(out)
    jobs = _load_jobs(out)
    live = live_jobs([e["job_id"] for e in jobs.values()])
    _collect_lost(grid, out, {k: e for k, e in jobs.items() if e["job_id"] not in live}, folder, log)
    active = {key: e for key, e in jobs.items() if e["job_id"] in live}
    plan = plan_tasks(grid, out, bundles, planning_device(device), log)
    # trainings first (they start at once), then the cells and sweeps that wait for their job ids
    new = sorted((t for t in plan.tasks if t.key not in active), key=lambda t: t.kind != "train")
    threads = threads or options.cpus_per_task
    ids: dict[str, str] = {key: e["job_id"] for key, e in active.items()}
    submitter = Submitter(folder, options) if new else None
    try:
        for task in new:
            after = ids.get(Task("train", task.attack, task.seed).key) if task.kind != "train" else None
            ids[task.key] = submitter.submit(f"otbr-{task.key}", slurm_job,
                                             (grid, task, str(out), str(bundles), device, threads), after)
            jobs[task.key] = {"job_id": ids[task.key], "submitted": _now()}
            if task.kind == "cell":
                jobs[task.key]["record"] = str(cell_record_path(grid, out, task.attack, task.defense, task.seed, task.dseed)
                                               .relative_to(out))
    finally:  # also when sbatch refuses a job: the ones already submitted stay known
        if new:
            write_json(jobs_file(out), {"executor": "slurm", "grid": grid.name, "jobs": jobs})
    watched = {t.key: jobs[t.key] for t in plan.tasks if t.key in jobs}
    if new:
        log(f"submitted {len(new)} Slurm job(s) ({', '.join(ids[t.key] for t in new[:8])}"
            f"{', ...' if len(new) > 8 else ''}); logs in {folder}")
    if active:
        log(f"{len(active)} job(s) of an earlier submission still queued or running: waiting for them")
    if detach:
        return None
    _wait_slurm(grid, out, watched, folder, poll_s, progress, log)
    return plan.skipped + _cell_results(grid, out, [t for t in plan.tasks if t.kind == "cell"])


def _wait_slurm(grid: GridSpec, out: Path, jobs: dict[str, dict[str, Any]], folder: Path, poll_s: float,
                progress: bool, log: Callable[[str], None]) -> None:
    """Poll the queue until every job has ended; one bar over them, one line per finished cell."""
    bar = _JobBar(len(jobs), f"grid {grid.name} (Slurm)", progress)
    ended: dict[str, JobState] = {}
    gone_since: dict[str, float] = {}
    squeue_errors = 0
    while True:
        try:
            live = live_jobs([e["job_id"] for k, e in jobs.items() if k not in ended])
            squeue_errors = 0
        except RuntimeError as err:  # a busy controller: try again, give up after a few minutes
            squeue_errors += 1
            if squeue_errors * poll_s > 300:
                raise
            log(f"{err}; trying again in {poll_s:.0f} s")
            time.sleep(poll_s)
            continue
        for key, entry in jobs.items():
            if key in ended or entry["job_id"] in live:
                continue
            state = finished_outcome(folder, entry["job_id"], key)
            if state.state == "failed" and "without a result" in (state.error or ""):
                gone_since.setdefault(key, time.monotonic())  # the result file may still be on its way
                if time.monotonic() - gone_since[key] < VANISHED_GRACE_S:
                    continue
            ended[key] = state
            task = Task.from_key(key)
            if task.kind == "cell":
                if read_cell(out / entry["record"]) is None:
                    _record_lost(grid, out, task, state.error or "its job ended without a record")
                _log_cell(grid, out, task, log)
            elif state.state == "failed":
                log(f"{key}: FAILED {state.error}")
            bar.finish(state.state == "failed" or (task.kind == "cell" and _cell_failed(grid, out, task)))
        running = sum(s == "running" for s in live.values())
        bar.update(running=running, pending=len(jobs) - len(ended) - running)
        if len(ended) == len(jobs):
            break
        time.sleep(poll_s)
    bar.close()


def _collect_lost(grid: GridSpec, out: Path, ended: dict[str, dict[str, Any]], folder: Path,
                  log: Callable[[str], None]) -> None:
    """Cells of an earlier submission whose job ended without writing their record get a failed one now."""
    for key, entry in ended.items():
        task = Task.from_key(key)
        if task.kind != "cell" or task.attack not in grid.attacks or task.defense not in grid.defenses:
            continue
        if read_cell(out / entry["record"]) is None:
            state = finished_outcome(folder, entry["job_id"], key)
            _record_lost(grid, out, task, state.error or f"Slurm job {entry['job_id']} ended without a record")
            log(f"{key}: FAILED {state.error}")


# ----------------------------------------------------------------------------------------------------------------
# status of a folder
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class JobTable:
    """The jobs submitted for a folder, by state (task keys), with the errors of the failed ones."""

    done: list[str]
    running: list[str]
    pending: list[str]
    failed: dict[str, str]

    @property
    def live(self) -> int:
        return len(self.running) + len(self.pending)


def job_table(out: str | Path) -> JobTable:
    """Where the Slurm jobs of ``out`` stand, from the queue, the job folders and the records (a cell whose job
    ended is failed when its record is). Reads only; an empty table when no jobs were submitted."""
    out = Path(out)
    jobs = _load_jobs(out)
    table = JobTable([], [], [], {})
    if not jobs:
        return table
    live = live_jobs([e["job_id"] for e in jobs.values()])
    for key, entry in sorted(jobs.items()):
        if entry["job_id"] in live:
            (table.running if live[entry["job_id"]] == "running" else table.pending).append(key)
            continue
        state = finished_outcome(slurm_folder(out), entry["job_id"], key)
        record = read_cell(out / entry["record"]) if entry.get("record") else None
        if record is not None and record.status == "failed":
            table.failed[key] = str(record.error)
        elif state.state == "failed" and (record is None or not entry.get("record")):
            table.failed[key] = str(state.error)
        else:
            table.done.append(key)
    return table


# ----------------------------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------------------------
class _JobBar:
    """One tqdm bar over a grid's jobs, its postfix the counts: done / running / pending / failed."""

    def __init__(self, total: int, desc: str, progress: bool) -> None:
        self.total, self.finished, self.failed = total, 0, 0
        self._bar = tqdm(total=total, desc=desc, unit="job", disable=not progress, dynamic_ncols=True)

    def finish(self, failed: bool) -> None:
        self.finished += 1
        self.failed += bool(failed)
        self._bar.update(1)

    def update(self, running: int, pending: int) -> None:
        self._bar.set_postfix_str(f"done {self.finished - self.failed}, running {running}, pending {max(0, pending)}, "
                                  f"failed {self.failed}")

    def close(self) -> None:
        self._bar.close()


def _default_log(progress: bool) -> Callable[[str], None]:
    return (lambda s: tqdm.write(s)) if progress else (lambda s: print(s, flush=True))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _current_record(grid: GridSpec, out: Path, task: Task) -> tuple[RunRecord | None, str]:
    """The cell's record when it is this run's (its fingerprint is the cell's for the grid's configs), else None
    and why. A record written meanwhile by an earlier run's worker or job with another config is not reported."""
    path = cell_record_path(grid, out, task.attack, task.defense, task.seed, task.dseed)
    record = read_cell(path)
    if record is None:
        return None, "no record was written"
    if not record_is_current(grid, path, task.attack, task.defense, task.seed, task.dseed):
        return None, (f"its record {path} was written with another config (its fingerprint is not this run's: an "
                      "earlier run's worker or job wrote it); run the grid again to redo the cell")
    return record, ""


def _cell_failed(grid: GridSpec, out: Path, task: Task) -> bool:
    if task.kind != "cell":
        return False
    record, _ = _current_record(grid, out, task)
    return record is None or record.status != "ok"


def _log_cell(grid: GridSpec, out: Path, task: Task, log: Callable[[str], None]) -> None:
    record, why = _current_record(grid, out, task)
    log(cell_line(record) if record is not None else f"{task.key}: FAILED {why}")


def _record_lost(grid: GridSpec, out: Path, task: Task, error: str) -> None:
    """A failed record for a cell whose job or worker ended without writing one (an ok record is kept)."""
    path = cell_record_path(grid, out, task.attack, task.defense, task.seed, task.dseed)
    record_failure(grid, task.attack, task.defense, task.seed, path, None, RuntimeError(error), dseed=task.dseed)


def _cell_results(grid: GridSpec, out: Path, cells: list[Task]) -> list[CellResult]:
    """One result per cell task, from its record (a missing record, or one with another fingerprint, is a
    failure)."""
    results = []
    for task in cells:
        record, why = _current_record(grid, out, task)
        if record is None:
            results.append(CellResult(task.attack, task.defense, task.seed, "failed", why, task.dseed))
        else:
            results.append(CellResult(task.attack, task.defense, task.seed, record.status, record.error, task.dseed))
    return results


# ----------------------------------------------------------------------------------------------------------------
# the sequential executor: every task in this process, one bar over all cells
# ----------------------------------------------------------------------------------------------------------------
def run_grid(grid: GridSpec, out: str | Path, *, bundles_dir: str | Path | None = None, progress: bool = True,
             log: Callable[[str], None] | None = None, lock: bool = True,
             settings: RunSettings | None = None) -> list[CellResult]:
    """Run every cell whose record is missing, failed or stale; returns one result per cell (skipped, ok or
    failed). ``lock``: hold ``<out>/.lock`` (and the bundles folder's) for the run, so a second run on the
    same folder stops at once with :class:`~otbr_plugin.io.FolderLockedError` (pass False when the caller
    holds it). With ``progress``, one tqdm bar over all cells (with ETA) and one summary line per finished cell
    above it. ``settings``: the command's run settings (device, threads, progress), passed to attack training,
    evaluation and every defense; without them they are built once here from the grid's ``device`` and
    ``progress``."""
    if settings is None:
        settings = RunSettings.from_args(grid.device, progress=progress, apply=False)
    progress = settings.progress
    if log is None:  # one line per finished cell; above the bar when there is one
        log = (lambda s: tqdm.write(s)) if progress else (lambda s: print(s, flush=True))
    out = Path(out)
    bundles = Path(bundles_dir) if bundles_dir else out / "bundles"
    if not lock:
        return _run_grid(grid, out, bundles, settings, log)
    # the bundles folder is locked too, also <out>/bundles: another run may name it with --bundles
    with folder_lock(out, "otbr-bench run"), (
            folder_lock(bundles, "otbr-bench run (bundles folder)") if bundles.resolve() != out.resolve()
            else contextlib.nullcontext()):
        return _run_grid(grid, out, bundles, settings, log)


def _run_grid(grid: GridSpec, out: Path, bundles: Path, settings: RunSettings,
              log: Callable[[str], None]) -> list[CellResult]:
    progress, device = settings.progress, settings.device
    plan = plan_tasks(grid, out, bundles, device, log)  # the skip rules of every executor
    results: list[CellResult] = list(plan.skipped)
    todo: dict[tuple[str, int], list[tuple[str, int | None]]] = {}
    for task in plan.cells:
        todo.setdefault((task.attack, task.seed), []).append((task.defense, task.dseed))
    clean_test = None
    # one bar over all cells; cells already done count as its starting point. Its ETA (_Eta) comes from measured
    # rates: each defense's seconds per cell (this run's, or this grid's existing records') and this run's seconds
    # per training step for the models still to train.
    total = len(grid.seeds) * len(grid.attacks) * sum(len(grid.cell_defense_seeds(d)) for d in grid.defenses)
    eta = _Eta([t.defense for t in plan.cells], _training_work(grid, plan.tasks),
               _recorded_cell_seconds(grid, out, plan.skipped))
    bar = tqdm(total=total, initial=total - len(plan.cells), desc=f"grid {grid.name}", unit="cell",
               disable=not progress, dynamic_ncols=True, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
    for (attack, seed), defenses in todo.items():
        attack_cfg = attack_fingerprint_config(grid, attack, seed)
        paths = {(d, ds): cell_record_path(grid, out, attack, d, seed, ds) for d, ds in defenses}
        bar.set_postfix_str(f"{attack}/seed{seed}: backdoored model, {eta}")
        t0 = time.perf_counter()

        def epoch_done(info: dict, key: tuple[str, int] = (attack, seed)) -> None:
            eta.training_progress(key, info["seconds"], info["steps"], info["train_samples"])
            bar.set_postfix_str(f"{key[0]}/seed{key[1]}: training epoch {info['epoch']}/{info['epochs']}, {eta}")

        try:
            bundle = bundle_for(grid, attack, seed, bundles, log, settings, on_epoch=epoch_done)
            eta.training_done((attack, seed), time.perf_counter() - t0)
            if clean_test is None:
                clean_test = load_dataset(grid.dataset, "test", grid.data_root)
            bar.set_postfix_str(f"{attack}/seed{seed}: evaluating the backdoored model, {eta}")
            before, before_samples = before_evaluation(bundle, clean_test, device)
        except Exception as err:  # noqa: BLE001 - recorded, the grid goes on
            eta.training_done((attack, seed), None)
            for (defense, dseed), path in paths.items():
                results.append(record_failure(grid, attack, defense, seed, path, None, err, log, dseed))
                eta.cell_done(defense, None)
                bar.update(1)
            continue
        for (defense, dseed), path in paths.items():
            bar.set_postfix_str(f"{attack}/{defense}/seed{seed}{'' if dseed is None else f'/dseed{dseed}'}, {eta}")
            t0 = time.perf_counter()
            results.append(run_cell(grid, attack, defense, seed, path, bundle, clean_test, before, attack_cfg,
                                    device, log, before_samples, dseed))
            eta.cell_done(defense, time.perf_counter() - t0 if results[-1].status == "ok" else None)
            bar.set_postfix_str(str(eta), refresh=False)
            bar.update(1)
        run_oracle_sweeps(grid, attack, seed, bundle, clean_test, before, out / "oracle", log, device)
    bar.close()
    return results


def _training_work(grid: GridSpec, tasks: list[Task]) -> dict[tuple[str, int], tuple[int, int]]:
    """(epochs, batch size) of each model the plan trains; a config that does not parse is left out (its
    training fails at once)."""
    work = {}
    for task in tasks:
        if task.kind == "train":
            try:
                train = parse_attack_run(grid.attack_config(task.attack, task.seed)).train
            except Exception:  # noqa: BLE001 - reported by the training itself
                continue
            work[(task.attack, task.seed)] = (train.epochs, train.batch_size)
    return work


def _recorded_cell_seconds(grid: GridSpec, out: Path, done: list[CellResult]) -> dict[str, list[float]]:
    """Seconds per cell of each defense in this grid's current ok records (cells this run skips)."""
    seconds: dict[str, list[float]] = {}
    for cell in done:
        record = read_cell(cell_record_path(grid, out, cell.attack, cell.defense, cell.seed, cell.dseed))
        value = record.seconds.get("cell_total") if record is not None and record.status == "ok" else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
            seconds.setdefault(cell.defense, []).append(float(value))
    return seconds


class _Eta:
    """Time left in a grid, from rates measured in this run: each cell left costs the mean seconds per cell of its
    defense (measured in this run, or read from this grid's existing records), each model left to train its steps
    (epochs x ceil(training samples / batch)) x the seconds per training step of this run's trainings so far (the
    one under way included). Shown as "ETA 3:20"; "ETA > 1:10" (a lower bound) while a rate is unknown for part of
    the work; "ETA ?" while none is known."""

    def __init__(self, cells_left: list[str], trainings_left: dict[tuple[str, int], tuple[int, int]],
                 cell_seconds: dict[str, list[float]] | None = None) -> None:
        self.cells_left: dict[str, int] = {}
        for defense in cells_left:
            self.cells_left[defense] = self.cells_left.get(defense, 0) + 1
        self.trainings_left = dict(trainings_left)
        self.cell_seconds = {d: list(v) for d, v in (cell_seconds or {}).items()}
        self.train_seconds, self.train_steps = 0.0, 0  # this run's finished trainings
        self.current: tuple[tuple[str, int], float, int] | None = None  # the training under way: seconds, steps
        self.train_samples: int | None = None

    def training_progress(self, key: tuple[str, int], seconds: float, steps: int, train_samples: int) -> None:
        self.current, self.train_samples = (key, seconds, steps), train_samples

    def training_done(self, key: tuple[str, int], seconds: float | None) -> None:
        """The model ``key`` is there (trained: all its steps took ``seconds``; or found cached: no progress was
        seen) or its training failed (None)."""
        work = self.trainings_left.pop(key, None)
        if self.current is not None and self.current[0] == key and seconds is not None:
            self.train_seconds += seconds
            self.train_steps += (work[0] * math.ceil(self.train_samples / work[1]) if work and self.train_samples
                                 else self.current[2])
        self.current = None

    def cell_done(self, defense: str, seconds: float | None) -> None:
        self.cells_left[defense] = max(0, self.cells_left.get(defense, 0) - 1)
        if seconds is not None:
            self.cell_seconds.setdefault(defense, []).append(seconds)

    def seconds(self) -> tuple[float, bool]:
        """The seconds left whose rate is known, and whether that is all the work left."""
        left, complete = 0.0, True
        for defense, n in self.cells_left.items():
            known = self.cell_seconds.get(defense)
            if n and known:
                left += n * sum(known) / len(known)
            elif n:
                complete = False
        if self.trainings_left:
            secs, steps = self.train_seconds, self.train_steps
            if self.current is not None:
                secs, steps = secs + self.current[1], steps + self.current[2]
            if not steps or not self.train_samples:
                return left, False
            for key, (epochs, batch) in self.trainings_left.items():
                done = self.current[2] if self.current is not None and self.current[0] == key else 0
                left += max(0, epochs * math.ceil(self.train_samples / batch) - done) * secs / steps
        return left, complete

    def __str__(self) -> str:
        left, complete = self.seconds()
        if complete:
            return f"ETA {tqdm.format_interval(left)}"
        return f"ETA > {tqdm.format_interval(left)}" if left > 0 else "ETA ?"
