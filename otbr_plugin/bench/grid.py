"""The grid runner behind ``otbr-bench bench``: attacks x defenses x seeds, one run record per cell.

Each attack bundle is trained once per seed and cached (``<out>/bundles/<attack>-seed<s>``, reused only when its
recorded config equals the requested one). A cell whose record exists with status "ok" is skipped, so an
interrupted grid resumes where it stopped; a failing cell is recorded with its error and the grid goes on.
"""

from __future__ import annotations

import copy
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from tqdm.auto import tqdm

from benchmark_adapters.bundle import Bundle, BundleError, load_bundle, save_bundle
from ..attacks.runner import parse_attack_run, run_attack
from ..config import apply_overrides, configs_dir, default_config_path, load_yaml
from ..data import load_dataset
from ..defenses import get_defense
from .records import RunRecord, read_record, record_filename, write_record
from .runner import evaluate_model, run_defense

__all__ = ["GridSpec", "CellResult", "load_grid", "run_grid"]

GRID_KEYS = {"name", "dataset", "data_root", "attacks", "attack_overrides", "defenses", "defense_overrides", "seeds",
             "clean_ratio", "device", "description", "oracle_sweeps"}


@dataclass
class GridSpec:
    """A validated grid: attack run configs and defense configs, fully resolved."""

    name: str
    dataset: str
    attacks: dict[str, dict[str, Any]]  # attack label -> attack run config (attack/dataset/model/train sections)
    defenses: dict[str, dict[str, Any]]  # defense name -> config mapping
    seeds: list[int]
    clean_ratio: float = 0.05
    device: str = "auto"
    data_root: str | None = None
    description: str = ""
    sources: dict[str, str] = field(default_factory=dict)
    oracle_sweeps: dict[str, dict[str, list]] = field(default_factory=dict)  # defense -> {config key: values}

    def attack_config(self, attack: str, seed: int) -> dict[str, Any]:
        """The attack run config for one seed: the seed drives poisoning and training."""
        cfg = copy.deepcopy(self.attacks[attack])
        cfg.setdefault("attack", {})["seed"] = seed
        cfg.setdefault("train", {})["seed"] = seed
        return cfg


def _resolve_path(p: str, base: Path) -> Path:
    for cand in (Path(p), base / p, (configs_dir() or base).parent / p):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"config file {p!r} not found (looked relative to the current folder and {base})")


