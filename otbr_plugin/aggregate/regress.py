"""CI regression of defense metrics: compare current run records against a committed baseline.

The baseline file is JSON: ``{"schema_version": 1, "kind": "otbr-regression-baseline", "cells": [...]}`` where
each cell holds the record key (dataset, model, attack, defense, seed) and its after-defense ACC/ASR/RA and
DER (with a defense_seeds axis: the means over the defense seeds, listed in ``defense_seeds``; current records are
averaged over their defense seeds the same way). Baselines written by this version also record (all optional, so
older files stay readable and older readers still read these): ``grid``, ``package_version``, ``versions``,
``tolerances`` and ``std_factor``, and per cell a ``defense_config_sha256`` and, from records that keep per-sample
outcomes, ``ci_half`` and ``ci_levels`` (see ``ci_factor`` below).

Cells are compared per (dataset, model, attack, defense): with several seeds, the means over the baseline's
seeds. A metric regresses when it gets worse (ACC, RA or DER drop, ASR rises) by more than

    allowed = max(abs, rel * |baseline mean|, std_factor * baseline std)

where ``abs``/``rel`` are the tolerances (fractions) for that metric and defense label, and the standard deviation
is the baseline's over its seeds (sample std; 0 with one seed). Exactly at the allowed change passes.

With ``ci_factor`` K > 0 (``otbr-bench regress --ci-factor K``) the allowed change is also at least K x the half
width of the 95% bootstrap interval of the compared mean (:mod:`otbr_plugin.aggregate.bootstrap`, the interval
``otbr-bench table --ci`` gives that cell): over test images and, where the cell has several, its training seeds and
their defense seeds (two-level bootstrap, :func:`~otbr_plugin.aggregate.bootstrap.records_interval`, stream
``seeds:<attack>:<defense>``, 1000 replicates, seed 0); one record: its test-image interval. It is the baseline's
when the baseline recorded one, else the current records'. ``--write-baseline`` records it from records that keep
per-sample outcomes: ``ci_half`` (a dict of half widths, fractions) in each cell of a (dataset, model, attack,
defense), the same in each since it covers all of their seeds, and ``ci_levels`` (the levels resampled, e.g.
``["test images", "defense seeds"]``). An older baseline (no ``ci_levels``) recorded each training seed's
test-image interval; they are averaged over the seeds, unless the cell's current records are several (seeds) and
keep per-sample outcomes: then the current records' seed-aware interval is used. A cell with neither (records of
schema 1) gets no such term. K = 1: a change within that noise passes. A baseline cell with no current record for
one of its seeds, or with a failed one, is a failure too.

Tolerances are layered, the most specific scope first (a defense label before the defaults), then the latest
source (command line > tolerance file > the baseline's recorded tolerances > built-in defaults), field by field.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..config import load_yaml
from ..io import write_json, write_text
from .records import RunRecord

__all__ = ["DEFAULT_TOLERANCE", "METRICS", "Tolerance", "ToleranceSpec", "parse_tolerance", "parse_tolerance_layer",
           "load_tolerance_file", "find_tolerance_file", "make_baseline", "read_baseline", "load_baseline", "Baseline",
           "compare", "RegressionRow", "MetricCheck", "RegressionReport", "build_report", "provenance_warnings",
           "format_report", "format_markdown", "format_junit", "report_dict"]

BASELINE_SCHEMA_VERSION = 1
BASELINE_KIND = "otbr-regression-baseline"
REPORT_KIND = "otbr-regression-report"
METRICS = ("acc", "asr", "ra", "der")
DEFAULT_TOLERANCE = {"acc": 0.01, "asr": 0.02, "ra": 0.02, "der": 0.02}
HIGHER = {"acc": True, "asr": False, "ra": True, "der": True}
KEY_FIELDS = ("dataset", "model", "attack", "defense", "seed")
EPS = 1e-9  # float slack: a change exactly at the tolerance passes (far below one test sample in any metric)
_FIELDS = ("abs", "rel")


# --------------------------------------------------------------------------------------------------- tolerances
@dataclass(frozen=True)
class Tolerance:
    """Allowed worsening of one metric: absolute (fraction) and relative (fraction of the baseline value)."""

    abs: float = 0.0
    rel: float = 0.0

    def allowed(self, baseline: float, std: float = 0.0, std_factor: float = 0.0) -> float:
        return max(self.abs, self.rel * abs(baseline), std_factor * std)


def _check_value(name: str, fld: str, value: Any) -> float:
    v = _check_std_factor(value, f"{fld} tolerance for {name}")
    if fld == "absolute" and v > 1:
        raise ValueError(f"absolute tolerance for {name} must be a fraction in [0, 1], got {v}")
    return v


def _check_metric(name: str) -> str:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r} in tolerance; expected one of {', '.join(METRICS)}")
    return name


def _empty_layer() -> dict:
    return {"default": {}, "defenses": {}, "std_factor": None}


def parse_tolerance_layer(text: str | None, kind: str = "abs") -> dict:
    """``"acc=0.01,anp:asr=0.05"`` -> a tolerance layer; ``kind`` is "abs" (fractions) or "rel" (of the baseline).

    A ``DEFENSE:`` prefix scopes an entry to one defense label of the grid."""
    if kind not in _FIELDS:
        raise ValueError(f"tolerance kind must be 'abs' or 'rel', got {kind!r}")
    layer = _empty_layer()
    if not text:
        return layer
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"tolerance {part!r} is not [defense:]metric=value (metrics: {', '.join(METRICS)})")
        name, value = (s.strip() for s in part.split("=", 1))
        defense = None
        if ":" in name:
            defense, name = (s.strip() for s in name.split(":", 1))
            if not defense:
                raise ValueError(f"tolerance {part!r}: empty defense label before ':'")
        _check_metric(name)
        v = _check_value(name, "absolute" if kind == "abs" else "relative", value)
        scope = layer["default"] if defense is None else layer["defenses"].setdefault(defense, {})
        scope.setdefault(name, {})[kind] = v
    return layer


def parse_tolerance(text: str | None) -> dict[str, float]:
    """``"acc=0.01,asr=0.02"`` -> absolute tolerances per metric, others keep their defaults (the historic form)."""
    tol = dict(DEFAULT_TOLERANCE)
    layer = parse_tolerance_layer(text, "abs")
    if layer["defenses"]:
        raise ValueError("parse_tolerance takes no defense-scoped entries; use parse_tolerance_layer")
    for m, spec in layer["default"].items():
        tol[m] = spec["abs"]
    return tol


def _metric_spec(where: str, name: str, value: Any) -> dict[str, float]:
    _check_metric(name)
    if isinstance(value, Mapping):
        bad = [k for k in value if k not in _FIELDS]
        if bad:
            raise ValueError(f"{where}.{name}: unknown key(s) {', '.join(map(str, bad))}; expected abs and/or rel")
        return {k: _check_value(name, "absolute" if k == "abs" else "relative", v) for k, v in value.items()}
    return {"abs": _check_value(name, "absolute", value)}


def layer_from_mapping(data: Mapping[str, Any], where: str = "tolerances") -> dict:
    """A tolerance layer from its mapping form (YAML file or a baseline's ``tolerances``)::

        default:  {acc: 0.01, asr: {abs: 0.02, rel: 0.1}}   # a bare number is absolute
        defenses: {anp: {asr: {abs: 0.05}}}
        std_factor: 2

    Metric keys at the top level are shorthand for ``default``."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping with default, defenses and/or std_factor")
    layer = _empty_layer()
    allowed = {"default", "defenses", "std_factor", *METRICS}
    bad = [k for k in data if k not in allowed]
    if bad:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(str, bad))}; expected {', '.join(sorted(allowed))}")
    default = dict(data.get("default") or {})
    for m in METRICS:
        if m in data:
            default[m] = data[m]
    if not isinstance(default, Mapping):
        raise ValueError(f"{where}.default must map metrics to tolerances")
    layer["default"] = {m: _metric_spec(f"{where}.default", m, v) for m, v in default.items()}
    defenses = data.get("defenses") or {}
    if not isinstance(defenses, Mapping):
        raise ValueError(f"{where}.defenses must map defense labels to metric tolerances")
    for d, metrics in defenses.items():
        if not isinstance(metrics, Mapping):
            raise ValueError(f"{where}.defenses.{d} must map metrics to tolerances")
        layer["defenses"][str(d)] = {m: _metric_spec(f"{where}.defenses.{d}", m, v) for m, v in metrics.items()}
    if data.get("std_factor") is not None:
        layer["std_factor"] = _check_std_factor(data["std_factor"], f"{where}.std_factor")
    return layer


