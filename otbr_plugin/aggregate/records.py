"""Run records: one JSON file per dataset x model x attack x defense x seed, written atomically.

Tables, leaderboard files and regression checks read only these records.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..io import json_default, read_regular, write_json
from .bootstrap import check_per_sample

__all__ = ["RunRecord", "RECORD_SCHEMA_VERSION", "write_record", "read_record", "read_record_json",
           "library_versions", "record_filename", "run_fingerprint", "training_summary"]

RECORD_SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)  # 1: before per-sample outcomes and defense seeds (read as records without them)
MAX_RECORD_BYTES = 32 << 20  # a record is a few KB; anything near this is not one


def library_versions() -> dict[str, str]:
    """Versions of the package and the libraries that shape results, and torch's CPU thread count (CPU kernels
    may sum in another order with another count, so it shapes the last digits too)."""
    import numpy
    import torch

    from .._version import __version__

    out = {"otbr_plugin": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
           "python": platform.python_version(), "platform": platform.platform(),
           "torch_threads": str(torch.get_num_threads())}
    try:
        import ot

        out["POT"] = ot.__version__
    except ImportError:  # pragma: no cover - POT is a dependency
        pass
    return out


def run_fingerprint(attack_config: Any, defense_config: Any, checkpoint_sha256: str,
                    extra: dict[str, Any] | None = None) -> str:
    """sha256 over everything that produced a cell's result: the resolved attack config, the resolved defense
    config, the checkpoint's sha256 and the package version (``extra``: anything else that shapes it, e.g. the
    clean subset ratio). A grid reuses a record only when its fingerprint equals the one of the cell to run."""
    from .._version import __version__

    payload = {"attack": attack_config, "defense": defense_config, "checkpoint_sha256": checkpoint_sha256,
               "otbr_plugin": __version__, **(extra or {})}
    text = json.dumps(payload, sort_keys=True, default=json_default, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_types(data: dict[str, Any]) -> None:
    """Every field of a record has the type the tables and the grid rely on (ValueError naming the field)."""
    def need(ok: bool, name: str, expected: str) -> None:
        if not ok:
            raise ValueError(f"field {name!r} must be {expected}, got {data.get(name)!r:.80}")

    for name in ("dataset", "defense", "checkpoint_sha256", "data_used"):
        need(isinstance(data[name], str), name, "a string")
    for name in ("model", "attack", "defense_config"):
        need(isinstance(data[name], dict), name, "an object")
    for name in ("seconds", "diagnostics", "versions"):
        if name in data:
            need(isinstance(data[name], dict), name, "an object")
    for name in ("device", "config_source", "timestamp"):
        if name in data:
            need(isinstance(data[name], str), name, "a string")
    for name in ("error", "defense_name", "fingerprint"):
        if data.get(name) is not None:
            need(isinstance(data[name], str), name, "a string or null")
    need(isinstance(data["seed"], int) and not isinstance(data["seed"], bool) and data["seed"] >= 0, "seed",
         "a non-negative integer")
    need(isinstance(data["metrics_before"], dict) and all(_is_num(v) for v in data["metrics_before"].values()),
         "metrics_before", "an object of finite numbers")
    after = data["metrics_after"]
    if after is not None:
        need(isinstance(after, dict), "metrics_after", "an object or null")
        for m in ("acc", "asr", "ra"):
            v = after.get(m)
            if not (_is_num(v) and 0 <= v <= 1):
                raise ValueError(f"field 'metrics_after.{m}' must be a fraction in [0, 1], got {v!r:.80}")
    der = data["der"]
    need(der is None or (_is_num(der) and 0 <= der <= 1), "der", "a fraction in [0, 1] or null")
    name = data["model"].get("name")
    need(isinstance(name, str), "model", "an object with a string 'name'")


@dataclass
class RunRecord:
    """The result of one defense on one backdoored checkpoint (metrics are fractions in [0, 1])."""

    dataset: str
    model: dict[str, Any]
    attack: dict[str, Any]
    defense: str
    defense_config: dict[str, Any]
    seed: int
    checkpoint_sha256: str
    metrics_before: dict[str, float]
    metrics_after: dict[str, float] | None
    der: float | None
    data_used: str
    seconds: dict[str, float] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"
    error: str | None = None
    device: str = "cpu"
    config_source: str = ""  # the config layers used (see otbr_plugin.config.resolve_config)
    versions: dict[str, str] = field(default_factory=library_versions)
    timestamp: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    schema_version: int = RECORD_SCHEMA_VERSION
    defense_name: str | None = None  # the registered defense when ``defense`` is a grid label (a variant)
    fingerprint: str | None = None  # run_fingerprint of the cell; None in records written before it existed
    attack_config: dict[str, Any] | None = None  # the resolved attack run config (grid cells)
    # the data it was evaluated on: {"root": folder used, "test"/"train": {"num_samples", "sha256"}} (see
    # otbr_plugin.data.identity); None in records written before it existed
    data: dict[str, Any] | None = None
    # per-sample outcomes before and after the defense, packed bits (otbr_plugin.aggregate.bootstrap); None in
    # records of schema 1 (tables show them without intervals)
    per_sample: dict[str, Any] | None = None
    # the defense's own seed when the grid has a defense_seeds axis (``seed`` is then the training seed); None: the
    # defense ran with ``seed`` (every record written before the axis existed)
    defense_seed: int | None = None
    # what training the checkpoint cost: {"minutes", "cpu_minutes", "device", "epochs", "torch_threads"} from its
    # bundle (None when the bundle did not say, and in records written before it existed)
    training: dict[str, Any] | None = None
    # the grid's attack and defense labels in its order ({"attacks": [...], "defenses": [...]}): tables and the report
    # follow it; None outside a grid and in records written before it existed
    grid_order: dict[str, list[str]] | None = None

    def __post_init__(self) -> None:
        if self.status not in ("ok", "failed"):
            raise ValueError(f"status must be 'ok' or 'failed', got {self.status!r}")
        if self.status == "ok" and (self.metrics_after is None or self.der is None):
            raise ValueError("a successful record needs metrics_after and der")

    @property
    def attack_name(self) -> str:
        """The attack's label in the grid (e.g. "badnets_5pct") if it has one, else its name."""
        return str(self.attack.get("label") or self.attack.get("name", "?"))

    def key(self) -> tuple[str, str, str, str, int]:
        return (self.dataset, str(self.model.get("name")), self.attack_name, self.defense, self.seed)

    def full_key(self) -> tuple[str, str, str, str, int, int]:
        """:meth:`key` and the defense seed (-1: none, the defense ran with ``seed``): one record per full key in a
        folder."""
        return (*self.key(), -1 if self.defense_seed is None else self.defense_seed)

    @property
    def seed_label(self) -> str:
        """``seed0``, or ``seed0/dseed1`` for a record of a grid with a defense_seeds axis."""
        return f"seed{self.seed}" + ("" if self.defense_seed is None else f"/dseed{self.defense_seed}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunRecord":
        if not isinstance(data, dict):
            raise ValueError(f"a run record is a JSON object, got {type(data).__name__}")
        if data.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
            raise ValueError(f"run record schema_version {data.get('schema_version')!r} is not supported (expected one "
                             f"of {', '.join(map(str, READABLE_SCHEMA_VERSIONS))})")
        names = set(cls.__dataclass_fields__)
        missing = [n for n in ("dataset", "model", "attack", "defense", "defense_config", "seed", "checkpoint_sha256",
                               "metrics_before", "metrics_after", "der", "data_used") if n not in data]
        if missing:
            raise ValueError(f"run record is missing field(s) {', '.join(missing)}")
        _check_types(data)
        if data.get("attack_config") is not None and not isinstance(data["attack_config"], dict):
            raise ValueError("field 'attack_config' must be an object or null")
        if data.get("data") is not None and not isinstance(data["data"], dict):
            raise ValueError("field 'data' must be an object or null")
        if data.get("training") is not None and not isinstance(data["training"], dict):
            raise ValueError("field 'training' must be an object or null")
        order = data.get("grid_order")
        if order is not None and not (isinstance(order, dict) and all(
                isinstance(order.get(k, []), list) and all(isinstance(x, str) for x in order.get(k, []))
                for k in ("attacks", "defenses"))):
            raise ValueError("field 'grid_order' must be an object of string lists ('attacks', 'defenses') or null")
        dseed = data.get("defense_seed")
        if dseed is not None and (not isinstance(dseed, int) or isinstance(dseed, bool) or dseed < 0):
            raise ValueError(f"field 'defense_seed' must be a non-negative integer or null, got {dseed!r:.80}")
        if data.get("per_sample") is not None:
            check_per_sample(data["per_sample"], data["metrics_before"], data["metrics_after"])
        return cls(**{k: v for k, v in data.items() if k in names})


def training_summary(training: Any) -> dict[str, Any] | None:
    """What a bundle's ``training`` metadata says the checkpoint cost (wall and CPU minutes, device, epochs, torch
    threads), finite numbers only; None when it says nothing of it."""
    if not isinstance(training, dict):
        return None
    out: dict[str, Any] = {}
    for k in ("minutes", "cpu_minutes"):
        if _is_num(training.get(k)) and training[k] >= 0:
            out[k] = float(training[k])
    if isinstance(training.get("device"), str):
        out["device"] = training["device"]
    cfg = training.get("config") if isinstance(training.get("config"), dict) else {}
    if isinstance(cfg.get("epochs"), int) and not isinstance(cfg.get("epochs"), bool):
        out["epochs"] = cfg["epochs"]
    if isinstance(training.get("torch_threads"), int) and not isinstance(training.get("torch_threads"), bool):
        out["torch_threads"] = training["torch_threads"]
    return out or None


def record_filename(dataset: str, model: str, attack: str, defense: str, seed: int,
                    defense_seed: int | None = None) -> str:
    """``<dataset>__<model>__<attack>__<defense>__seed<s>.json``; with a defense seed ``...__seed<s>__dseed<d>.json``
    (a grid without the defense_seeds axis names its records as before)."""
    tail = "" if defense_seed is None else f"__dseed{defense_seed}"
    return f"{dataset}__{model}__{attack}__{defense}__seed{seed}{tail}.json"


def write_record(record: RunRecord, path: str | Path) -> Path:
    return write_json(path, record.to_dict())


def read_record_json(path: str | Path) -> Any:
    """The parsed JSON of the file ``path`` in a records folder: a regular file (a FIFO, a device or a symlink to
    one is refused without blocking) of at most :data:`MAX_RECORD_BYTES`; ValueError naming the file otherwise."""
    p = Path(path)
    try:
        return json.loads(read_regular(p, MAX_RECORD_BYTES).decode())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{p}: not a readable run record ({err})") from err
    except RecursionError as err:
        raise ValueError(f"{p}: not a run record (JSON nested too deeply)") from err
    except ValueError as err:  # not a regular file, or too big
        raise ValueError(f"{p}: not a readable run record ({err})") from err


def read_record(path: str | Path) -> RunRecord:
    p = Path(path)
    data = read_record_json(p)
    try:
        return RunRecord.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{p}: {err}") from err
