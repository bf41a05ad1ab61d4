"""``otbr-bench diagnose``: the paper's own analyses on one checkpoint, written as CSVs, PNGs and summary.md.

1. NWC of random unlearning (the defense's own stage 1-2) against NWC of *poison unlearning* (the same ascent
   loop on the checkpoint's poisoned training samples with their poisoned labels) and of *clean unlearning*
   (on clean training samples): Pearson/Spearman per layer and overall, ROC AUC of random NWC for the top 5%
   neurons by poison NWC, scatter plots (paper Fig. 1).
2. ORACLE DIAGNOSTIC (test set): ACC/ASR/RA of the pruned-only and the fused model over a gamma x lambda grid
   (paper Fig. 5). NWC is computed once; each cell calls :func:`~otbr_plugin.otbr.pipeline.prune_and_fuse`.
3. Pruned neurons per layer, and neuron weight L2 norms of the backdoored, pruned and fused models (Fig. 4).

This module joins the pieces (checkpoint, datasets, attack, OTBR config, metrics) and writes files; the
analyses themselves are the pure functions of :mod:`otbr_plugin.otbr.diagnostics`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from torch import nn

from benchmark_adapters.bundle import Bundle
from ..attacks import restore_attack
from ..data import ImageDataset, PoisonedTestSet, load_dataset, to_float
from ..data.specs import get_dataset_spec
from ..defenses.base import StageTimer, build_context
from ..io import atomic_dir
from ..defenses.otbr import OTBRDefense
from ..otbr.auto import auto_gamma, auto_lam
from ..otbr.diagnostics import (
    data_unlearning,
    neuron_table,
    nwc_correlation,
    pruned_counts,
    top_neuron_auc,
    weight_norms,
)
from ..otbr.pipeline import prune_and_fuse
from ..otbr.unlearning import neuron_weight_change, target_layer_names
from ..runtime import seed_everything
from ..metrics import BackdoorMetrics
from ..bench.runner import evaluate_model

__all__ = ["ORACLE_TITLE", "ORACLE_PREFIX", "DEFAULT_GAMMAS", "DEFAULT_LAMS", "UnlearningSet", "Diagnosis",
           "poisoned_training_samples", "clean_training_samples", "diagnose", "write_diagnosis", "check_out_dir"]

ORACLE_TITLE = "ORACLE DIAGNOSTIC (test set)"
ORACLE_PREFIX = "oracle_diagnostic_test_set"
DEFAULT_GAMMAS = (0.01, 0.05, 0.1, 0.2, 0.3)
DEFAULT_LAMS = (0.25, 0.5, 0.75, 1.0)


@dataclass
class UnlearningSet:
    """Samples for data unlearning: uint8 images and the labels ascended on, or None with the reason."""

    images: torch.Tensor | None
    labels: torch.Tensor | None
    source: str
    note: str = ""

    @property
    def available(self) -> bool:
        return self.images is not None and self.images.shape[0] > 0


@dataclass
class Diagnosis:
    """Everything the analyses produced (tables, numbers, models for the plots)."""

    bundle: Bundle
    config: dict[str, Any]
    layers: list[str]
    before: BackdoorMetrics
    nwc: pd.DataFrame                       # one row per neuron, columns nwc_random/nwc_poison/nwc_clean
    correlation: pd.DataFrame               # comparison, layer, neurons, pearson, spearman
    auc: list[dict[str, Any]]               # one entry per ranking compared with poison NWC
    grid: pd.DataFrame                      # ORACLE: gamma, lam, model, acc, asr, ra, pruned
    pruned: pd.DataFrame                    # gamma, layer, neurons, pruned, share
    norms: pd.DataFrame                     # model, layer, neuron, norm at the config's gamma and lam
    gamma: float
    lam: float
    sets: dict[str, UnlearningSet]
    losses: dict[str, list[float]]
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    evaluated_on: str = ""


# --------------------------------------------------------------------------------------------------------
# samples to unlearn
# --------------------------------------------------------------------------------------------------------
def _subsample(n: int, limit: int, seed: int) -> torch.Tensor:
    if n <= limit:
        return torch.arange(n)
    return torch.sort(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit]).values


def poisoned_training_samples(bundle: Bundle, train: ImageDataset | None, limit: int, seed: int = 0, *,
                              trust: bool = False) -> UnlearningSet:
    """The checkpoint's poisoned training samples with their poisoned labels (at most ``limit``, seeded).

    A bundle: rebuilt from its attack config (``bundle.attack``) and its poisoned indices
    (``extra.safetensors:poison_indices``) on the training split. A BackdoorBench record: its ``bd_train``
    PNGs. Otherwise (no indices, unknown attack, no bd_train) no samples and a note saying why."""
    from benchmark_adapters.backdoorbench import AttackResultError, is_record, poisoned_train_set

    if bundle.path is not None and is_record(bundle.path):
        try:
            bd = poisoned_train_set(bundle.path, trust=trust, max_samples=limit, seed=seed)
        except AttackResultError as err:
            return UnlearningSet(None, None, "backdoorbench bd_train", f"poison unlearning skipped: {err}")
        if bd is None:
            return UnlearningSet(None, None, "backdoorbench bd_train",
                                 "poison unlearning skipped: the BackdoorBench record has no bd_train set")
        return UnlearningSet(bd.images, bd.targets, "backdoorbench bd_train",
                             f"{bd.images.shape[0]} samples of the record's bd_train")
    idx = bundle.tensors.get("poison_indices")
    name = str(bundle.attack.get("name", ""))
    if idx is None:
        return UnlearningSet(None, None, "attack rebuild",
                             "poison unlearning skipped: the checkpoint records no poisoned training indices "
                             "(extra.safetensors:poison_indices)")
    try:
        attack = restore_attack(bundle.attack, bundle.tensors)  # a learned trigger comes from the bundle's state
    except ValueError as err:
        return UnlearningSet(None, None, "attack rebuild", f"poison unlearning skipped: {err}")
    if train is None:
        return UnlearningSet(None, None, "attack rebuild",
                             "poison unlearning skipped: the training split was not found")
    idx = idx.long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(train)):
        raise ValueError(f"poisoned indices of {bundle.path} lie outside the training split ({len(train)} samples)")
    idx = idx[_subsample(idx.numel(), limit, seed)]
    images = attack.poison_train_images(train.images[idx])
    labels = train.labels[idx].clone()
    if not attack.clean_label:
        labels = attack.targets(labels, train.spec.num_classes)
    return UnlearningSet(images, labels, f"{name} rebuilt on the training split",
                         f"{idx.numel()} of {bundle.tensors['poison_indices'].numel()} poisoned training samples")


def clean_training_samples(bundle: Bundle, train: ImageDataset | None, limit: int, seed: int = 0) -> UnlearningSet:
    """Clean training samples with their true labels (seeded, at most ``limit``), the poisoned ones left out."""
    if train is None:
        return UnlearningSet(None, None, "training split", "clean unlearning skipped: the training split was not found")
    keep = torch.ones(len(train), dtype=torch.bool)
    for key in ("poison_indices", "cross_indices"):
        idx = bundle.tensors.get(key)
        if idx is not None and idx.numel():
            keep[idx.long().clamp(0, len(train) - 1)] = False
    pool = torch.nonzero(keep).flatten()
    pool = pool[_subsample(pool.numel(), limit, seed + 1)]
    return UnlearningSet(train.images[pool], train.labels[pool].clone(), "training split",
                         f"{pool.numel()} clean training samples")


# --------------------------------------------------------------------------------------------------------
# the analyses
# --------------------------------------------------------------------------------------------------------
def diagnose(
    bundle: Bundle,
    defense: OTBRDefense,
    *,
    clean_test: ImageDataset,
    train: ImageDataset | None,
    gammas: Sequence[float] = DEFAULT_GAMMAS,
    lams: Sequence[float] = DEFAULT_LAMS,
    unlearn_samples: int | None = None,
    device: torch.device = torch.device("cpu"),
    seed: int = 0,
    progress: bool = True,
    trust: bool = False,
    top: float = 0.05,
    eval_samples: int | None = 2000,
    log=print,
) -> Diagnosis:
    """Run every analysis on ``bundle`` with ``defense``'s config (see the module docstring).

    ``eval_samples``: the grid's ACC/ASR/RA (and the backdoored model's) are measured on a seeded random subset
    of this many clean and this many poisoned test samples (None or 0: the whole test sets). Evaluation is
    most of the command's cost: 26 evaluations for the default 5 x 4 grid."""
    from tqdm import tqdm

    cfg = defense.config
    timer = StageTimer()
    spec = get_dataset_spec(bundle.dataset)
    limit = int(unlearn_samples) if unlearn_samples else cfg.unlearn_steps * cfg.unlearn_batch_size
    notes: list[str] = []
    full = (len(clean_test), len(bundle.bd_test))
    if eval_samples:
        clean_test = clean_test.subset(_subsample(len(clean_test), eval_samples, seed + 2))
        bd = bundle.bd_test
        keep = _subsample(len(bd), eval_samples, seed + 3)
        bundle = dataclasses.replace(bundle, bd_test=PoisonedTestSet(bd.images[keep], bd.targets[keep],
                                                                     bd.original_labels[keep],
                                                                     bd.original_indices[keep]))
    evaluated_on = (f"{len(clean_test)} of {full[0]} clean and {len(bundle.bd_test)} of {full[1]} poisoned "
                    "test samples" + (f" (seeded subsets, seed {seed})" if eval_samples else ""))
    seed_everything(seed)
    model = bundle.build_model().to(device).eval()
    layers = target_layer_names(model, cfg.include_shortcut, cfg.include_linear)
    context = build_context(defense, num_classes=bundle.model_config.num_classes, input_shape=spec.input_shape,
                            normalizer=bundle.normalizer, device=device, seed=seed, progress=progress,
                            dataset=spec.name)
    with timer("evaluate_backdoored"):
        before = evaluate_model(model, bundle, clean_test, device)

    nwc: dict[str, dict[str, torch.Tensor]] = {}
    losses: dict[str, list[float]] = {}
    log("random unlearning (the defense's own stage 1-2)")
    nwc["random"], losses["random"], _ = defense.random_nwc(model, context, layers, timer)

    with timer("load_unlearning_samples"):
        sets = {"poison": poisoned_training_samples(bundle, train, limit, seed, trust=trust),
                "clean": clean_training_samples(bundle, train, limit, seed)}
    for offset, (name, samples) in enumerate(sets.items(), start=1):
        if not samples.available:
            notes.append(samples.note)
            log(samples.note)
            continue
        log(f"{name} unlearning on {samples.note}")
        with timer(f"{name}_unlearning"):
            inputs = bundle.normalizer(to_float(samples.images))
            result = data_unlearning(model, inputs, samples.labels, generator=context.generator(100 + offset),
                                     device=device, progress=context.progress_bar if progress else None,
                                     desc=f"{name} unlearning", **cfg.unlearning_options())
            nwc[name] = neuron_weight_change(model, result.model, layers, cfg.nwc_accumulate())
            losses[name] = result.losses
            del result, inputs

    with timer("correlation"):
        pairs = [("random", "poison"), ("random", "clean"), ("clean", "poison")]
        tables = []
        for a, b in pairs:
            if a in nwc and b in nwc:
                t = nwc_correlation(nwc[a], nwc[b], layers)
                t.insert(0, "comparison", f"{a}_vs_{b}")
                tables.append(t)
        correlation = (pd.concat(tables, ignore_index=True) if tables
                       else pd.DataFrame(columns=["comparison", "layer", "neurons", "pearson", "spearman"]))
        auc = []
        if "poison" in nwc:
            for name in ("random", "clean"):
                if name in nwc:
                    auc.append({"ranking": f"{name}_nwc", "reference": "poison_nwc",
                                **top_neuron_auc(nwc[name], nwc["poison"], top, layers)})
        table = neuron_table(nwc, layers)

    with timer("scores"):
        scores = cfg.scores(nwc["random"], model, layers)
        gamma = (auto_gamma(scores, cfg.auto_z, cfg.auto_gamma_max)[0] if cfg.gamma == "auto" else float(cfg.gamma))
        lam = auto_lam(gamma, cfg.repair) if cfg.lam == "auto" else float(cfg.lam)
    options = cfg.fusion_options()
    rows, pruned_rows = [], []
    cells = [(g, l) for g in gammas for l in lams]
    bar = tqdm(total=len(cells), desc=f"{ORACLE_TITLE}: gamma x lambda grid", disable=not progress, leave=False)
    for g in gammas:
        pruned_metrics = None
        for l in lams:
            with timer("grid_prune_fuse"):
                res = prune_and_fuse(model, scores, layers, gamma=float(g), lam=float(l), options=options)
            n_pruned = int(sum(int(m.sum()) for m in res.masks.values()))
            with timer("grid_evaluate"):
                if pruned_metrics is None:  # the pruned model does not depend on lambda
                    pruned_metrics = evaluate_model(res.pruned, bundle, clean_test, device)
                    pc = pruned_counts(res.masks, layers)
                    pc.insert(0, "gamma", float(g))
                    pruned_rows.append(pc)
                fused_metrics = evaluate_model(res.model, bundle, clean_test, device)
            for kind, m in (("pruned", pruned_metrics), ("fused", fused_metrics)):
                rows.append({"gamma": float(g), "lam": float(l), "model": kind, "acc": m.acc, "asr": m.asr,
                             "ra": m.ra, "pruned_neurons": n_pruned, "diagnostic": ORACLE_TITLE})
            bar.update(1)
            del res
    bar.close()
    grid = pd.DataFrame(rows, columns=["gamma", "lam", "model", "acc", "asr", "ra", "pruned_neurons", "diagnostic"])

    with timer("weight_norms"):
        res = prune_and_fuse(model, scores, layers, gamma=gamma, lam=lam, options=options)
        pc = pruned_counts(res.masks, layers)
        pc.insert(0, "gamma", gamma)
        pruned_rows.insert(0, pc)
        norms = weight_norms({"backdoored": model, "pruned": res.pruned, "fused": res.model}, layers)
    pruned = pd.concat(pruned_rows, ignore_index=True).drop_duplicates(["gamma", "layer"])
    return Diagnosis(bundle=bundle, config=cfg.to_dict(), layers=layers, before=before, nwc=table,
                     correlation=correlation, auc=auc, grid=grid, pruned=pruned, norms=norms, gamma=gamma, lam=lam,
                     sets=sets, losses=losses, seconds=dict(timer.seconds), notes=notes, evaluated_on=evaluated_on)


