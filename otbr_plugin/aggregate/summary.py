"""The per-defense summary (``otbr-bench table DIR --by-defense``): one row per defense, from run records only.

Per defense: what data it used, how many attacks it covers, its mean ACC drop (the backdoored model's ACC, the
record's ``metrics_before``, minus the defense's, in points), mean ASR, RA and DER after it, its rank by mean DER
among all defenses and among the data-free ones (``data_used == "none"``), and the median and total wall seconds of
its cells (``seconds.defense_total``: the defense alone; ``seconds.cell_total``: defense and evaluation).

Rules (documented in docs/statistics.md):

- A checkpoint is an (attack, training seed) pair, on the backdoored model the ``none`` records of it were made on
  (else the model most of its records were made on): a record on another model of the same attack and seed (a
  retrained checkpoint, another ``checkpoint_sha256``) is left out of the means and ranks and named in a note.
- Averaging: per checkpoint the mean over defense seeds, then per attack the mean over training seeds, then the mean
  over attacks; with one defense seed per cell this is the comparison table's average row.
- Ranks compare defenses over the same checkpoints only. The reference set is every checkpoint some defense (not
  ``none``) has a record on; the defenses with a record on each are ranked, on it. A defense with records on fewer
  is listed with its means over its own checkpoints (the attacks column says "k of n") and left unranked; a note
  gives the rank its mean DER would have on its own checkpoints against the ranked defenses there. When no defense
  covers the whole set, every defense is compared on the checkpoints they all have (a note says which), or, when
  they share none, nothing is ranked.
- The registered ``none`` defense (the backdoored model itself) is listed and never ranked.
- Clean-accuracy bound (``--acc-drop``, as the comparison table's best marks): a defense whose mean ACC drop is above
  it carries ``†`` and is ranked after every defense within it (so it is never first); best marks only go to
  defenses within it.
- ``ci``: the mean DER's 95% bootstrap interval over test images (:mod:`otbr_plugin.aggregate.bootstrap`; replicates
  averaged like the point values), and over an attack's training seeds and each one's defense seeds where it has >= 2
  (two-level bootstrap, :func:`~otbr_plugin.aggregate.bootstrap.seed_replicates`); none where a record of the mean
  keeps no per-sample outcomes.
"""

from __future__ import annotations

import csv
import html as _html
import io
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from .bootstrap import (DEFAULT_BOOT, DEFAULT_BOOT_SEED, attacks_replicates, levels_text, percentile_interval,
                        record_replicates, resampled_levels)
from .records import RunRecord
from .tables import DEFAULT_ACC_DROP, check_one_dataset_model, csv_safe, grid_order, latex_escape, ordered

__all__ = ["DefenseSummary", "defense_summary", "format_summary", "summary_notes", "SUMMARY_COLUMNS"]

SUMMARY_COLUMNS = ["defense", "backdoored", "data_used", "data_free", "ranked", "attacks", "attacks_total", "acc_drop",
                   "asr", "ra", "der", "der_lo", "der_hi", "beyond_acc_bound", "rank_all", "rank_data_free",
                   "seconds_defense_median", "seconds_cell_median", "seconds_cell_total", "cells"]
"""The columns of :attr:`DefenseSummary.frame` and of the CSV (metrics in percent / points, seconds)."""

_VALUES = ("acc_drop", "asr", "ra", "der")
_LOWER_IS_BETTER = {"acc_drop": True, "asr": True, "ra": False, "der": False}
Checkpoint = tuple[str, int]  # (attack label, training seed)


@dataclass
class DefenseSummary:
    """``frame``: one row per defense in the grid's order (columns :data:`SUMMARY_COLUMNS`); ``notes``: the sentences
    that belong under it (rules, coverage, left-out records); ``acc_drop``: the clean-accuracy bound (points)."""

    frame: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    acc_drop: float | None = DEFAULT_ACC_DROP
    levels: tuple[str, ...] = ("test images",)  # what the DER interval resampled (bootstrap.resampled_levels)


def _is_none(r: RunRecord) -> bool:
    return (r.defense_name or r.defense) == "none"


