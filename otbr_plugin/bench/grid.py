"""What a grid is: its spec (:func:`load_grid`, validated), the fingerprints that decide whether a cell's record or a
cached backdoored model can be reused (:func:`stale_reason`, :func:`training_changes`), and its plan: the tasks left to
run (:func:`plan_tasks`).

Three kinds of task: ``train`` (the backdoored model of one (attack, seed), trained once and cached in the bundles
folder under its lock), ``cell`` (one defense on that model; writes its run record) and ``sweep`` (one labelled
oracle sweep). How a task runs is :mod:`otbr_plugin.bench.jobs`; who runs the tasks (this process, local workers,
Slurm jobs) is :mod:`otbr_plugin.bench.executors`. Each attack bundle is trained once per seed and cached
(``<out>/bundles/<attack>-seed<s>``, reused only when its recorded config equals the requested one; see
:func:`training_changes` for how the device is compared). A cell whose record exists with a matching fingerprint is
skipped, so an interrupted grid resumes where it stopped.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from benchmark_adapters.bundle import MODEL_FILE, verify_bundle

from ..bundle import BundleError
from .._version import __version__
from ..attacks.runner import parse_attack_run
from ..config import apply_overrides, declared_values, find_config_file, load_yaml, resolve_config
from ..data import identity_changes, try_data_identity
from ..defenses import get_defense
from ..io import json_default, safe_name
from ..runtime import resolve_device
from ..aggregate.records import RunRecord, read_record, record_filename, run_fingerprint
from .slurm import SlurmOptions

__all__ = ["GridSpec", "CellResult", "load_grid", "stale_reason", "training_changes", "attack_fingerprint_config",
           "cell_fingerprint", "cached_checkpoint", "Task", "GridPlan", "plan_tasks", "cell_record_path",
           "train_error_path", "planning_device", "record_is_current", "current_records", "grid_data"]

GRID_KEYS = {"name", "dataset", "data_root", "attacks", "attack_overrides", "defenses", "defense_overrides", "seeds",
             "defense_seeds", "clean_ratio", "device", "description", "oracle_sweeps", "slurm"}


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
    # the defense seeds axis (OTBR's noise, FP/ANP's clean subset and order), apart from the training ``seeds``: every
    # defense runs once per defense seed on each trained model. None (no axis): a defense runs with the training seed,
    # and records are named and fingerprinted as before the axis existed
    defense_seeds: list[int] | None = None

    def cell_defense_seeds(self, label: str | None = None) -> list[int | None]:
        """The defense seeds of each (attack, defense ``label``, training seed): ``[None]`` without the axis; the
        registered ``none`` defense (nothing random in it) runs with the first defense seed only."""
        if self.defense_seeds is None:
            return [None]
        if label is not None and self.defense_names.get(label, label) == "none":
            return list(self.defense_seeds[:1])
        return list(self.defense_seeds)

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
        safe_name(label, f"{gpath}: attack label")  # it names the bundle folder and the record files
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
        safe_name(name, f"{gpath}: defense label")  # it names the record files
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
    dseeds = raw.get("defense_seeds")
    if dseeds is not None and (not isinstance(dseeds, list) or not dseeds or len(set(dseeds)) != len(dseeds) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in dseeds)):
        raise ValueError(f"{gpath}: 'defense_seeds' must be a non-empty list of distinct non-negative integers, e.g. "
                         f"[0, 1, 2] (or left out: each defense then runs with the training seed), got {dseeds!r}")
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
                    slurm=slurm, defense_seeds=list(dseeds) if dseeds is not None else None)

@dataclass
class CellResult:
    attack: str
    defense: str
    seed: int
    status: str  # "ok", "skipped" (record existed), "failed"
    error: str | None = None
    dseed: int | None = None  # the defense seed (grids with a defense_seeds axis)


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
    """The defaults of the config class of the defense behind ``label``: as declared, with the options that are
    declared None because they follow another option (e.g. FP's ``setting``) as the default config resolves them."""
    cls = grid.defense_class(label).config_class
    declared = _plain(declared_values(cls))
    resolved = _plain(cls().to_dict())
    return {k: (resolved.get(k) if v is None else v) for k, v in declared.items()}


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


def attack_fingerprint_config(grid: GridSpec, attack: str, seed: int) -> dict[str, Any]:
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


def cell_fingerprint(grid: GridSpec, attack_cfg: Mapping[str, Any], label: str, checkpoint_sha256: str,
                     since: RunRecord | None = None, data: Mapping[str, Any] | None = None,
                     dseed: int | None = None) -> str:
    """The cell's fingerprint; ``since``: as of that record's configs -- options added to the config classes
    after it was written that the cell leaves at their defaults are left out (see :func:`_without_new_defaults`).
    ``data``: the identity of the data (:func:`grid_data`); None gives the fingerprint of records written before
    it was part of it. ``dseed``: the defense seed of a grid with the defense_seeds axis (None: no axis, the
    fingerprint is the one records had before the axis existed)."""
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
    if dseed is not None:
        extra["defense_seed"] = dseed
    return run_fingerprint(attack_cfg, defense, checkpoint_sha256, extra)


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += _changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]} {old!r} -> {new!r}"]


