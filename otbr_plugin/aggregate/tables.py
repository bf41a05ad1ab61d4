"""Comparison tables from run records: attacks as rows, defenses as columns, ACC / ASR / RA / DER per cell.

Values are percentages, mean over seeds (``mean ± std`` when there is more than one seed). The last row
averages over attacks. In each row and for each metric the best defense is marked (``**x**`` in Markdown,
``\\textbf{x}`` in LaTeX, ``<b>x</b>`` in HTML, a trailing ``*`` in CSV); "none" (no defense) is shown but never
marked. Higher is better for ACC, RA and DER; lower for ASR.
"""

from __future__ import annotations

import csv
import html as _html
import io
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from ..io import plain_text_plots, read_regular, save_figure
from .bootstrap import (DEFAULT_BOOT, DEFAULT_BOOT_SEED, levels_text, metric_tree, percentile_interval,
                        record_replicates, resampled_levels, seed_replicates, seed_tree)
from .records import RunRecord, read_record, read_record_json

__all__ = ["load_records", "load_record_folders", "unreadable_line", "check_one_dataset_model", "latex_escape",
           "csv_safe", "records_frame", "comparison_table", "interval_table", "interval_note", "format_table",
           "METRICS", "HIGHER_IS_BETTER", "plot_acc_vs_asr", "oracle_table"]

METRICS = ("acc", "asr", "ra", "der")
HIGHER_IS_BETTER = {"acc": True, "asr": False, "ra": True, "der": True}
DEFENSE_ORDER = ["none", "otbr", "clp", "fp", "anp"]


def _looks_like_record(path: Path) -> bool:
    """A file the grid would have written as a run record (in a ``records/`` folder or named like one)."""
    return path.parent.name == "records" or bool(re.search(r"__seed\d+(__dseed\d+)?\.json$", path.name))


