"""The paper's own analyses, as pure functions: why OTBR works (or fails) on a model.

* :func:`data_unlearning` -- the unlearning loop of random unlearning (same SGD ascent, same steps, lr,
  momentum, batch size), run on given samples instead of noise: on the poisoned training samples with their
  poisoned labels ("poison unlearning", the paper's reference signal) or on clean training samples.
* :func:`nwc_correlation` -- Pearson and Spearman correlation of two NWC maps, per layer and overall
  (the paper's Fig. 1: random-unlearning NWC vs poison-unlearning NWC).
* :func:`top_neuron_auc` -- how well one NWC map ranks the top neurons of another (ROC AUC).
* :func:`neuron_table`, :func:`weight_norms`, :func:`pruned_counts` -- per-neuron tables for plots
  (the paper's Fig. 4: neuron weight norms of the backdoored, pruned and fused models).

Tensors and modules in, numbers and data frames out; the input models are never modified. Nothing here
reads files, configs or test sets -- the ``otbr-bench diagnose`` command does that.
"""

from __future__ import annotations

import math
from typing import Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .unlearning import UnlearningResult, gradient_ascent

__all__ = ["data_unlearning", "nwc_correlation", "top_neuron_auc", "neuron_table", "weight_norms",
           "pruned_counts", "flatten_nwc"]


def data_unlearning(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int = 20,
    batch_size: int = 256,
    lr: float = 1e-4,
    momentum: float = 0.9,
    bn_mode: Literal["train", "eval"] = "train",
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    progress=None,
    desc: str = "data unlearning",
) -> UnlearningResult:
    """Gradient ascent on the cross-entropy of ``(inputs, labels)``, on a copy of ``model``.

    ``inputs`` are float tensors already in the model's input space (normalized), ``labels`` int64. Each step
    takes the next ``batch_size`` samples of a seeded random permutation, reshuffled after each pass (all
    samples every step when there are fewer than ``batch_size``). The loop itself is random unlearning's
    (:func:`~otbr_plugin.otbr.unlearning.gradient_ascent`), so the NWCs compare like for like.
    """
    n = int(inputs.shape[0])
    if n == 0:
        raise ValueError("data unlearning needs at least one sample")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = generator or torch.Generator().manual_seed(0)
    labels = labels.long()
    counts = torch.zeros(int(labels.max()) + 1, dtype=torch.long)
    size = min(batch_size, n)

    def batches():
        order, pos = torch.randperm(n, generator=generator), 0
        while True:
            if pos + size > n:
                order, pos = torch.randperm(n, generator=generator), 0
            idx = order[pos:pos + size]
            pos += size
            counts.add_(torch.bincount(labels[idx], minlength=counts.numel()))
            yield inputs[idx], labels[idx]

    unlearned, losses = gradient_ascent(model, batches(), steps=steps, lr=lr, momentum=momentum, bn_mode=bn_mode,
                                        device=device, progress=progress, desc=desc)
    return UnlearningResult(model=unlearned, losses=losses, label_counts=counts)


def flatten_nwc(nwc: Mapping[str, torch.Tensor], layers: Sequence[str] | None = None) -> np.ndarray:
    """All neurons' values in layer order, as one float64 array."""
    names = list(layers) if layers is not None else list(nwc)
    if not names:
        return np.zeros(0)
    return np.concatenate([nwc[n].detach().to("cpu", torch.float64).flatten().numpy() for n in names])


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or np.std(a) == 0 or np.std(b) == 0:
        return math.nan  # undefined for fewer than 2 points or a constant side
    return float(np.corrcoef(a, b)[0, 1])


