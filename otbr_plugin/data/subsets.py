"""The clean defense subset: a seeded, stratified sample of the clean *training* set (5% by default)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .datasets import ImageDataset

__all__ = ["CleanData", "clean_defense_subset", "stratified_indices", "uniform_indices"]


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


def stratified_indices(labels: torch.Tensor, ratio: float, seed: int) -> torch.Tensor:
    """Indices of a sample holding ``ratio`` of each class (at least one per present class), sorted."""
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
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
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    gen = torch.Generator().manual_seed(seed)
    k = max(1, int(n * ratio))
    return torch.sort(torch.randperm(n, generator=gen)[:k]).values


def clean_defense_subset(train: ImageDataset, ratio: float = 0.05, seed: int = 0,
                         sampling: str = "stratified") -> CleanData:
    """The clean defense subset of ``train`` (which must be the training split); ``sampling`` "stratified" (the
    same share of each class) or "uniform" (see :func:`uniform_indices`)."""
    if train.split != "train":
        raise ValueError(f"the clean defense subset is drawn from the training split, got split {train.split!r}")
    if sampling == "stratified":
        idx = stratified_indices(train.labels, ratio, seed)
    elif sampling == "uniform":
        idx = uniform_indices(len(train.labels), ratio, seed)
    else:
        raise ValueError(f"sampling must be 'stratified' or 'uniform', got {sampling!r}")
    return CleanData(images=train.images[idx], labels=train.labels[idx], source="train")
