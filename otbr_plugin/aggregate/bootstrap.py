"""Bootstrap intervals for ACC / ASR / RA / DER from the per-sample outcomes kept in run records.

A record (schema 2) keeps, for the backdoored model ("before") and the defended one ("after"), which clean test
samples were classified correctly and which poisoned test samples went to the target / to their true label, as
packed bits (:func:`encode_bits`; index order: the clean test set as loaded, the poisoned test set as stored in the
checkpoint's bundle). From them intervals are computed without running a model again. Pure functions, seeded.

Resampling (documented, the same everywhere):

- Images are resampled, with replacement, each test set to its own size, ``n_boot`` times (default 1000). The clean
  test set and each checkpoint's poisoned test set are resampled independently of each other; the rows of indices
  come from ``numpy.random.default_rng(SeedSequence([seed, *stream words]))`` drawn in order (``integers(0, n,
  size=(n_boot, n))``), where the stream is ``clean:<n>`` for the clean test set (so every record on the same clean
  set uses the same resampled images) and ``poisoned:<checkpoint sha256>:<n>`` for a checkpoint's poisoned set.
- Per replicate, ACC/ASR/RA are the means over the resampled images, before and after the defense on the *same*
  images, and DER = (max(0, ASR_before - ASR_after) - max(0, ACC_before - ACC_after) + 1) / 2 from those pairs.
- Seeds (two-level, hierarchical bootstrap; :func:`seed_replicates`): a cell over several records is a tree,
  training seeds (checkpoints) over defense seeds. Per replicate, each level with >= 2 members is resampled with
  replacement (the training seeds, then, for each drawn one, its defense seeds), and the replicate is the mean over
  the drawn training seeds of the mean over their drawn defense seeds of that replicate's test-image value. A level
  with one member is not resampled, so a single-record cell keeps exactly its test-image replicates. The seed draws
  come from the generator of the stream ``seeds:<cell>`` (the same for every metric of the cell). The average row
  averages its attacks' replicates (attacks are fixed, not resampled). The interval is the 2.5 / 97.5 percentile of
  the replicates (percentile bootstrap, 95%). Every consumer (table, by-defense summary, compare, leaderboard,
  regress) builds its trees with :func:`seed_tree` / :func:`attack_trees` and draws with :func:`seed_replicates` /
  :func:`attacks_replicates`; a mean over several attacks averages the attacks' replicates, each attack on its
  stream ``seeds:<attack>:<defense label>`` (:func:`records_interval`).
- A paired comparison of two defenses on the same checkpoint takes, replicate by replicate, the difference of
  their metrics on the same resampled images, each side's defense seeds resampled independently (its own stream:
  defense A's seed k and B's seed k are unrelated draws); the difference is "real" when its 95% interval excludes 0.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["PER_SAMPLE_FORMAT", "encode_bits", "decode_bits", "per_sample_payload", "check_per_sample",
           "resample_indices", "replicate_means", "record_replicates", "Interval", "percentile_interval",
           "group_interval", "paired_difference", "seed_tree", "seed_replicates", "resampled_levels",
           "levels_text", "metric_tree", "attack_trees", "attacks_replicates", "records_interval", "DEFAULT_BOOT",
           "DEFAULT_BOOT_SEED", "BOOT_CHUNK"]

PER_SAMPLE_FORMAT = 1
ENCODING = "numpy.packbits (bitorder big, zero padded), base64"
DEFAULT_BOOT = 1000
DEFAULT_BOOT_SEED = 0
BOOT_CHUNK = 100  # replicate rows drawn and used at a time (memory: BOOT_CHUNK x n indices)
MAX_SAMPLES = 10_000_000
CLEAN_FIELDS = ("before_correct", "after_correct")
POISONED_FIELDS = ("before_target", "after_target", "before_true", "after_true")


# ------------------------------------------------------------------------------------------------ encoding
def encode_bits(bits: Any) -> str:
    """A 1-D bool vector as base64 text of its packed bits (8 samples a byte, first sample in the high bit)."""
    arr = np.asarray(bits, dtype=bool).reshape(-1)
    return base64.b64encode(np.packbits(arr, bitorder="big").tobytes()).decode("ascii")


def decode_bits(text: Any, n: int) -> np.ndarray:
    """The ``n`` bools encoded by :func:`encode_bits`; ValueError when ``text`` is not exactly that (wrong length,
    not base64, set padding bits)."""
    if not isinstance(text, str):
        raise ValueError(f"packed bits must be a base64 string, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as err:
        raise ValueError(f"packed bits are not valid base64 ({err})") from None
    if len(raw) != (n + 7) // 8:
        raise ValueError(f"packed bits hold {len(raw)} bytes, {n} samples need {(n + 7) // 8}")
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="big")
    if bits[n:].any():
        raise ValueError("packed bits have set padding bits after the last sample")
    return bits[:n].astype(bool)


def per_sample_payload(before: Any, after: Any) -> dict[str, Any]:
    """The record's ``per_sample`` field from two :class:`~otbr_plugin.metrics.SampleCorrectness` (the backdoored and
    the defended model, on the same test sets)."""
    def vec(x: Any) -> np.ndarray:
        return np.asarray(x.numpy() if hasattr(x, "numpy") else x, dtype=bool).reshape(-1)

    if vec(before.clean).shape != vec(after.clean).shape or vec(before.target).shape != vec(after.target).shape:
        raise ValueError("before and after per-sample outcomes cover different test sets")
    return {"format": PER_SAMPLE_FORMAT, "encoding": ENCODING,
            "clean": {"n": int(vec(before.clean).size), "before_correct": encode_bits(vec(before.clean)),
                      "after_correct": encode_bits(vec(after.clean))},
            "poisoned": {"n": int(vec(before.target).size), "before_target": encode_bits(vec(before.target)),
                         "after_target": encode_bits(vec(after.target)), "before_true": encode_bits(vec(before.true)),
                         "after_true": encode_bits(vec(after.true))}}


def check_per_sample(payload: Any, before: Mapping[str, Any], after: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    """The decoded vectors of a record's ``per_sample`` field (``clean_before_correct``, ``poisoned_after_target``,
    ...), checked as untrusted input: known format, sizes in range, bits that reproduce the record's own ACC/ASR/RA
    (within 1e-6). ValueError naming what is wrong otherwise."""
    if not isinstance(payload, dict) or payload.get("format") != PER_SAMPLE_FORMAT:
        raise ValueError(f"field 'per_sample' must be an object with format {PER_SAMPLE_FORMAT}")
    out: dict[str, np.ndarray] = {}
    for part, fields in (("clean", CLEAN_FIELDS), ("poisoned", POISONED_FIELDS)):
        sub = payload.get(part)
        n = sub.get("n") if isinstance(sub, dict) else None
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= MAX_SAMPLES:
            raise ValueError(f"field 'per_sample.{part}' must be an object with a sample count n in "
                             f"[1, {MAX_SAMPLES}]")
        for f in fields:
            try:
                out[f"{part}_{f}"] = decode_bits(sub.get(f), n)
            except ValueError as err:
                raise ValueError(f"field 'per_sample.{part}.{f}': {err}") from None
    expected = {"clean_before_correct": ("before", "acc"), "poisoned_before_target": ("before", "asr"),
                "clean_after_correct": ("after", "acc"), "poisoned_after_target": ("after", "asr"),
                "poisoned_after_true": ("after", "ra")}
    if "ra" in before:
        expected["poisoned_before_true"] = ("before", "ra")
    for key, (when, metric) in expected.items():
        source = before if when == "before" else after
        if source is None or metric not in source:
            continue
        rate = float(out[key].mean())
        if abs(rate - float(source[metric])) > 1e-6:
            raise ValueError(f"field 'per_sample': the {key} bits give {metric.upper()} {rate:.6f}, the record says "
                             f"metrics_{when}.{metric} = {float(source[metric]):.6f}")
    return out


# ------------------------------------------------------------------------------------------------ resampling
def _rng(seed: int, stream: str) -> np.random.Generator:
    words = np.frombuffer(hashlib.sha256(stream.encode()).digest()[:16], dtype=np.uint32).tolist()
    return np.random.default_rng(np.random.SeedSequence([int(seed), *words]))


def resample_indices(n: int, n_boot: int, seed: int, stream: str, chunk: int = BOOT_CHUNK) -> Iterable[np.ndarray]:
    """The bootstrap's rows of resampled indices into a set of ``n`` samples, ``chunk`` rows at a time (int64, each
    row ``n`` draws with replacement); the rows equal ``rng.integers(0, n, size=(n_boot, n))`` of the stream's
    generator (see the module docstring)."""
    if n < 1 or n_boot < 1:
        raise ValueError(f"a bootstrap needs n >= 1 samples and n_boot >= 1 replicates, got n={n}, n_boot={n_boot}")
    rng = _rng(seed, stream)
    for start in range(0, n_boot, chunk):
        yield rng.integers(0, n, size=(min(chunk, n_boot - start), n))


def replicate_means(vectors: np.ndarray, n_boot: int, seed: int, stream: str) -> np.ndarray:
    """(n_boot, K): per replicate, the mean of each of the K rows of ``vectors`` (K, n) over the same resampled
    images."""
    v = np.asarray(vectors, dtype=bool)
    if v.ndim == 1:
        v = v[None]
    out = [v[:, idx].mean(axis=-1).T for idx in resample_indices(v.shape[1], n_boot, seed, stream)]
    return np.concatenate(out, axis=0)


def _der(acc_b: np.ndarray, asr_b: np.ndarray, acc_a: np.ndarray, asr_a: np.ndarray) -> np.ndarray:
    return (np.maximum(0.0, asr_b - asr_a) - np.maximum(0.0, acc_b - acc_a) + 1.0) / 2.0


def record_replicates(records: Sequence[Any], n_boot: int = DEFAULT_BOOT,
                      seed: int = DEFAULT_BOOT_SEED) -> list[dict[str, np.ndarray] | None]:
    """For each record (a :class:`~otbr_plugin.aggregate.records.RunRecord`), its bootstrap replicates of ACC, ASR,
    RA and DER after the defense (fractions, arrays of ``n_boot``), or None for a record without per-sample data (an
    old record, or a failed one). Records on the same clean set / the same checkpoint share resampled images."""
    decoded: list[dict[str, np.ndarray] | None] = []
    for r in records:
        payload = getattr(r, "per_sample", None)
        if r.status != "ok" or payload is None:
            decoded.append(None)
            continue
        decoded.append(check_per_sample(payload, r.metrics_before, r.metrics_after))
    streams: dict[str, list[tuple[int, str]]] = {}
    for i, (r, d) in enumerate(zip(records, decoded)):
        if d is None:
            continue
        nc, npz = d["clean_after_correct"].size, d["poisoned_after_target"].size
        streams.setdefault(f"clean:{nc}", []).extend((i, k) for k in ("clean_before_correct", "clean_after_correct"))
        streams.setdefault(f"poisoned:{r.checkpoint_sha256}:{npz}", []).extend(
            (i, k) for k in ("poisoned_before_target", "poisoned_after_target", "poisoned_after_true"))
    reps: list[dict[str, np.ndarray]] = [{} for _ in records]
    for stream, members in streams.items():
        vectors = np.stack([decoded[i][k] for i, k in members])  # type: ignore[index]
        means = replicate_means(vectors, n_boot, seed, stream)
        for col, (i, k) in enumerate(members):
            reps[i][k] = means[:, col]
    out: list[dict[str, np.ndarray] | None] = []
    for d, rep in zip(decoded, reps):
        if d is None:
            out.append(None)
            continue
        out.append({"acc": rep["clean_after_correct"], "asr": rep["poisoned_after_target"],
                    "ra": rep["poisoned_after_true"],
                    "der": _der(rep["clean_before_correct"], rep["poisoned_before_target"], rep["clean_after_correct"],
                                rep["poisoned_after_target"])})
    return out


# ------------------------------------------------------------------------------------------------ intervals
@dataclass(frozen=True)
class Interval:
    """A 95% percentile-bootstrap interval [lo, hi] (same unit as the replicates)."""

    lo: float
    hi: float

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> Interval:
    """The central ``level`` percentile interval of ``replicates`` (numpy's linear interpolation)."""
    r = np.asarray(replicates, dtype=float)
    if r.size == 0 or not np.isfinite(r).all():
        raise ValueError("an interval needs a non-empty set of finite replicates")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(r, [tail, 100 - tail])
    return Interval(float(lo), float(hi))


def group_interval(replicates: Sequence[dict[str, np.ndarray] | None], metric: str,
                   level: float = 0.95) -> Interval | None:
    """The interval of the mean of ``metric`` over several records (their replicates averaged replicate by
    replicate: test images only, seeds not resampled; for a cell over seeds use :func:`records_interval`); None when
    any of them has no per-sample data."""
    if not replicates or any(r is None for r in replicates):
        return None
    stacked = np.stack([r[metric] for r in replicates])  # type: ignore[index]
    return percentile_interval(stacked.mean(axis=0), level)


def paired_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray], metric: str, point: float,
                      level: float = 0.95) -> tuple[float, Interval]:
    """(point difference, interval) of ``metric`` between two records' replicates drawn on the same resampled images
    (``point``: the recorded a - b). Identical outcomes give exactly [0, 0]."""
    diff = np.asarray(a[metric]) - np.asarray(b[metric])
    if diff.shape != np.asarray(b[metric]).shape or not math.isfinite(point):
        raise ValueError("paired replicates must have the same shape and a finite point difference")
    return point, percentile_interval(diff, level)


