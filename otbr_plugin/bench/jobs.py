"""How a grid's tasks run: the one public API that the sequential grid (:func:`~otbr_plugin.bench.executors.run_grid`)
and every job of local workers or Slurm (:func:`run_task`) call, so the records are the same whoever runs them.

A ``train`` task trains (or finds cached) the backdoored model of (attack, seed) under its lock
(:func:`bundle_for`); a ``cell`` runs one defense on it and writes its run record (:func:`run_cell`; a failure is
recorded by :func:`record_failure`); a ``sweep`` runs one labelled oracle sweep (:func:`run_oracle_sweeps`). As jobs,
cells and sweeps start after their ``train`` task has ended and never train themselves: when the model is missing,
the cell is recorded as failed with the training's error (:func:`trained_bundle`). What a grid and its tasks are is
:mod:`otbr_plugin.bench.grid`.
"""

from __future__ import annotations

import math
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from benchmark_adapters.bundle import load_bundle, save_bundle

from ..attacks.runner import parse_attack_run, run_attack
from ..bundle import Bundle
from ..data import identity_changes, load_dataset
from ..io import FolderLockedError, file_lock, read_regular, write_text
from ..runtime import RunSettings
from ..aggregate.records import RunRecord, read_record, write_record
from .grid import (CellResult, GridSpec, Task, attack_fingerprint_config, cached_checkpoint, cell_fingerprint,
                   cell_record_path, grid_data, stale_reason, train_error_path, training_changes)
from .evalcache import before_evaluation
from .runner import run_defense

__all__ = ["run_task", "run_cell", "record_failure", "bundle_for", "bundle_lock", "trained_bundle",
           "run_oracle_sweeps", "cell_line", "epoch_line", "read_cell"]


def bundle_lock(bundles: Path, attack: str, seed: int):
    """The lock of one cached bundle, waited for: whoever holds it trains or reads ``<bundles>/<attack>-seed<s>``, so
    two processes (workers, Slurm jobs, runs sharing a bundles folder) never train the same bundle twice."""
    return file_lock(bundles / f".{attack}-seed{seed}.lock", "training of this bundle", wait=True)


