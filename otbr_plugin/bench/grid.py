"""The grid runner behind ``otbr-bench bench``: attacks x defenses x seeds, one run record per cell.

Each attack bundle is trained once per seed and cached (``<out>/bundles/<attack>-seed<s>``, reused only when its
recorded config equals the requested one; see :func:`training_changes` for how the device is compared). A cell whose record exists with status "ok" is skipped, so an
interrupted grid resumes where it stopped; a failing cell is recorded with its error and the grid goes on.
"""

from __future__ import annotations

import copy
import json
import math
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from tqdm.auto import tqdm

from benchmark_adapters.bundle import MODEL_FILE, load_bundle, save_bundle, verify_bundle

from ..bundle import Bundle, BundleError
from ..attacks.runner import parse_attack_run, run_attack
from ..config import apply_overrides, declared_values, find_config_file, load_yaml, resolve_config
from ..data import identity_changes, load_dataset, try_data_identity
from ..defenses import get_defense
from ..io import file_lock, folder_lock, json_default
from ..runtime import RunSettings, resolve_device
from .records import RunRecord, read_record, run_fingerprint, write_record
from .runner import evaluate_model, run_defense
from .slurm import SlurmOptions

__all__ = ["GridSpec", "CellResult", "load_grid", "run_grid", "run_cell", "bundle_lock", "stale_reason",
           "training_changes", "grid_data"]

GRID_KEYS = {"name", "dataset", "data_root", "attacks", "attack_overrides", "defenses", "defense_overrides", "seeds",
             "clean_ratio", "device", "description", "oracle_sweeps", "slurm"}


@dataclass
class GridSpec:
    """A validated grid: attack run configs and defense configs, fully resolved."""

    name: str
    dataset: str
    attacks: dict[str, dict[str, Any]]  # attack label -> attack run config (attack/dataset/model/train sections)
    defenses: dict[str, dict[str, Any]]  # defense label -> config mapping
    seeds: list[int]
    clean_ratio: float = 0.05
    device: str = "auto"
    data_root: str | None = None
    description: str = ""
    sources: dict[str, str] = field(default_factory=dict)
    oracle_sweeps: dict[str, dict[str, list]] = field(default_factory=dict)  # defense -> {config key: values}
    defense_names: dict[str, str] = field(default_factory=dict)  # label -> registered defense (variants)
    slurm: SlurmOptions = field(default_factory=SlurmOptions)  # job options for --executor slurm

    def defense_class(self, label: str):
        """The registered defense class behind a grid label."""
        return get_defense(self.defense_names.get(label, label))

    def attack_config(self, attack: str, seed: int) -> dict[str, Any]:
        """The attack run config for one seed: the seed drives poisoning and training."""
        cfg = copy.deepcopy(self.attacks[attack])
        cfg.setdefault("attack", {})["seed"] = seed
        cfg.setdefault("train", {})["seed"] = seed
        return cfg