def _ranks(a: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), as scipy.stats.rankdata."""
    return pd.Series(a).rank(method="average").to_numpy()


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return _pearson(_ranks(a), _ranks(b))


def nwc_correlation(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                    layers: Sequence[str] | None = None) -> pd.DataFrame:
    """Pearson and Spearman correlation of two NWC maps over the neurons of each layer, and over all neurons
    of all layers together (last row, ``layer="overall"``). Columns: layer, neurons, pearson, spearman.
    A correlation is NaN where it is undefined (a layer with one neuron, or constant values)."""
    names = list(layers) if layers is not None else list(a)
    missing = [n for n in names if n not in a or n not in b]
    if missing:
        raise KeyError(f"layers missing from one of the NWC maps: {', '.join(missing)}")
    rows = []
    for n in names:
        x, y = flatten_nwc(a, [n]), flatten_nwc(b, [n])
        if x.shape != y.shape:
            raise ValueError(f"{n}: {x.size} neurons in one NWC map, {y.size} in the other")
        rows.append({"layer": n, "neurons": int(x.size), "pearson": _pearson(x, y), "spearman": _spearman(x, y)})
    x, y = flatten_nwc(a, names), flatten_nwc(b, names)
    rows.append({"layer": "overall", "neurons": int(x.size), "pearson": _pearson(x, y), "spearman": _spearman(x, y)})
    return pd.DataFrame(rows, columns=["layer", "neurons", "pearson", "spearman"])


def top_neuron_auc(scores: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], top: float = 0.05,
                   layers: Sequence[str] | None = None) -> dict[str, float]:
    """How well ``scores`` (e.g. random-unlearning NWC) rank the top ``top`` share of neurons by ``reference``
    (e.g. poison-unlearning NWC), over all neurons of ``layers``: those neurons are the positives, the ROC AUC
    of ``scores`` against them is returned (1 = every positive ranked above every negative, 0.5 = chance),
    with the number of positives and the share of positives among the top-``top`` neurons by ``scores``
    (precision at the same count)."""
    from sklearn.metrics import roc_auc_score

    if not 0.0 < top < 1.0:
        raise ValueError(f"top must be a share in (0, 1), got {top}")
    names = list(layers) if layers is not None else list(reference)
    s, r = flatten_nwc(scores, names), flatten_nwc(reference, names)
    if s.shape != r.shape:
        raise ValueError(f"{s.size} neurons in scores, {r.size} in reference")
    k = max(1, int(math.floor(top * r.size + 1e-9)))
    positives = np.zeros(r.size, dtype=bool)
    positives[np.argsort(-r, kind="stable")[:k]] = True
    out = {"top": float(top), "positives": int(k), "neurons": int(r.size)}
    if positives.all() or not positives.any():
        out.update(auc=math.nan, precision_at_k=math.nan)
        return out
    out["auc"] = float(roc_auc_score(positives, s))
    out["precision_at_k"] = float(positives[np.argsort(-s, kind="stable")[:k]].mean())
    return out


def neuron_table(nwc: Mapping[str, Mapping[str, torch.Tensor]], layers: Sequence[str]) -> pd.DataFrame:
    """One row per neuron (layer, neuron) and one column ``nwc_<name>`` per NWC map in ``nwc``."""
    rows = {"layer": [], "neuron": []}
    for n in layers:
        k = int(next(iter(nwc.values()))[n].numel()) if nwc else 0
        rows["layer"] += [n] * k
        rows["neuron"] += list(range(k))
    table = pd.DataFrame(rows)
    for name, values in nwc.items():
        table[f"nwc_{name}"] = flatten_nwc(values, layers)
    return table


def weight_norms(models: Mapping[str, nn.Module], layers: Sequence[str]) -> pd.DataFrame:
    """L2 norm of each neuron's incoming weights (``weight[k]``) in each model: one row per (model, layer,
    neuron), columns model, layer, neuron, norm (the paper's Fig. 4)."""
    rows = []
    for label, model in models.items():
        modules = dict(model.named_modules())
        for n in layers:
            if n not in modules:
                raise KeyError(f"layer {n!r} is not in model {label!r}")
            w = modules[n].weight.detach().to("cpu", torch.float64)
            norms = w.flatten(1).norm(dim=1).tolist()
            rows.extend((label, n, i, v) for i, v in enumerate(norms))
    return pd.DataFrame(rows, columns=["model", "layer", "neuron", "norm"])


def pruned_counts(masks: Mapping[str, torch.Tensor], layers: Sequence[str]) -> pd.DataFrame:
    """Pruned neurons per layer: layer, neurons, pruned, share."""
    rows = []
    for n in layers:
        total, pruned = int(masks[n].numel()), int(masks[n].sum())
        rows.append({"layer": n, "neurons": total, "pruned": pruned, "share": pruned / total if total else 0.0})
    return pd.DataFrame(rows, columns=["layer", "neurons", "pruned", "share"])
