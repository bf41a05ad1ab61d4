"""A results report as one self-contained HTML file, from run records only.

``write_report(folder, out)`` reads the run records under ``folder`` (plus, where present, the labelled oracle
sweeps ``oracle_sweep_*.csv`` and the ``otbr-bench diagnose`` outputs ``diagnose*/**/summary.md`` + ``*.png``) and
writes one HTML page: the comparison table (mean ± std over seeds, best per attack and metric marked), the
per-defense summary (mean ACC drop / DER, ranks, seconds per cell; :mod:`.summary`), ACC-vs-ASR
scatter per defense, grouped ACC/ASR/RA bars per attack, the OTBR diagnostics, the oracle sweeps in their own
clearly labelled section, and provenance (versions, configs, checkpoint hashes, device, seconds per cell).
Images are PNGs drawn with matplotlib's Agg backend and embedded as base64, the CSS is inline: the page needs no
network access and no other file. ``render_leaderboard_page`` builds the same kind of page for leaderboard
submissions.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from .records import RunRecord
from ..io import is_inside, plain_text_plots, read_regular
from ..io import write_text as write_text_atomic
from .bootstrap import DEFAULT_BOOT, DEFAULT_BOOT_SEED, levels_text
from .leaderboard import leaderboard_note
from .summary import defense_summary, format_summary
from .tables import (DEFAULT_ACC_DROP, HIGHER_IS_BETTER, METRICS, best_mask, bound_note, comparison_table,
                     eligible_mask, format_cell, grid_order, interval_table, load_records, ordered)

__all__ = ["Section", "render_page", "records_sections", "render_report", "write_report", "find_diagnose_dirs",
           "render_leaderboard_page", "submission_records", "ORACLE_TITLE"]

ORACLE_TITLE = "ORACLE DIAGNOSTIC — scored on the test set, never the reported row"
ARROW = {True: "↑", False: "↓"}
# one colour per defense, the same in every plot (tab10 order; "none" is grey)
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]
_MAX_READ_BYTES = 32 << 20  # a diagnose file larger than this is not embedded
_MAX_EMBED_BYTES = 120_000  # a diagnose PNG larger than this is downscaled before it is embedded

CSS = """
:root{--fg:#1d2330;--muted:#5b6475;--line:#d9dee7;--bg:#f6f7fb;--card:#fff;--best:#d7f5dd;--bestfg:#0b5d1e;
--warn:#fff4d6;--warnline:#e0a800;--accent:#2f5aa8}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 -apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;color:var(--fg);
background:var(--bg)}
header{background:#1f2a44;color:#fff;padding:22px 32px 18px}
header h1{margin:0 0 4px;font-size:22px;font-weight:600}
header p{margin:0;color:#c9d3ea}
nav{background:#2a3757;padding:6px 32px}
nav a{color:#dfe7fb;margin-right:16px;text-decoration:none;font-size:13px}
nav a:hover{text-decoration:underline}
main{max-width:1320px;margin:0 auto;padding:12px 16px 48px}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:14px 16px;margin:16px 0}
section h2{margin:0 0 10px;font-size:18px;color:var(--accent)}
section h3{font-size:15px;margin:16px 0 6px}
p.note,.note{color:var(--muted);font-size:13px}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;font-size:12.5px;margin:6px 0}
th,td{border:1px solid var(--line);padding:3px 5px;text-align:right;white-space:nowrap}
th{background:#eef1f7;font-weight:600}
td:first-child,th:first-child{text-align:left}
tr.average td{font-weight:600;border-top:2px solid #9aa3b5}
td.best{background:var(--best);color:var(--bestfg);font-weight:700}
th.defense{text-align:center;background:#e3e8f3}
td.nodef,th.nodef{color:var(--muted);background:#fafafa}
.scroll{overflow-x:auto}
img{max-width:100%;height:auto;border:1px solid var(--line);border-radius:4px;background:#fff}
.oracle{background:var(--warn);border:2px solid var(--warnline)}
.oracle h2{color:#7a5200}
.badge{display:inline-block;padding:1px 7px;border-radius:10px;background:#e3e8f3;font-size:12px;margin-right:4px}
.badge.ok{background:#d7f5dd;color:#0b5d1e}.badge.failed{background:#fbd5d5;color:#8a1111}
details{margin:6px 0}summary{cursor:pointer;color:var(--accent)}
pre{background:#f3f5f9;border:1px solid var(--line);padding:8px;overflow-x:auto;font-size:12px}
code{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12px}
ul.findings li{margin:2px 0}
.md table{margin:8px 0}
span.ci{display:block;color:var(--muted);font-size:11px}
td.beyond{color:#8a1111}
tr.real td{background:#eef7ee}
"""


@dataclass
class Section:
    """One titled block of the page; ``body`` is trusted HTML built by this module."""

    id: str
    title: str
    body: str
    css_class: str = ""


# ----------------------------------------------------------------------------------------------- helpers
def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _png(fig, dpi: int = 80) -> str:
    """A matplotlib figure as an embedded ``<img>`` (base64 PNG); closes the figure."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    # bbox_inches="tight": the saved image grows to hold every artist (a figure legend below the axes is never clipped)
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.1, pil_kwargs={"optimize": True})
    plt.close(fig)
    return _img(buf.getvalue(), "figure")


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _pyplot():
    plain_text_plots()
    import matplotlib.pyplot as plt

    return plt


def _colors(defenses: Sequence[str]) -> dict[str, str]:
    out, i = {}, 0
    for d in defenses:
        if d == "none":
            out[d] = "#7f7f7f"
        else:
            out[d] = _PALETTE[i % len(_PALETTE)]
            i += 1
    return out


def _frame(records: Iterable[RunRecord]) -> pd.DataFrame:
    """One row per successful record: after-defense metrics in percent plus the before metrics."""
    rows = []
    for r in records:
        if r.status != "ok" or r.metrics_after is None:
            continue
        rows.append({"dataset": r.dataset, "model": r.model.get("name"), "attack": r.attack_name,
                     "defense": r.defense, "seed": r.seed, "acc": r.metrics_after["acc"] * 100,
                     "asr": r.metrics_after["asr"] * 100, "ra": r.metrics_after["ra"] * 100, "der": r.der * 100,
                     "acc_before": r.metrics_before.get("acc", np.nan) * 100,
                     "asr_before": r.metrics_before.get("asr", np.nan) * 100})
    return pd.DataFrame(rows, columns=["dataset", "model", "attack", "defense", "seed", "acc", "asr", "ra", "der",
                                       "acc_before", "asr_before"])


def _groups(records: Sequence[RunRecord]) -> list[tuple[str, str, list[RunRecord]]]:
    """Records split by (dataset, model): one comparison table each."""
    keys = list(dict.fromkeys((r.dataset, str(r.model.get("name"))) for r in records))
    return [(d, m, [r for r in records if (r.dataset, str(r.model.get("name"))) == (d, m)]) for d, m in keys]


# ------------------------------------------------------------------------------------- comparison table
TABLE_CHUNK = 2
"""Defenses (besides ``none``, repeated in each) per comparison table: more defenses wrap into further tables, so the
table fits the page at any number of defenses (12 columns of "mean ± std" over an interval fit its 1320 px)."""


def table_html(records: Sequence[RunRecord], metrics: Sequence[str] = METRICS, *,
               acc_drop: float | None = DEFAULT_ACC_DROP, n_boot: int = DEFAULT_BOOT,
               boot_seed: int = DEFAULT_BOOT_SEED) -> str:
    """The comparison table (percent, mean ± std over seeds, the 95% bootstrap interval under each value where the
    records keep per-sample outcomes) with the best defense per attack and metric marked among those within the
    clean-accuracy bound (``acc_drop`` points; the others' cells carry †). Wraps after :data:`TABLE_CHUNK`
    defenses."""
    mean, std = comparison_table(records, metrics)
    lo, hi = interval_table(records, mean, n_boot, boot_seed)
    best = best_mask(mean, acc_drop)
    ok = eligible_mask(mean, acc_drop if acc_drop is not None else np.inf)
    defenses = list(dict.fromkeys(mean.columns.get_level_values(0)))
    others = [d for d in defenses if d != "none"]
    chunks = [others[i:i + TABLE_CHUNK] for i in range(0, len(others), TABLE_CHUNK)] or [[]]
    tables = []
    for chunk in chunks:
        shown = (["none"] if "none" in defenses else []) + chunk
        head1 = '<tr><th rowspan="2">attack</th>' + "".join(
            f'<th class="defense{" nodef" if d == "none" else ""}" colspan="{len(metrics)}">'
            f'{_e("none (backdoored)" if d == "none" else d)}</th>' for d in shown) + "</tr>"
        head2 = "<tr>" + "".join(f'<th{" class=nodef" if d == "none" else ""}>{m.upper()} '
                                 f'{ARROW[HIGHER_IS_BETTER[m]]}</th>' for d in shown for m in metrics) + "</tr>"
        rows = []
        for attack in mean.index:
            cells = []
            for d in shown:
                for m in metrics:
                    beyond = not ok.at[attack, d]
                    cls = ("best" if best.at[attack, (d, m)] else "nodef" if d == "none" else
                           "beyond" if beyond else "")
                    title = f"{d} {m.upper()} on {attack}" + (" (best)" if cls == "best" else "") + (
                        f" (ACC more than {acc_drop:g} points below the backdoored model's: never best)"
                        if beyond else "")
                    value = format_cell(mean.at[attack, (d, m)], std.at[attack, (d, m)])
                    ci = ""
                    if not pd.isna(lo.at[attack, (d, m)]) and value != "-":
                        ci = f'<span class="ci">[{lo.at[attack, (d, m)]:.2f}, {hi.at[attack, (d, m)]:.2f}]</span>'
                    mark = "†" if beyond and value != "-" else ""
                    cells.append(f'<td class="{cls}" data-defense="{_e(d)}" data-metric="{m}" title="{_e(title)}">'
                                 f"{_e(value)}{mark}{ci}</td>")
            cls = ' class="average"' if str(attack).startswith("average") else ""
            rows.append(f'<tr{cls} data-attack="{_e(attack)}"><td>{_e(attack)}</td>{"".join(cells)}</tr>')
        tables.append(f'<div class="scroll"><table class="comparison">{head1}{head2}{"".join(rows)}</table></div>')
    has_ci = bool(lo.notna().any().any())
    notes = [bound_note(acc_drop)] if acc_drop is not None else []
    levels = tuple(lo.attrs.get("levels", ("test images",)))
    notes.append(("Under each value: its 95% bootstrap interval over test images (resampled from the per-sample "
                  "outcomes the records keep; test-set sampling only, the ± std is the spread over seeds)."
                  if levels == ("test images",) else
                  f"Under each value: its 95% bootstrap interval over {levels_text(levels)} (two-level bootstrap: "
                  "per replicate the seeds drawn with replacement, then the test images, from the per-sample outcomes "
                  "the records keep; the ± std is the spread over seeds).")
                 if has_ci else "No interval: these records keep no per-sample outcomes (written before record "
                 "schema 2).")
    return "".join(tables) + "".join(f"<p class=note>{_e(n)}</p>" for n in notes)


def summary_html(records: Sequence[RunRecord], *, acc_drop: float | None = DEFAULT_ACC_DROP,
                 n_boot: int = DEFAULT_BOOT, boot_seed: int = DEFAULT_BOOT_SEED) -> str:
    """The per-defense summary (``otbr-bench table --by-defense``; :mod:`otbr_plugin.aggregate.summary`): one row per
    defense with its mean ACC drop / ASR / RA / DER, ranks among all and data-free defenses and seconds per cell; the
    mean DER's bootstrap interval where every record of it keeps per-sample outcomes."""
    ci = any(r.per_sample is not None for r in records)
    summary = defense_summary(records, acc_drop, ci, n_boot, boot_seed)
    return '<div class="scroll">' + format_summary(summary, "html", ci) + "</div>"


def differences_html(records: Sequence[RunRecord], metrics: Sequence[str] = ("der", "acc", "asr"), *,
                     n_boot: int = DEFAULT_BOOT, boot_seed: int = DEFAULT_BOOT_SEED) -> str:
    """Which differences between defenses are real: per checkpoint, each pair's difference (A − B, points) with its
    paired 95% bootstrap interval; rows whose interval excludes 0 are marked. Empty without per-sample outcomes."""
    from .compare import paired_comparisons

    df = paired_comparisons(records, metrics, n_boot, boot_seed, order=grid_order(records, "defenses"))
    if df.empty:
        return ""
    real = df[df["significant"]]
    levels = tuple(df.attrs.get("levels", ("test images",)))
    over = ("both defenses scored on the same resampled test images" if levels == ("test images",) else
            f"over {levels_text(levels)}: per replicate each side's seeds drawn with replacement, independently, then "
            "both scored on the same resampled test images")
    covers = ("test-set sampling on this checkpoint" if levels == ("test images",) else
              f"{levels_text(levels)} on this checkpoint")
    noise = "test-set noise" if levels == ("test images",) else "that noise"
    parts = [f"<p class=note>For two defenses on the same backdoored checkpoint: A − B in points and its paired 95% "
             f"bootstrap interval ({over}, {n_boot} replicates). "
             f"<b>Real</b> (green rows): the interval excludes 0. {len(real)} of {len(df)} differences are real; the "
             f"others are within {noise}. Each interval is 95% on its own (no correction for the number of "
             f"comparisons: about 1 in 20 differences that are really 0 comes out real), and it covers {covers}, "
             "not training-seed variance.</p>"]
    for m in metrics:
        sub = df[df["metric"] == m]
        if sub.empty:
            continue
        rows = "".join(
            f'<tr class="{"real" if r.significant else ""}"><td>{_e(r.attack)}</td><td>{r.seed}</td>'
            f"<td>{_e(r.defense_a)}</td><td>{_e(r.defense_b)}</td><td>{r.a:.2f}</td><td>{r.b:.2f}</td>"
            f"<td>{r.diff:+.2f}</td><td>[{r.lo:+.2f}, {r.hi:+.2f}]</td><td>{'yes' if r.significant else 'no'}</td>"
            f"<td>{_e(r.better or '-')}</td></tr>" for r in sub.itertuples(index=False))
        parts.append(f"<h3>{m.upper()} {ARROW[HIGHER_IS_BETTER[m]]}</h3><div class=scroll><table class=differences>"
                     "<tr><th>attack</th><th>seed</th><th>A</th><th>B</th><th>A %</th><th>B %</th><th>A − B</th>"
                     f"<th>95% CI</th><th>real?</th><th>better</th></tr>{rows}</table></div>")
    return "".join(parts)


def _findings(records: Sequence[RunRecord], acc_drop: float | None = DEFAULT_ACC_DROP) -> str:
    """Per attack: the defense with the best DER among those within the clean-accuracy bound, and what it left of
    ACC and ASR (a better DER won by dropping ACC beyond the bound is named beside it)."""
    df = _frame(records)
    base_all = df[df["defense"] == "none"]
    df = df[df["defense"] != "none"]
    if df.empty:
        return ""
    g = df.groupby(["attack", "defense"])[["acc", "asr", "ra", "der"]].mean().reset_index()
    items = []
    for attack in ordered(g["attack"], grid_order(records, "attacks")):
        sub = g[g["attack"] == attack].sort_values("der", ascending=False)
        base = base_all[base_all["attack"] == attack]
        ref = base["acc"].mean() if not base.empty else sub["acc"].max()
        within = sub if acc_drop is None else sub[sub["acc"] >= ref - acc_drop - 1e-9]
        before = f" (backdoored: ACC {base['acc'].mean():.1f}, ASR {base['asr'].mean():.1f})" if not base.empty else ""
        if within.empty:
            items.append(f"<li><b>{_e(attack)}</b>: no defense keeps ACC within {acc_drop:g} points{_e(before)}</li>")
            continue
        top = within.iloc[0]
        beyond = sub.iloc[0]
        extra = ""
        if beyond["defense"] != top["defense"]:
            extra = (f"; {_e(beyond['defense'])} has a higher DER ({beyond['der']:.1f}) but drops ACC to "
                     f"{beyond['acc']:.1f} (beyond the bound)")
        items.append(f"<li><b>{_e(attack)}</b>: best DER <b>{_e(top['defense'])}</b> — ACC {top['acc']:.1f}, "
                     f"ASR {top['asr']:.1f}, RA {top['ra']:.1f}, DER {top['der']:.1f}{_e(before)}{extra}</li>")
    return f'<ul class="findings">{"".join(items)}</ul>'


# -------------------------------------------------------------------------------------------------- plots
def scatter_html(records: Sequence[RunRecord]) -> str:
    """ACC against ASR after defense, one panel per defense; grey hollow markers: the backdoored model."""
    plt = _pyplot()
    df = _frame(records)
    if df.empty:
        return ""
    defenses = [d for d in ordered(df["defense"], grid_order(records, "defenses")) if d != "none"] or ["none"]
    colors = _colors(ordered(df["defense"], grid_order(records, "defenses")))
    attacks = ordered(df["attack"], grid_order(records, "attacks"))
    markers = "osD^vP*Xh"
    g = df.groupby(["attack", "defense"]).agg(acc=("acc", "mean"), asr=("asr", "mean"), acc_sd=("acc", "std"),
                                              asr_sd=("asr", "std"), acc0=("acc_before", "mean"),
                                              asr0=("asr_before", "mean")).reset_index()
    ncol = min(4, len(defenses))
    nrow = (len(defenses) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.3 * ncol, 3.1 * nrow + 0.4), squeeze=False, sharex=True,
                             sharey=True)
    for ax in axes.flat[len(defenses):]:
        ax.set_visible(False)
    for ax, d in zip(axes.flat, defenses):
        ax.axvspan(-2, 20, color="#2ca02c", alpha=0.06)
        for i, a in enumerate(attacks):
            row = g[(g["attack"] == a) & (g["defense"] == d)]
            if row.empty:
                continue
            r = row.iloc[0]
            mk = markers[i % len(markers)]
            ax.scatter([r["asr0"]], [r["acc0"]], marker=mk, facecolors="none", edgecolors="#999", s=36, zorder=2)
            ax.annotate("", xy=(r["asr"], r["acc"]), xytext=(r["asr0"], r["acc0"]),
                        arrowprops={"arrowstyle": "->", "color": "#bbb", "lw": 0.8}, zorder=1)
            ax.errorbar([r["asr"]], [r["acc"]], xerr=None if pd.isna(r["asr_sd"]) else [r["asr_sd"]],
                        yerr=None if pd.isna(r["acc_sd"]) else [r["acc_sd"]], fmt=mk, color=colors[d], ms=7,
                        label=a, zorder=3)
        ax.set_title(d, fontsize=10, color=colors[d], fontweight="bold")
        ax.grid(alpha=0.3)
        ax.set_xlim(-3, 103)
    lo = float(np.nanmin(np.r_[g["acc"], g["acc0"]]))
    hi = float(np.nanmax(np.r_[g["acc"], g["acc0"]]))
    axes.flat[0].set_ylim(max(0.0, min(lo - 3, hi - 15)), min(101.0, hi + 3))  # shared: at least 15 points tall
    for ax in axes[:, 0]:
        ax.set_ylabel("ACC after (%) ↑")
    for ax in axes[-1, :]:
        ax.set_xlabel("ASR after (%) ↓")
    handles = [plt.Line2D([], [], marker=markers[i % len(markers)], ls="", color="#444", label=a)
               for i, a in enumerate(attacks)]
    handles.append(plt.Line2D([], [], marker="o", ls="", markerfacecolor="none", markeredgecolor="#999",
                              label="backdoored (before)"))
    fig.tight_layout()
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(handles), 6), fontsize=8,
               frameon=False)  # below the axes; the tight bbox of _png keeps every row of it
    return _png(fig)


def bars_html(records: Sequence[RunRecord]) -> str:
    """Grouped bars of ACC / ASR / RA after defense, one panel per attack, one bar per defense (± std)."""
    plt = _pyplot()
    df = _frame(records)
    if df.empty:
        return ""
    defenses = ordered(df["defense"], grid_order(records, "defenses"))
    colors = _colors(defenses)
    attacks = ordered(df["attack"], grid_order(records, "attacks"))
    mean = df.groupby(["attack", "defense"])[["acc", "asr", "ra"]].mean()
    std = df.groupby(["attack", "defense"])[["acc", "asr", "ra"]].std()
    ncol = min(4, len(attacks))
    nrow = (len(attacks) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(max(3.3 * ncol, 6.6), 2.8 * nrow + 0.4), squeeze=False, sharey=True)
    for ax in axes.flat[len(attacks):]:
        ax.set_visible(False)
    metrics = ["acc", "asr", "ra"]
    width = 0.8 / max(1, len(defenses))
    for ax, a in zip(axes.flat, attacks):
        for j, d in enumerate(defenses):
            if (a, d) not in mean.index:
                continue
            ys = [mean.at[(a, d), m] for m in metrics]
            es = [0 if pd.isna(std.at[(a, d), m]) else std.at[(a, d), m] for m in metrics]
            xs = np.arange(len(metrics)) - 0.4 + width * (j + 0.5)
            ax.bar(xs, ys, width, yerr=es if any(es) else None, color=colors[d], label=d, capsize=2)
        ax.set_xticks(range(len(metrics)), [f"{m.upper()} {ARROW[HIGHER_IS_BETTER[m]]}" for m in metrics])
        ax.set_title(a, fontsize=10)
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("% after defense")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[d], label="none (backdoored)" if d == "none" else d)
               for d in defenses]
    fig.tight_layout()
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(handles), 8), fontsize=8,
               frameon=False)  # below the axes; the tight bbox of _png keeps every row of it
    return _png(fig)


# --------------------------------------------------------------------------------------------- oracle
def oracle_html(folder: Path, records: Sequence[RunRecord]) -> str:
    """The oracle sweeps (``oracle_sweep_<key>.csv``) under ``folder``: one plot panel per sweep and the table."""
    files = sorted(f for f in folder.rglob("oracle_sweep_*.csv") if embeddable(f, folder))
    if not files:
        return ""
    plt = _pyplot()
    frames = []
    for f in files:
        try:
            df = pd.read_csv(f)
        except (OSError, ValueError, pd.errors.ParserError):
            continue
        key = f.stem[len("oracle_sweep_"):]
        if key in df.columns and {"acc", "asr", "ra"} <= set(df.columns):
            frames.append((key, f, df))
    if not frames:
        return ""
    reported = {(r.attack_name, r.defense, r.seed): r.defense_config for r in records if r.status == "ok"}
    n = len(frames)
    ncol = min(4, n)
    nrow = (n + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.3 * ncol, 2.7 * nrow + 0.5), squeeze=False, sharey=True)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    parts = []
    for ax, (key, f, df) in zip(axes.flat, frames):
        first = df.iloc[0]
        who = (str(first.get("attack", f.parent.name)), str(first.get("defense", "")), int(first.get("seed", 0)))
        x = df[key].astype(float)
        for col, color in (("acc", "tab:blue"), ("asr", "tab:red"), ("ra", "tab:green")):
            ax.plot(x, df[col] * 100, marker="o", ms=3, color=color, label=col.upper())
        rv = reported.get(who, {}).get(key)
        if isinstance(rv, (int, float)):
            ax.axvline(float(rv), color="k", ls="--", lw=1, label=f"reported {key}")
        ax.set_title(f"{who[0]} / {who[1]} (seed {who[2]})", fontsize=9)
        ax.set_xlabel(key)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        show = df[[c for c in df.columns if c not in ("diagnostic", "defense_seconds")]].copy()
        for c in ("acc", "asr", "ra", "der"):
            if c in show:
                show[c] = (show[c] * 100).map(lambda v: f"{v:.2f}")
        rows = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in show.itertuples(index=False))
        parts.append(f"<details><summary>{_e(who[0])} / {_e(who[1])} seed {who[2]}: {_e(key)} sweep "
                     f"({len(df)} values; reported {key} = {_e(rv)})</summary><div class=scroll><table class=oracle-table>"
                     f"<tr>{''.join(f'<th>{_e(c)}</th>' for c in show.columns)}</tr>{rows}</table></div></details>")
    for ax in axes[:, 0]:
        ax.set_ylabel("% of test samples")
    h, lab = axes.flat[0].get_legend_handles_labels()
    fig.suptitle("ORACLE DIAGNOSTIC (test set) — never used to choose a reported result", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.legend(h, lab, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(h), 6), fontsize=8, frameon=False)
    intro = ("<p><b>These numbers are not results.</b> Each sweep scores one hyperparameter of a defense on the "
             "<b>test set</b>, which no defense may see: it shows how much an oracle choice could gain, and where "
             "the a-priori value (dashed line) sits. The comparison table above always uses the configured value.</p>")
    return intro + _png(fig) + "".join(parts)


# ------------------------------------------------------------------------------------------- diagnose
def find_diagnose_dirs(folder: Path) -> list[Path]:
    """Folders written by ``otbr-bench diagnose`` under ``folder``: ``diagnose*/`` (recursively) holding a
    ``summary.md`` that :func:`embeddable` (inside ``folder``, symlinks resolved; a regular file)."""
    out = []
    for d in sorted(p for p in folder.glob("diagnose*") if p.is_dir() and is_inside(p, folder)):
        out += sorted({s.parent for s in d.rglob("summary.md") if embeddable(s, folder)})
    return out


def embeddable(path: Path, folder: Path) -> bool:
    """Whether the report may embed ``path``: a regular file (not a FIFO or device) whose resolved location is
    inside ``folder``, so a symlink planted in a results folder cannot pull a private file into the page."""
    try:
        return is_inside(path, folder) and stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _inline_md(text: str) -> str:
    t = _e(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    t = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)
    return t


def markdown_html(text: str) -> str:
    """A small, safe Markdown subset (headings, pipe tables, lists, code blocks, paragraphs); everything escaped."""
    out, para, lines, i = [], [], text.splitlines(), 0

    def flush() -> None:
        if para:
            out.append(f"<p>{_inline_md(' '.join(para))}</p>")
            para.clear()

    while i < len(lines):
        line = lines[i].rstrip()
        if line.startswith("```"):
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append(f"<pre>{_e(chr(10).join(lines[i + 1:j]))}</pre>")
            i = j + 1
            continue
        m = re.match(r"^(#{1,6})\s+(.*)$", line)
        if m:
            flush()
            level = min(6, len(m.group(1)) + 2)
            out.append(f"<h{level}>{_inline_md(m.group(2))}</h{level}>")
        elif line.startswith("|"):
            flush()
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(re.fullmatch(r":?-{2,}:?", c) for c in cells if c):
                    rows.append(cells)
                i += 1
            if rows:
                body = "".join("<tr>" + "".join(f"<td>{_inline_md(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
                out.append("<div class=scroll><table><tr>" + "".join(f"<th>{_inline_md(c)}</th>" for c in rows[0])
                           + f"</tr>{body}</table></div>")
            continue
        elif re.match(r"^\s*[-*]\s+", line):
            flush()
            items = []
            while i < len(lines) and re.match(r"^\s*[-*]\s+", lines[i]):
                items.append("<li>" + _inline_md(re.sub(r"^\s*[-*]\s+", "", lines[i])) + "</li>")
                i += 1
            out.append(f"<ul>{''.join(items)}</ul>")
            continue
        elif not line.strip():
            flush()
        else:
            para.append(line.strip())
        i += 1
    flush()
    return f'<div class="md">{"".join(out)}</div>'


def _embed_png(path: Path, folder: Path) -> str:
    data = read_regular(path, _MAX_READ_BYTES, inside=folder)
    if len(data) > _MAX_EMBED_BYTES:
        try:
            from PIL import Image

            im = Image.open(io.BytesIO(data))
            scale = (_MAX_EMBED_BYTES / len(data)) ** 0.5
            im = im.convert("RGB").resize((max(1, int(im.width * scale)), max(1, int(im.height * scale))))
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
            data = buf.getvalue()
        except Exception:  # noqa: BLE001 - embed the original rather than nothing
            pass
    return _img(data, path.name)


def diagnose_html(folder: Path) -> str:
    parts = []
    for d in find_diagnose_dirs(folder):
        rel = d.relative_to(folder)
        try:
            summary = read_regular(d / "summary.md", _MAX_READ_BYTES, inside=folder).decode("utf-8", "replace")
            pngs = "".join(f"<figure>{_embed_png(p, folder)}<figcaption class=note>{_e(p.name)}</figcaption></figure>"
                           for p in sorted(d.glob("*.png")) if embeddable(p, folder))
        except (OSError, ValueError):  # changed under us, or too big: not embedded
            continue
        parts.append(f"<h3>{_e(rel)}</h3>{markdown_html(summary)}{pngs}")
    return "".join(parts)


# ------------------------------------------------------------------------------------------ provenance
def _kv_table(pairs: Iterable[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td style='text-align:left'>{v}</td></tr>" for k, v in pairs) + "</table>"


def _model_text(model: dict) -> str:
    m = dict(model)
    text = str(m.pop("name", "?"))
    if "width" in m:
        text += f" width {m.pop('width')}"
    if {"in_channels", "image_size"} <= set(m):
        text += f", input {m.pop('in_channels')}x{m['image_size']}x{m.pop('image_size')}"
    if "num_classes" in m:
        text += f", {m.pop('num_classes')} classes"
    return text + (f", {json.dumps(m, sort_keys=True)}" if m else "")


def _training_text(training: dict | None) -> str:
    """``12.3 min (24.1 CPU-min), cpu, 2 epochs, 1 thread(s)`` from a record's training summary; "-" without one."""
    if not training:
        return "-"
    parts = []
    if isinstance(training.get("minutes"), (int, float)):
        cpu = training.get("cpu_minutes")
        parts.append(f"{training['minutes']:.1f} min" + (f" ({cpu:.1f} CPU-min)" if isinstance(cpu, (int, float)) else ""))
    for k, unit in (("device", ""), ("epochs", " epochs"), ("torch_threads", " thread(s)")):
        if training.get(k) is not None:
            parts.append(f"{training[k]}{unit}")
    return ", ".join(parts) or "-"


def provenance_html(records: Sequence[RunRecord]) -> str:
    """Versions, devices, configs, checkpoint hashes and seconds per cell, all from the run records."""
    parts = []
    versions: dict[str, set] = {}
    for r in records:
        for k, v in (r.versions or {}).items():
            versions.setdefault(k, set()).add(str(v))
    devices = sorted({str(r.device) for r in records})
    stamps = sorted(r.timestamp for r in records if r.timestamp)
    pairs = [(k, _e(", ".join(sorted(v)))) for k, v in sorted(versions.items())]
    pairs += [("device", _e(", ".join(devices))), ("records", _e(len(records)))]
    if stamps:
        pairs.append(("run between", _e(f"{stamps[0]} and {stamps[-1]}")))
    parts.append("<h3>Versions and devices</h3>" + _kv_table(pairs))

    ckpts: dict[tuple, RunRecord] = {}
    for r in records:
        ckpts.setdefault((r.attack_name, r.seed, r.checkpoint_sha256), r)
    for r in records:  # a record that knows the training cost stands for its checkpoint
        key = (r.attack_name, r.seed, r.checkpoint_sha256)
        if r.training and not ckpts[key].training:
            ckpts[key] = r
    rows = "".join(
        f"<tr><td>{_e(a)}</td><td>{s}</td><td style='text-align:left'><code>{_e(sha)}</code></td>"
        f"<td style='text-align:left'>{_e(_model_text(r.model))}</td>"
        f"<td>{' '.join(f'{k.upper()} {v * 100:.2f}' for k, v in sorted(r.metrics_before.items()) if isinstance(v, (int, float)))}</td>"
        f"<td style='text-align:left'>{_e(_training_text(r.training))}</td></tr>"
        for (a, s, sha), r in sorted(ckpts.items(), key=lambda kv: (kv[0][0], kv[0][1])))
    known = [r.training for r in ckpts.values() if r.training and isinstance(r.training.get("minutes"), (int, float))]
    total = (f" Training in all: {sum(t['minutes'] for t in known):.1f} min wall"
             + (f", {sum(t.get('cpu_minutes', 0.0) for t in known):.1f} CPU-min" if all('cpu_minutes' in t for t in known)
                else "") + f" for {len(known)} of {len(ckpts)} checkpoint(s)." if known else "")
    parts.append("<h3>Backdoored checkpoints</h3><p class=note>Training cost as the checkpoint's bundle recorded it "
                 "(wall minutes and CPU-minutes on the machine that trained it; \"-\": not recorded, e.g. records "
                 f"written before they carried it).{_e(total)}</p><div class=scroll><table><tr><th>attack</th>"
                 "<th>seed</th><th>model sha256</th><th>model</th><th>before defense (%)</th><th>training</th></tr>"
                 + rows + "</table></div>")

    cell_rows = []
    order = {d: i for i, d in enumerate(ordered((r.defense for r in records), grid_order(records, "defenses")))}
    for r in sorted(records, key=lambda r: (r.attack_name, order[r.defense], r.seed, r.defense_seed or 0)):
        sec = r.seconds or {}
        status = f'<span class="badge {_e(r.status)}">{_e(r.status)}</span>'
        err = f"<br><span class=note>{_e(r.error)}</span>" if r.error else ""
        fmt = lambda k: f"{sec[k]:.1f}" if isinstance(sec.get(k), (int, float)) else "-"  # noqa: E731
        cell_rows.append(f"<tr data-attack='{_e(r.attack_name)}' data-defense='{_e(r.defense)}'><td>{_e(r.attack_name)}</td>"
                         f"<td>{_e(r.defense)}</td><td>{_e(r.seed_label)}</td><td>{status}{err}</td><td>{_e(r.device)}</td>"
                         f"<td>{_e(r.data_used)}</td><td>{fmt('cell_total')}</td><td>{fmt('defense_total')}</td>"
                         f"<td>{fmt('evaluation')}</td><td>{_e(r.timestamp)}</td></tr>")
    total = sum(float((r.seconds or {}).get("cell_total", 0) or 0) for r in records)
    parts.append(f"<h3>Cells</h3><p class=note>Seconds as recorded by the run (wall time on the machine that ran it; "
                 f"{total / 60:.1f} min of defense cells in all, attack training not included).</p>"
                 "<div class=scroll><table><tr><th>attack</th><th>defense</th><th>seed</th><th>status</th><th>device</th>"
                 "<th>data used</th><th>s / cell</th><th>s defense</th><th>s evaluation</th><th>time stamp</th></tr>"
                 + "".join(cell_rows) + "</table></div>")

    cfg_parts = []
    seen = set()
    for r in records:
        key = ("defense", r.defense, json.dumps(r.defense_config, sort_keys=True))
        if key not in seen:
            seen.add(key)
            cfg_parts.append(f"<details><summary>defense <b>{_e(r.defense)}</b> ({_e(r.attack_name)}, seed {r.seed})"
                             f"</summary><pre>{_e(json.dumps(r.defense_config, indent=1, sort_keys=True))}</pre></details>")
    for r in records:
        key = ("attack", r.attack_name, json.dumps(r.attack, sort_keys=True, default=str))
        if key not in seen:
            seen.add(key)
            cfg_parts.append(f"<details><summary>attack <b>{_e(r.attack_name)}</b> (seed {r.seed})</summary>"
                             f"<pre>{_e(json.dumps(r.attack, indent=1, sort_keys=True, default=str))}</pre></details>")
    parts.append("<h3>Configs (resolved, as recorded)</h3>" + "".join(cfg_parts))
    return "".join(parts)


# -------------------------------------------------------------------------------------------------- page
def render_page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """A complete, self-contained HTML document (inline CSS, embedded images, no scripts, no network)."""
    nav = "".join(f'<a href="#{_e(s.id)}">{_e(s.title.split(" — ")[0])}</a>' for s in sections)
    body = "".join(f'<section id="{_e(s.id)}" class="{_e(s.css_class)}"><h2>{_e(s.title)}</h2>{s.body}</section>'
                   for s in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{_e(title)}</title>'
            f"<style>{CSS}</style></head><body><header><h1>{_e(title)}</h1><p>{subtitle}</p></header>"
            f"<nav>{nav}</nav><main>{body}</main></body></html>\n")


def records_sections(records: Sequence[RunRecord], folder: Path | None = None,
                     unreadable: Sequence[tuple[Path, str]] = (), *, acc_drop: float | None = DEFAULT_ACC_DROP,
                     n_boot: int = DEFAULT_BOOT, boot_seed: int = DEFAULT_BOOT_SEED) -> list[Section]:
    """The report's sections for a set of run records (and, with ``folder``, its diagnose and oracle outputs);
    ``unreadable``: record files that could not be read (listed under "Failed cells"); ``acc_drop``: the clean-accuracy
    bound of the best marks (points); ``n_boot``/``boot_seed``: the bootstrap's replicates and seed."""
    ok = [r for r in records if r.status == "ok"]
    sections = []
    multi = len(_groups(ok)) > 1
    for dataset, model, recs in _groups(ok):
        suffix = f" — {dataset} / {model}" if multi else ""
        sid = re.sub(r"[^a-z0-9]+", "-", f"{dataset}-{model}".lower()) if multi else ""
        widths = sorted({str(r.model.get("width", "")) for r in recs} - {""})
        seeds = sorted({r.seed for r in recs})
        dseeds = sorted({r.defense_seed for r in recs if r.defense_seed is not None})
        info = (f"<p class=note>{_e(dataset)}, {_e(model)}{' width ' + _e(', '.join(widths)) if widths else ''}; "
                f"seeds {_e(', '.join(map(str, seeds)))}"
                + (f", defense seeds {_e(', '.join(map(str, dseeds)))}" if dseeds else "")
                + " (mean ± std over seeds where there are several); after-defense "
                "metrics in percent. <b>Green</b>: the best defense per attack and metric among those within the "
                "clean-accuracy bound stated under the table (the backdoored model, <i>none</i>, is never marked). "
                "↑ higher is better, ↓ lower is better. DER = (max(0, ΔASR) − "
                "max(0, ΔACC) + 1) / 2.</p>")
        sections.append(Section(f"table{'-' + sid if sid else ''}", "Comparison table" + suffix,
                                info + table_html(recs, acc_drop=acc_drop, n_boot=n_boot, boot_seed=boot_seed)
                                + _findings(recs, acc_drop)))
        sections.append(Section(f"summary{'-' + sid if sid else ''}", "Per-defense summary" + suffix,
                                summary_html(recs, acc_drop=acc_drop, n_boot=n_boot, boot_seed=boot_seed)))
        diffs = differences_html(recs, n_boot=n_boot, boot_seed=boot_seed)
        if diffs:
            sections.append(Section(f"differences{'-' + sid if sid else ''}", "Which differences are real" + suffix,
                                    diffs))
        sections.append(Section(f"scatter{'-' + sid if sid else ''}", "ACC vs ASR per defense" + suffix,
                                "<p class=note>Each panel one defense; each marker one attack (mean over seeds). The "
                                "arrow starts at the backdoored model (hollow grey). Top left (shaded: ASR below 20%) is "
                                "where a good defense lands.</p>" + scatter_html(recs)))
        sections.append(Section(f"bars{'-' + sid if sid else ''}", "ACC / ASR / RA per attack" + suffix,
                                "<p class=note>After-defense metrics per attack, one bar per defense (± std over "
                                "seeds).</p>" + bars_html(recs)))
    failed = [r for r in records if r.status != "ok"]
    if failed or unreadable:
        items = "".join(f"<li>{_e(r.attack_name)}/{_e(r.defense)}/seed{r.seed}: {_e(r.error)}</li>" for r in failed)
        items += "".join(f"<li>unreadable record <code>{_e(p)}</code>: {_e(why)}</li>" for p, why in unreadable)
        sections.append(Section("failed", "Failed cells", f"<p>Not in the table:</p><ul>{items}</ul>"))
    if folder is not None:
        diag = diagnose_html(folder)
        if diag:
            sections.append(Section("diagnostics", "OTBR diagnostics",
                                    "<p class=note>From <code>otbr-bench diagnose</code> (its summary and plots, as "
                                    "written).</p>" + diag))
        oracle = oracle_html(folder, records)
        if oracle:
            sections.append(Section("oracle", ORACLE_TITLE, oracle, css_class="oracle"))
    sections.append(Section("provenance", "Provenance", provenance_html(records)))
    return sections


def render_report(folder: str | Path, title: str | None = None,
                  unreadable: list[tuple[Path, str]] | None = None, **stats: Any) -> str:
    """The HTML report for the run records under ``folder`` (as a string). Record files that cannot be read are
    listed in its "Failed cells" section and appended to ``unreadable`` when given. ``stats``: ``acc_drop``,
    ``n_boot``, ``boot_seed`` (see :func:`records_sections`)."""
    root = Path(folder)
    found: list[tuple[Path, str]] = []
    records = load_records(root, found)
    if unreadable is not None:
        unreadable.extend(found)
    if not records:
        raise ValueError(f"{root}: no run records found (expected records/*.json from `otbr-bench bench`)")
    if not any(r.status == "ok" for r in records):
        raise ValueError(f"{root}: every run record failed; nothing to report")
    datasets = ", ".join(dict.fromkeys(r.dataset for r in records))
    attacks = ordered((r.attack_name for r in records), grid_order(records, "attacks"))
    defenses = ordered((r.defense for r in records), grid_order(records, "defenses"))
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = (f"{_e(datasets)} · {len(attacks)} attack(s): {_e(', '.join(attacks))} · {len(defenses)} defense(s): "
                f"{_e(', '.join(defenses))} · {len(records)} run record(s) from <code>{_e(root)}</code> · "
                f"generated {now} by otbr-bench report")
    return render_page(title or f"Backdoor defense report: {root.name}", subtitle,
                       records_sections(records, root, found, **stats))


def write_report(folder: str | Path, out: str | Path | None = None, title: str | None = None,
                 unreadable: list[tuple[Path, str]] | None = None, **stats: Any) -> Path:
    """Write the report atomically (temporary file + rename); default ``<folder>/report.html``. ``unreadable``: as
    for :func:`render_report`."""
    target = Path(out) if out else Path(folder) / "report.html"
    return write_text_atomic(target, render_report(folder, title, unreadable, **stats))  # the io helper keeps the umask mode


# ----------------------------------------------------------------------------------------- leaderboard
def submission_records(submissions: Sequence[dict]) -> list[RunRecord]:
    """Leaderboard entries as run records; each defense is labelled ``<method>: <defense>`` so that methods are
    columns of one comparison table (the backdoored model stays ``none``)."""
    out = []
    for sub in submissions:
        method = sub["method"]["name"]
        for e in sub["entries"]:
            label = "none" if e["defense"] == "none" else f"{method}: {e['defense']}"
            out.append(RunRecord(dataset=e["dataset"], model=e["model"], attack=e["attack"], defense=label,
                                 defense_config=e["defense_config"], seed=e["seed"],
                                 checkpoint_sha256=e["checkpoint_sha256"], metrics_before=e["metrics_before"],
                                 metrics_after=e["metrics_after"], der=e["der"], data_used=e["data_used"],
                                 seconds=e.get("seconds", {}), versions=dict(sub.get("versions", {})),
                                 per_sample=e.get("per_sample"), defense_seed=e.get("defense_seed"),
                                 timestamp=str(sub.get("created", ""))))
    return out


def render_leaderboard_page(submissions: Sequence[dict], board: pd.DataFrame, title: str = "Leaderboard") -> str:
    """The HTML page for ``otbr-bench leaderboard build --html``: the ranked board, then the same comparison
    table, plots and provenance as the report, over every submission's entries."""
    cols = list(board.columns)
    best_der = board["der"].where(board["defense"] != "none").groupby([board["dataset"], board["model"]]).transform("max")
    rows = []
    for (_, row), top in zip(board.iterrows(), best_der):
        cells = "".join(f'<td class="{"best" if c == "der" and row[c] == top else ""}">{_e(row[c])}</td>' for c in cols)
        rows.append(f"<tr>{cells}</tr>")
    note = leaderboard_note(board.attrs.get("levels", ("test images",)))
    board_html = ("<p class=note>Mean after-defense metrics (percent) per method and defense, ranked by DER within "
                  "each dataset and model." + (f" {_e(note)}" if note else "")
                  + "</p><div class=scroll><table class=leaderboard><tr>"
                  + "".join(f"<th>{_e(c)}</th>" for c in cols) + "</tr>" + "".join(rows) + "</table></div>")
    subs = "".join(f"<li><b>{_e(s['method']['name'])}</b> by {_e(s['submitter']['name'])} ({_e(s.get('created', ''))}, "
                   f"{len(s['entries'])} entries)</li>" for s in submissions)
    sections = [Section("leaderboard", "Leaderboard", board_html + f"<ul>{subs}</ul>")]
    sections += records_sections(submission_records(submissions))
    subtitle = f"{len(submissions)} submission(s) · generated by otbr-bench leaderboard build"
    return render_page(title, subtitle, sections)