def _check_std_factor(value: Any, where: str = "--std-factor") -> float:
    """``value`` as a finite number >= 0 (a std factor or a tolerance); ValueError naming ``where`` otherwise."""
    try:
        k = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(k) or k < 0:
        raise ValueError(f"{where} must be a finite number >= 0, got {k}")
    return k


def load_tolerance_file(path: str | Path) -> dict:
    """Read a tolerance YAML file (see :func:`layer_from_mapping` for its form)."""
    p = Path(path)
    try:
        data = load_yaml(p)  # the project's YAML reader: 1e-2 is a number, a non-mapping is an error
    except (OSError, ValueError) as err:
        raise ValueError(f"{p}: not a readable tolerance file ({err})") from err
    return layer_from_mapping(data, where=str(p))


def find_tolerance_file(baseline: str | Path) -> Path | None:
    """``<baseline stem>.tolerances.yaml`` (or ``.yml``) next to the baseline, if it exists."""
    b = Path(baseline)
    for ext in (".yaml", ".yml"):
        cand = b.with_name(f"{b.stem}.tolerances{ext}")
        if cand.is_file():
            return cand
    return None


class ToleranceSpec:
    """Tolerances per metric and per defense label, from a stack of layers (later layers win, field by field)."""

    def __init__(self, *layers: dict | None, std_factor: float | None = None) -> None:
        base = _empty_layer()
        base["default"] = {m: {"abs": v, "rel": 0.0} for m, v in DEFAULT_TOLERANCE.items()}
        base["std_factor"] = 0.0
        self.layers = [base, *(layer for layer in layers if layer)]
        if std_factor is not None:
            top = _empty_layer()
            top["std_factor"] = _check_std_factor(std_factor)
            self.layers.append(top)

    @classmethod
    def coerce(cls, tolerance: "ToleranceSpec | Mapping[str, float] | None") -> "ToleranceSpec":
        """Accept the historic ``{metric: absolute}`` dict as well as a spec."""
        if tolerance is None:
            return cls()
        if isinstance(tolerance, ToleranceSpec):
            return tolerance
        layer = _empty_layer()
        layer["default"] = {_check_metric(m): {"abs": _check_value(m, "absolute", v)} for m, v in tolerance.items()}
        return cls(layer)

    @property
    def std_factor(self) -> float:
        return next(layer["std_factor"] for layer in reversed(self.layers) if layer["std_factor"] is not None)

    def defense_labels(self) -> list[str]:
        return sorted({d for layer in self.layers for d in layer["defenses"]})

    def resolve(self, defense: str, metric: str) -> Tolerance:
        out = {}
        for fld in _FIELDS:
            out[fld] = 0.0
            found = False
            for scope in ("defense", "default"):
                for layer in reversed(self.layers):
                    src = layer["defenses"].get(defense, {}) if scope == "defense" else layer["default"]
                    if fld in src.get(metric, {}):
                        out[fld], found = src[metric][fld], True
                        break
                if found:
                    break
        return Tolerance(**out)

    def to_dict(self) -> dict:
        """The effective tolerances in mapping form (what a baseline records and a report shows)."""
        default = {m: vars(self.resolve("\0", m)) for m in METRICS}
        defenses = {}
        for d in self.defense_labels():
            own = {m: vars(self.resolve(d, m)) for m in METRICS}
            diff = {m: t for m, t in own.items() if t != default[m]}
            if diff:
                defenses[d] = diff
        return {"default": default, "defenses": defenses, "std_factor": self.std_factor}


