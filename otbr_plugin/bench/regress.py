"""CI regression of defense metrics: compare current run records against a committed baseline.

The baseline file is JSON: ``{"schema_version": 1, "kind": "otbr-regression-baseline", "cells": [...]}`` where
each cell holds the record key (dataset, model, attack, defense, seed) and its after-defense ACC/ASR/RA and
DER. A cell regresses when ACC, RA or DER drop, or ASR rises, by more than its tolerance (absolute fractions).
A baseline cell with no current record (or a failed one) is a failure too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..io import write_json
from .records import RunRecord

__all__ = ["DEFAULT_TOLERANCE", "parse_tolerance", "make_baseline", "read_baseline", "compare", "RegressionRow",
           "format_report"]

BASELINE_SCHEMA_VERSION = 1
BASELINE_KIND = "otbr-regression-baseline"
DEFAULT_TOLERANCE = {"acc": 0.01, "asr": 0.02, "ra": 0.02, "der": 0.02}
KEY_FIELDS = ("dataset", "model", "attack", "defense", "seed")


def parse_tolerance(text: str | None) -> dict[str, float]:
    """``"acc=0.01,asr=0.02"`` -> tolerances (absolute fractions), others keep their defaults."""
    tol = dict(DEFAULT_TOLERANCE)
    if not text:
        return tol
    for part in text.split(","):
        if "=" not in part:
            raise ValueError(f"tolerance {part!r} is not metric=value (metrics: {', '.join(DEFAULT_TOLERANCE)})")
        name, value = (s.strip() for s in part.split("=", 1))
        if name not in DEFAULT_TOLERANCE:
            raise ValueError(f"unknown metric {name!r} in tolerance; expected one of {', '.join(DEFAULT_TOLERANCE)}")
        try:
            v = float(value)
        except ValueError:
            raise ValueError(f"tolerance for {name} must be a number, got {value!r}") from None
        if not 0 <= v <= 1:
            raise ValueError(f"tolerance for {name} must be a fraction in [0, 1], got {v}")
        tol[name] = v
    return tol


def _cell(r: RunRecord) -> dict:
    return {"dataset": r.dataset, "model": r.model.get("name"), "attack": r.attack_name, "defense": r.defense,
            "seed": r.seed, "acc": r.metrics_after["acc"], "asr": r.metrics_after["asr"],  # type: ignore[index]
            "ra": r.metrics_after["ra"], "der": r.der, "checkpoint_sha256": r.checkpoint_sha256}  # type: ignore[index]


def make_baseline(records: Iterable[RunRecord], path: str | Path, note: str = "") -> Path:
    """Write the baseline file from successful records."""
    cells = [_cell(r) for r in records if r.status == "ok"]
    if not cells:
        raise ValueError("no successful records to make a baseline from")
    return write_json(path, {"schema_version": BASELINE_SCHEMA_VERSION, "kind": BASELINE_KIND, "note": note,
                                    "cells": cells})


def read_baseline(path: str | Path) -> list[dict]:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{p}: not a readable baseline file ({err})") from err
    if not isinstance(data, dict) or data.get("kind") != BASELINE_KIND or data.get("schema_version") != BASELINE_SCHEMA_VERSION:
        raise ValueError(f"{p}: not a regression baseline (expected kind {BASELINE_KIND!r}, schema_version 1)")
    cells = data.get("cells")
    if not isinstance(cells, list) or not cells:
        raise ValueError(f"{p}: 'cells' must be a non-empty list")
    for i, c in enumerate(cells):
        missing = [k for k in (*KEY_FIELDS, "acc", "asr", "ra", "der") if k not in c]
        if missing:
            raise ValueError(f"{p}: cell {i} is missing {', '.join(missing)}")
    return cells


@dataclass
class RegressionRow:
    key: tuple
    status: str  # "ok", "regressed", "missing", "failed"
    baseline: dict
    current: dict | None
    problems: list[str]


def compare(baseline: list[dict], records: Iterable[RunRecord], tolerance: dict[str, float]) -> list[RegressionRow]:
    current = {}
    for r in records:
        current[(r.dataset, r.model.get("name"), r.attack_name, r.defense, r.seed)] = r
    rows = []
    for cell in baseline:
        key = tuple(cell[k] for k in KEY_FIELDS)
        rec = current.get(key)
        if rec is None:
            rows.append(RegressionRow(key, "missing", cell, None, ["no current record"]))
            continue
        if rec.status != "ok":
            rows.append(RegressionRow(key, "failed", cell, None, [f"run failed: {rec.error}"]))
            continue
        cur = _cell(rec)
        problems = []
        for m, tol in tolerance.items():
            delta = cur[m] - cell[m]
            worse = -delta if HIGHER[m] else delta
            if worse > tol + 1e-12:
                problems.append(f"{m.upper()} {cell[m] * 100:.2f} -> {cur[m] * 100:.2f} (tolerance {tol * 100:.2f} points)")
        rows.append(RegressionRow(key, "regressed" if problems else "ok", cell, cur, problems))
    return rows


HIGHER = {"acc": True, "asr": False, "ra": True, "der": True}


def format_report(rows: list[RegressionRow]) -> str:
    lines = [f"{'attack':<10} {'defense':<8} {'seed':>4}  {'metric':<6} {'baseline':>9} {'current':>9} {'delta':>7}  status"]
    for row in rows:
        _, _, attack, defense, seed = row.key
        for m in ("acc", "asr", "ra", "der"):
            base = row.baseline[m] * 100
            if row.current is None:
                cur, delta = "-", "-"
            else:
                cur, delta = f"{row.current[m] * 100:9.2f}", f"{(row.current[m] - row.baseline[m]) * 100:+7.2f}"
            flag = row.status if m == "acc" or row.status in ("missing", "failed") else ""
            if row.current is not None and any(p.startswith(m.upper() + " ") for p in row.problems):
                flag = "REGRESSED"
            lines.append(f"{attack:<10} {defense:<8} {seed:>4}  {m.upper():<6} {base:>9.2f} {cur:>9} {delta:>7}  {flag}")
    bad = [r for r in rows if r.status != "ok"]
    lines.append(f"\n{len(rows) - len(bad)}/{len(rows)} cells within tolerance" + (
        "" if not bad else "; problems:\n" + "\n".join(f"  {r.key[2]}/{r.key[3]}/seed{r.key[4]}: {'; '.join(r.problems)}" for r in bad)))
    return "\n".join(lines)