# ------------------------------------------------------------------------------------------------ seeds
SeedTree = Sequence[Sequence[np.ndarray]]
"""Replicates of one cell as training seeds (outer) x defense seeds (inner), each leaf an array of ``n_boot``."""


def seed_tree(pairs: Iterable[tuple[Any, Any]]) -> list[list[Any]]:
    """``(record, value)`` pairs grouped as a :data:`SeedTree`: outer by training seed, inner by defense seed, both in
    ascending order (a record without a defense seed sorts first)."""
    by_seed: dict[int, list[tuple[int, Any]]] = {}
    for r, v in pairs:
        by_seed.setdefault(int(r.seed), []).append((-1 if r.defense_seed is None else int(r.defense_seed), v))
    return [[v for _, v in sorted(by_seed[s], key=lambda t: t[0])] for s in sorted(by_seed)]


def resampled_levels(trees: Iterable[SeedTree]) -> tuple[str, ...]:
    """Which levels :func:`seed_replicates` resamples over ``trees``: always ``test images``, then ``training seeds``
    where some tree has >= 2 of them and ``defense seeds`` where some training seed has >= 2 defense seeds."""
    trees = list(trees)
    out = ["test images"]
    if any(len(t) >= 2 for t in trees):
        out.append("training seeds")
    if any(len(inner) >= 2 for t in trees for inner in t):
        out.append("defense seeds")
    return tuple(out)