def _folder_records(folder: str | Path, unreadable: list[tuple[Path, str]] | None) -> list[tuple[Path, RunRecord]]:
    """(path, record) for every run record under ``folder``, recursively, in path order; one record per full key."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder of run records")
    found: list[tuple[Path, RunRecord]] = []
    seen: dict[tuple, Path] = {}
    for path in sorted(root.rglob("*.json")):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        try:
            data = read_record_json(path)
        except ValueError as err:
            if unreadable is not None and _looks_like_record(path):
                unreadable.append((path, str(err).removeprefix(f"{path}: ")[:160]))
            continue
        if unreadable is not None and not isinstance(data, dict) and _looks_like_record(path):
            unreadable.append((path, f"not a JSON object ({type(data).__name__})"))
        if isinstance(data, dict) and "schema_version" in data and "checkpoint_sha256" in data:
            record = read_record(path)
            key = record.full_key()
            if key in seen:
                raise ValueError(
                    f"{seen[key]} and {path} are both the record of {'/'.join(map(str, key[:4]))} "
                    f"{record.seed_label}; one folder holds one record per (dataset, model, attack, defense, seed, "
                    "defense seed): remove one of them"
                )
            seen[key] = path
            found.append((path, record))
    return found


def load_records(folder: str | Path, unreadable: list[tuple[Path, str]] | None = None) -> list[RunRecord]:
    """Every run record (JSON with a ``schema_version``) under ``folder``, recursively, sorted by key.

    ``unreadable``: when given, gets (path, reason) for each file that should be a record (in a ``records/`` folder
    or named like one) but cannot be read as JSON, so callers can say what is missing from a table."""
    return sorted((r for _, r in _folder_records(folder, unreadable)), key=lambda r: r.full_key())


def _difference(a: RunRecord, b: RunRecord) -> str:
    """Why two records of the same cell are not one measurement ("" when they are: same checkpoint, config, data
    and outcome)."""
    if a.checkpoint_sha256 != b.checkpoint_sha256:
        return f"checkpoints {a.checkpoint_sha256[:12]}... and {b.checkpoint_sha256[:12]}..."
    if a.fingerprint != b.fingerprint:
        return "another attack/defense config or data (their fingerprints differ)"
    if (a.status, a.metrics_after) != (b.status, b.metrics_after):
        return "other outcomes"
    return ""


def load_record_folders(folders: Sequence[str | Path], unreadable: list[tuple[Path, str]] | None = None,
                        repeated: list[tuple[Path, Path]] | None = None) -> list[RunRecord]:
    """The run records of several folders (each as :func:`load_records`) as one set, sorted by key.

    A cell found in more than one folder is kept once when its records are one measurement (same checkpoint sha256,
    fingerprint and outcome: e.g. the ``none`` cell that two grids on one checkpoint both ran); ``repeated`` gets
    (kept, dropped) paths for each. Records of the same cell that differ (another checkpoint, config or outcome) are
    a ValueError naming both: a table counts each cell once."""
    kept: dict[tuple, tuple[Path, RunRecord]] = {}
    for folder in folders:
        for path, record in _folder_records(folder, unreadable):
            key = record.full_key()
            if key not in kept:
                kept[key] = (path, record)
                continue
            first, other = kept[key]
            why = _difference(other, record)
            if why:
                raise ValueError(f"{first} and {path} are both the record of {'/'.join(map(str, key[:4]))} "
                                 f"{record.seed_label} but are different measurements ({why}); a table over several "
                                 "folders counts each cell once: leave one of the folders out")
            if repeated is not None:
                repeated.append((first, path))
    return sorted((r for _, r in kept.values()), key=lambda r: r.full_key())


def unreadable_line(unreadable: Sequence[tuple[Path, str]]) -> str:
    """One stderr line naming the record files that could not be read (empty when none)."""
    if not unreadable:
        return ""
    return (f"warning: {len(unreadable)} record file(s) could not be read and are not in the table: "
            + "; ".join(f"{p} ({why})" for p, why in unreadable))


def records_frame(records: Iterable[RunRecord]) -> pd.DataFrame:
    """One row per successful record: dataset, model, attack, defense, seed and the after-defense metrics."""
    rows = []
    for r in records:
        if r.status != "ok" or r.metrics_after is None:
            continue
        rows.append({"dataset": r.dataset, "model": r.model.get("name"), "attack": r.attack_name, "defense": r.defense,
                     "seed": r.seed, **{m: r.metrics_after[m] for m in ("acc", "asr", "ra")}, "der": r.der})
    return pd.DataFrame(rows, columns=["dataset", "model", "attack", "defense", "seed", *METRICS])


def check_one_dataset_model(records: Iterable[RunRecord]) -> pd.DataFrame:
    """:func:`records_frame` of ``records``; ValueError when it is empty or mixes datasets or models (a table is of
    one dataset x model)."""
    df = records_frame(records)
    if df.empty:
        raise ValueError("no successful run records to tabulate")
    if df[["dataset", "model"]].drop_duplicates().shape[0] > 1:
        raise ValueError("records mix datasets or models; tabulate one dataset x model at a time")
    return df


def grid_order(records: Iterable[RunRecord], kind: str) -> list[str]:
    """The order of the grid's ``kind`` ("attacks" or "defenses") as the records carry it, then, for defenses,
    :data:`DEFENSE_ORDER`. Records from several grids (or runs of parts of one): the longest order first, each other
    one's new labels after it, in its order."""
    out: list[str] = []
    orders = {tuple((r.grid_order or {}).get(kind, [])) for r in records}
    for order in sorted(orders, key=lambda o: (-len(o), o)):
        for label in order:
            if label not in out:
                out.append(label)
    if kind == "defenses":
        out += [d for d in DEFENSE_ORDER if d not in out]
    return out


def ordered(values: Iterable[str], order: Sequence[str]) -> list[str]:
    vals = list(dict.fromkeys(values))
    return sorted(vals, key=lambda v: (order.index(v) if v in order else len(order), v))