def load_grid(path: str | Path, overrides: Mapping[str, Any] | None = None) -> GridSpec:
    """Read a grid YAML (see configs/bench/*.yaml) and resolve every referenced config file."""
    gpath = Path(path)
    raw = apply_overrides(load_yaml(gpath), overrides or {})
    unknown = sorted(set(raw) - GRID_KEYS)
    if unknown:
        raise ValueError(f"{gpath}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(GRID_KEYS))}")
    for key in ("dataset", "attacks", "defenses"):
        if key not in raw:
            raise ValueError(f"{gpath}: missing '{key}'")
    base = gpath.parent
    sources: dict[str, str] = {}
    attacks: dict[str, dict] = {}
    if not isinstance(raw["attacks"], Mapping) or not raw["attacks"]:
        raise ValueError(f"{gpath}: 'attacks' must map attack labels to config files or inline configs")
    for label, spec in raw["attacks"].items():
        if isinstance(spec, str):
            p = _resolve_path(spec, base)
            cfg, sources[f"attack:{label}"] = load_yaml(p), str(p)
        elif isinstance(spec, Mapping):
            cfg, sources[f"attack:{label}"] = dict(spec), "inline"
        else:
            raise ValueError(f"{gpath}: attacks.{label} must be a config file path or a mapping")
        cfg = apply_overrides(cfg, raw.get("attack_overrides") or {})
        run = parse_attack_run(cfg)  # validate now, before hours of work
        if run.dataset != raw["dataset"]:
            raise ValueError(f"{gpath}: attacks.{label} is for dataset {run.dataset!r}, the grid is for {raw['dataset']!r}")
        attacks[str(label)] = cfg
    defenses: dict[str, dict] = {}
    dspec = raw["defenses"]
    if isinstance(dspec, list):
        dspec = {d: None for d in dspec}
    if not isinstance(dspec, Mapping) or not dspec:
        raise ValueError(f"{gpath}: 'defenses' must list defense names (optionally mapping each to a config file)")
    doverrides = raw.get("defense_overrides") or {}
    for name, spec in dspec.items():
        cls = get_defense(str(name))
        if spec is None:
            p = default_config_path("defense", str(name), raw["dataset"])
            cfg, sources[f"defense:{name}"] = (load_yaml(p), str(p)) if p else ({}, "built-in defaults")
        elif isinstance(spec, str):
            p = _resolve_path(spec, base)
            cfg, sources[f"defense:{name}"] = load_yaml(p), str(p)
        elif isinstance(spec, Mapping):
            cfg, sources[f"defense:{name}"] = dict(spec), "inline"
        else:
            raise ValueError(f"{gpath}: defenses.{name} must be null, a config file path or a mapping")
        cfg = apply_overrides(cfg, doverrides.get(name, {}) or {})
        cls(cfg)  # validate
        defenses[str(name)] = cfg
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ValueError(f"{gpath}: 'seeds' must be a non-empty list of non-negative integers")
    ratio = float(raw.get("clean_ratio", 0.05))
    if not 0 < ratio <= 1:
        raise ValueError(f"{gpath}: clean_ratio must be in (0, 1], got {ratio}")
    sweeps = raw.get("oracle_sweeps") or {}
    for dname, spec in sweeps.items():
        if dname not in defenses or not isinstance(spec, Mapping) or len(spec) != 1:
            raise ValueError(f"{gpath}: oracle_sweeps.{dname} must name one grid defense and one key: values list")
        key, values = next(iter(spec.items()))
        if key not in get_defense(dname)(defenses[dname]).config.to_dict() or not isinstance(values, list):
            raise ValueError(f"{gpath}: oracle_sweeps.{dname}.{key} must be a config field with a list of values")
    return GridSpec(oracle_sweeps=dict(sweeps), name=str(raw.get("name", gpath.stem)), dataset=str(raw["dataset"]), attacks=attacks,
                    defenses=defenses, seeds=list(seeds), clean_ratio=ratio, device=str(raw.get("device", "auto")),
                    data_root=raw.get("data_root"), description=str(raw.get("description", "")), sources=sources)


@dataclass
class CellResult:
    attack: str
    defense: str
    seed: int
    status: str  # "ok", "skipped" (record existed), "failed"
    error: str | None = None


def _result_relevant(resolved: Mapping[str, Any] | None) -> Any:
    """A resolved attack config without the fields that cannot change the trained model (progress bars)."""
    if not isinstance(resolved, Mapping):
        return resolved
    out = copy.deepcopy(dict(resolved))
    if isinstance(out.get("train"), dict):
        out["train"].pop("progress", None)
    return out


def _bundle_for(grid: GridSpec, attack: str, seed: int, bundles: Path, log: Callable[[str], None]) -> Bundle:
    """The cached bundle for (attack, seed), trained now if absent."""
    cfg = grid.attack_config(attack, seed)
    run = parse_attack_run(cfg)
    path = bundles / f"{attack}-seed{seed}"
    if path.exists():
        bundle = load_bundle(path)
        if _result_relevant(bundle.extra.get("resolved_config")) != _result_relevant(run.resolved()):
            raise BundleError(f"{path} was trained with another config than the grid asks for; remove it or use "
                              "another --out folder")
        log(f"{attack} seed {seed}: using cached bundle {path}")
        return bundle
    log(f"{attack} seed {seed}: training the backdoored model (cached in {path})")
    bundle = run_attack(run, grid.data_root, log=lambda s: None)
    save_bundle(bundle, path)
    return load_bundle(path)