# ----------------------------------------------------------------------------------------------------- baseline
def _config_sha(cfg: Any) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def _cell(r: RunRecord) -> dict:
    return {"dataset": r.dataset, "model": r.model.get("name"), "attack": r.attack_name, "defense": r.defense,
            "seed": r.seed, "acc": r.metrics_after["acc"], "asr": r.metrics_after["asr"],  # type: ignore[index]
            "ra": r.metrics_after["ra"], "der": r.der, "checkpoint_sha256": r.checkpoint_sha256,  # type: ignore[index]
            "defense_config_sha256": _config_sha(r.defense_config)}


def _by_key(records: Iterable[RunRecord]) -> dict[tuple, list[RunRecord]]:
    """Records grouped by :meth:`~otbr_plugin.aggregate.records.RunRecord.key` (a grid with a defense_seeds axis has
    one record per defense seed under each key)."""
    out: dict[tuple, list[RunRecord]] = {}
    for r in records:
        out.setdefault(r.key(), []).append(r)
    return out


def _group_cell(group: list[RunRecord]) -> dict:
    """A baseline cell from the records of one key: the record's metrics, or with defense seeds their means (and the
    seeds, ``defense_seeds``)."""
    cell = _cell(group[0])
    if len(group) > 1 or group[0].defense_seed is not None:
        for m in METRICS:
            cell[m] = statistics.fmean(float(c[m]) for c in map(_cell, group))
        cell["defense_seeds"] = sorted(r.defense_seed for r in group if r.defense_seed is not None)
    return cell


def _ci_half_widths(records: list[RunRecord]) -> tuple[dict[str, float], list[str]] | None:
    """Half the width of the 95% bootstrap interval of each metric's mean over ``records`` (fractions; the records of
    one attack and defense label: the table's interval of that cell, its training seeds and their defense seeds
    resampled where there are several, :func:`~otbr_plugin.aggregate.bootstrap.records_interval`) and the levels
    resampled; None when a record keeps no per-sample outcomes."""
    from .bootstrap import DEFAULT_BOOT_SEED, record_replicates, records_interval

    if not records or any(r.per_sample is None for r in records):
        return None
    pairs = list(zip(records, record_replicates(records)))
    out, levels = {}, ["test images"]
    for m in METRICS:
        found = records_interval(pairs, m, DEFAULT_BOOT_SEED, records[0].defense)
        if found is None:
            return None
        out[m], levels = (found[0].hi - found[0].lo) / 2, list(found[1])
    return out, levels


def record_grid(r: RunRecord) -> str | None:
    """The grid a record came from, where the record carries it (``attack["grid"]``, stamped next to the label)."""
    g = r.attack.get("grid") if isinstance(r.attack, dict) else None
    return str(g) if g else None


def _versions(records: list[RunRecord], name: str) -> list[str]:
    return sorted({str(r.versions.get(name)) for r in records if r.versions.get(name)})


def make_baseline(records: Iterable[RunRecord], path: str | Path, note: str = "", *, grid: str | None = None,
                  tolerance: ToleranceSpec | None = None) -> Path:
    """Write the baseline file from successful records, with the grid name, the package and library versions
    that produced them and (when given) the tolerances it is to be checked with."""
    ok = [r for r in records if r.status == "ok"]
    if not ok:
        raise ValueError("no successful records to make a baseline from")
    grids = {record_grid(r) for r in ok} - {None}
    grid = grid or (grids.pop() if len(grids) == 1 else None)
    pkg = _versions(ok, "otbr_plugin")
    data: dict[str, Any] = {"schema_version": BASELINE_SCHEMA_VERSION, "kind": BASELINE_KIND, "note": note,
                            "grid": grid, "package_version": ", ".join(pkg) if pkg else None,
                            "versions": {n: ", ".join(_versions(ok, n)) for n in ("otbr_plugin", "torch", "numpy", "POT")
                                         if _versions(ok, n)},
                            "cells": _baseline_cells(ok)}
    if tolerance is not None:
        spec = tolerance.to_dict()
        data["tolerances"] = {"default": spec["default"], "defenses": spec["defenses"]}
        data["std_factor"] = spec["std_factor"]
    return write_json(path, data)