def cached_checkpoint(path: Path, attack_cfg: Mapping[str, Any], device: torch.device,
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
                 checkpoint: str | None, dseed: int | None = None) -> str | None:
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
    if record.defense_seed != dseed:
        return f"it was made with defense seed {record.defense_seed}, the cell's is {dseed}"
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
                   if k in record.defense_config or k not in defaults
                   or (defaults[k] if asked.get(k) is None else asked[k]) != defaults[k]}  # None: the default
        changed = _changed_keys(_plain(record.defense_config), current)
        if changed:
            return "the defense config changed (" + "; ".join(changed[:5]) + ")"
        if checkpoint is not None and record.checkpoint_sha256 != checkpoint:
            return "the backdoored checkpoint changed"
        return None
    sha = checkpoint or record.checkpoint_sha256
    if record.fingerprint in (cell_fingerprint(grid, attack_cfg, label, sha, data=data, dseed=dseed),
                              cell_fingerprint(grid, attack_cfg, label, sha, since=record, data=data, dseed=dseed)):
        return None
    # a fingerprint from before the data was part of it: matched when the data the record names is the grid's
    if record.fingerprint in (cell_fingerprint(grid, attack_cfg, label, sha, dseed=dseed),
                              cell_fingerprint(grid, attack_cfg, label, sha, since=record, dseed=dseed)):
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


def record_is_current(grid: GridSpec, path: Path, attack: str, label: str, seed: int,
                      dseed: int | None = None) -> bool:
    """Whether the record at ``path`` was written for this cell as ``grid`` defines it now. An ok record passes
    the resume rule (:func:`stale_reason`, with its own checkpoint); a failed one carries the cell's fingerprint. A
    run reports a cell from its record only when this holds, so a record written meanwhile by a worker or job of an
    earlier run with another config is never shown as this run's."""
    attack_cfg = attack_fingerprint_config(grid, attack, seed)
    try:
        record = read_record(path)
    except ValueError:
        return False
    if record.status == "ok":
        return stale_reason(grid, path, attack_cfg, label, None, dseed) is None
    sha, data = record.checkpoint_sha256, grid_data(grid)
    return record.fingerprint is not None and record.fingerprint == cell_fingerprint(
        grid, attack_cfg, label, sha, data=None if isinstance(data, str) else data, dseed=dseed)  # no data: what failed


def current_records(grid: GridSpec, out: Path, records: list[RunRecord]) -> tuple[list[RunRecord], list[RunRecord]]:
    """``records`` (read from ``<out>/records``) of the grid's dataset split into (shown, left out): a record of one
    of the grid's cells is left out when it is not :func:`record_is_current` (written with another config, e.g. by
    an earlier run's worker); records of other cells in the folder are shown as they are."""
    shown, stale = [], []
    for r in records:
        if r.dataset != grid.dataset:
            continue
        mine = (r.attack_name in grid.attacks and r.defense in grid.defenses and r.seed in grid.seeds
                and r.defense_seed in grid.cell_defense_seeds(r.defense))
        current = not mine or record_is_current(
            grid, cell_record_path(grid, out, r.attack_name, r.defense, r.seed, r.defense_seed), r.attack_name,
            r.defense, r.seed, r.defense_seed)
        (shown if current else stale).append(r)
    return shown, stale