def load_grid(path: str | Path, overrides: Mapping[str, Any] | None = None, *, check_device: bool = True) -> GridSpec:
    """Read a grid YAML (see configs/bench/*.yaml) and resolve every referenced config file. ``check_device``: refuse
    a ``device`` this machine does not have (off for a Slurm submission: the jobs decide it on their nodes)."""
    found = find_config_file(path)  # a file, or the packaged copy of configs/bench/<grid>.yaml
    gpath = found if isinstance(found, Path) else Path(str(path))
    raw = apply_overrides(load_yaml(found), overrides or {})
    unknown = sorted(set(raw) - GRID_KEYS)
    if unknown:
        raise ValueError(f"{gpath}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(GRID_KEYS))}")
    for key in ("dataset", "attacks", "defenses"):
        if key not in raw:
            raise ValueError(f"{gpath}: missing '{key}'")
    base = gpath.parent if isinstance(found, Path) else Path.cwd()
    sources: dict[str, str] = {}
    attacks: dict[str, dict] = {}
    if not isinstance(raw["attacks"], Mapping) or not raw["attacks"]:
        raise ValueError(f"{gpath}: 'attacks' must map attack labels to config files or inline configs")
    for label, spec in raw["attacks"].items():
        if isinstance(spec, str):
            p = find_config_file(spec, base)
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
    defense_names: dict[str, str] = {}
    for name, spec in dspec.items():
        # a variant: label -> {defense: NAME, config: FILE|null, set: {key: value}} (e.g. otbr_reference)
        if isinstance(spec, Mapping) and "defense" in spec:
            extra = sorted(set(spec) - {"defense", "config", "set"})
            if extra or not isinstance(spec.get("set") or {}, Mapping):
                raise ValueError(f"{gpath}: defenses.{name}: a variant takes 'defense', 'config' (file or null) and "
                                 f"'set' (a mapping of config keys), got {sorted(spec)}")
            if isinstance(spec.get("config"), Mapping):
                raise ValueError(f"{gpath}: defenses.{name}.config must be a file or null; put values under 'set'")
            dname, spec, variant_set = str(spec["defense"]), spec.get("config"), dict(spec.get("set") or {})
        else:
            dname, variant_set = str(name), {}
        defense_names[str(name)] = dname
        cls = get_defense(dname)
        if spec is not None and not isinstance(spec, (str, Mapping)):
            raise ValueError(f"{gpath}: defenses.{name} must be null, a config file path or a mapping")
        user = find_config_file(spec, base) if isinstance(spec, str) else spec
        overrides = {**variant_set, **(doverrides.get(name) or {})}
        resolved = resolve_config("defense", dname, str(raw["dataset"]), user, overrides or None)
        cfg, sources[f"defense:{name}"] = resolved.values, resolved.source + (f" (variant {name} of {dname})"
                                                                                if dname != str(name) else "")
        cls(cfg)  # validate
        defenses[str(name)] = cfg
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ValueError(f"{gpath}: 'seeds' must be a non-empty list of non-negative integers")
    if check_device:
        resolve_device(str(raw.get("device", "auto")))  # an unavailable device is refused now, not in every cell
    slurm = SlurmOptions.from_mapping(raw.get("slurm"), f"{gpath}: slurm")
    ratio = float(raw.get("clean_ratio", 0.05))
    if not 0 < ratio <= 1:
        raise ValueError(f"{gpath}: clean_ratio must be in (0, 1], got {ratio}")
    sweeps = raw.get("oracle_sweeps") or {}
    for dname, spec in sweeps.items():
        if dname not in defenses or not isinstance(spec, Mapping) or len(spec) != 1:
            raise ValueError(f"{gpath}: oracle_sweeps.{dname} must name one grid defense and one key: values list")
        key, values = next(iter(spec.items()))
        if key not in get_defense(defense_names[dname])(defenses[dname]).config.to_dict() or not isinstance(values, list):
            raise ValueError(f"{gpath}: oracle_sweeps.{dname}.{key} must be a config field with a list of values")
    return GridSpec(oracle_sweeps=dict(sweeps), name=str(raw.get("name", gpath.stem)), dataset=str(raw["dataset"]), attacks=attacks,
                    defenses=defenses, defense_names=defense_names, seeds=list(seeds), clean_ratio=ratio, device=str(raw.get("device", "auto")),
                    data_root=raw.get("data_root"), description=str(raw.get("description", "")), sources=sources,
                    slurm=slurm)


@dataclass
class CellResult:
    attack: str
    defense: str
    seed: int
    status: str  # "ok", "skipped" (record existed), "failed"
    error: str | None = None


def _plain(value: Any) -> Any:
    """JSON-equal plain data (tuples as lists, tensors as lists), so configs compare as they are stored."""
    return json.loads(json.dumps(value, sort_keys=True, default=json_default))


def _result_relevant(resolved: Mapping[str, Any] | None) -> Any:
    """A resolved attack config without the fields that cannot change the trained model (progress bars)."""
    if not isinstance(resolved, Mapping):
        return resolved
    out = copy.deepcopy(dict(resolved))
    if isinstance(out.get("train"), dict):
        out["train"].pop("progress", None)
    return _plain(out)


def _without_new_defaults(old: Any, new: Any, defaults: Mapping[str, Any]) -> Any:
    """``new`` without the keys that ``old`` lacks and that hold their declared default (``defaults``).

    New options default to the behaviour that existed before them (a project rule), so an option a config class
    gained after ``old`` was recorded, left at its default, reproduces the recorded run."""
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return new
    return {k: v for k, v in new.items() if k in old or k not in defaults or v != defaults[k]}