def _baseline_cells(records: list[RunRecord]) -> list[dict]:
    """The baseline's cells, one per record key (:func:`_group_cell`), each with ``ci_half`` and ``ci_levels`` where
    the records keep per-sample outcomes: the interval of what regress compares, the mean over every training seed
    (and defense seed) the baseline has of that dataset, model, attack and defense, so the same in each of those
    cells."""
    groups = _by_key(records)
    cells = {key: _group_cell(g) for key, g in groups.items()}
    by_cell: dict[tuple, list[tuple]] = {}
    for key in groups:
        by_cell.setdefault(key[:4], []).append(key)
    for keys in by_cell.values():
        found = _ci_half_widths([r for k in keys for r in groups[k]])
        if found is not None:
            for k in keys:
                cells[k]["ci_half"], cells[k]["ci_levels"] = dict(found[0]), list(found[1])
    return list(cells.values())


@dataclass
class Baseline:
    """A baseline file: its cells and what it records about how they were made (None where an older file lacks it)."""

    path: Path
    cells: list[dict]
    grid: str | None = None
    package_version: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    tolerances: dict | None = None  # a tolerance layer
    note: str = ""


def load_baseline(path: str | Path) -> Baseline:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{p}: not a readable baseline file ({err})") from err
    except RecursionError:
        raise ValueError(f"{p}: not a regression baseline (JSON nested too deeply)") from None
    if not isinstance(data, dict) or data.get("kind") != BASELINE_KIND or data.get("schema_version") != BASELINE_SCHEMA_VERSION:
        raise ValueError(f"{p}: not a regression baseline (expected kind {BASELINE_KIND!r}, schema_version 1)")
    cells = data.get("cells")
    if not isinstance(cells, list) or not cells:
        raise ValueError(f"{p}: 'cells' must be a non-empty list")
    seen: dict[tuple, int] = {}
    for i, c in enumerate(cells):
        key = _check_cell(p, i, c)
        if key in seen:
            raise ValueError(f"{p}: cell {i} ({_describe_key(key)}) repeats cell {seen[key]}: a baseline holds one "
                             "cell per dataset, model, attack, defense and seed")
        seen[key] = i
    for name in ("grid", "package_version", "note"):
        if data.get(name) is not None and not isinstance(data[name], str):
            raise ValueError(f"{p}: field {name!r} must be a string or null, got {_short(data[name])}")
    versions = data.get("versions")
    if versions is not None and not (isinstance(versions, dict)
                                     and all(isinstance(v, str) for v in versions.values())):
        raise ValueError(f"{p}: field 'versions' must be an object of strings, got {_short(versions)}")
    if data.get("tolerances") is not None and not isinstance(data["tolerances"], dict):
        raise ValueError(f"{p}: field 'tolerances' must be an object, got {_short(data['tolerances'])}")
    tol = None
    if data.get("tolerances") or data.get("std_factor") is not None:
        tol = layer_from_mapping({**(data.get("tolerances") or {}), "std_factor": data.get("std_factor")},
                                 where=f"{p}: tolerances")
    return Baseline(p, cells, grid=data.get("grid"), package_version=data.get("package_version"),
                    versions=dict(data.get("versions") or {}), tolerances=tol, note=str(data.get("note") or ""))


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (a tampered file's value can be huge)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<{type(value).__name__} nested too deeply>"
    return text if len(text) <= limit else text[:limit] + "..."


def _describe_key(key: tuple) -> str:
    return "/".join(str(v) for v in key[:4]) + f"/seed {key[4]}"


def _check_cell(path: Path, i: int, cell: Any) -> tuple:
    """A baseline cell checked like a run record: string names, a non-negative integer seed, each metric a finite
    fraction in [0, 1]; its key. A one-line ValueError naming the file, the cell and the field otherwise."""
    if not isinstance(cell, dict):
        raise ValueError(f"{path}: cell {i} is not a mapping (got {_short(cell)})")
    missing = [k for k in (*KEY_FIELDS, *METRICS) if k not in cell]
    if missing:
        raise ValueError(f"{path}: cell {i} is missing {', '.join(missing)}")
    for name in KEY_FIELDS[:4]:
        if not isinstance(cell[name], str) or not cell[name]:
            raise ValueError(f"{path}: cell {i}: field {name!r} must be a non-empty string, got {_short(cell[name])}")
    where = f"{path}: cell {i} ({'/'.join(cell[n] for n in KEY_FIELDS[:4])})"
    seed = cell["seed"]
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"{where}: field 'seed' must be a non-negative integer, got {_short(seed)}")
    for m in METRICS:
        v = cell[m]
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1):
            raise ValueError(f"{where}: field {m!r} must be a finite fraction in [0, 1], got {_short(v)}")
    for name in ("checkpoint_sha256", "defense_config_sha256"):
        if cell.get(name) is not None and not isinstance(cell[name], str):
            raise ValueError(f"{where}: field {name!r} must be a string, got {_short(cell[name])}")
    return tuple(cell[n] for n in KEY_FIELDS)


