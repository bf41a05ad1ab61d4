"""Paired comparisons: for two defenses on the same backdoored checkpoint, the difference of each metric with a paired
bootstrap interval (the same resampled test images for both; see :mod:`otbr_plugin.aggregate.bootstrap`).

A difference is called real ("significant") when its 95% interval excludes 0. The interval covers test-set sampling
on that checkpoint; with several defense seeds each side is the mean over its seeds, and each side's defense seeds are
resampled too, independently of the other side's (two-level bootstrap,
:func:`~otbr_plugin.aggregate.bootstrap.seed_replicates`), on the same resampled test images for both.
"""

from __future__ import annotations

import csv
import io
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from .bootstrap import (DEFAULT_BOOT, DEFAULT_BOOT_SEED, levels_text, metric_tree, paired_difference,
                        record_replicates, resampled_levels, seed_replicates, seed_tree)
from .records import RunRecord
from .tables import DEFENSE_ORDER, HIGHER_IS_BETTER, METRICS, csv_safe, ordered

__all__ = ["paired_comparisons", "format_comparisons", "comparison_note", "COMPARISON_COLUMNS"]

COMPARISON_COLUMNS = ["dataset", "model", "attack", "seed", "defense_a", "defense_b", "metric", "a", "b", "diff", "lo",
                      "hi", "significant", "better"]


def paired_comparisons(records: Iterable[RunRecord], metrics: Sequence[str] = METRICS, n_boot: int = DEFAULT_BOOT,
                       seed: int = DEFAULT_BOOT_SEED, defenses: Sequence[str] | None = None,
                       include_none: bool = False, order: Sequence[str] = DEFENSE_ORDER) -> pd.DataFrame:
    """One row per (checkpoint, pair of defenses, metric): the means ``a`` and ``b`` (percent), ``diff`` = a - b and
    its paired 95% interval [lo, hi] (percent), ``significant`` (the interval excludes 0) and ``better`` (the defense
    the difference favours when significant, else ""). Pairs follow ``order`` (the first is ``defense_a``);
    ``defenses`` limits them to those labels; ``none`` takes part only with ``include_none``. Records without
    per-sample outcomes are left out."""
    ok = [r for r in records if r.status == "ok" and r.metrics_after is not None and r.per_sample is not None]
    reps = record_replicates(ok, n_boot, seed)
    cells: dict[tuple, dict[str, list[tuple[RunRecord, dict]]]] = {}
    for r, rep in zip(ok, reps):
        if rep is None or (defenses is not None and r.defense not in defenses):
            continue
        if r.defense == "none" and not include_none:
            continue
        key = (r.dataset, str(r.model.get("name")), r.attack_name, r.seed, r.checkpoint_sha256)
        cells.setdefault(key, {}).setdefault(r.defense, []).append((r, rep))
    rows = []
    used_trees = []
    for (dataset, model, attack, tseed, sha), by_def in cells.items():
        names = ordered(by_def, list(defenses) if defenses is not None else list(order))
        trees = {d: seed_tree(by_def[d]) for d in names}
        if len(names) >= 2:
            used_trees += list(trees.values())
        for i, da in enumerate(names):
            for db in names[i + 1:]:
                for m in metrics:
                    side = {}
                    for d in (da, db):
                        recs = by_def[d]
                        point = float(np.mean([(r.der if m == "der" else r.metrics_after[m]) for r, _ in recs]))
                        stream = f"{attack}:{tseed}:{sha}:{d}"
                        side[d] = (point, seed_replicates(metric_tree(trees[d], m), seed, stream))
                    diff, ci = paired_difference({m: side[da][1]}, {m: side[db][1]}, m, side[da][0] - side[db][0])
                    sig = ci.excludes_zero()
                    better = ""
                    if sig:
                        better = da if (diff > 0) == HIGHER_IS_BETTER[m] else db
                    rows.append({"dataset": dataset, "model": model, "attack": attack, "seed": tseed,
                                 "defense_a": da, "defense_b": db, "metric": m, "a": side[da][0] * 100,
                                 "b": side[db][0] * 100, "diff": diff * 100, "lo": ci.lo * 100, "hi": ci.hi * 100,
                                 "significant": sig, "better": better})
    df = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    df.attrs["levels"] = resampled_levels(used_trees)
    return df


def comparison_note(levels: Sequence[str] = ("test images",)) -> str:
    """The sentence under the comparisons: what the paired interval resamples (``df.attrs["levels"]``)."""
    if tuple(levels) == ("test images",):
        return ("A − B in points; 95% paired bootstrap interval over the same resampled test images "
                "(otbr_plugin.aggregate.bootstrap); real = the interval excludes 0.")
    return (f"A − B in points (each side the mean over its {' and '.join(levels[1:])}); 95% paired bootstrap "
            f"interval over {levels_text(levels)} (two-level: per replicate each side's seeds drawn with replacement, "
            "independently of the other side's, then the same resampled test images for both; "
            "otbr_plugin.aggregate.bootstrap); real = the interval excludes 0.")


def format_comparisons(df: pd.DataFrame, fmt: str = "md", only_significant: bool = False) -> str:
    """The comparisons as Markdown (one line per pair and metric, "yes"/"no" for real) or CSV."""
    if fmt not in ("md", "csv"):
        raise ValueError(f"format must be md or csv, got {fmt!r}")
    levels = tuple(df.attrs.get("levels", ("test images",)))
    if only_significant:
        df = df[df["significant"]]
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(COMPARISON_COLUMNS)
        for row in df.itertuples(index=False):
            w.writerow([csv_safe(f"{v:.4f}" if isinstance(v, float) else str(v)) for v in row])
        return buf.getvalue()
    head = ("| attack | seed | A | B | metric | A % | B % | A − B | 95% CI | real? | better |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {r.attack} | {r.seed} | {r.defense_a} | {r.defense_b} | {r.metric.upper()} | {r.a:.2f} | {r.b:.2f} | "
             f"{r.diff:+.2f} | [{r.lo:+.2f}, {r.hi:+.2f}] | {'yes' if r.significant else 'no'} | {r.better or '-'} |"
             for r in df.itertuples(index=False)]
    note = "\n" + comparison_note(levels) + "\n"
    return head + "\n".join(lines) + "\n" + note