def _reference_models(ok: Sequence[RunRecord]) -> dict[Checkpoint, str]:
    """(attack, seed) -> the checkpoint sha256 its ``none`` records were made on, else the most common one (ties: the
    smallest hash)."""
    out: dict[Checkpoint, str] = {}
    for key in dict.fromkeys((r.attack_name, r.seed) for r in ok):
        recs = [r for r in ok if (r.attack_name, r.seed) == key]
        base = [r.checkpoint_sha256 for r in recs if _is_none(r)] or [r.checkpoint_sha256 for r in recs]
        counts = Counter(base)
        out[key] = min(counts, key=lambda s: (-counts[s], s))
    return out


def _cell_values(recs: Sequence[tuple[RunRecord, dict | None]],
                 ci: bool) -> dict[Checkpoint, tuple[dict, list[np.ndarray] | None]]:
    """Per checkpoint: the mean over its records (defense seeds) of ACC drop / ASR / RA / DER in percent, and their
    DER replicates in percent, one array per defense seed in ascending order (None when one of them has none)."""
    by_ckpt: dict[Checkpoint, list[tuple[RunRecord, dict | None]]] = {}
    for r, rep in recs:
        by_ckpt.setdefault((r.attack_name, r.seed), []).append((r, rep))
    out = {}
    for key, group in by_ckpt.items():
        vals = {"acc_drop": np.mean([(r.metrics_before["acc"] - r.metrics_after["acc"]) * 100 for r, _ in group]),
                "asr": np.mean([r.metrics_after["asr"] * 100 for r, _ in group]),
                "ra": np.mean([r.metrics_after["ra"] * 100 for r, _ in group]),
                "der": np.mean([r.der * 100 for r, _ in group])}
        reps = None
        if ci and all(rep is not None for _, rep in group):
            ordered_group = sorted(group, key=lambda g: -1 if g[0].defense_seed is None else g[0].defense_seed)
            reps = [rep["der"] * 100 for _, rep in ordered_group]  # type: ignore[index]
        out[key] = (vals, reps)
    return out


def _mean_over(cells: dict[Checkpoint, tuple[dict, list[np.ndarray] | None]], ckpts: Iterable[Checkpoint],
               boot_seed: int = DEFAULT_BOOT_SEED, stream: str = "",
               ) -> tuple[dict[str, float], np.ndarray | None, list[list[list[np.ndarray]]]]:
    """The means over ``ckpts``: per attack over its training seeds, then over attacks (values; DER replicates or
    None; the attacks' seed trees the replicates came from, empty without them). An attack's replicates: the
    two-level bootstrap over its training seeds and their defense seeds
    (:func:`~otbr_plugin.aggregate.bootstrap.seed_replicates`, stream ``<attack>:<stream>``)."""
    by_attack: dict[str, list[Checkpoint]] = {}
    for c in ckpts:
        by_attack.setdefault(c[0], []).append(c)
    if not by_attack:
        return {v: np.nan for v in _VALUES}, None, []
    vals = {v: float(np.mean([np.mean([cells[c][0][v] for c in cs]) for cs in by_attack.values()])) for v in _VALUES}
    reps = [cells[c][1] for cs in by_attack.values() for c in cs]
    if any(r is None for r in reps):
        return vals, None, []
    trees = {a: [cells[c][1] for c in sorted(cs)] for a, cs in by_attack.items()}
    rep = attacks_replicates(trees, boot_seed, stream)  # type: ignore[arg-type]
    return vals, rep, list(trees.values())  # type: ignore[arg-type]


def _ranks(values: dict[str, dict[str, float]], within: dict[str, bool]) -> dict[str, int]:
    """Competition ranks (1, 2, 2, 4) by mean DER, higher first, defenses within the bound before the others."""
    keys = {d: (not within[d], -v["der"]) for d, v in values.items()}
    out = {}
    for d, (beyond, der) in keys.items():
        out[d] = 1 + sum(1 for e, (b2, der2) in keys.items() if e != d and (b2, der2) < (beyond, der)
                         and not (b2 == beyond and np.isclose(der2, der)))
    return out


def _seconds(recs: Sequence[RunRecord], name: str) -> list[float]:
    vals = [r.seconds.get(name) for r in recs]
    return [float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
            and v >= 0]