def levels_text(levels: Sequence[str]) -> str:
    """``test images``, ``test images and defense seeds``, ``test images, training seeds and defense seeds``."""
    return levels[0] if len(levels) == 1 else ", ".join(levels[:-1]) + " and " + levels[-1]


def seed_replicates(tree: SeedTree, seed: int, stream: str) -> np.ndarray:
    """The replicates (``n_boot``) of a cell's mean over its seeds by the two-level bootstrap of the module docstring:
    per replicate, the training seeds drawn with replacement (when >= 2), for each drawn one its defense seeds drawn
    with replacement (when >= 2), the mean of the drawn leaves' values at that replicate. A tree of one leaf gives
    that leaf unchanged. Deterministic given ``seed`` and ``stream``."""
    groups = [[np.asarray(leaf, dtype=float) for leaf in inner] for inner in tree]
    if not groups or any(not g for g in groups):
        raise ValueError("a seed tree needs at least one training seed, each with at least one record")
    n_boot = groups[0][0].shape[0]
    if any(leaf.shape != (n_boot,) for g in groups for leaf in g):
        raise ValueError("every record of a seed tree must have the same number of replicates")
    if len(groups) == 1 and len(groups[0]) == 1:
        return groups[0][0]
    rng = _rng(seed, f"seeds:{stream}")
    n_out = len(groups)
    outer = rng.integers(0, n_out, size=(n_boot, n_out)) if n_out >= 2 else np.zeros((n_boot, 1), dtype=np.int64)
    rows = np.arange(n_boot)
    inner_means = np.empty((n_out, n_boot, n_out))  # [group, replicate, outer slot]
    for g, leaves in enumerate(groups):
        stacked = np.stack(leaves, axis=1)  # (n_boot, k)
        k = stacked.shape[1]
        if k == 1:
            inner_means[g] = stacked[:, :1]
            continue
        idx = rng.integers(0, k, size=(n_boot, n_out, k))
        inner_means[g] = stacked[rows[:, None, None], idx].mean(axis=-1)
    slots = np.arange(n_out)
    return inner_means[outer, rows[:, None], slots[None, :]].mean(axis=1)


