"""The clean defense subset: a seeded, stratified sample of the clean *training* set (5% by default)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .datasets import ImageDataset

__all__ = ["CleanData", "SAMPLINGS", "backdoorbench_stream_indices", "check_indices", "clean_defense_subset",
           "read_index_file", "stratified_indices", "uniform_indices"]

SAMPLINGS = ("stratified", "uniform", "backdoorbench_stream")


@dataclass
class CleanData:
    """The clean defense subset: uint8 images (N, C, H, W) and int64 labels drawn from the training set."""

    images: torch.Tensor
    labels: torch.Tensor
    source: str = "train"

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError("clean data images must be uint8 (N, C, H, W)")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("clean data needs one label per image")
        if self.source != "train":
            raise ValueError("the clean defense subset must come from the training split, never the test split")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def describe(self) -> str:
        return f"clean subset of {len(self)}"


def _check_ratio(ratio: float) -> None:
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")


def stratified_indices(labels: torch.Tensor, ratio: float, seed: int) -> torch.Tensor:
    """Indices of a sample holding ``ratio`` of each class (at least one per present class), sorted."""
    _check_ratio(ratio)
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for cls in torch.unique(labels):
        idx = torch.nonzero(labels == cls).flatten()
        k = max(1, int(round(ratio * len(idx))))
        picked.append(idx[torch.randperm(len(idx), generator=gen)[:k]])
    return torch.sort(torch.cat(picked)).values


def uniform_indices(n: int, ratio: float, seed: int) -> torch.Tensor:
    """Indices of a plain random sample of ``int(n * ratio)`` of ``n`` items (at least one), sorted: no per-class
    quota, as BackdoorBench's ``choose_index`` (``random.sample``; not its random stream)."""
    _check_ratio(ratio)
    gen = torch.Generator().manual_seed(seed)
    k = max(1, int(n * ratio))
    return torch.sort(torch.randperm(n, generator=gen)[:k]).values


def backdoorbench_stream_indices(n: int, ratio: float, seed: int, draw: int = 1) -> list[int]:
    """BackdoorBench's own clean subset at ``--random_seed seed``: its ``fix_random`` seeds Python's ``random``
    and its ``choose_index`` returns ``random.sample(range(n), int(n * ratio))``; ``draw`` is which call of
    ``choose_index`` after seeding gives the subset (anp.py: the 1st; fp.py: the 2nd, as it calls it twice and
    logs/saves the first). Reproduced with a private ``random.Random(seed)`` (the same stream, the global one
    untouched); the indices in BackdoorBench's order (unsorted)."""
    _check_ratio(ratio)
    if draw < 1:
        raise ValueError(f"draw must be >= 1, got {draw!r}")
    k = int(n * ratio)
    if k < 1:
        raise ValueError(f"ratio {ratio} of {n} training images is int({n * ratio}) = 0 images (BackdoorBench's "
                         "choose_index would draw an empty subset); use a larger ratio")
    stream = random.Random(seed)
    for _ in range(draw):
        idx = stream.sample(range(n), k)
    return idx


def read_index_file(path: str | Path) -> list[int]:
    """The clean-subset indices of BackdoorBench's ``--index FILE`` (read there by ``np.loadtxt(FILE, dtype=int)``;
    its ``np.savetxt`` writes one per line): integers separated by whitespace, ``#`` comments allowed. Parsed as
    text (nothing unpickled); a non-integer token, an empty file or a duplicate is a ValueError."""
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--index {path}: cannot read the file of clean-subset indices ({err})") from None
    idx: list[int] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for token in line.split("#", 1)[0].split():
            try:
                idx.append(int(token, 10))
            except ValueError:
                raise ValueError(f"--index {path}: line {lineno}: {token!r} is not an integer (expected integer "
                                 "indices of the training split, whitespace-separated, as np.savetxt writes them)") from None
    if not idx:
        raise ValueError(f"--index {path}: no indices in the file (expected integer indices of the training split)")
    return check_indices(idx, None, f"--index {path}")


def check_indices(idx: Sequence[int], n: int | None, where: str = "clean-subset indices") -> list[int]:
    """``idx`` as a list after checking: no duplicates and, when ``n`` is given, every index in ``0..n-1``."""
    out = [int(i) for i in idx]
    seen: set[int] = set()
    for i in out:
        if i in seen:
            raise ValueError(f"{where}: index {i} appears more than once (each training image at most once)")
        seen.add(i)
    bad = next((i for i in out if i < 0 or (n is not None and i >= n)), None)
    if bad is not None:
        raise ValueError(f"{where}: index {bad} is out of range (expected 0.."
                         f"{'N-1' if n is None else n - 1} for a training split of {'N' if n is None else n} images)")
    return out


def clean_defense_subset(train: ImageDataset, ratio: float = 0.05, seed: int = 0,
                         sampling: str = "stratified", draw: int = 1,
                         indices: Sequence[int] | None = None) -> CleanData:
    """The clean defense subset of ``train`` (which must be the training split); ``sampling`` "stratified" (the
    same share of each class), "uniform" (see :func:`uniform_indices`) or "backdoorbench_stream" (BackdoorBench's
    own draw ``draw``, see :func:`backdoorbench_stream_indices`). ``indices``: the subset given explicitly
    (BackdoorBench's ``--index FILE``), which replaces ratio, seed and sampling."""
    if train.split != "train":
        raise ValueError(f"the clean defense subset is drawn from the training split, got split {train.split!r}")
    n = len(train.labels)
    if indices is not None:
        idx = torch.as_tensor(check_indices(indices, n), dtype=torch.long)
    elif sampling == "stratified":
        idx = stratified_indices(train.labels, ratio, seed)
    elif sampling == "uniform":
        idx = uniform_indices(n, ratio, seed)
    elif sampling == "backdoorbench_stream":
        idx = torch.as_tensor(backdoorbench_stream_indices(n, ratio, seed, draw), dtype=torch.long)
    else:
        raise ValueError(f"sampling must be one of {', '.join(map(repr, SAMPLINGS))}, got {sampling!r}")
    return CleanData(images=train.images[idx], labels=train.labels[idx], source="train")