def _ckpt_text(ckpts: Iterable[Checkpoint], order: Sequence[str], seeds: bool) -> str:
    """The checkpoints in the grid's attack order: attack names, or ``attack seed s`` when seeds matter."""
    keyed = sorted(ckpts, key=lambda c: (order.index(c[0]) if c[0] in order else len(order), c))
    return ", ".join(dict.fromkeys(f"{a} seed {s}" if seeds else a for a, s in keyed))


def defense_summary(records: Iterable[RunRecord], acc_drop: float | None = DEFAULT_ACC_DROP, ci: bool = False,
                    n_boot: int = DEFAULT_BOOT, seed: int = DEFAULT_BOOT_SEED) -> DefenseSummary:
    """The per-defense summary of ``records`` (one dataset x model) by the rules of the module docstring;
    ``acc_drop``: the clean-accuracy bound in points (None: no bound); ``ci``: the mean DER's bootstrap interval."""
    records = list(records)
    ok = [r for r in records if r.status == "ok" and r.metrics_after is not None]
    check_one_dataset_model(ok)
    notes: list[str] = []
    reference = _reference_models(ok)
    off = [r for r in ok if r.checkpoint_sha256 != reference[(r.attack_name, r.seed)]]
    if off:
        notes.append("Left out of the means and ranks (made on another backdoored model of the same attack and seed "
                     "than the others, so not comparable): " + "; ".join(
                         f"{r.defense} on {r.attack_name} seed {r.seed} (checkpoint {r.checkpoint_sha256[:8]}, the "
                         f"others' {reference[(r.attack_name, r.seed)][:8]})" for r in off) + ".")
    left_out = {id(r) for r in off}
    used = [r for r in ok if id(r) not in left_out]
    reps = record_replicates(used, n_boot, seed) if ci else [None] * len(used)
    defenses = ordered((r.defense for r in ok), grid_order(records, "defenses"))
    cells = {d: _cell_values([(r, p) for r, p in zip(used, reps) if r.defense == d], ci) for d in defenses}
    is_none = {d: all(_is_none(r) for r in ok if r.defense == d) for d in defenses}
    candidates = [d for d in defenses if not is_none[d]]
    universe = {c for d in candidates for c in cells[d]}
    order = grid_order(records, "attacks")
    seeds = len({c[1] for c in universe}) > 1
    complete = [d for d in candidates if universe <= set(cells[d])]
    reference_set, ranked = universe, complete
    if candidates and not complete:
        common = set.intersection(*(set(cells[d]) for d in candidates))
        reference_set, ranked = common, (candidates if common else [])
        notes.append(f"No defense has records on every checkpoint: means and ranks over the {len(common)} "
                     f"checkpoint(s) every defense has ({_ckpt_text(common, order, seeds)})." if common else
                     "No defense has records on every checkpoint and no checkpoint has records of every defense: "
                     "nothing is ranked; each defense's means are over its own checkpoints.")
    n_total = len({a for a, _ in reference_set or universe})

    within = {}
    rows = {}
    trees: list[list[list[np.ndarray]]] = []
    for d in defenses:
        own = set(cells[d])
        ckpts = reference_set if d in ranked else (own & reference_set or own) if is_none[d] else own
        vals, rep, used = _mean_over(cells[d], ckpts, seed, d)
        trees += used
        recs = [r for r in ok if r.defense == d]
        data = sorted({r.data_used for r in recs})
        lo = hi = np.nan
        if rep is not None:
            interval = percentile_interval(rep)
            lo, hi = interval.lo, interval.hi
        within[d] = acc_drop is None or not vals["acc_drop"] > acc_drop + 1e-9
        dsec, csec = _seconds(recs, "defense_total"), _seconds(recs, "cell_total")
        rows[d] = {"defense": d, "backdoored": is_none[d], "data_used": "; ".join(data), "data_free": data == ["none"],
                   "ranked": d in ranked, "attacks": len({a for a, _ in ckpts}), "attacks_total": n_total, **vals,
                   "der_lo": lo, "der_hi": hi,
                   "beyond_acc_bound": not within[d], "rank_all": np.nan, "rank_data_free": np.nan,
                   "seconds_defense_median": float(np.median(dsec)) if dsec else np.nan,
                   "seconds_cell_median": float(np.median(csec)) if csec else np.nan,
                   "seconds_cell_total": float(np.sum(csec)) if csec else np.nan, "cells": len(recs)}
    if ranked:
        for col, pool in (("rank_all", ranked), ("rank_data_free", [d for d in ranked if rows[d]["data_free"]])):
            for d, k in _ranks({d: rows[d] for d in pool}, within).items():
                rows[d][col] = k
    for d in candidates:
        if d in ranked:
            continue
        own = set(cells[d])
        missing = _ckpt_text(universe - own, order, seeds)
        unit = "checkpoints (attack, training seed)" if seeds else "attacks"
        text = (f"{d}: records on {len(own)} of {len(universe)} {unit} (none on {missing}), so unranked; its means are "
                "over its own only.")
        if ranked and own:
            pool = [d, *ranked]
            vals = {e: _mean_over(cells[e], own)[0] for e in pool}
            inside = {e: acc_drop is None or not vals[e]["acc_drop"] > acc_drop + 1e-9 for e in pool}
            rank_all = _ranks(vals, inside)[d]
            free = [e for e in pool if rows[e]["data_free"]]
            text += f" On them its mean DER would rank {rank_all} of {len(pool)} among all"
            text += (f", {_ranks({e: vals[e] for e in free}, inside)[d]} of {len(free)} among data-free"
                     if rows[d]["data_free"] else " (it uses data)")
            text += "" if inside[d] else f"; † there: mean ACC drop {vals[d]['acc_drop']:.2f} points"
            text += "."
        notes.append(text)
    frame = pd.DataFrame([rows[d] for d in defenses], columns=SUMMARY_COLUMNS)
    for col in ("rank_all", "rank_data_free"):
        frame[col] = frame[col].astype("Int64")
    return DefenseSummary(frame, notes, acc_drop, resampled_levels(trees))