def read_baseline(path: str | Path) -> list[dict]:
    """The baseline's cells (see :func:`load_baseline` for the whole file)."""
    return load_baseline(path).cells


# ------------------------------------------------------------------------------------------------------ compare
@dataclass
class MetricCheck:
    """One metric of one cell: means over the seeds, the baseline's std and the allowed worsening."""

    metric: str
    baseline: float
    baseline_std: float
    current: float | None
    current_std: float | None
    tolerance: Tolerance
    allowed: float
    status: str  # "ok", "regressed", "improved" (better by more than allowed), "missing"
    ci_half: float = 0.0  # half width of the cell's 95% bootstrap interval (fraction), when --ci-factor used it
    ci_factor: float = 0.0

    @property
    def delta(self) -> float | None:
        return None if self.current is None else self.current - self.baseline

    @property
    def worse(self) -> float | None:
        d = self.delta
        return None if d is None else (-d if HIGHER[self.metric] else d)

    def describe(self) -> str:
        """``ACC 83.67 -> 81.67 (delta -2.00, tolerance 1.00 points)``: the failure message."""
        cur = "-" if self.current is None else f"{self.current * 100:.2f}"
        delta = "" if self.delta is None else f"delta {self.delta * 100:+.2f}, "
        return (f"{self.metric.upper()} {self.baseline * 100:.2f} -> {cur} "
                f"({delta}tolerance {self.allowed * 100:.2f} points{self._why()})")

    def _why(self) -> str:
        parts = [f"abs {self.tolerance.abs * 100:.2f}"]
        if self.tolerance.rel:
            parts.append(f"rel {self.tolerance.rel:g} x {self.baseline * 100:.2f}")
        if self.baseline_std:
            parts.append(f"std {self.baseline_std * 100:.2f}")
        if self.ci_factor and self.ci_half:
            parts.append(f"{self.ci_factor:g} x CI half width {self.ci_half * 100:.2f}")
        return ": " + ", ".join(parts) if len(parts) > 1 else ""


@dataclass
class RegressionRow:
    """One cell (dataset, model, attack, defense) over its baseline seeds; ``key`` ends with the seeds tuple."""

    key: tuple
    status: str  # "ok", "regressed", "missing", "failed"
    baseline: dict  # metric -> baseline mean
    current: dict | None  # metric -> current mean (None when missing/failed)
    problems: list[str]
    checks: dict[str, MetricCheck] = field(default_factory=dict)
    seeds: tuple = ()

    @property
    def label(self) -> str:
        dataset, model, attack, defense, seeds = self.key
        return f"{attack}/{defense}/seed{','.join(map(str, seeds))}"


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _baseline_ci_half(cells: list[dict]) -> dict[str, float] | None:
    """The interval half widths the baseline cells recorded (``ci_half``): the group's, which every cell of it carries
    (baselines written since 2026-12-05), else (older files: each training seed's own) their mean over the seeds; None
    unless every cell has a sound one."""
    halves = [c.get("ci_half") for c in cells]
    if not halves or not all(isinstance(h, dict) for h in halves):
        return None
    out = {}
    for m in METRICS:
        vals = [h.get(m) for h in halves]  # type: ignore[union-attr]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1
                   for v in vals):
            return None
        out[m] = float(vals[0]) if len(set(vals)) == 1 else statistics.fmean(vals)
    return out


def _ci_half(cells: list[dict], records: list[RunRecord]) -> dict[str, float] | None:
    """The half widths ``--ci-factor`` uses for baseline ``cells`` (one group) against the current ``records``: the
    baseline's, unless it is an older file's test-image-only one over several seeds (no ``ci_levels``) and the
    current records give a seed-aware one; else the current records'; None when neither has one."""
    recorded = _baseline_ci_half(cells)
    if recorded is not None and (len(records) == 1 or all("ci_levels" in c for c in cells)):
        return recorded
    current = _ci_half_widths(records)
    return current[0] if current is not None else recorded