def _defense_defaults(grid: GridSpec, label: str) -> dict[str, Any]:
    """The declared defaults of the config class of the defense behind ``label``."""
    return _plain(declared_values(grid.defense_class(label).config_class))


def _train_defaults() -> dict[str, Any]:
    from ..train import TrainConfig

    return _plain(declared_values(TrainConfig))


def _device_type(value: Any) -> str:
    """"cpu", "cuda", "mps", ... for a recorded device string; "auto" (or anything unreadable) stays as it is."""
    try:
        return torch.device(str(value)).type
    except (RuntimeError, TypeError):
        return str(value)


def training_changes(recorded: Mapping[str, Any] | None, trained_on: Any, wanted: Mapping[str, Any],
                     device: torch.device) -> list[str]:
    """How a cached bundle's training differs from the one a grid asks for ("key old -> new"; empty: reuse it).

    The rule for the device: in a grid, attack training runs on the grid's device (``RunSettings.device``), not on
    the attack config's ``train.device``, so ``train.device`` is compared as the device *type* the bundle was
    actually trained on (its ``training.device``; the recorded ``train.device`` for a bundle without one) against
    the type of the grid's device. The device index (``cuda:0`` vs ``cuda:1``) and the declared ``train.device``
    (``auto``/``cpu``) never force a retrain: a bundle trained with ``train.device: cpu`` is reused by a grid whose
    device resolves to cpu. The configs themselves are recorded as declared (record fingerprints are unchanged)."""
    old, new = _result_relevant(recorded), _result_relevant(wanted)
    if isinstance(old, dict) and isinstance(old.get("train"), dict):
        old["train"]["device"] = _device_type(trained_on if trained_on else old["train"].get("device", "auto"))
    if isinstance(new, dict) and isinstance(new.get("train"), dict):
        new["train"]["device"] = device.type
        if isinstance(old, dict):
            new["train"] = _without_new_defaults(old.get("train"), new["train"], _train_defaults())
    return _changed_keys(old, new)


def _attack_fingerprint_config(grid: GridSpec, attack: str, seed: int) -> dict[str, Any]:
    return _result_relevant(parse_attack_run(grid.attack_config(attack, seed)).resolved())


def _defense_fingerprint_config(grid: GridSpec, label: str) -> dict[str, Any]:
    """The defense's full config (defaults filled in) and the registered defense behind the label."""
    return {"name": grid.defense_names.get(label, label),
            "config": _plain(grid.defense_class(label)(grid.defenses[label]).config.to_dict())}


def grid_data(grid: GridSpec) -> dict[str, Any] | str:
    """The identity of the grid's data (:func:`~otbr_plugin.data.data_identity` of its dataset under its data root:
    size and sha256 of each split), or why it cannot be computed."""
    return try_data_identity(grid.dataset, grid.data_root)


def _data_fingerprint(data: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a data identity that shapes results: each split's size and hash (not where it lives)."""
    return {split: {"num_samples": data[split]["num_samples"], "sha256": data[split]["sha256"]}
            for split in ("train", "test") if isinstance(data.get(split), Mapping)}


def _cell_fingerprint(grid: GridSpec, attack_cfg: Mapping[str, Any], label: str, checkpoint_sha256: str,
                      since: RunRecord | None = None, data: Mapping[str, Any] | None = None) -> str:
    """The cell's fingerprint; ``since``: as of that record's configs -- options added to the config classes
    after it was written that the cell leaves at their defaults are left out (see :func:`_without_new_defaults`).
    ``data``: the identity of the data (:func:`grid_data`); None gives the fingerprint of records written before
    it was part of it."""
    defense = _defense_fingerprint_config(grid, label)
    if since is not None:
        defaults = _defense_defaults(grid, label)
        defense = {**defense, "config": _without_new_defaults(_plain(since.defense_config), defense["config"], defaults)}
        old = since.attack_config
        if isinstance(old, Mapping) and isinstance(attack_cfg.get("train"), Mapping):
            attack_cfg = {**attack_cfg, "train": _without_new_defaults(old.get("train"), dict(attack_cfg["train"]),
                                                                        _train_defaults())}
    extra: dict[str, Any] = {"clean_ratio": grid.clean_ratio}
    if data is not None:
        extra["data"] = _data_fingerprint(data)
    return run_fingerprint(attack_cfg, defense, checkpoint_sha256, extra)


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += _changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]} {old!r} -> {new!r}"]