def summary_notes(summary: DefenseSummary, ci: bool = False) -> list[str]:
    """Every sentence that belongs under the table: how it was made, then coverage and left-out records."""
    bound = summary.acc_drop
    out = ["ACC drop: the backdoored model's clean ACC minus the defense's, in points; ASR, RA, DER after the defense "
           "(%). Means per checkpoint (attack, training seed) over defense seeds, per attack over training seeds, "
           "then over attacks. Ranks by mean DER over the same checkpoints for every ranked defense; none (the "
           "backdoored model) is listed, never ranked; data-free: data used none."]
    if bound is not None:
        out.append(f"† = mean ACC drop above {bound:g} points: ranked after every defense within it, never marked "
                   "best (as the comparison table's best marks).")
    out.append("Seconds per cell as recorded (seconds.defense_total: the defense alone; seconds.cell_total: with the "
               "evaluation): median over the defense's cells and their sum; they hold for the machine and load each "
               "record names.")
    if ci and summary.frame["der_lo"].notna().any() and summary.levels == ("test images",):
        out.append("[lo, hi]: 95% bootstrap interval of the mean DER over test images (otbr_plugin.aggregate.bootstrap,"
                   " replicates averaged like the means); none where a record keeps no per-sample outcomes.")
    elif ci and summary.frame["der_lo"].notna().any():
        out.append(f"[lo, hi]: 95% bootstrap interval of the mean DER over {levels_text(summary.levels)} (two-level "
                   "bootstrap: per replicate and attack the seeds drawn with replacement, then the test images; "
                   "otbr_plugin.aggregate.bootstrap); none where a record keeps no per-sample outcomes.")
    elif ci:
        out.append("No DER interval: each defense's mean covers records without per-sample outcomes (written before "
                   "record schema 2).")
    return out + summary.notes


def _best(frame: pd.DataFrame) -> dict[str, set[str]]:
    """Column -> the defenses marked best in it: ranked, within the bound, best value (ties all marked)."""
    pool = frame[frame["ranked"] & ~frame["beyond_acc_bound"]]
    out: dict[str, set[str]] = {}
    for col in _VALUES:
        vals = pool[col].dropna()
        if vals.empty:
            out[col] = set()
            continue
        best = vals.min() if _LOWER_IS_BETTER[col] else vals.max()
        out[col] = set(pool.loc[np.isclose(pool[col], best), "defense"])
    return out