def compare(baseline: "Baseline | list[dict]", records: Iterable[RunRecord],
            tolerance: "ToleranceSpec | Mapping[str, float] | None" = None, ci_factor: float = 0.0) -> list[RegressionRow]:
    """Compare the current records with the baseline, one row per baseline cell (seeds grouped, in file order).
    ``ci_factor``: also allow that many half widths of the cell's 95% bootstrap interval (see the module doc)."""
    ci_factor = _check_std_factor(ci_factor, "--ci-factor")
    cells = baseline.cells if isinstance(baseline, Baseline) else baseline
    spec = ToleranceSpec.coerce(tolerance)
    k = spec.std_factor
    current = _by_key(records)  # with defense seeds: several records a key, averaged
    groups: dict[tuple, list[dict]] = {}
    for cell in cells:
        groups.setdefault(tuple(cell[f] for f in KEY_FIELDS[:4]), []).append(cell)
    rows = []
    for gkey, gcells in groups.items():
        gcells = sorted(gcells, key=lambda c: c["seed"])
        seeds = tuple(c["seed"] for c in gcells)
        key = (*gkey, seeds)
        base = {m: _mean_std([float(c[m]) for c in gcells]) for m in METRICS}
        base_mean = {m: v[0] for m, v in base.items()}
        groups_now = [current.get((*gkey, s)) for s in seeds]
        recs = [None if g is None else next((r for r in g if r.status != "ok"), g[0]) for g in groups_now]
        tol = {m: spec.resolve(gkey[3], m) for m in METRICS}
        allowed = {m: tol[m].allowed(base[m][0], base[m][1], k) for m in METRICS}
        absent = [s for s, r in zip(seeds, recs) if r is None]
        failed = [(s, r) for s, r in zip(seeds, recs) if r is not None and r.status != "ok"]
        if absent or failed:
            problems = [f"no current record for seed {s}" for s in absent]
            problems += [f"run failed (seed {s}): {r.error}" for s, r in failed]
            if len(seeds) == 1 and absent:
                problems = ["no current record"]
            checks = {m: MetricCheck(m, base[m][0], base[m][1], None, None, tol[m], allowed[m], "missing")
                      for m in METRICS}
            rows.append(RegressionRow(key, "missing" if absent else "failed", base_mean, None, problems, checks, seeds))
            continue
        cur_cells = [_group_cell(g) for g in groups_now]  # type: ignore[arg-type]
        cur = {m: _mean_std([float(c[m]) for c in cur_cells]) for m in METRICS}
        checks, problems = {}, []
        every = [r for g in groups_now for r in g]  # type: ignore[union-attr]
        half = _ci_half(gcells, every) if ci_factor else None
        if half:
            allowed = {m: max(allowed[m], ci_factor * half[m]) for m in METRICS}
        for m in METRICS:
            delta = cur[m][0] - base[m][0]
            worse = -delta if HIGHER[m] else delta
            status = "regressed" if worse > allowed[m] + EPS else "improved" if -worse > allowed[m] + EPS else "ok"
            checks[m] = MetricCheck(m, base[m][0], base[m][1], cur[m][0], cur[m][1], tol[m], allowed[m], status,
                                    half[m] if half else 0.0, ci_factor)
            if status == "regressed":
                problems.append(checks[m].describe())
        rows.append(RegressionRow(key, "regressed" if problems else "ok", base_mean, {m: v[0] for m, v in cur.items()},
                                  problems, checks, seeds))
    return rows


def provenance_warnings(baseline: Baseline, records: Iterable[RunRecord], grid: str | None = None) -> list[str]:
    """Warnings when the current records came from another grid or package version than the baseline, or a
    cell's defense ran with another config. They never change the verdict."""
    recs = [r for r in records if r.status == "ok"]
    out = []
    grids = sorted({g for g in (record_grid(r) for r in recs) if g})
    current_grid = grid or (grids[0] if len(grids) == 1 else None)
    if len(grids) > 1 and not grid:
        out.append(f"the current records come from several grids ({', '.join(grids)})")
    if baseline.grid and current_grid and current_grid != baseline.grid:
        out.append(f"grid differs: the baseline was made from grid {baseline.grid!r}, the current records from "
                   f"{current_grid!r}")
    pkg = _versions(recs, "otbr_plugin")
    if baseline.package_version and pkg and pkg != [baseline.package_version]:
        out.append(f"package version differs: baseline made with otbr-plugin {baseline.package_version}, current "
                   f"records with {', '.join(pkg)}")
    torch_v = _versions(recs, "torch")
    if baseline.versions.get("torch") and torch_v and torch_v != [baseline.versions["torch"]]:
        out.append(f"torch version differs: baseline {baseline.versions['torch']}, current {', '.join(torch_v)}")
    by_key = {k: g[0] for k, g in _by_key(recs).items()}
    changed = []
    for c in baseline.cells:
        r = by_key.get(tuple(c[f] for f in KEY_FIELDS))
        if r is not None and c.get("defense_config_sha256") and _config_sha(r.defense_config) != c["defense_config_sha256"]:
            changed.append(f"{c['attack']}/{c['defense']}/seed{c['seed']}")
    if changed:
        out.append(f"defense config differs from the baseline's for {len(changed)} cell(s): {', '.join(changed)}")
    return out


@dataclass
class RegressionReport:
    """Everything a regress run found: the rows, warnings, cells new since the baseline, and what was used."""

    rows: list[RegressionRow]
    warnings: list[str]
    new_cells: list[str]
    tolerance: ToleranceSpec
    baseline_path: str = ""
    current_path: str = ""
    baseline_grid: str | None = None
    baseline_package: str | None = None
    tolerance_file: str | None = None

    @property
    def passed(self) -> bool:
        return all(r.status == "ok" for r in self.rows)

    @property
    def failing(self) -> list[RegressionRow]:
        return [r for r in self.rows if r.status != "ok"]


def build_report(baseline: Baseline, records: Iterable[RunRecord], tolerance: ToleranceSpec | None = None, *,
                 grid: str | None = None, current_path: str = "", tolerance_file: str | None = None,
                 ci_factor: float = 0.0) -> RegressionReport:
    records = list(records)
    spec = tolerance or ToleranceSpec(baseline.tolerances)
    rows = compare(baseline, records, spec, ci_factor)
    known = {tuple(c[f] for f in KEY_FIELDS) for c in baseline.cells}
    new = sorted({f"{r.attack_name}/{r.defense}/seed{r.seed}" for r in records if r.key() not in known})
    return RegressionReport(rows, provenance_warnings(baseline, records, grid), new, spec, str(baseline.path),
                            current_path, baseline.grid, baseline.package_version, tolerance_file)