def _cached_checkpoint(path: Path, attack_cfg: Mapping[str, Any], device: torch.device,
                       data: Mapping[str, Any] | str | None = None) -> str | None:
    """sha256 of the cached bundle's weights when it exists and was trained with ``attack_cfg`` (on a device of
    ``device``'s type, see :func:`training_changes`) on the data ``data`` (:func:`grid_data`), else None."""
    if not path.exists():
        return None
    try:
        meta = verify_bundle(path)
    except BundleError:
        return None
    extra = meta.get("extra") if isinstance(meta.get("extra"), dict) else {}
    training = meta.get("training") if isinstance(meta.get("training"), dict) else {}
    if training_changes(extra.get("resolved_config"), training.get("device"), attack_cfg, device):
        return None
    if data is not None and (isinstance(data, str) or identity_changes(extra.get("data"), data)):
        return None
    return meta["files"].get(MODEL_FILE)


def stale_reason(grid: GridSpec, record_path: Path, attack_cfg: Mapping[str, Any], label: str,
                 checkpoint: str | None) -> str | None:
    """Why the cell behind ``record_path`` must run again, or None when its record can be reused.

    A record is reused only when its fingerprint equals the cell's (resolved attack and defense configs,
    checkpoint sha256, package version, clean ratio). ``checkpoint`` is the cached bundle's sha256; when there
    is no cached bundle the record's own is used (the bundle is trained again from the same config). A record
    written before fingerprints existed matches when its defense config and checkpoint sha256 match."""
    try:
        record = read_record(record_path)
    except ValueError as err:
        return f"its record cannot be read ({err})"
    if record.status != "ok":
        return "its last run failed"
    data = grid_data(grid)
    if isinstance(data, str):
        return data
    if not isinstance(record.data, dict):
        return "it does not say what data it was made on (written before records named their data)"
    data_changed = identity_changes(record.data, data)
    if data_changed:  # made on other data: whatever its fingerprint says
        return "the data changed (" + "; ".join(data_changed) + ")"
    defense = _defense_fingerprint_config(grid, label)
    if record.fingerprint is None:  # a record from before fingerprints: defense config + checkpoint
        # fields the config class gained after the record was written match when the grid leaves them at
        # their declared defaults (the record's run had no such option)
        defaults = _defense_defaults(grid, label)
        asked = _plain(dict(grid.defenses[label] or {}))
        current = {k: v for k, v in defense["config"].items()
                   if k in record.defense_config or k not in defaults or asked.get(k, defaults[k]) != defaults[k]}
        changed = _changed_keys(_plain(record.defense_config), current)
        if changed:
            return "the defense config changed (" + "; ".join(changed[:5]) + ")"
        if checkpoint is not None and record.checkpoint_sha256 != checkpoint:
            return "the backdoored checkpoint changed"
        return None
    sha = checkpoint or record.checkpoint_sha256
    if record.fingerprint in (_cell_fingerprint(grid, attack_cfg, label, sha, data=data),
                              _cell_fingerprint(grid, attack_cfg, label, sha, since=record, data=data)):
        return None
    # a fingerprint from before the data was part of it: matched when the data the record names is the grid's
    if record.fingerprint in (_cell_fingerprint(grid, attack_cfg, label, sha),
                              _cell_fingerprint(grid, attack_cfg, label, sha, since=record)):
        return None
    reasons = []
    defaults = _defense_defaults(grid, label)  # options added since: not a change
    changed = _changed_keys(_plain(record.defense_config),
                            _without_new_defaults(_plain(record.defense_config), defense["config"], defaults))
    if changed or (record.defense_name or record.defense) != defense["name"]:
        reasons.append("the defense config changed" + (" (" + "; ".join(changed[:5]) + ")" if changed else ""))
    if record.attack_config is not None:
        changed = _changed_keys(_plain(record.attack_config), attack_cfg)
        if changed:
            reasons.append("the attack config changed (" + "; ".join(changed[:5]) + ")")
    if record.checkpoint_sha256 != sha:
        reasons.append("the backdoored checkpoint changed")
    if record.versions.get("otbr_plugin") != _package_version():
        reasons.append(f"otbr-plugin {record.versions.get('otbr_plugin')} wrote it, this is {_package_version()}")
    return "its fingerprint does not match" + (": " + ", ".join(reasons) if reasons else "")