def _num(x: float, digits: int = 2) -> str:
    return "-" if pd.isna(x) else f"{x:.{digits}f}"


def _sec(x: float) -> str:
    """Seconds: two decimals under 1 s (a defense that only reads weights), one under 1000, none above."""
    return "-" if pd.isna(x) else f"{x:.{2 if x < 1 else 1 if x < 1000 else 0}f}"


def _csv_value(x: object) -> str:
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if x is pd.NA or (isinstance(x, float) and np.isnan(x)):
        return ""
    if isinstance(x, (float, np.floating)):
        return repr(round(float(x), 6))
    return csv_safe(str(x))


def format_summary(summary: DefenseSummary, fmt: str = "md", ci: bool = False) -> str:
    """Render the summary as ``md`` (notes under it), ``csv`` (every column of the frame, plain numbers; no notes),
    ``latex`` or ``html`` (notes as paragraphs). ``ci``: show the DER interval column."""
    if fmt not in ("md", "csv", "latex", "html"):
        raise ValueError(f"format must be one of md, csv, latex, html; got {fmt!r}")
    frame = summary.frame
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(SUMMARY_COLUMNS)
        writer.writerows([_csv_value(row[c]) for c in SUMMARY_COLUMNS] for _, row in frame.iterrows())
        return buf.getvalue()
    best = _best(frame)
    mark = {"md": "**{}**", "latex": "\\textbf{{{}}}", "html": "<b>{}</b>"}[fmt]
    dagger = {"md": "†", "latex": "$^\\dagger$", "html": "†"}[fmt]
    esc = {"md": lambda t: t.replace("|", "\\|"), "latex": latex_escape, "html": _html.escape}[fmt]
    header = ["defense", "data used", "attacks", "ACC drop", "ASR", "RA", "DER", "rank (all)", "rank (data-free)",
              "defense s/cell (median)", "cell s/cell (median)", "cell s (total)"]
    body = []
    for _, row in frame.iterrows():
        d = row["defense"]
        cells = {c: _num(row[c]) for c in _VALUES}
        if ci:
            cells["der"] += "" if pd.isna(row["der_lo"]) else f" [{row['der_lo']:.2f}, {row['der_hi']:.2f}]"
        cells = {c: (mark.format(esc(t)) if d in best[c] else esc(t)) for c, t in cells.items()}
        beyond = dagger if row["beyond_acc_bound"] and not row["backdoored"] else ""
        cells["acc_drop"] += beyond
        partial = row["attacks"] != row["attacks_total"] or not (row["ranked"] or row["backdoored"])
        attacks = str(row["attacks"]) + (f" of {row['attacks_total']}" if partial else "")
        ranks = []
        for col in ("rank_all", "rank_data_free"):
            if pd.isna(row[col]):
                ranks.append("-" if row["backdoored"] or (col == "rank_data_free" and not row["data_free"])
                             else "unranked")
            else:
                ranks.append(f"{int(row[col])}{beyond}")
        body.append([esc(d) + (" (backdoored)" if row["backdoored"] else ""), esc(row["data_used"]), attacks,
                     *(cells[c] for c in _VALUES), *ranks, _sec(row["seconds_defense_median"]),
                     _sec(row["seconds_cell_median"]), _sec(row["seconds_cell_total"])])
    notes = summary_notes(summary, ci)
    if fmt == "md":
        lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines) + "\n" + "".join(f"\n{n}\n" for n in notes)
    if fmt == "latex":
        lines = ["\\begin{tabular}{ll" + "r" * (len(header) - 2) + "}", "\\toprule",
                 " & ".join(map(latex_escape, header)) + " \\\\", "\\midrule"]
        lines += [" & ".join(r) + " \\\\" for r in body]
        lines += ["\\bottomrule", "\\end{tabular}"]
        return "\n".join(lines) + "\n"
    lines = ['<table class="summary">', "<tr>" + "".join(f"<th>{_html.escape(h)}</th>" for h in header) + "</tr>"]
    lines += ["<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in body]
    lines.append("</table>")
    lines += [f'<p class="note">{_html.escape(n)}</p>' for n in notes]
    return "\n".join(lines) + "\n"