def comparison_table(records: Iterable[RunRecord], metrics: Sequence[str] = METRICS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(mean, std) frames in percent; rows = attacks + "average", columns = (defense, metric).

    std is NaN where a cell has a single seed. The "average" row is the mean over attacks of the per-attack means,
    over the attacks every defense has a result for: when some defense lacks an attack (a failed or unreadable
    record), the row says so in its label, "average (k of n attacks every defense has)", so no defense's average
    is taken over a different set of attacks than another's.
    """
    records = list(records)
    df = check_one_dataset_model(records)
    grouped = df.groupby(["attack", "defense"])[list(metrics)]
    mean = grouped.mean().mul(100).unstack("defense")
    std = grouped.std(ddof=1).mul(100).unstack("defense")
    defenses = ordered(df["defense"], grid_order(records, "defenses"))
    attacks = ordered(df["attack"], grid_order(records, "attacks"))
    cols = pd.MultiIndex.from_tuples([(d, m) for d in defenses for m in metrics], names=["defense", "metric"])
    mean = mean.swaplevel(axis=1).reindex(columns=cols).reindex(attacks)
    std = std.swaplevel(axis=1).reindex(columns=cols).reindex(attacks)
    complete = [a for a in attacks if mean.loc[a].notna().all()]
    label = ("average" if len(complete) == len(attacks)
             else f"average ({len(complete)} of {len(attacks)} attacks every defense has)")
    mean.loc[label] = mean.loc[complete].mean(axis=0) if complete else np.nan
    std.loc[label] = np.nan
    return mean, std


def interval_table(records: Iterable[RunRecord], mean: pd.DataFrame, n_boot: int = DEFAULT_BOOT,
                   seed: int = DEFAULT_BOOT_SEED) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(lo, hi) frames shaped like ``mean`` (from :func:`comparison_table`): the 95% bootstrap interval of each cell
    in percent (:mod:`otbr_plugin.aggregate.bootstrap`: images resampled; a cell over several seeds resamples them
    too, :func:`~otbr_plugin.aggregate.bootstrap.seed_replicates`; the average row averages the attacks' replicates
    over the attacks it averages). NaN where a record of the cell has no per-sample outcomes (records written before
    schema 2). ``lo.attrs["levels"]``: the levels resampled (:func:`~otbr_plugin.aggregate.bootstrap.resampled_levels`
    over the cells with an interval)."""
    ok = [r for r in records if r.status == "ok" and r.metrics_after is not None]
    reps = record_replicates(ok, n_boot, seed)
    lo = pd.DataFrame(np.nan, index=mean.index, columns=mean.columns)
    hi = lo.copy()
    by_cell: dict[tuple[str, str], list] = {}
    for r, rep in zip(ok, reps):
        by_cell.setdefault((r.attack_name, r.defense), []).append((r, rep))
    attacks = [a for a in mean.index if a in {r.attack_name for r in ok}]
    average = [a for a in mean.index if a not in attacks]
    complete = [a for a in attacks if mean.loc[a].notna().all()]
    trees = {}
    for (a, d), group in by_cell.items():
        if all(g is not None for _, g in group):
            trees[(a, d)] = seed_tree(group)
    for d, m in mean.columns:
        cell_means = {}
        for a in attacks:
            tree = trees.get((a, d))
            if tree is not None:
                cell_means[a] = seed_replicates(metric_tree(tree, m), seed, f"{a}:{d}")
                ci = percentile_interval(cell_means[a])
                lo.at[a, (d, m)], hi.at[a, (d, m)] = ci.lo * 100, ci.hi * 100
        if average and complete and all(a in cell_means for a in complete):
            ci = percentile_interval(np.mean([cell_means[a] for a in complete], axis=0))
            lo.at[average[0], (d, m)], hi.at[average[0], (d, m)] = ci.lo * 100, ci.hi * 100
    lo.attrs["levels"] = resampled_levels(trees.values())
    return lo, hi


def interval_note(levels: Sequence[str] = ("test images",)) -> str:
    """The sentence under a table with intervals: which levels were resampled (:func:`interval_table`)."""
    if tuple(levels) == ("test images",):
        return "[lo, hi]: 95% bootstrap interval over test images (otbr_plugin.aggregate.bootstrap); ± std: over seeds."
    return (f"[lo, hi]: 95% bootstrap interval over {levels_text(levels)} (two-level bootstrap: per replicate the "
            "seeds drawn with replacement, then the test images; otbr_plugin.aggregate.bootstrap); ± std: over seeds.")


DEFAULT_ACC_DROP = 10.0
"""The clean-accuracy bound of the "best" marks, in points: a defense whose clean ACC after is more than this below
the backdoored model's (the row's ``none``) is never marked best in that row, and its cells carry a ``†``."""


def bound_note(acc_drop: float = DEFAULT_ACC_DROP) -> str:
    """The sentence that states the bound under a table."""
    return (f"Best marks only among defenses whose clean ACC after is at most {acc_drop:g} points below the backdoored "
            f"model's (none; without a none column, below the row's best ACC); † = dropped ACC by more than that, "
            "never marked best.")


def eligible_mask(mean: pd.DataFrame, acc_drop: float = DEFAULT_ACC_DROP) -> pd.DataFrame:
    """(row, defense) -> whether the defense keeps clean ACC within ``acc_drop`` points of the backdoored model's
    (the ``none`` column's ACC; when the table has no ``none`` ACC, of the best ACC in the row). A row without ACC
    keeps every defense eligible."""
    defenses = list(dict.fromkeys(mean.columns.get_level_values(0)))
    out = pd.DataFrame(True, index=mean.index, columns=defenses)
    if not any((d, "acc") in mean.columns for d in defenses):
        return out
    acc = pd.DataFrame({d: mean[(d, "acc")] if (d, "acc") in mean.columns else np.nan for d in defenses})
    others = [d for d in defenses if d != "none"]
    ref = acc["none"] if "none" in acc else acc[others].max(axis=1)
    ref = ref.fillna(acc[others].max(axis=1)) if others else ref
    for d in others:
        out[d] = ~(acc[d] < ref - acc_drop - 1e-9)
    return out


def best_mask(mean: pd.DataFrame, acc_drop: float | None = DEFAULT_ACC_DROP) -> pd.DataFrame:
    """Where a cell is the row's best for its metric among the defenses (never ``none``) that respect the clean-accuracy
    bound (:func:`eligible_mask`; ``acc_drop=None``: no bound)."""
    mask = pd.DataFrame(False, index=mean.index, columns=mean.columns)
    defenses = [d for d in mean.columns.get_level_values(0).unique() if d != "none"]
    ok = eligible_mask(mean, acc_drop if acc_drop is not None else np.inf)
    for metric in mean.columns.get_level_values(1).unique():
        cols = [(d, metric) for d in defenses if (d, metric) in mean.columns]
        if not cols:
            continue
        block = mean[cols].where(pd.DataFrame({c: ok[c[0]] for c in cols}))
        best = block.max(axis=1) if HIGHER_IS_BETTER[metric] else block.min(axis=1)
        for c in cols:
            mask[c] = np.isclose(block[c], best) & block[c].notna()
    return mask


def format_cell(m: float, s: float, lo: float = np.nan, hi: float = np.nan) -> str:
    """``m``, ``m ± s`` (several seeds), then `` [lo, hi]`` when the cell has a bootstrap interval."""
    if pd.isna(m):
        return "-"
    text = f"{m:.2f}" if pd.isna(s) else f"{m:.2f} ± {s:.2f}"
    return text if pd.isna(lo) or pd.isna(hi) else f"{text} [{lo:.2f}, {hi:.2f}]"


_LATEX = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "$": "\\$", "#": "\\#", "_": "\\_", "{": "\\{",
          "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}"}