# ------------------------------------------------------------------------------------------------------ outputs
def _rows_of(x: "RegressionReport | list[RegressionRow]") -> list[RegressionRow]:
    return x.rows if isinstance(x, RegressionReport) else x


def format_report(report: "RegressionReport | list[RegressionRow]") -> str:
    """The plain-text table printed by ``otbr-bench regress``."""
    rows = _rows_of(report)
    lines = [f"{'attack':<10} {'defense':<14} {'seeds':>5}  {'metric':<6} {'baseline':>9} {'current':>9} {'delta':>7} "
             f"{'allowed':>7}  status"]
    for row in rows:
        _, _, attack, defense, seeds = row.key
        for m in METRICS:
            c = row.checks.get(m)
            base = row.baseline[m] * 100
            if row.current is None or c is None or c.current is None:
                cur, delta = "-", "-"
            else:
                cur, delta = f"{c.current * 100:9.2f}", f"{c.delta * 100:+7.2f}"  # type: ignore[operator]
            allowed = f"{c.allowed * 100:7.2f}" if c else "-"
            flag = row.status.upper() if row.status in ("missing", "failed") else ""
            if c is not None and c.status in ("regressed", "improved"):
                flag = "REGRESSED" if c.status == "regressed" else "improved"
            s = ",".join(map(str, seeds))
            lines.append(f"{attack:<10} {defense:<14} {s:>5}  {m.upper():<6} {base:>9.2f} {cur:>9} {delta:>7} "
                         f"{allowed:>7}  {flag}")
    bad = [r for r in rows if r.status != "ok"]
    lines.append(f"\n{len(rows) - len(bad)}/{len(rows)} cells within tolerance" + (
        "" if not bad else "; problems:\n" + "\n".join(f"  {r.label}: {'; '.join(r.problems)}" for r in bad)))
    if isinstance(report, RegressionReport):
        lines += [f"warning: {w}" for w in report.warnings]
        if report.new_cells:
            lines.append(f"note: {len(report.new_cells)} current cell(s) not in the baseline: {', '.join(report.new_cells)}")
    return "\n".join(lines)


def _md_value(c: MetricCheck) -> str:
    if c.current is None:
        return f"{c.baseline * 100:.2f} → —"
    d = c.delta * 100  # type: ignore[operator]
    arrow = "↑" if d >= 0.005 else "↓" if d <= -0.005 else "="
    std = f"±{c.baseline_std * 100:.2f}" if c.baseline_std else ""
    text = f"{c.baseline * 100:.2f}{std} → {c.current * 100:.2f} {arrow}{abs(d):.2f}"
    if c.status == "regressed":
        return f"**{text}** ❌ (allowed {c.allowed * 100:.2f})"
    return text


def format_markdown(report: RegressionReport) -> str:
    """A summary for a pull-request comment or a CI job summary: verdict, warnings, then one row per cell with the
    failing cells first; values in percent, arrows give the direction of the change."""
    rows = report.rows
    bad = report.failing
    head = (f"### ✅ Defense-metric regression: all {len(rows)} cells within tolerance" if not bad else
            f"### ❌ Defense-metric regression: {len(bad)} of {len(rows)} cells failed")
    prov = []
    if report.baseline_grid:
        prov.append(f"grid `{report.baseline_grid}`")
    if report.baseline_package:
        prov.append(f"otbr-plugin {report.baseline_package}")
    lines = [head, "",
             f"Baseline `{report.baseline_path}`" + (f" ({', '.join(prov)})" if prov else "")
             + f" vs current `{report.current_path}`. After-defense metrics in percent, baseline → current; "
               "ACC, RA, DER must not drop and ASR must not rise by more than the allowed change.", ""]
    for w in report.warnings:
        lines.append(f"> ⚠️ **warning:** {w}")
    if report.warnings:
        lines.append("")
    multi_ds = len({(r.key[0], r.key[1]) for r in rows}) > 1
    cols = ["", *(["dataset", "model"] if multi_ds else []), "attack", "defense", "seeds", *(m.upper() for m in METRICS)]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    order = {"failed": 0, "missing": 0, "regressed": 0, "ok": 1}
    for row in sorted(rows, key=lambda r: order[r.status]):
        dataset, model, attack, defense, seeds = row.key
        icon = {"ok": "✅", "regressed": "❌", "missing": "❌ missing", "failed": "❌ run failed"}[row.status]
        vals = [_md_value(row.checks[m]) for m in METRICS]
        lines.append("| " + " | ".join([icon, *([dataset, model] if multi_ds else []), attack, f"`{defense}`",
                                         ",".join(map(str, seeds)), *vals]) + " |")
    lines.append("")
    if bad:
        lines.append("**Failures:**")
        lines += [f"- `{r.label}`: {'; '.join(r.problems)}" for r in bad]
        lines.append("")
    improved = [f"`{r.label}` {m.upper()}" for r in rows for m, c in r.checks.items() if c.status == "improved"]
    if improved:
        lines.append(f"Improved by more than the tolerance (consider `--write-baseline`): {', '.join(improved)}.")
        lines.append("")
    if report.new_cells:
        lines.append(f"Not in the baseline (not checked): {', '.join(f'`{c}`' for c in report.new_cells)}.")
        lines.append("")
    tol = report.tolerance.to_dict()
    lines.append("Tolerances (points): " + ", ".join(_tol_text(m, t) for m, t in tol["default"].items())
                 + "".join(f"; `{d}`: " + ", ".join(_tol_text(m, t) for m, t in ms.items())
                           for d, ms in tol["defenses"].items())
                 + (f"; std factor {tol['std_factor']:g}" if tol["std_factor"] else "")
                 + (f" (from `{report.tolerance_file}` and the command line)" if report.tolerance_file else ""))
    return "\n".join(lines) + "\n"