def bundle_for(grid: GridSpec, attack: str, seed: int, bundles: Path, log: Callable[[str], None],
                settings: RunSettings, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> Bundle:
    """The cached bundle for (attack, seed), trained now (on ``settings.device``) if absent or trained with another
    config (:func:`training_changes`). Holds the bundle's lock (:func:`bundle_lock`): a process that waited for
    another one's training finds the bundle cached. Training shows its bars when ``settings.progress`` (whatever
    the attack config's ``train.progress`` says) and logs one line per finished epoch (:func:`epoch_line`);
    ``on_epoch`` gets each epoch's facts too (:func:`~otbr_plugin.attacks.runner.run_attack`)."""
    with bundle_lock(bundles, attack, seed):
        return _bundle_for_locked(grid, attack, seed, bundles, log, settings, on_epoch)


def epoch_line(attack: str, seed: int, info: Mapping[str, Any]) -> str:
    """The one line a finished training epoch prints in a grid."""
    m = info.get("metrics", {})
    return (f"training {attack}/seed{seed}: epoch {info['epoch']}/{info['epochs']} done ({info['seconds']:.0f} s, "
            f"{info['steps']} steps; ACC {m.get('acc', math.nan) * 100:.2f}  ASR {m.get('asr', math.nan) * 100:.2f})")


def _bundle_for_locked(grid: GridSpec, attack: str, seed: int, bundles: Path, log: Callable[[str], None],
                       settings: RunSettings, on_epoch: Callable[[dict[str, Any]], None] | None) -> Bundle:
    cfg = grid.attack_config(attack, seed)
    run = parse_attack_run(cfg)
    path = bundles / f"{attack}-seed{seed}"
    if path.exists():
        bundle = load_bundle(path)
        changed = training_changes(bundle.extra.get("resolved_config"), (bundle.training or {}).get("device"),
                                   run.resolved(), settings.device)
        data = grid_data(grid)
        if isinstance(data, str):
            raise RuntimeError(f"the grid's {grid.dataset} data: {data}")
        changed += [f"data: {c}" for c in identity_changes(bundle.extra.get("data"), data)]
        if not changed:
            log(f"{attack} seed {seed}: using cached bundle {path}")
            return bundle
        log(f"{attack} seed {seed}: the cached bundle {path} was trained with another config ("
            + "; ".join(changed[:5]) + "); training it again")
    else:
        log(f"{attack} seed {seed}: training the backdoored model (cached in {path})")
    # the grid's device and progress setting reach training: its bars with progress, one line per epoch always

    def epoch_done(info: dict[str, Any]) -> None:
        log(epoch_line(attack, seed, info))
        if on_epoch is not None:
            on_epoch(info)

    bundle = run_attack(run, grid.data_root, log=lambda s: None, device=settings.device,
                        progress=settings.progress, on_epoch=epoch_done)
    save_bundle(bundle, path, overwrite=True)
    return load_bundle(path)


def run_cell(grid: GridSpec, attack: str, defense: str, seed: int, path: Path, bundle: Bundle, clean_test, before,
             attack_cfg: Mapping[str, Any], device: torch.device, log: Callable[[str], None],
             before_samples=None, dseed: int | None = None) -> CellResult:
    """Run one defense cell on its backdoored model and write its record to ``path`` (a failure is recorded with its
    error). The one code path of a cell, in a sequential grid, a local worker and a Slurm job alike.
    ``before_samples``: the backdoored model's per-sample outcomes (:func:`~otbr_plugin.bench.evalcache.
    before_evaluation`), kept in the record with the defended model's. ``dseed``: the defense seed (grids with a
    defense_seeds axis): the defense runs with it, the record keeps ``seed`` (the training seed) and it."""
    t0 = time.perf_counter()
    try:
        d = grid.defense_class(defense)(grid.defenses[defense])
        run = run_defense(bundle, d, data_root=grid.data_root, device=device, seed=seed if dseed is None else dseed,
                          clean_ratio=grid.clean_ratio, progress=False, clean_test=clean_test,
                          before=before, config_source=grid.sources.get(f"defense:{defense}", ""),
                          before_samples=before_samples)
        record = run.record()
        record.seed, record.defense_seed = seed, dseed
        record.attack["label"] = attack
        record.attack["grid"] = grid.name  # regress warns when records come from another grid
        if grid.defense_names.get(defense, defense) != defense:
            record.defense, record.defense_name = defense, grid.defense_names[defense]
        record.attack_config = dict(attack_cfg)
        record.grid_order = {"attacks": list(grid.attacks), "defenses": list(grid.defenses)}
        data = grid_data(grid)
        if isinstance(data, str):
            raise RuntimeError(f"the grid's {grid.dataset} data: {data}")
        changes = identity_changes(record.data, {k: data[k] for k in ("train", "test") if k in (record.data or {})})
        if changes:  # the cell was evaluated on other data than the grid's fingerprint names
            raise RuntimeError("the clean test set used differs from the grid's data (" + "; ".join(changes) + ")")
        record.data = {**(record.data or {}), **{k: v for k, v in data.items() if k not in ("dataset",)}}
        record.fingerprint = cell_fingerprint(grid, attack_cfg, defense, record.checkpoint_sha256, data=data,
                                              dseed=dseed)
        record.seconds["cell_total"] = time.perf_counter() - t0
        write_record(record, path)
        log(f"{attack}/{defense}/{record.seed_label}: ACC {run.after.acc * 100:.2f}  ASR {run.after.asr * 100:.2f}  "
            f"RA {run.after.ra * 100:.2f}  DER {run.der * 100:.2f}  ({record.seconds['cell_total']:.1f} s)")
        return CellResult(attack, defense, seed, "ok", dseed=dseed)
    except Exception as err:  # noqa: BLE001 - recorded, the grid goes on
        return record_failure(grid, attack, defense, seed, path, bundle, err, log, dseed)


def run_oracle_sweeps(grid: GridSpec, attack: str, seed: int, bundle: Bundle, clean_test, before,
                       folder: Path, log: Callable[[str], None], device: torch.device,
                       only: str | None = None) -> None:
    """Labelled oracle diagnostics on the TEST set (e.g. OTBR's gamma sweep); never feed the reported rows.
    ``only``: the sweep of this one grid defense (a job of its own)."""
    from .sweep import oracle_sweep, sweep_defenses, write_sweep

    for dname, spec in grid.oracle_sweeps.items():
        if only is not None and dname != only:
            continue
        key, values = next(iter(spec.items()))
        target = folder / f"{attack}__{dname}__seed{seed}"
        if (target / f"oracle_sweep_{key}.csv").exists():
            continue
        try:
            base = grid.defense_class(dname)(grid.defenses[dname])
            table = oracle_sweep(bundle, sweep_defenses(base, key, values), key, clean_test=clean_test, before=before,
                                 data_root=grid.data_root, device=device, seed=seed, clean_ratio=grid.clean_ratio,
                                 progress=False)
            table.insert(0, "attack", attack)
            table.insert(1, "defense", dname)
            table.insert(2, "seed", seed)
            write_sweep(table, target, key, reported_value=getattr(base.config, key), before=before,
                        title=f"{dname} on {attack} / {grid.dataset}")
            log(f"{attack}/{dname}: oracle {key} sweep written to {target} (test-set diagnostic, not reported)")
        except Exception as err:  # noqa: BLE001 - a diagnostic must not stop the grid
            log(f"{attack}/{dname}: oracle sweep failed: {type(err).__name__}: {err}")


def record_failure(grid: GridSpec, attack: str, defense: str, seed: int, path: Path, bundle: Bundle | None,
          err: BaseException, log: Callable[[str], None] = lambda s: None, dseed: int | None = None) -> CellResult:
    """Record a failed cell; an ok record already at ``path`` is never overwritten by a failed one."""
    message = f"{type(err).__name__}: {err}"
    where = f"{attack}/{defense}/seed{seed}" + ("" if dseed is None else f"/dseed{dseed}")
    if path.exists():
        try:
            kept = read_record(path).status == "ok"
        except ValueError:
            kept = False
        if kept:
            log(f"{where}: failed ({message}); kept the earlier ok record {path}")
            return CellResult(attack, defense, seed, "failed", message, dseed)
    metrics = dict(bundle.metrics) if bundle else {}
    record = RunRecord(
        dataset=grid.dataset, model=bundle.model_config.to_dict() if bundle else {"name": str(grid.attacks[attack].get("model", {}).get("name"))},
        attack={**(dict(bundle.attack) if bundle else {"name": attack}), "label": attack}, defense=defense,
        defense_config=grid.defenses.get(defense, {}), seed=seed,
        checkpoint_sha256=(bundle.model_sha256 or "") if bundle else "",
        metrics_before={k: v for k, v in metrics.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)},
        metrics_after=None, der=None, data_used="",
        status="failed", error=message, diagnostics={"traceback": traceback.format_exc(limit=8)}, defense_seed=dseed,
    )
    try:  # a failed record carries its cell's fingerprint too: a run reports only records with its own
        record.attack_config = attack_fingerprint_config(grid, attack, seed)
        data = grid_data(grid)
        record.fingerprint = cell_fingerprint(grid, record.attack_config, defense, record.checkpoint_sha256,
                                              data=None if isinstance(data, str) else data, dseed=dseed)
    except Exception:  # noqa: BLE001 - an unresolvable config is what failed; the record says so without one
        record.attack_config, record.fingerprint = None, None
    write_record(record, path)
    return CellResult(attack, defense, seed, "failed", message, dseed)


