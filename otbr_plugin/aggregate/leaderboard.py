"""Leaderboard submissions: export run records into one JSON file, validate it, merge many into a table.

A submission (schema ``otbr-leaderboard-submission`` v1, published in ``leaderboard_schema.json``) holds who
submitted what, the package and library versions, the run records, the sha256 of every checkpoint they were
computed on, and ``entries_sha256``: the sha256 of the canonical JSON of the entries, so any edit after export
is detected. :func:`validate_submission` returns every problem it finds, each naming the entry and field.

Entries exported from records that keep per-sample outcomes (record schema 2) carry them (``per_sample``, and
``defense_seed`` where the grid had that axis); the built board then gives each mean its 95% bootstrap interval
(columns ``acc_ci`` ... ``der_ci``, "-" where an entry has none; see :mod:`otbr_plugin.aggregate.bootstrap`). The
interval is the tables' one (:func:`~otbr_plugin.aggregate.bootstrap.records_interval`): test images resampled and,
where a row has several seeds of an attack, the seeds too (two-level bootstrap: per attack its training seeds, then
their defense seeds, stream ``seeds:<attack>:<defense>``), the attacks' replicates averaged with equal weights (the
row's mean is over its entries: the same thing when every attack has as many entries). A row with one entry per
attack keeps exactly its test-image interval. ``board.attrs["levels"]``: the levels resampled over the board.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from ..metrics import BackdoorMetrics, defense_effectiveness_rating
from ..io import write_json
from .bootstrap import (DEFAULT_BOOT, DEFAULT_BOOT_SEED, check_per_sample, levels_text, record_replicates,
                        records_interval)
from .records import RunRecord, library_versions

__all__ = ["SUBMISSION_KIND", "export_submission", "validate_submission", "load_submission", "build_leaderboard",
           "SubmissionError", "entries_digest", "leaderboard_note"]

SUBMISSION_KIND = "otbr-leaderboard-submission"
SUBMISSION_SCHEMA_VERSION = 1
ENTRY_FIELDS = {"dataset": str, "model": dict, "attack": dict, "defense": str, "defense_config": dict, "seed": int,
                "checkpoint_sha256": str, "metrics_before": dict, "metrics_after": dict, "der": (int, float),
                "data_used": str}
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class SubmissionError(ValueError):
    """A submission failed validation; ``problems`` lists every issue found."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