# --------------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------------
def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    """``out`` as a Path; an existing non-empty folder is refused unless ``overwrite``."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise FileExistsError(f"--out {p} exists and is not a folder")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {p} exists and is not empty (pass --overwrite to replace it)")
    return p


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _title(d: Diagnosis) -> str:
    b = d.bundle
    return (f"{b.attack.get('name', '?')} / {b.dataset} / {b.model_config.name} (width {b.model_config.width}), "
            f"OTBR setting {d.config['setting']}")


def _plot_scatter(d: Diagnosis, folder: Path) -> list[str]:
    plt = _pyplot()
    written = []
    t = d.nwc
    layer_ids = t["layer"].map({n: i for i, n in enumerate(d.layers)})
    others = [c for c in ("poison", "clean") if f"nwc_{c}" in t]
    if not others:
        return written
    fig, axes = plt.subplots(1, len(others), figsize=(5.6 * len(others), 4.8), squeeze=False,
                             constrained_layout=True)
    for ax, other in zip(axes[0], others):
        sc = ax.scatter(t["nwc_random"], t[f"nwc_{other}"], c=layer_ids, cmap="viridis", s=6, alpha=0.7)
        row = d.correlation[(d.correlation.comparison == f"random_vs_{other}") & (d.correlation.layer == "overall")]
        r = row.iloc[0] if len(row) else None
        ax.set_xlabel("NWC, random unlearning (noise)")
        ax.set_ylabel(f"NWC, {other} unlearning ({other} training samples)")
        ax.set_title(f"random vs {other}: Pearson {_fmt(r.pearson if r is not None else None)}, "
                     f"Spearman {_fmt(r.spearman if r is not None else None)}", fontsize=9)
        ax.grid(alpha=0.3)
    fig.colorbar(sc, ax=axes[0].tolist(), label="layer index (forward order)")
    fig.suptitle(f"Neuron weight change (paper Fig. 1)\n{_title(d)}", fontsize=9)
    fig.savefig(folder / "nwc_scatter.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    written.append("nwc_scatter.png")

    if "nwc_poison" in t:
        n = len(d.layers)
        cols = min(6, n)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.3 * rows), squeeze=False)
        per = d.correlation[d.correlation.comparison == "random_vs_poison"].set_index("layer")
        for i, name in enumerate(d.layers):
            ax = axes[i // cols][i % cols]
            sub = t[t.layer == name]
            ax.scatter(sub["nwc_random"], sub["nwc_poison"], s=5, alpha=0.7)
            ax.set_title(f"{name}\nr={_fmt(per.loc[name, 'pearson'])} rho={_fmt(per.loc[name, 'spearman'])}",
                         fontsize=7)
            ax.tick_params(labelsize=6)
        for j in range(n, rows * cols):
            axes[j // cols][j % cols].axis("off")
        fig.suptitle(f"NWC per layer: random (x) vs poison (y) unlearning\n{_title(d)}", fontsize=9)
        fig.tight_layout()
        fig.savefig(folder / "nwc_scatter_layers.png", dpi=110)
        plt.close(fig)
        written.append("nwc_scatter_layers.png")
    return written


def _plot_heatmaps(d: Diagnosis, folder: Path) -> str:
    plt = _pyplot()
    gammas = sorted(d.grid.gamma.unique())
    lams = sorted(d.grid.lam.unique())
    fig, axes = plt.subplots(2, 3, figsize=(4.0 * 3, 3.2 * 2 + 0.6), squeeze=False)
    for r, kind in enumerate(("pruned", "fused")):
        sub = d.grid[d.grid.model == kind]
        for c, (metric, label) in enumerate((("acc", "ACC"), ("asr", "ASR"), ("ra", "RA"))):
            ax = axes[r][c]
            mat = sub.pivot_table(index="gamma", columns="lam", values=metric).reindex(index=gammas, columns=lams)
            im = ax.imshow(mat.to_numpy() * 100, vmin=0, vmax=100, cmap="RdYlGn_r" if metric == "asr" else "RdYlGn",
                           aspect="auto", origin="lower")
            for i in range(len(gammas)):
                for j in range(len(lams)):
                    ax.text(j, i, f"{mat.iat[i, j] * 100:.1f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(lams)), [f"{v:g}" for v in lams])
            ax.set_yticks(range(len(gammas)), [f"{v:g}" for v in gammas])
            ax.set_xlabel("lambda (fusion weight of the pruned model)")
            ax.set_ylabel("gamma (share pruned)")
            extra = " (independent of lambda)" if kind == "pruned" else ""
            ax.set_title(f"{label} %, {kind} model{extra}", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.046)
    b = d.before
    fig.suptitle(f"{ORACLE_TITLE} - never used to choose a reported result (paper Fig. 5)\n{_title(d)}\n"
                 f"backdoored: ACC {b.acc * 100:.1f}%  ASR {b.asr * 100:.1f}%  RA {b.ra * 100:.1f}%", fontsize=9)
    fig.tight_layout()
    name = f"{ORACLE_PREFIX}_heatmaps.png"
    fig.savefig(folder / name, dpi=110)
    plt.close(fig)
    return name


def _plot_pruned(d: Diagnosis, folder: Path) -> str:
    plt = _pyplot()
    gammas = list(dict.fromkeys(d.pruned.gamma.tolist()))
    x = range(len(d.layers))
    width = 0.8 / max(1, len(gammas))
    fig, ax = plt.subplots(figsize=(max(6.4, 0.45 * len(d.layers)), 4.2))
    for k, g in enumerate(gammas):
        sub = d.pruned[d.pruned.gamma == g].set_index("layer").reindex(d.layers)
        label = f"gamma {g:g}" + (" (config)" if k == 0 else "")
        ax.bar([i - 0.4 + width * (k + 0.5) for i in x], sub["pruned"], width=width, label=label)
    ax.set_xticks(list(x), d.layers, rotation=70, fontsize=6)
    ax.set_ylabel("pruned neurons")
    ax.set_title(f"Pruned neurons per layer (random-unlearning NWC ranking)\n{_title(d)}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "pruned_per_layer.png", dpi=110)
    plt.close(fig)
    return "pruned_per_layer.png"


def _plot_norms(d: Diagnosis, folder: Path) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    mean = d.norms.groupby(["model", "layer"], sort=False)["norm"].mean().unstack("model").reindex(d.layers)
    for model in ("backdoored", "pruned", "fused"):
        axes[0].plot(range(len(d.layers)), mean[model], marker="o", ms=3, label=model)
    axes[0].set_xticks(range(len(d.layers)), d.layers, rotation=70, fontsize=6)
    axes[0].set_ylabel("mean neuron weight L2 norm")
    axes[0].set_title("per layer", fontsize=9)
    axes[0].legend(fontsize=7)
    axes[0].grid(alpha=0.3)
    counts = d.pruned[d.pruned.gamma == d.gamma].set_index("layer")["pruned"].reindex(d.layers)
    layer = counts.idxmax() if counts.max() > 0 else d.layers[0]
    sub = d.norms[d.norms.layer == layer].pivot(index="neuron", columns="model", values="norm")
    sub = sub.sort_values("backdoored", ascending=False)
    for model in ("backdoored", "pruned", "fused"):
        axes[1].plot(range(len(sub)), sub[model], marker=".", lw=0.8, label=model)
    axes[1].set_xlabel("neuron (sorted by backdoored norm)")
    axes[1].set_ylabel("weight L2 norm")
    axes[1].set_title(f"{layer} ({int(counts.get(layer, 0))} pruned)", fontsize=9)
    axes[1].legend(fontsize=7)
    axes[1].grid(alpha=0.3)
    fig.suptitle(f"Neuron weight norms, gamma {d.gamma:g}, lambda {d.lam:g} (paper Fig. 4)\n{_title(d)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "weight_norms.png", dpi=110)
    plt.close(fig)
    return "weight_norms.png"


def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v) if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines)


def summary_data(d: Diagnosis) -> dict[str, Any]:
    """The headline numbers, as plain data (summary.json)."""
    overall = d.correlation[d.correlation.layer == "overall"]
    return {
        "checkpoint": str(d.bundle.path) if d.bundle.path else None,
        "checkpoint_sha256": d.bundle.model_sha256,
        "attack": d.bundle.attack.get("name"),
        "dataset": d.bundle.dataset,
        "model": d.bundle.model_config.to_dict(),
        "config": d.config,
        "gamma": d.gamma,
        "lam": d.lam,
        "backdoored": d.before.to_dict(),
        "evaluated_on": d.evaluated_on,
        "correlation_overall": {r.comparison: {"pearson": r.pearson, "spearman": r.spearman, "neurons": r.neurons}
                                for r in overall.itertuples()},
        "auc": d.auc,
        "unlearning_samples": {k: s.note for k, s in d.sets.items()},
        "unlearning_loss": {k: {"first": v[0], "last": v[-1]} for k, v in d.losses.items()},
        "notes": d.notes,
        "seconds": d.seconds,
        "oracle_grid_label": ORACLE_TITLE,
    }


def _summary_md(d: Diagnosis, files: list[str]) -> str:
    b, bd = d.bundle, d.before
    lines = [f"# OTBR diagnosis: {_title(d)}", "",
             f"- checkpoint: `{b.path}` (model sha256 {str(b.model_sha256)[:16]}...)",
             f"- backdoored model: ACC {bd.acc * 100:.2f}%, ASR {bd.asr * 100:.2f}%, RA {bd.ra * 100:.2f}% "
             f"(on {d.evaluated_on})",
             f"- OTBR config: setting {d.config['setting']}, gamma {d.config['gamma']} (used {d.gamma:g}), "
             f"lambda {d.config['lam']} (used {d.lam:g}), unlearning {d.config['unlearn_steps']} steps x batch "
             f"{d.config['unlearn_batch_size']}, lr {d.config['unlearn_lr']}, momentum {d.config['unlearn_momentum']}",
             f"- unlearning samples: " + "; ".join(f"{k}: {s.note} ({s.source})" for k, s in d.sets.items()), ""]
    if d.notes:
        lines += ["**Notes:** " + " ".join(d.notes), ""]
    lines += ["## NWC: random unlearning vs data unlearning (paper Fig. 1)", "",
              "Overall correlation over all target neurons:", ""]
    overall = d.correlation[d.correlation.layer == "overall"][["comparison", "neurons", "pearson", "spearman"]]
    lines += [_md_table(overall) if len(overall) else "(no data unlearning could run)", ""]
    if d.auc:
        lines += [f"How well each NWC ranks the top {d.auc[0]['top'] * 100:g}% neurons by poison-unlearning NWC "
                  "(ROC AUC; 0.5 = chance):", ""]
        lines += [_md_table(pd.DataFrame(d.auc)[["ranking", "reference", "positives", "neurons", "auc",
                                                 "precision_at_k"]]), ""]
    per = d.correlation[(d.correlation.comparison == "random_vs_poison") & (d.correlation.layer != "overall")]
    if len(per):
        lines += ["Per layer, random vs poison:", "", _md_table(per[["layer", "neurons", "pearson", "spearman"]]), ""]
    lines += [f"## {ORACLE_TITLE}: gamma x lambda grid (paper Fig. 5)", "",
              f"Scored on the TEST set ({d.evaluated_on}); an {ORACLE_TITLE} only, never used to choose a "
              "reported result.", ""]
    fused = d.grid[d.grid.model == "fused"]
    if len(fused):
        best = fused.sort_values(["asr", "acc"], ascending=[True, False]).iloc[0]
        lines += [f"Lowest fused ASR in the grid ({ORACLE_TITLE}): {best.asr * 100:.2f}% at gamma {best.gamma:g}, "
                  f"lambda {best.lam:g} (ACC {best.acc * 100:.2f}%, RA {best.ra * 100:.2f}%).", ""]
        g = d.grid.copy()
        for c in ("acc", "asr", "ra"):
            g[c] = (g[c] * 100).round(2)
        lines += [_md_table(g.drop(columns=["diagnostic"])), ""]
    at = d.pruned[d.pruned.gamma == d.gamma]
    lines += ["## Pruned neurons and weight norms (paper Fig. 4)", "",
              f"At the config's gamma {d.gamma:g}: {int(at.pruned.sum())} of {int(at.neurons.sum())} neurons pruned, "
              f"in {int((at.pruned > 0).sum())} of {len(at)} layers.", "",
              "## Seconds per stage", "", ", ".join(f"{k} {v:.1f}" for k, v in d.seconds.items()), "",
              "## Files", "", *[f"- `{f}`" for f in files], ""]
    return "\n".join(lines)


def write_diagnosis(d: Diagnosis, out: str | Path, overwrite: bool = False) -> Path:
    """Write every table, plot and summary.md into a temporary folder beside ``out``, then rename it to ``out``
    (an existing non-empty ``out`` is refused unless ``overwrite``)."""
    target = check_out_dir(out, overwrite)
    with atomic_dir(target, overwrite=True) as tmp:  # check_out_dir refused a non-empty folder already
        start = time.perf_counter()
        files = []

        def csv(df: pd.DataFrame, name: str) -> None:
            df.to_csv(tmp / name, index=False)
            files.append(name)

        csv(d.nwc, "nwc.csv")
        csv(d.correlation, "nwc_correlation.csv")
        csv(pd.DataFrame(d.auc, columns=["ranking", "reference", "top", "positives", "neurons", "auc",
                                         "precision_at_k"]), "nwc_top_auc.csv")
        csv(d.grid, f"{ORACLE_PREFIX}_grid.csv")
        csv(d.pruned, "pruned_per_layer.csv")
        csv(d.norms, "weight_norms.csv")
        files += _plot_scatter(d, tmp)
        files.append(_plot_heatmaps(d, tmp))
        files.append(_plot_pruned(d, tmp))
        files.append(_plot_norms(d, tmp))
        d.seconds["write"] = time.perf_counter() - start
        (tmp / "summary.json").write_text(json.dumps(summary_data(d), indent=2, default=float))
        files.append("summary.json")
        (tmp / "summary.md").write_text(_summary_md(d, files + ["summary.md"]))
    return target