def _tol_text(m: str, t: dict) -> str:
    return f"{m.upper()} {t['abs'] * 100:g}" + (f" or {t['rel'] * 100:g}% of baseline" if t["rel"] else "")


def format_junit(report: RegressionReport, suite: str = "otbr-bench regress") -> str:
    """JUnit XML: one test case per cell and metric (classname ``dataset.model.attack.defense``, name
    ``METRIC seeds=...``); a regression is a ``<failure>`` carrying baseline, current, tolerance and delta, a missing
    or failed run an ``<error>``. Warnings go to the suite's ``<system-out>``."""
    cases = [(row, m) for row in report.rows for m in METRICS]
    n_fail = sum(1 for row, m in cases if row.checks[m].status == "regressed")
    n_err = sum(1 for row, _ in cases if row.status in ("missing", "failed"))
    root = ET.Element("testsuites", name=suite, tests=str(len(cases)), failures=str(n_fail), errors=str(n_err))
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(cases)), failures=str(n_fail), errors=str(n_err),
                       skipped="0", time="0")
    props = ET.SubElement(ts, "properties")
    for name, value in (("baseline", report.baseline_path), ("current", report.current_path),
                        ("baseline_grid", report.baseline_grid or ""), ("baseline_package", report.baseline_package or ""),
                        ("tolerances", json.dumps(report.tolerance.to_dict(), sort_keys=True))):
        ET.SubElement(props, "property", name=name, value=str(value))
    for row, m in cases:
        dataset, model, attack, defense, seeds = row.key
        c = row.checks[m]
        tc = ET.SubElement(ts, "testcase", classname=f"{dataset}.{model}.{attack}.{defense}",
                           name=f"{m.upper()} seeds={','.join(map(str, seeds))}", time="0")
        if row.status in ("missing", "failed"):
            el = ET.SubElement(tc, "error", type=row.status, message=f"{row.label}: {'; '.join(row.problems)}")
            el.text = f"baseline {c.baseline * 100:.2f}, current -, tolerance {c.allowed * 100:.2f} points"
            continue
        detail = (f"baseline {c.baseline * 100:.2f}" + (f" (std {c.baseline_std * 100:.2f})" if c.baseline_std else "")
                  + f", current {c.current * 100:.2f}, delta {c.delta * 100:+.2f}, "  # type: ignore[operator]
                  f"tolerance {c.allowed * 100:.2f} points (abs {c.tolerance.abs * 100:.2f}, rel {c.tolerance.rel:g}, "
                  f"std factor {report.tolerance.std_factor:g})")
        if c.status == "regressed":
            el = ET.SubElement(tc, "failure", type="regression", message=f"{row.label}: {c.describe()}")
            el.text = detail
        else:
            ET.SubElement(tc, "system-out").text = detail
    if report.warnings or report.new_cells:
        ET.SubElement(ts, "system-out").text = "\n".join(
            [f"warning: {w}" for w in report.warnings]
            + ([f"not in the baseline: {', '.join(report.new_cells)}"] if report.new_cells else []))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def report_dict(report: RegressionReport) -> dict:
    """The report as JSON-ready data (``--json``)."""
    cells = []
    for row in report.rows:
        dataset, model, attack, defense, seeds = row.key
        cells.append({"dataset": dataset, "model": model, "attack": attack, "defense": defense, "seeds": list(seeds),
                      "status": row.status, "problems": row.problems,
                      "metrics": {m: {"baseline": c.baseline, "baseline_std": c.baseline_std, "current": c.current,
                                      "current_std": c.current_std, "delta": c.delta, "allowed": c.allowed,
                                      "tolerance": vars(c.tolerance), "status": c.status}
                                  for m, c in row.checks.items()}})
    return {"kind": REPORT_KIND, "schema_version": 1, "passed": report.passed, "baseline": report.baseline_path,
            "current": report.current_path, "baseline_grid": report.baseline_grid,
            "baseline_package_version": report.baseline_package, "tolerance_file": report.tolerance_file,
            "tolerances": report.tolerance.to_dict(), "warnings": report.warnings, "new_cells": report.new_cells,
            "summary": {"cells": len(report.rows), "failed": len(report.failing),
                        "by_status": {s: sum(r.status == s for r in report.rows)
                                      for s in ("ok", "regressed", "missing", "failed")}},
            "cells": cells}


write_text_atomic = write_text  # the project-wide atomic text writer (otbr_plugin.io)