def metric_tree(tree: Sequence[Sequence[Mapping[str, np.ndarray]]], metric: str) -> list[list[np.ndarray]]:
    """One metric's :data:`SeedTree` from a tree of :func:`record_replicates` dicts (as :func:`seed_tree` groups
    them)."""
    return [[leaf[metric] for leaf in inner] for inner in tree]


def attack_trees(pairs: Iterable[tuple[Any, Any]]) -> dict[str, list[list[Any]]]:
    """``(record, value)`` pairs grouped by attack (in the order the attacks first appear), each attack's pairs as a
    :func:`seed_tree`."""
    by_attack: dict[str, list[tuple[Any, Any]]] = {}
    for r, v in pairs:
        by_attack.setdefault(str(r.attack_name), []).append((r, v))
    return {a: seed_tree(group) for a, group in by_attack.items()}


def attacks_replicates(trees: Mapping[str, SeedTree], seed: int, stream: str) -> np.ndarray:
    """The replicates of a mean over attacks: each attack's :func:`seed_replicates` (stream ``<attack>:<stream>``),
    averaged replicate by replicate with equal weights (attacks are fixed, not resampled). One attack: its own."""
    if not trees:
        raise ValueError("a mean over attacks needs at least one attack")
    return np.mean([seed_replicates(t, seed, f"{a}:{stream}") for a, t in trees.items()], axis=0)


def records_interval(pairs: Sequence[tuple[Any, Mapping[str, np.ndarray] | None]], metric: str, seed: int,
                     stream: str, level: float = 0.95) -> tuple[Interval, tuple[str, ...]] | None:
    """The interval of ``metric``'s mean over the records of ``pairs`` (``(record, replicates)`` as
    :func:`record_replicates` gives them; ``stream``: the defense label) by the two-level bootstrap: per attack over
    its training seeds and their defense seeds (:func:`attack_trees`, :func:`attacks_replicates`), then over the
    attacks; with the levels it resampled (:func:`resampled_levels`). None when a record has no replicates. A single
    record gives exactly its test-image interval; one record per attack the attacks' replicates averaged, as
    :func:`group_interval`."""
    if not pairs or any(rep is None for _, rep in pairs):
        return None
    trees = attack_trees(pairs)
    reps = attacks_replicates({a: metric_tree(t, metric) for a, t in trees.items()}, seed, stream)
    return percentile_interval(reps, level), resampled_levels(trees.values())
