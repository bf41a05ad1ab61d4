"""The clean test set that goes with a BackdoorBench record: where its data root is, and a check that the
record's poisoned samples carry the labels of the clean test split at their indices."""

from __future__ import annotations

import os
from pathlib import Path

from otbr_plugin.bundle import Bundle
from otbr_plugin.data import ImageDataset, default_data_root, find_dataset, get_dataset_spec, load_dataset

from .safe_load import AttackResultError

__all__ = ["resolve_data_root", "record_data_path", "load_clean_test", "check_clean_labels"]


def record_data_path(record: Path, data_path: str | None) -> Path | None:
    """The folder a record's ``data_path`` names, when it resolves inside the BackdoorBench tree that holds
    ``record/<name>`` (its parent's parent); None for an absolute path, a ``..`` escape or a symlink that leads
    out of the tree (the record is untrusted input: it never chooses data from elsewhere)."""
    if not isinstance(data_path, str) or not data_path or "\x00" in data_path:
        return None
    bb_root = record.resolve().parent.parent
    dp = Path(data_path)
    if dp.is_absolute() or ".." in dp.parts:
        return None
    resolved = (bb_root / dp).resolve()
    return resolved if resolved == bb_root or bb_root in resolved.parents else None


def resolve_data_root(record: Path, dataset: str, data_path: str | None = None,
                      data_root: str | Path | None = None) -> Path | None:
    """The data root under which ``dataset`` is found. The user's root wins: ``data_root`` (``--data-root``,
    ``dataset_path``) or else ``$OTBR_DATA`` (or ``<root>/<dataset>``), and when the user named one it is the only
    candidate. Otherwise the record's ``data_path`` is a fallback, only when it resolves inside the BackdoorBench
    tree (:func:`record_data_path`), then that tree's ``data/`` and ``./data``. None if not found."""
    spec = get_dataset_spec(dataset)
    user = data_root if data_root is not None else os.environ.get("OTBR_DATA") or None
    if user is not None:
        candidates = [Path(user), Path(user) / spec.name]
    else:
        bb_root = record.resolve().parent.parent
        candidates = []
        dp = record_data_path(record, data_path)
        if dp is not None:
            candidates += [dp] + ([dp.parent] if dp != bb_root else [])
        candidates += [bb_root / "data", default_data_root()]
    for cand in candidates:
        if cand.is_dir() and find_dataset(spec.name, cand) is not None:
            return cand
    return None


def load_clean_test(bundle: Bundle, data_root: str | Path | None = None, download: bool = True) -> ImageDataset:
    """The clean test split of the bundle's dataset, from ``data_root`` (or where the record says), checked
    against the labels the record stores for its poisoned samples."""
    root = Path(data_root) if data_root is not None else None
    if root is not None:
        found = resolve_data_root(root, bundle.dataset, None, root)
        root = found or root
    elif bundle.extra.get("data_root"):
        root = Path(bundle.extra["data_root"])
    test = load_dataset(bundle.dataset, "test", root, download=download)
    check_clean_labels(bundle, test)
    return test


def check_clean_labels(bundle: Bundle, clean_test: ImageDataset) -> None:
    """The record's original labels must equal the clean test labels at the original indices."""
    bd = bundle.bd_test
    n = len(clean_test)
    if len(bd) and int(bd.original_indices.max()) >= n:
        raise AttackResultError(
            f"poisoned sample index {int(bd.original_indices.max())} is beyond the clean {bundle.dataset} test set "
            f"({n} samples): the data root holds another dataset or split"
        )
    expected = clean_test.labels[bd.original_indices]
    wrong = int((expected != bd.original_labels).sum())
    if wrong:
        raise AttackResultError(
            f"{wrong} of {len(bd)} poisoned samples carry an original label that differs from the clean "
            f"{bundle.dataset} test set at the same index: the data root holds a different dataset or ordering"
        )