def run_grid(grid: GridSpec, out: str | Path, *, bundles_dir: str | Path | None = None, progress: bool = True,
             log: Callable[[str], None] | None = None) -> list[CellResult]:
    """Run every missing cell; returns one result per cell (skipped, ok or failed).

    With ``progress``, one tqdm bar over all cells (with ETA) and one summary line per finished cell above it."""
    if log is None:  # one line per finished cell; above the bar when there is one
        log = (lambda s: tqdm.write(s)) if progress else (lambda s: print(s, flush=True))
    out = Path(out)
    records_dir = out / "records"
    bundles = Path(bundles_dir) if bundles_dir else out / "bundles"
    cells = [(a, d, s) for s in grid.seeds for a in grid.attacks for d in grid.defenses]
    model_name = {a: parse_attack_run(c).model.name for a, c in grid.attacks.items()}
    results: list[CellResult] = []
    clean_test = None
    # one bar over all cells; cells already done count as its starting point. Its ETA (_Eta) counts the backdoored
    # models still to train apart from the defense cells, so one long training does not inflate every cell.
    left = [(a, s) for a, d, s in cells
            if not _record_ok(records_dir / record_filename(grid.dataset, model_name[a], a, d, s))]
    eta = _Eta(cells_left=len(left), trainings_left=sum(not (bundles / f"{a}-seed{s}").exists() for a, s in set(left)))
    bar = tqdm(total=len(cells), initial=len(cells) - len(left), desc=f"grid {grid.name}", unit="cell",
               disable=not progress, dynamic_ncols=True, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
    for seed in grid.seeds:
        for attack in grid.attacks:
            todo = []
            for defense in grid.defenses:
                path = records_dir / record_filename(grid.dataset, model_name[attack], attack, defense, seed)
                if path.exists():
                    try:
                        if read_record(path).status == "ok":
                            results.append(CellResult(attack, defense, seed, "skipped"))
                            continue
                    except ValueError:
                        pass  # unreadable: run the cell again
                todo.append((defense, path))
            if not todo:
                continue
            bar.set_postfix_str(f"{attack}/seed{seed}: backdoored model, {eta}")
            t0, cached = time.perf_counter(), (bundles / f"{attack}-seed{seed}").exists()
            try:
                bundle = _bundle_for(grid, attack, seed, bundles, log)
                if clean_test is None:
                    clean_test = load_dataset(grid.dataset, "test", grid.data_root)
                before = evaluate_model(bundle.build_model(), bundle, clean_test)
                if not cached:
                    eta.training_done(time.perf_counter() - t0)
            except Exception as err:  # noqa: BLE001 - recorded, the grid goes on
                if not cached:
                    eta.training_done(None)
                for defense, path in todo:
                    results.append(_fail(grid, attack, defense, seed, path, None, err))
                    log(f"{attack}/{defense}/seed{seed}: FAILED (no backdoored model: {type(err).__name__}: {err})")
                    eta.cell_done(None)
                    bar.update(1)
                continue
            for defense, path in todo:
                bar.set_postfix_str(f"{attack}/{defense}/seed{seed}, {eta}")
                t0 = time.perf_counter()
                try:
                    d = get_defense(defense)(grid.defenses[defense])
                    run = run_defense(bundle, d, data_root=grid.data_root, device=grid.device, seed=seed,
                                      clean_ratio=grid.clean_ratio, progress=False, clean_test=clean_test,
                                      before=before)
                    record = run.record()
                    record.attack["label"] = attack
                    record.seconds["cell_total"] = time.perf_counter() - t0
                    write_record(record, path)
                    results.append(CellResult(attack, defense, seed, "ok"))
                    log(f"{attack}/{defense}/seed{seed}: ACC {run.after.acc * 100:.2f}  ASR {run.after.asr * 100:.2f}  "
                        f"RA {run.after.ra * 100:.2f}  DER {run.der * 100:.2f}  ({record.seconds['cell_total']:.1f} s)")
                except Exception as err:  # noqa: BLE001
                    results.append(_fail(grid, attack, defense, seed, path, bundle, err))
                    log(f"{attack}/{defense}/seed{seed}: FAILED ({type(err).__name__}: {err})")
                eta.cell_done(time.perf_counter() - t0)
                bar.set_postfix_str(str(eta), refresh=False)
                bar.update(1)
            _run_oracle_sweeps(grid, attack, seed, bundle, clean_test, before, out / "oracle", log)
    bar.close()
    return results


class _Eta:
    """Time left in a grid: cells left x mean seconds per cell + models left to train x mean seconds per training
    (each measured in this run); "?" until both are known."""

    def __init__(self, cells_left: int, trainings_left: int) -> None:
        self.cells_left, self.trainings_left = cells_left, trainings_left
        self.cell_seconds: list[float] = []
        self.training_seconds: list[float] = []

    def training_done(self, seconds: float | None) -> None:
        self.trainings_left = max(0, self.trainings_left - 1)
        if seconds is not None:
            self.training_seconds.append(seconds)

    def cell_done(self, seconds: float | None) -> None:
        self.cells_left = max(0, self.cells_left - 1)
        if seconds is not None:
            self.cell_seconds.append(seconds)

    def seconds(self) -> float | None:
        if self.cells_left == 0:
            return 0.0
        if not self.cell_seconds or (self.trainings_left and not self.training_seconds):
            return None
        per_training = sum(self.training_seconds) / len(self.training_seconds) if self.training_seconds else 0.0
        return (self.cells_left * sum(self.cell_seconds) / len(self.cell_seconds)
                + self.trainings_left * per_training)

    def __str__(self) -> str:
        left = self.seconds()
        return "ETA ?" if left is None else f"ETA {tqdm.format_interval(left)}"


def _record_ok(path: Path) -> bool:
    try:
        return path.exists() and read_record(path).status == "ok"
    except ValueError:
        return False


def _run_oracle_sweeps(grid: GridSpec, attack: str, seed: int, bundle: Bundle, clean_test, before,
                       folder: Path, log: Callable[[str], None]) -> None:
    """Labelled oracle diagnostics on the TEST set (e.g. OTBR's gamma sweep); never feed the reported rows."""
    from .sweep import oracle_sweep, sweep_defenses, write_sweep

    for dname, spec in grid.oracle_sweeps.items():
        key, values = next(iter(spec.items()))
        target = folder / f"{attack}__{dname}__seed{seed}"
        if (target / f"oracle_sweep_{key}.csv").exists():
            continue
        try:
            base = get_defense(dname)(grid.defenses[dname])
            table = oracle_sweep(bundle, sweep_defenses(base, key, values), key, clean_test=clean_test, before=before,
                                 data_root=grid.data_root, device=grid.device, seed=seed, clean_ratio=grid.clean_ratio,
                                 progress=False)
            table.insert(0, "attack", attack)
            table.insert(1, "defense", dname)
            table.insert(2, "seed", seed)
            write_sweep(table, target, key, reported_value=getattr(base.config, key), before=before,
                        title=f"{dname} on {attack} / {grid.dataset}")
            log(f"{attack}/{dname}: oracle {key} sweep written to {target} (test-set diagnostic, not reported)")
        except Exception as err:  # noqa: BLE001 - a diagnostic must not stop the grid
            log(f"{attack}/{dname}: oracle sweep failed: {type(err).__name__}: {err}")


def _fail(grid: GridSpec, attack: str, defense: str, seed: int, path: Path, bundle: Bundle | None,
          err: BaseException) -> CellResult:
    message = f"{type(err).__name__}: {err}"
    record = RunRecord(
        dataset=grid.dataset, model=bundle.model_config.to_dict() if bundle else {"name": grid.attacks[attack].get("model", {}).get("name")},
        attack={**(dict(bundle.attack) if bundle else {"name": attack}), "label": attack}, defense=defense,
        defense_config=grid.defenses.get(defense, {}), seed=seed,
        checkpoint_sha256=(bundle.model_sha256 or "") if bundle else "",
        metrics_before=dict(bundle.metrics) if bundle else {}, metrics_after=None, der=None, data_used="",
        status="failed", error=message, diagnostics={"traceback": traceback.format_exc(limit=8)},
    )
    write_record(record, path)
    return CellResult(attack, defense, seed, "failed", message)