def _package_version() -> str:
    from otbr_plugin import __version__

    return __version__


def bundle_lock(bundles: Path, attack: str, seed: int):
    """The lock of one cached bundle, waited for: whoever holds it trains or reads ``<bundles>/<attack>-seed<s>``, so
    two processes (workers, Slurm jobs, runs sharing a bundles folder) never train the same bundle twice."""
    return file_lock(bundles / f".{attack}-seed{seed}.lock", "training of this bundle", wait=True)


def _bundle_for(grid: GridSpec, attack: str, seed: int, bundles: Path, log: Callable[[str], None],
                settings: RunSettings) -> Bundle:
    """The cached bundle for (attack, seed), trained now (on ``settings.device``) if absent or trained with another
    config (:func:`training_changes`). Holds the bundle's lock (:func:`bundle_lock`): a process that waited for
    another one's training finds the bundle cached."""
    with bundle_lock(bundles, attack, seed):
        return _bundle_for_locked(grid, attack, seed, bundles, log, settings)


def _bundle_for_locked(grid: GridSpec, attack: str, seed: int, bundles: Path, log: Callable[[str], None],
                       settings: RunSettings) -> Bundle:
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
    # the grid's device and progress setting reach training; training bars follow the config unless --no-progress
    bundle = run_attack(run, grid.data_root, log=lambda s: None, device=settings.device,
                        progress=None if settings.progress else False)
    save_bundle(bundle, path, overwrite=True)
    return load_bundle(path)


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
    with folder_lock(out, "otbr-bench run"):
        if bundles_dir is None or out.resolve() in bundles.resolve().parents:
            return _run_grid(grid, out, bundles, settings, log)
        with folder_lock(bundles, "otbr-bench run (bundles folder)"):
            return _run_grid(grid, out, bundles, settings, log)