def cell_line(record: RunRecord) -> str:
    """The one line a finished cell prints (as the sequential grid does)."""
    where = f"{record.attack_name}/{record.defense}/{record.seed_label}"
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
    path = cell_record_path(grid, out_dir, task.attack, task.defense, task.seed, task.dseed)
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
        bundle_for(grid, task.attack, task.seed, bundles, log, settings)
    except Exception as err:
        write_text(error_file, f"{type(err).__name__}: {err}")
        raise
    log(f"{task.key}: bundle ready ({time.perf_counter() - t0:.1f} s)")
    return "trained"


def trained_bundle(grid: GridSpec, attack: str, seed: int, out: Path, bundles: Path, device: torch.device) -> Bundle:
    """The cached bundle of (attack, seed), trained with the grid's config; a clear error (with the training task's
    error, when it left one) when it is not there. Never trains."""
    path = bundles / f"{attack}-seed{seed}"
    if cached_checkpoint(path, attack_fingerprint_config(grid, attack, seed), device, grid_data(grid)) is None:
        error_file = train_error_path(out, attack, seed)
        try:  # the results folder is untrusted: a bounded read of a regular file
            why = f"training it failed: {read_regular(error_file, 1 << 16, tail=True).decode(errors='replace').strip()}"
        except (OSError, ValueError):
            why = "its training job ended without it"
        raise RuntimeError(f"the backdoored model {path} is not there or was trained with another config ({why})")
    return load_bundle(path)


def _cell(grid: GridSpec, task: Task, path: Path, out: Path, bundles: Path, settings: RunSettings,
          log: Callable[[str], None]) -> str:
    attack, defense, seed, dseed = task.attack, task.defense, task.seed, task.dseed
    attack_cfg = attack_fingerprint_config(grid, attack, seed)
    try:
        bundle = trained_bundle(grid, attack, seed, out, bundles, settings.device)
        if path.exists() and stale_reason(grid, path, attack_cfg, defense, bundle.model_sha256, dseed) is None:
            log(f"{task.key}: its record is already there")
            return "skipped"
        clean_test = load_dataset(grid.dataset, "test", grid.data_root)
        before, before_samples = before_evaluation(bundle, clean_test, settings.device)
    except Exception as err:  # noqa: BLE001 - recorded, as in a sequential grid
        return record_failure(grid, attack, defense, seed, path, None, err, log, dseed).status
    return run_cell(grid, attack, defense, seed, path, bundle, clean_test, before, attack_cfg, settings.device,
                    log, before_samples, dseed).status


def _sweep(grid: GridSpec, task: Task, out: Path, bundles: Path, settings: RunSettings,
           log: Callable[[str], None]) -> str:
    try:
        bundle = trained_bundle(grid, task.attack, task.seed, out, bundles, settings.device)
        clean_test = load_dataset(grid.dataset, "test", grid.data_root)
        before = before_evaluation(bundle, clean_test, settings.device)[0]
    except Exception as err:  # noqa: BLE001 - a diagnostic must not fail a grid
        log(f"{task.key}: oracle sweep not run: {type(err).__name__}: {err}")
        return "failed"
    run_oracle_sweeps(grid, task.attack, task.seed, bundle, clean_test, before, out / "oracle", log,
                       settings.device, only=task.defense)
    return "ok"


def read_cell(path: Path) -> RunRecord | None:
    """The record at ``path``, or None when there is none or it cannot be read."""
    try:
        return read_record(path) if path.exists() else None
    except ValueError:
        return None