def entries_digest(entries: list[dict]) -> str:
    return hashlib.sha256(json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def export_submission(records: Iterable[RunRecord], path: str | Path, submitter: str, method: str,
                      description: str = "", contact: str = "") -> Path:
    """Write a submission file from successful run records."""
    entries = []
    for r in records:
        if r.status != "ok":
            continue
        d = r.to_dict()
        entry = {k: d[k] for k in ENTRY_FIELDS} | {"seconds": d.get("seconds", {})}
        for k in ("per_sample", "defense_seed"):  # optional: intervals on the board; records of schema 1 lack them
            if d.get(k) is not None:
                entry[k] = d[k]
        entries.append(entry)
    if not entries:
        raise ValueError("no successful run records to submit")
    if not submitter.strip() or not method.strip():
        raise ValueError("a submission needs a submitter and a method name")
    checkpoints = {}
    for e in entries:
        checkpoints[e["checkpoint_sha256"]] = {"dataset": e["dataset"], "model": e["model"].get("name"),
                                               "attack": e["attack"].get("name")}
    data = {"kind": SUBMISSION_KIND, "schema_version": SUBMISSION_SCHEMA_VERSION,
            "submitter": {"name": submitter, "contact": contact},
            "method": {"name": method, "description": description},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": library_versions(), "checkpoints": checkpoints, "entries": entries,
            "entries_sha256": entries_digest(entries)}
    return write_json(path, data)


def _check_metrics(where: str, m: Any, problems: list[str]) -> bool:
    if not isinstance(m, dict):
        problems.append(f"{where}: must be an object with acc, asr, ra")
        return False
    ok = True
    for k in ("acc", "asr", "ra"):
        v = m.get(k)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            problems.append(f"{where}.{k}: missing or not a number")
            ok = False
        elif not 0.0 <= v <= 1.0:
            problems.append(f"{where}.{k}: {v} is out of range [0, 1] (metrics are fractions)")
            ok = False
    return ok


def validate_submission(data: Any, name: str = "submission") -> list[str]:
    """Every problem in a submission (empty list = valid)."""
    problems: list[str] = []
    if not isinstance(data, dict):
        return [f"{name}: expected a JSON object"]
    if data.get("kind") != SUBMISSION_KIND:
        problems.append(f"kind: expected {SUBMISSION_KIND!r}, got {data.get('kind')!r}")
    if data.get("schema_version") != SUBMISSION_SCHEMA_VERSION:
        problems.append(f"schema_version: expected {SUBMISSION_SCHEMA_VERSION}, got {data.get('schema_version')!r}")
    for section, field in (("submitter", "name"), ("method", "name")):
        sec = data.get(section)
        if not isinstance(sec, dict) or not isinstance(sec.get(field), str) or not sec.get(field).strip():
            problems.append(f"{section}.{field}: missing or empty")
    for field in ("versions", "checkpoints"):
        if not isinstance(data.get(field), dict):
            problems.append(f"{field}: missing or not an object")
    entries = data.get("entries")
    if not isinstance(entries, list) or not entries:
        problems.append("entries: missing or empty")
        return problems
    digest = data.get("entries_sha256")
    if not isinstance(digest, str):
        problems.append("entries_sha256: missing")
    elif digest != entries_digest(entries):
        problems.append("entries_sha256: does not match the entries (the entries were changed after export)")
    checkpoints = data.get("checkpoints") if isinstance(data.get("checkpoints"), dict) else {}
    seen: dict[tuple, int] = {}
    for i, e in enumerate(entries):
        where = f"entries[{i}]"
        if not isinstance(e, dict):
            problems.append(f"{where}: not an object")
            continue
        missing = [k for k in ENTRY_FIELDS if k not in e]
        if missing:
            problems.append(f"{where}: missing field(s) {', '.join(missing)}")
        for k, typ in ENTRY_FIELDS.items():
            if k in e and (not isinstance(e[k], typ) or isinstance(e[k], bool)):
                problems.append(f"{where}.{k}: wrong type {type(e[k]).__name__}")
        names_ok = True
        for k in ("model", "attack"):  # the schema requires {"name": <non-empty string>}
            if isinstance(e.get(k), dict) and not (isinstance(e[k].get("name"), str) and e[k]["name"].strip()):
                problems.append(f"{where}.{k}.name: missing or not a non-empty string")
                names_ok = False
        for k in ("dataset", "defense"):
            if isinstance(e.get(k), str) and not e[k].strip():
                problems.append(f"{where}.{k}: empty")
        sha = e.get("checkpoint_sha256")
        if isinstance(sha, str):
            if not SHA256.match(sha):
                problems.append(f"{where}.checkpoint_sha256: {sha!r} is not a sha256 hex digest")
            elif sha not in checkpoints:
                problems.append(f"{where}.checkpoint_sha256: {sha[:12]}... is not listed in 'checkpoints'")
        ok_before = _check_metrics(f"{where}.metrics_before", e.get("metrics_before"), problems) if "metrics_before" in e else False
        ok_after = _check_metrics(f"{where}.metrics_after", e.get("metrics_after"), problems) if "metrics_after" in e else False
        if e.get("per_sample") is not None and ok_before and ok_after:
            try:
                check_per_sample(e["per_sample"], e["metrics_before"], e["metrics_after"])
            except ValueError as err:
                problems.append(f"{where}.{str(err).removeprefix('field ').replace(chr(39), '', 2)}")
        dseed = e.get("defense_seed")
        if dseed is not None and (not isinstance(dseed, int) or isinstance(dseed, bool) or dseed < 0):
            problems.append(f"{where}.defense_seed: must be a non-negative integer")
        der = e.get("der")
        if isinstance(der, (int, float)) and not isinstance(der, bool):
            if not 0.0 <= der <= 1.0:
                problems.append(f"{where}.der: {der} is out of range [0, 1]")
            elif ok_before and ok_after:
                b, a = e["metrics_before"], e["metrics_after"]
                expected = defense_effectiveness_rating(BackdoorMetrics(b["acc"], b["asr"], b["ra"]),
                                                        BackdoorMetrics(a["acc"], a["asr"], a["ra"]))
                if abs(expected - der) > 1e-6:
                    problems.append(f"{where}.der: {der:.6f} does not follow from the metrics ({expected:.6f})")
        if names_ok and all(isinstance(e.get(k), t) for k, t in (("dataset", str), ("model", dict), ("attack", dict),
                                                                ("defense", str), ("seed", int))) \
                and isinstance(e.get("checkpoint_sha256", ""), str):
            key = (e["dataset"], e["model"].get("name"), e["attack"].get("name"), e["defense"], e["seed"],
                   e.get("checkpoint_sha256"), e.get("defense_seed"))
            if key in seen:
                problems.append(f"{where}: duplicate of entries[{seen[key]}] (same dataset, model, attack, defense, "
                                "seed and checkpoint)")
            else:
                seen[key] = i
    return problems


def load_submission(path: str | Path) -> dict:
    """Read and validate a submission; raises :class:`SubmissionError` listing every problem."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SubmissionError(str(p), [f"not readable JSON ({err})"]) from err
    except RecursionError:
        raise SubmissionError(str(p), ["not a submission (JSON nested too deeply)"]) from None
    problems = validate_submission(data, str(p))
    if problems:
        raise SubmissionError(str(p), problems)
    return data


def build_leaderboard(submissions: list[dict], n_boot: int = DEFAULT_BOOT,
                      boot_seed: int = DEFAULT_BOOT_SEED) -> pd.DataFrame:
    """One row per (method, defense, dataset, model): mean after-defense metrics (percent) over its entries,
    ranked by DER, each with its 95% bootstrap interval (``acc_ci`` ... ``der_ci``: "[lo, hi]", "-" unless every
    entry keeps per-sample outcomes; over test images and the row's seeds, see the module doc). Rows mixing different
    checkpoints are still comparable only on the same dataset/model. ``attrs["levels"]``: the levels resampled."""
    rows, entries = [], []
    for sub in submissions:
        for e in sub["entries"]:
            rows.append({"method": sub["method"]["name"], "submitter": sub["submitter"]["name"], "dataset": e["dataset"],
                         "model": e["model"].get("name"), "defense": e["defense"], "acc": e["metrics_after"]["acc"],
                         "asr": e["metrics_after"]["asr"], "ra": e["metrics_after"]["ra"], "der": e["der"]})
            entries.append(e)
    if not rows:
        raise ValueError("no entries to build a leaderboard from")
    df = pd.DataFrame(rows)
    keys = ["dataset", "model", "method", "submitter", "defense"]
    agg = df.groupby(keys).agg(
        cells=("der", "size"), acc=("acc", "mean"), asr=("asr", "mean"), ra=("ra", "mean"), der=("der", "mean"))
    agg[["acc", "asr", "ra", "der"]] = agg[["acc", "asr", "ra", "der"]].mul(100).round(2)
    recs = [_entry_record(e) for e in entries]
    reps = record_replicates(recs, n_boot, boot_seed)
    levels: set[str] = {"test images"}
    for m in ("acc", "asr", "ra", "der"):
        texts = {}
        for key, idx in df.groupby(keys).groups.items():
            found = records_interval([(recs[i], reps[i]) for i in idx], m, boot_seed, key[-1])
            if found is not None:
                levels.update(found[1])
            texts[key] = "-" if found is None else f"[{found[0].lo * 100:.2f}, {found[0].hi * 100:.2f}]"
        agg[f"{m}_ci"] = [texts[k] for k in agg.index]
    agg = agg.reset_index().sort_values(["dataset", "model", "der"], ascending=[True, True, False])
    agg.insert(0, "rank", agg.groupby(["dataset", "model"]).cumcount() + 1)
    board = agg.reset_index(drop=True)
    board.attrs["levels"] = tuple(x for x in ("test images", "training seeds", "defense seeds") if x in levels)
    return board


def leaderboard_note(levels: tuple[str, ...] = ("test images",)) -> str:
    """The sentence under a board whose intervals resampled seeds (``board.attrs["levels"]``); empty when they
    covered test images only (the board then reads as before seeds were resampled)."""
    if tuple(levels) == ("test images",):
        return ""
    return (f"*_ci: 95% bootstrap interval over {levels_text(levels)} (two-level bootstrap: per replicate each "
            "attack's seeds drawn with replacement, then the test images; attacks averaged; "
            "otbr_plugin.aggregate.bootstrap).")


def _entry_record(e: dict) -> RunRecord:
    """A validated submission entry as a run record (for its bootstrap replicates)."""
    return RunRecord(dataset=e["dataset"], model=e["model"], attack=e["attack"], defense=e["defense"],
                     defense_config=e["defense_config"], seed=e["seed"], checkpoint_sha256=e["checkpoint_sha256"],
                     metrics_before=e["metrics_before"], metrics_after=e["metrics_after"], der=e["der"],
                     data_used=e["data_used"], per_sample=e.get("per_sample"), defense_seed=e.get("defense_seed"),
                     versions={}, timestamp="")