def _run_grid(grid: GridSpec, out: Path, bundles: Path, settings: RunSettings,
              log: Callable[[str], None]) -> list[CellResult]:
    from .jobs import cell_record_path, plan_tasks  # jobs builds on this module

    progress, device = settings.progress, settings.device
    plan = plan_tasks(grid, out, bundles, device, log)  # the skip rules of every executor
    results: list[CellResult] = list(plan.skipped)
    todo: dict[tuple[str, int], list[str]] = {}
    for task in plan.cells:
        todo.setdefault((task.attack, task.seed), []).append(task.defense)
    clean_test = None
    # one bar over all cells; cells already done count as its starting point. Its ETA (_Eta) counts the backdoored
    # models still to train apart from the defense cells, so one long training does not inflate every cell.
    total = len(grid.seeds) * len(grid.attacks) * len(grid.defenses)
    eta = _Eta(cells_left=len(plan.cells), trainings_left=sum(t.kind == "train" for t in plan.tasks))
    bar = tqdm(total=total, initial=total - len(plan.cells), desc=f"grid {grid.name}", unit="cell",
               disable=not progress, dynamic_ncols=True, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
    for (attack, seed), defenses in todo.items():
        attack_cfg = _attack_fingerprint_config(grid, attack, seed)
        paths = {d: cell_record_path(grid, out, attack, d, seed) for d in defenses}
        bar.set_postfix_str(f"{attack}/seed{seed}: backdoored model, {eta}")
        t0, had_bundle = time.perf_counter(), (bundles / f"{attack}-seed{seed}").exists()
        try:
            bundle = _bundle_for(grid, attack, seed, bundles, log, settings)
            if clean_test is None:
                clean_test = load_dataset(grid.dataset, "test", grid.data_root)
            before = evaluate_model(bundle.build_model(), bundle, clean_test, device)
            if not had_bundle:
                eta.training_done(time.perf_counter() - t0)
        except Exception as err:  # noqa: BLE001 - recorded, the grid goes on
            if not had_bundle:
                eta.training_done(None)
            for defense, path in paths.items():
                results.append(_fail(grid, attack, defense, seed, path, None, err, log))
                eta.cell_done(None)
                bar.update(1)
            continue
        for defense, path in paths.items():
            bar.set_postfix_str(f"{attack}/{defense}/seed{seed}, {eta}")
            t0 = time.perf_counter()
            results.append(run_cell(grid, attack, defense, seed, path, bundle, clean_test, before, attack_cfg,
                                    device, log))
            eta.cell_done(time.perf_counter() - t0)
            bar.set_postfix_str(str(eta), refresh=False)
            bar.update(1)
        _run_oracle_sweeps(grid, attack, seed, bundle, clean_test, before, out / "oracle", log, device)
    bar.close()
    return results


def run_cell(grid: GridSpec, attack: str, defense: str, seed: int, path: Path, bundle: Bundle, clean_test, before,
             attack_cfg: Mapping[str, Any], device: torch.device, log: Callable[[str], None]) -> CellResult:
    """Run one defense cell on its backdoored model and write its record to ``path`` (a failure is recorded with its
    error). The one code path of a cell, in a sequential grid, a local worker and a Slurm job alike."""
    t0 = time.perf_counter()
    try:
        d = grid.defense_class(defense)(grid.defenses[defense])
        run = run_defense(bundle, d, data_root=grid.data_root, device=device, seed=seed,
                          clean_ratio=grid.clean_ratio, progress=False, clean_test=clean_test,
                          before=before, config_source=grid.sources.get(f"defense:{defense}", ""))
        record = run.record()
        record.attack["label"] = attack
        record.attack["grid"] = grid.name  # regress warns when records come from another grid
        if grid.defense_names.get(defense, defense) != defense:
            record.defense, record.defense_name = defense, grid.defense_names[defense]
        record.attack_config = dict(attack_cfg)
        data = grid_data(grid)
        if isinstance(data, str):
            raise RuntimeError(f"the grid's {grid.dataset} data: {data}")
        changes = identity_changes(record.data, {k: data[k] for k in ("train", "test") if k in (record.data or {})})
        if changes:  # the cell was evaluated on other data than the grid's fingerprint names
            raise RuntimeError("the clean test set used differs from the grid's data (" + "; ".join(changes) + ")")
        record.data = {**(record.data or {}), **{k: v for k, v in data.items() if k not in ("dataset",)}}
        record.fingerprint = _cell_fingerprint(grid, attack_cfg, defense, record.checkpoint_sha256, data=data)
        record.seconds["cell_total"] = time.perf_counter() - t0
        write_record(record, path)
        log(f"{attack}/{defense}/seed{seed}: ACC {run.after.acc * 100:.2f}  ASR {run.after.asr * 100:.2f}  "
            f"RA {run.after.ra * 100:.2f}  DER {run.der * 100:.2f}  ({record.seconds['cell_total']:.1f} s)")
        return CellResult(attack, defense, seed, "ok")
    except Exception as err:  # noqa: BLE001 - recorded, the grid goes on
        return _fail(grid, attack, defense, seed, path, bundle, err, log)


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


def _run_oracle_sweeps(grid: GridSpec, attack: str, seed: int, bundle: Bundle, clean_test, before,
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


def _fail(grid: GridSpec, attack: str, defense: str, seed: int, path: Path, bundle: Bundle | None,
          err: BaseException, log: Callable[[str], None] = lambda s: None) -> CellResult:
    """Record a failed cell; an ok record already at ``path`` is never overwritten by a failed one."""
    message = f"{type(err).__name__}: {err}"
    if path.exists():
        try:
            kept = read_record(path).status == "ok"
        except ValueError:
            kept = False
        if kept:
            log(f"{attack}/{defense}/seed{seed}: failed ({message}); kept the earlier ok record {path}")
            return CellResult(attack, defense, seed, "failed", message)
    metrics = dict(bundle.metrics) if bundle else {}
    record = RunRecord(
        dataset=grid.dataset, model=bundle.model_config.to_dict() if bundle else {"name": str(grid.attacks[attack].get("model", {}).get("name"))},
        attack={**(dict(bundle.attack) if bundle else {"name": attack}), "label": attack}, defense=defense,
        defense_config=grid.defenses.get(defense, {}), seed=seed,
        checkpoint_sha256=(bundle.model_sha256 or "") if bundle else "",
        metrics_before={k: v for k, v in metrics.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)},
        metrics_after=None, der=None, data_used="",
        status="failed", error=message, diagnostics={"traceback": traceback.format_exc(limit=8)},
    )
    write_record(record, path)
    return CellResult(attack, defense, seed, "failed", message)
