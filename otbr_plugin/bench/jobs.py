"""A grid cut into jobs: what is left to run (:func:`plan_tasks`) and the body of one job (:func:`run_task`).

Three kinds of task: ``train`` (the backdoored model of one (attack, seed), trained once and cached in the bundles
folder under its lock), ``cell`` (one defense on that model; writes its run record) and ``sweep`` (one labelled
oracle sweep). Cells and sweeps start after their ``train`` task has ended and never train themselves: when the
model is missing, the cell is recorded as failed with the training's error. A task runs in any process (a local
worker, a Slurm job) through the same functions as a sequential grid, so the records are the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from benchmark_adapters.bundle import load_bundle

from ..attacks.runner import parse_attack_run
from ..bundle import Bundle
from ..data import load_dataset
from ..io import FolderLockedError, file_lock, write_text
from ..runtime import RunSettings, resolve_device
from .grid import (CellResult, GridSpec, _attack_fingerprint_config, _bundle_for, _cached_checkpoint, _fail,
                   _run_oracle_sweeps, grid_data, run_cell, stale_reason)
from .records import RunRecord, read_record, record_filename
from .runner import evaluate_model

__all__ = ["Task", "GridPlan", "plan_tasks", "run_task", "cell_record_path", "cell_line", "planning_device"]

KINDS = ("train", "cell", "sweep")


@dataclass(frozen=True)
class Task:
    """One job of a grid: ``train`` (attack, seed), ``cell`` or ``sweep`` (attack, defense label, seed)."""

    kind: str
    attack: str
    seed: int
    defense: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS or (self.kind == "train") != (self.defense == ""):
            raise ValueError(f"a task is train (attack, seed) or {'/'.join(KINDS[1:])} (attack, defense, seed), "
                             f"got {self}")

    @property
    def key(self) -> str:
        """``train/badnets/seed0``, ``cell/badnets/otbr/seed0``: unique in a grid, readable in logs."""
        return "/".join([self.kind, self.attack, *([self.defense] if self.defense else []), f"seed{self.seed}"])

    @classmethod
    def from_key(cls, key: str) -> "Task":
        parts = key.split("/")
        if len(parts) not in (3, 4) or not parts[-1].startswith("seed") or not parts[-1][4:].isdigit():
            raise ValueError(f"not a task key: {key!r} (expected KIND/ATTACK[/DEFENSE]/seedN)")
        return cls(parts[0], parts[1], int(parts[-1][4:]), parts[2] if len(parts) == 4 else "")


@dataclass
class GridPlan:
    """What is left of a grid: tasks in dependency order (each ``train`` before its cells) and the cells skipped
    because their record is there and its fingerprint matches."""

    tasks: list[Task] = field(default_factory=list)
    skipped: list[CellResult] = field(default_factory=list)

    @property
    def cells(self) -> list[Task]:
        return [t for t in self.tasks if t.kind == "cell"]


def cell_record_path(grid: GridSpec, out: Path, attack: str, defense: str, seed: int) -> Path:
    """Where the run record of one cell lives in ``out``."""
    model = parse_attack_run(grid.attacks[attack]).model.name
    return Path(out) / "records" / record_filename(grid.dataset, model, attack, defense, seed)


def train_error_path(out: Path, attack: str, seed: int) -> Path:
    """Where a failed ``train`` task leaves its error for the cells that wait for it."""
    return Path(out) / "jobs" / "train_errors" / f"{attack}-seed{seed}.txt"


def planning_device(device: str) -> torch.device:
    """The device a plan compares cached bundles against: ``device`` resolved here, or, when this machine does not
    have it (a login node planning GPU jobs), its type as named."""
    try:
        return resolve_device(device)
    except ValueError:
        return torch.device(device)


def plan_tasks(grid: GridSpec, out: str | Path, bundles: str | Path, device: torch.device,
               log: Callable[[str], None] = lambda s: None) -> GridPlan:
    """The tasks left to run, by the sequential grid's rules: a cell is skipped only when its record's fingerprint
    matches (:func:`~otbr_plugin.bench.grid.stale_reason`); a model is trained only when a cell needs it and no
    cached bundle trained with its config exists; an oracle sweep runs with its model's cells when its CSV is
    missing."""
    out, bundles = Path(out), Path(bundles)
    plan = GridPlan()
    for seed in grid.seeds:
        for attack in grid.attacks:
            attack_cfg = _attack_fingerprint_config(grid, attack, seed)
            cached = _cached_checkpoint(bundles / f"{attack}-seed{seed}", attack_cfg, device, grid_data(grid))
            cells = []
            for defense in grid.defenses:
                path = cell_record_path(grid, out, attack, defense, seed)
                if path.exists():
                    reason = stale_reason(grid, path, attack_cfg, defense, cached)
                    if reason is None:
                        plan.skipped.append(CellResult(attack, defense, seed, "skipped"))
                        continue
                    log(f"{attack}/{defense}/seed{seed}: running again, {reason}")
                cells.append(Task("cell", attack, seed, defense))
            if not cells:
                continue
            if cached is None:
                plan.tasks.append(Task("train", attack, seed))
            plan.tasks += cells
            for dname, spec in grid.oracle_sweeps.items():
                key = next(iter(spec))
                if not (out / "oracle" / f"{attack}__{dname}__seed{seed}" / f"oracle_sweep_{key}.csv").exists():
                    plan.tasks.append(Task("sweep", attack, seed, dname))
    return plan


def cell_line(record: RunRecord) -> str:
    """The one line a finished cell prints (as the sequential grid does)."""
    where = f"{record.attack_name}/{record.defense}/seed{record.seed}"
    if record.status != "ok" or record.metrics_after is None or record.der is None:
        return f"{where}: FAILED {record.error}"
    a = record.metrics_after
    return (f"{where}: ACC {a['acc'] * 100:.2f}  ASR {a['asr'] * 100:.2f}  RA {a['ra'] * 100:.2f}  "
            f"DER {record.der * 100:.2f}  ({record.seconds.get('cell_total', 0.0):.1f} s)")


def run_task(grid: GridSpec, task: Task, out: str, bundles: str, device: str = "auto", threads: int | None = None,
             echo: bool = True) -> str:
    """Run one task (the body of a local worker's or a Slurm job's call) and return how it ended: "trained",
    "ok", "failed" or "skipped" (the cell's record is already there, or another job holds the cell's lock).

    ``device`` is resolved here, on the machine that runs the task. A ``train`` task raises when training fails
    (the job fails; its error is left for its cells); a cell never raises for its own failure, it records it.
    ``echo``: print the task's log lines (a Slurm job's log); local workers stay quiet, their coordinator prints."""
    settings = RunSettings.from_args(device, threads=threads, progress=False)
    log: Callable[[str], None] = (lambda s: print(s, flush=True)) if echo else (lambda s: None)
    out_dir, bundle_dir = Path(out), Path(bundles)
    if task.kind == "train":
        return _train(grid, task, out_dir, bundle_dir, settings, log)
    if task.kind == "sweep":
        return _sweep(grid, task, out_dir, bundle_dir, settings, log)
    path = cell_record_path(grid, out_dir, task.attack, task.defense, task.seed)
    try:
        with file_lock(path.parent / f".{path.stem}.lock", "job running this cell"):
            return _cell(grid, task, path, out_dir, bundle_dir, settings, log)
    except FolderLockedError:
        log(f"{task.key}: another job is running this cell; leaving it to that job")
        return "skipped"


def _train(grid: GridSpec, task: Task, out: Path, bundles: Path, settings: RunSettings,
           log: Callable[[str], None]) -> str:
    error_file = train_error_path(out, task.attack, task.seed)
    error_file.unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        _bundle_for(grid, task.attack, task.seed, bundles, log, settings)
    except Exception as err:
        write_text(error_file, f"{type(err).__name__}: {err}")
        raise
    log(f"{task.key}: bundle ready ({time.perf_counter() - t0:.1f} s)")
    return "trained"


def trained_bundle(grid: GridSpec, attack: str, seed: int, out: Path, bundles: Path, device: torch.device) -> Bundle:
    """The cached bundle of (attack, seed), trained with the grid's config; a clear error (with the training task's
    error, when it left one) when it is not there. Never trains."""
    path = bundles / f"{attack}-seed{seed}"
    if _cached_checkpoint(path, _attack_fingerprint_config(grid, attack, seed), device, grid_data(grid)) is None:
        error_file = train_error_path(out, attack, seed)
        why = (f"training it failed: {error_file.read_text().strip()}" if error_file.exists()
               else "its training job ended without it")
        raise RuntimeError(f"the backdoored model {path} is not there or was trained with another config ({why})")
    return load_bundle(path)


def _cell(grid: GridSpec, task: Task, path: Path, out: Path, bundles: Path, settings: RunSettings,
          log: Callable[[str], None]) -> str:
    attack, defense, seed = task.attack, task.defense, task.seed
    attack_cfg = _attack_fingerprint_config(grid, attack, seed)
    try:
        bundle = trained_bundle(grid, attack, seed, out, bundles, settings.device)
        if path.exists() and stale_reason(grid, path, attack_cfg, defense, bundle.model_sha256) is None:
            log(f"{task.key}: its record is already there")
            return "skipped"
        clean_test = load_dataset(grid.dataset, "test", grid.data_root)
        before = evaluate_model(bundle.build_model(), bundle, clean_test, settings.device)
    except Exception as err:  # noqa: BLE001 - recorded, as in a sequential grid
        return _fail(grid, attack, defense, seed, path, None, err, log).status
    return run_cell(grid, attack, defense, seed, path, bundle, clean_test, before, attack_cfg, settings.device,
                    log).status


def _sweep(grid: GridSpec, task: Task, out: Path, bundles: Path, settings: RunSettings,
           log: Callable[[str], None]) -> str:
    try:
        bundle = trained_bundle(grid, task.attack, task.seed, out, bundles, settings.device)
        clean_test = load_dataset(grid.dataset, "test", grid.data_root)
        before = evaluate_model(bundle.build_model(), bundle, clean_test, settings.device)
    except Exception as err:  # noqa: BLE001 - a diagnostic must not fail a grid
        log(f"{task.key}: oracle sweep not run: {type(err).__name__}: {err}")
        return "failed"
    _run_oracle_sweeps(grid, task.attack, task.seed, bundle, clean_test, before, out / "oracle", log,
                       settings.device, only=task.defense)
    return "ok"


def read_cell(path: Path) -> RunRecord | None:
    """The record at ``path``, or None when there is none or it cannot be read."""
    try:
        return read_record(path) if path.exists() else None
    except ValueError:
        return None