def latex_escape(text: str) -> str:
    """``text`` as literal LaTeX text: every special character (``\\ & % $ # _ { } ~ ^``) escaped, newlines as spaces
    (labels come from records: they must not become commands)."""
    return "".join(_LATEX.get(c, " " if c in "\r\n" else c) for c in str(text))


def csv_safe(value: str) -> str:
    """A CSV field that a spreadsheet shows as text: one starting with ``= + - @`` (a formula such as
    ``=HYPERLINK(...)``), a tab or a carriage return gets a leading ``'``, unless it is a plain number."""
    text = str(value)
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        try:
            float(text.rstrip("*"))
            return text
        except ValueError:
            return "'" + text
    return text


def format_table(mean: pd.DataFrame, std: pd.DataFrame, fmt: str = "md", lo: pd.DataFrame | None = None,
                 hi: pd.DataFrame | None = None, acc_drop: float | None = DEFAULT_ACC_DROP) -> str:
    """Render the comparison table as ``md``, ``csv``, ``latex`` or ``html``; ``lo``/``hi`` (:func:`interval_table`):
    each cell's 95% bootstrap interval in brackets. Best marks respect the clean-accuracy bound ``acc_drop``
    (:func:`best_mask`); cells of a defense beyond it carry ``†``, and Markdown states the bound under the table."""
    if fmt not in ("md", "csv", "latex", "html"):
        raise ValueError(f"format must be one of md, csv, latex, html; got {fmt!r}")
    best = best_mask(mean, acc_drop)
    ok = eligible_mask(mean, acc_drop if acc_drop is not None else np.inf)
    mark = {"md": "**{}**", "csv": "{}*", "latex": "\\textbf{{{}}}", "html": "<b>{}</b>"}[fmt]
    header = [f"{d} {m.upper()}" for d, m in mean.columns]
    body = []
    for attack in mean.index:
        row = []
        for col in mean.columns:
            ci = (lo.at[attack, col], hi.at[attack, col]) if lo is not None and hi is not None else (np.nan, np.nan)
            text = format_cell(mean.at[attack, col], std.at[attack, col], *ci)
            if not ok.at[attack, col[0]] and text != "-":
                text += "†"
            if fmt == "latex":
                text = text.replace("±", "$\\pm$").replace("†", "$^\\dagger$")
            if fmt == "html":
                text = _html.escape(text)
            row.append(mark.format(text) if best.at[attack, col] else text)
        body.append((str(attack), row))
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([csv_safe(v) for v in ["attack", *header]])
        writer.writerows([csv_safe(v) for v in [a, *row]] for a, row in body)
        return buf.getvalue()
    if fmt == "md":
        lines = ["| attack | " + " | ".join(header) + " |", "|" + "---|" * (len(header) + 1)]
        lines += ["| " + " | ".join([a, *row]) + " |" for a, row in body]
        notes = [] if acc_drop is None else [bound_note(acc_drop)]
        if lo is not None:
            notes.append(interval_note(lo.attrs.get("levels", ("test images",))))
        return "\n".join(lines) + "\n" + "".join(f"\n{n}\n" for n in notes)
    if fmt == "latex":
        lines = ["\\begin{tabular}{l" + "r" * len(header) + "}", "\\toprule",
                 " & ".join(["attack", *map(latex_escape, header)]) + " \\\\", "\\midrule"]
        lines += [" & ".join([latex_escape(a), *row]) + " \\\\" for a, row in body]
        lines += ["\\bottomrule", "\\end{tabular}"]
        return "\n".join(lines) + "\n"
    lines = ["<table>", "<tr><th>attack</th>" + "".join(f"<th>{_html.escape(h)}</th>" for h in header) + "</tr>"]
    lines += ["<tr><td>" + _html.escape(a) + "</td>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for a, row in body]
    lines.append("</table>")
    return "\n".join(lines) + "\n"


def plot_acc_vs_asr(records: Iterable[RunRecord], path: str | Path, title: str = "") -> Path:
    """Scatter of clean ACC against ASR after defense, one colour per defense, one point per attack x seed."""
    plain_text_plots()
    import matplotlib.pyplot as plt

    records = list(records)
    df = records_frame(records)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for defense in ordered(df["defense"], grid_order(records, "defenses")):
        sub = df[df["defense"] == defense]
        ax.scatter(sub["asr"] * 100, sub["acc"] * 100, label=defense, s=40, alpha=0.8)
        for _, row in sub.iterrows():
            ax.annotate(row["attack"], (row["asr"] * 100, row["acc"] * 100), fontsize=6, alpha=0.7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("ASR after defense (%)  (lower is better)")
    ax.set_ylabel("clean ACC after defense (%)  (higher is better)")
    ax.set_title(title or "ACC vs ASR per defense")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # outside: never on points
    fig.tight_layout()
    out = save_figure(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


MAX_ORACLE_CSV_BYTES = 8 * 2**20
"""An oracle sweep CSV holds a row per swept value: a few KiB; anything near this bound is not one."""


def oracle_table(folder: str | Path, attacks: Iterable[str] | None = None) -> str:
    """The oracle sweeps under ``folder`` (CSV files written by the grid or ``defend --sweep``), kept apart from
    the comparison table and labelled: they are scored on the test set and never chose a reported result.
    ``attacks``: keep only those attack labels' rows (a table's ``--attacks``)."""
    files = sorted(Path(folder).rglob("oracle_sweep_*.csv"))
    if not files:
        return ""
    frames = []
    for f in files:
        try:  # a regular file inside the folder, bounded: a FIFO or a symlink out of it is refused, never read
            frame = pd.read_csv(io.BytesIO(read_regular(f, MAX_ORACLE_CSV_BYTES, inside=folder)))
            for c in ("acc", "asr", "ra", "der"):
                if c in frame:
                    frame[c] = pd.to_numeric(frame[c], errors="raise")
        except (OSError, UnicodeDecodeError, ValueError, TypeError, pd.errors.ParserError) as err:
            why = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
            raise ValueError(f"{f}: not a readable oracle sweep CSV ({why}); "
                             "expected the CSV `otbr-bench bench`/`defend --sweep` writes, with numeric acc/asr/ra/der "
                             "columns") from None
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True)
    if attacks is not None and "attack" in df:
        df = df[df["attack"].astype(str).isin(set(attacks))]
        if df.empty:
            return ""
    keep = [c for c in df.columns if c not in ("diagnostic", "defense_seconds")]
    df = df[keep]
    for c in ("acc", "asr", "ra", "der"):
        if c in df:
            df[c] = (df[c] * 100).round(2)
    lines = ["ORACLE DIAGNOSTIC (scored on the test set; not used for any reported result)", "",
             "| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"
