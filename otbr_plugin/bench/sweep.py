"""Oracle sweeps: score a defense at several values of one config field on the *test* set.

This is a diagnostic, never a way to pick a reported result: the published OTBR code chooses gamma by
looking at test accuracy and ASR, which a real defender cannot do. The sweep runs *after* the reported run,
writes its own files (``oracle_sweep_<key>.csv`` / ``.png``, every row and the plot labelled
"oracle diagnostic (test set)") and leaves ``record.json`` and the defended model untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import yaml

from ..bundle import Bundle
from ..config import parse_yaml
from ..data import ImageDataset
from ..defenses.base import ORACLE_LABEL, Defense
from ..io import plain_text_plots, save_figure, write_csv
from ..metrics import BackdoorMetrics
from .runner import run_defense

__all__ = ["ORACLE_LABEL", "parse_sweep", "sweep_defenses", "oracle_sweep", "write_sweep"]


def parse_sweep(spec: str) -> tuple[str, list[Any]]:
    """``"gamma=0.01,0.05,0.1"`` -> ``("gamma", [0.01, 0.05, 0.1])`` (values parsed as YAML scalars)."""
    if "=" not in spec:
        raise ValueError(f"--sweep {spec!r} is not of the form key=v1,v2,...")
    key, raw = spec.split("=", 1)
    key = key.strip()
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    if not key or not parts:
        raise ValueError(f"--sweep {spec!r} needs a key and at least one value, e.g. gamma=0.01,0.05,0.1")
    return key, [parse_yaml(p) for p in parts]


def sweep_defenses(defense: Defense, key: str, values: Sequence[Any]) -> list[Defense]:
    """One defense per value (config copied with ``key`` replaced); bad keys/values fail before anything runs."""
    fields = defense.config.to_dict()
    if key not in fields:
        raise ValueError(f"--sweep: {defense.name} has no config field {key!r}; fields: {', '.join(sorted(fields))}")
    defenses = [type(defense)(defense.config.replace(**{key: v})) for v in values]
    for d in defenses:  # the Defense hook: e.g. OTBR reuses its unlearning stage when it is unchanged
        d.share_work_with(defense)
    return defenses


def oracle_sweep(bundle: Bundle, defenses: Sequence[Defense], key: str, *, clean_test: ImageDataset,
                 before: BackdoorMetrics, data_root=None, device="auto", seed: int = 0, clean_ratio: float = 0.05,
                 progress: bool = True) -> pd.DataFrame:
    """Run each defense and score it on the test set; one row per value."""
    rows = []
    for d in defenses:
        run = run_defense(bundle, d, data_root=data_root, device=device, seed=seed, clean_ratio=clean_ratio,
                          progress=progress, clean_test=clean_test, before=before)
        rows.append({
            key: getattr(d.config, key),
            "acc": run.after.acc, "asr": run.after.asr, "ra": run.after.ra, "der": run.der,
            "num_pruned": run.outcome.units_removed,  # column name kept for the committed sweep CSVs
            "defense_seconds": run.seconds.get("defense_total"),
            "diagnostic": ORACLE_LABEL,
        })
    return pd.DataFrame(rows)


def write_sweep(table: pd.DataFrame, out_dir: str | Path, key: str, *, reported_value: Any,
                before: BackdoorMetrics, title: str = "") -> dict[str, Path]:
    """Write ``oracle_sweep_<key>.csv`` and a plot of ACC/ASR/RA against ``key`` (atomically)."""
    plain_text_plots()
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / f"oracle_sweep_{key}.csv", out / f"oracle_sweep_{key}.png"
    write_csv(csv_path, table)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = table[key].astype(float)
    for col, label, color in (("acc", "ACC", "tab:blue"), ("asr", "ASR", "tab:red"), ("ra", "RA", "tab:green")):
        ax.plot(x, table[col] * 100, marker="o", label=f"{label} after", color=color)
    ax.axhline(before.acc * 100, color="tab:blue", ls=":", lw=1, label="ACC before")
    ax.axhline(before.asr * 100, color="tab:red", ls=":", lw=1, label="ASR before")
    try:
        ax.axvline(float(reported_value), color="k", ls="--", lw=1, label=f"reported {key}={reported_value} (config)")
    except (TypeError, ValueError):
        pass
    ax.set_xlabel(key)
    ax.set_ylabel("% of test samples")
    ax.set_ylim(-2, 102)
    ax.set_title(f"ORACLE DIAGNOSTIC (test set) - not used to choose the reported result\n{title}", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, png_path, dpi=120)
    plt.close(fig)
    return {"sweep_csv": csv_path, "sweep_png": png_path}