def _package_version() -> str:
    return __version__


KINDS = ("train", "cell", "sweep")


@dataclass(frozen=True)
class Task:
    """One job of a grid: ``train`` (attack, seed), ``cell`` or ``sweep`` (attack, defense label, seed)."""

    kind: str
    attack: str
    seed: int
    defense: str = ""
    dseed: int | None = None  # a cell's or sweep's defense seed (grids with a defense_seeds axis)

    def __post_init__(self) -> None:
        if self.kind not in KINDS or (self.kind == "train") != (self.defense == "") or (
                self.dseed is not None and (self.kind != "cell" or self.dseed < 0)):
            raise ValueError(f"a task is train (attack, seed) or {'/'.join(KINDS[1:])} (attack, defense, seed), "
                             f"got {self}")
        safe_name(self.attack, "task attack label")
        if self.defense:
            safe_name(self.defense, "task defense label")

    @property
    def key(self) -> str:
        """``train/badnets/seed0``, ``cell/badnets/otbr/seed0``, ``cell/badnets/otbr/seed0/dseed1``: unique in a grid,
        readable in logs."""
        return "/".join([self.kind, self.attack, *([self.defense] if self.defense else []), f"seed{self.seed}",
                         *([f"dseed{self.dseed}"] if self.dseed is not None else [])])

    @classmethod
    def from_key(cls, key: str) -> "Task":
        parts = key.split("/")
        dseed = None
        if len(parts) == 5 and parts[-1].startswith("dseed") and parts[-1][5:].isdigit():
            dseed, parts = int(parts[-1][5:]), parts[:-1]
        if len(parts) not in (3, 4) or not parts[-1].startswith("seed") or not parts[-1][4:].isdigit():
            raise ValueError(f"not a task key: {key!r} (expected KIND/ATTACK[/DEFENSE]/seedN[/dseedN])")
        return cls(parts[0], parts[1], int(parts[-1][4:]), parts[2] if len(parts) == 4 else "", dseed)


@dataclass
class GridPlan:
    """What is left of a grid: tasks in dependency order (each ``train`` before its cells) and the cells skipped
    because their record is there and its fingerprint matches."""

    tasks: list[Task] = field(default_factory=list)
    skipped: list[CellResult] = field(default_factory=list)

    @property
    def cells(self) -> list[Task]:
        return [t for t in self.tasks if t.kind == "cell"]


def cell_record_path(grid: GridSpec, out: Path, attack: str, defense: str, seed: int,
                     dseed: int | None = None) -> Path:
    """Where the run record of one cell lives in ``out`` (``dseed``: its defense seed, grids with that axis)."""
    model = parse_attack_run(grid.attacks[attack]).model.name
    return Path(out) / "records" / record_filename(grid.dataset, model, attack, defense, seed, dseed)


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
            attack_cfg = attack_fingerprint_config(grid, attack, seed)
            cached = cached_checkpoint(bundles / f"{attack}-seed{seed}", attack_cfg, device, grid_data(grid))
            cells = []
            for defense in grid.defenses:
                for dseed in grid.cell_defense_seeds(defense):
                    path = cell_record_path(grid, out, attack, defense, seed, dseed)
                    where = f"{attack}/{defense}/seed{seed}" + ("" if dseed is None else f"/dseed{dseed}")
                    if path.exists():
                        reason = stale_reason(grid, path, attack_cfg, defense, cached, dseed)
                        if reason is None:
                            plan.skipped.append(CellResult(attack, defense, seed, "skipped", dseed=dseed))
                            continue
                        log(f"{where}: running again, {reason}")
                    cells.append(Task("cell", attack, seed, defense, dseed))
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
