"""The backdoored model's ACC/ASR/RA ("before" metrics), computed once per checkpoint and reused by every cell.

The metrics are cached in a small JSON file beside the bundle folder (``<bundles>/<attack>-seed<s>.before.json``; not
inside it, whose file set the bundle format checks), keyed by everything that shapes the numbers: the model's sha256,
the poisoned and clean test sets' identities (sha256 of their tensors as loaded), the device type and evaluation
batch (:func:`~otbr_plugin.metrics.predict`'s defaults) and the torch version. So a sequential grid, each local
worker or Slurm job and every resume evaluate a checkpoint once between them. The file is read as untrusted: a
bounded regular file whose every number must be finite and in [0, 1]; anything else (damage, another key, a FIFO)
means the metrics are computed again and the file rewritten (atomically), never an error. Since format 2 the file
also keeps the per-sample outcomes (packed bits, as in run records), which must reproduce the cached metrics; a
format-1 file (metrics only) is computed again once.
"""

from __future__ import annotations

import hashlib
import json
import math
import weakref
from pathlib import Path
from typing import Any

import torch

from ..bundle import Bundle
from ..data import ImageDataset
from ..io import read_regular, write_json
from ..metrics import ACCELERATOR_EVAL_BATCH, CPU_EVAL_BATCH, BackdoorMetrics, SampleCorrectness
from ..aggregate.bootstrap import decode_bits, encode_bits
from .runner import evaluate_model_samples

__all__ = ["before_metrics", "before_evaluation", "before_cache_path", "before_cache_key", "read_cached_before",
           "read_cached_evaluation", "tensors_sha256"]

CACHE_SUFFIX = ".before.json"
CACHE_FORMAT = 2
_MAX_BYTES = 4 << 20  # packed bits: 10,000 samples take 1.7 KB a vector; a bigger file is not one of ours
_FIELDS = ("acc", "asr", "ra")
_DIGESTS: dict[tuple[int, ...], tuple[tuple[weakref.ref, ...], str]] = {}


def tensors_sha256(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' dtypes, shapes and contents; computed once per process for the same tensor objects
    (a loaded data set is never changed in place)."""
    key = tuple(id(t) for t in tensors)
    hit = _DIGESTS.get(key)
    if hit is not None and all(ref() is t for ref, t in zip(hit[0], tensors)):
        return hit[1]
    h = hashlib.sha256()
    for t in tensors:
        c = t.detach().cpu().contiguous()
        h.update(f"{c.dtype}{tuple(c.shape)};".encode())
        h.update(c.numpy().tobytes())
    digest = h.hexdigest()
    for k in [k for k, (refs, _) in _DIGESTS.items() if any(r() is None for r in refs)]:  # forget dead tensors
        del _DIGESTS[k]
    _DIGESTS[key] = (tuple(weakref.ref(t) for t in tensors), digest)
    return digest


def before_cache_path(bundle_path: str | Path) -> Path:
    """Where the before metrics of the bundle at ``bundle_path`` are cached: beside its folder."""
    p = Path(bundle_path)
    return p.parent / f"{p.name}{CACHE_SUFFIX}"


def before_cache_key(bundle: Bundle, clean_test: ImageDataset, device: torch.device) -> dict[str, Any] | None:
    """What the cached metrics must have been computed from; None for a bundle without a model sha256."""
    if not bundle.model_sha256:
        return None
    bd = bundle.bd_test
    return {
        "model_sha256": bundle.model_sha256,
        "bd_test_sha256": tensors_sha256(bd.images, bd.targets, bd.original_labels),
        "clean_test_sha256": tensors_sha256(clean_test.images, clean_test.labels),
        "device_type": device.type,
        "eval_batch": CPU_EVAL_BATCH if device.type == "cpu" else ACCELERATOR_EVAL_BATCH,
        "torch": torch.__version__,
    }


def read_cached_before(path: str | Path, key: dict[str, Any]) -> BackdoorMetrics | None:
    """The metrics cached at ``path`` when the file is sound and was written for ``key``; None otherwise."""
    hit = read_cached_evaluation(path, key)
    return None if hit is None else hit[0]


def read_cached_evaluation(path: str | Path,
                           key: dict[str, Any]) -> tuple[BackdoorMetrics, SampleCorrectness] | None:
    """The metrics and per-sample outcomes cached at ``path`` when the file is sound, was written for ``key`` and its
    bits reproduce its metrics; None otherwise."""
    try:
        data = json.loads(read_regular(path, _MAX_BYTES))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or data.get("key") != key:
        return None
    metrics = data.get("metrics")
    if not isinstance(metrics, dict) or sorted(metrics) != sorted(_FIELDS):
        return None
    values = {}
    for name in _FIELDS:
        v = metrics[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
            return None
        values[name] = float(v)
    samples = data.get("samples")
    try:
        n_clean, n_bd = samples["n_clean"], samples["n_poisoned"]
        if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in (n_clean, n_bd)):
            return None
        vecs = {"clean": decode_bits(samples["clean"], n_clean), "target": decode_bits(samples["target"], n_bd),
                "true": decode_bits(samples["true"], n_bd)}
    except (TypeError, KeyError, ValueError):
        return None
    if any(abs(float(vecs[v].mean()) - values[m]) > 1e-6 for v, m in (("clean", "acc"), ("target", "asr"),
                                                                       ("true", "ra"))):
        return None
    return BackdoorMetrics(**values), SampleCorrectness(*(torch.from_numpy(vecs[k]) for k in ("clean", "target", "true")))


def before_metrics(bundle: Bundle, clean_test: ImageDataset, device: torch.device) -> BackdoorMetrics:
    """ACC/ASR/RA of the bundle's backdoored model on the clean and poisoned test sets, read from the cache beside
    the bundle when it holds them for this model, data and device, else computed on ``device`` and cached."""
    return before_evaluation(bundle, clean_test, device)[0]


def before_evaluation(bundle: Bundle, clean_test: ImageDataset,
                      device: torch.device) -> tuple[BackdoorMetrics, SampleCorrectness]:
    """:func:`before_metrics` and the per-sample outcomes behind them (cached together)."""
    key = before_cache_key(bundle, clean_test, device) if bundle.path is not None else None
    path = before_cache_path(bundle.path) if key is not None else None
    if path is not None:
        cached = read_cached_evaluation(path, key)
        if cached is not None:
            return cached
    before, samples = evaluate_model_samples(bundle.build_model(), bundle, clean_test, device)
    if path is not None:
        try:
            write_json(path, {"format": CACHE_FORMAT, "key": key, "metrics": before.to_dict(),
                              "samples": {"n_clean": int(samples.clean.numel()),
                                          "n_poisoned": int(samples.target.numel()),
                                          "clean": encode_bits(samples.clean.numpy()),
                                          "target": encode_bits(samples.target.numpy()),
                                          "true": encode_bits(samples.true.numpy())}})
        except OSError:  # a read-only bundles folder: computed each time, as before the cache
            pass
    return before, samples
