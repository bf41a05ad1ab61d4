"""The identity of the data a result was made on: size and sha256 of the loaded tensors of each split.

Hashing the decoded tensors (not the files) makes the identity independent of the on-disk format (gzipped or
not, one file or many) and of where the data lives: the same images and labels at another path are the same data,
a 1000-image subset or an edited image is not. Run records and cached bundles carry it, and a grid cell's
fingerprint includes it, so a result made on other data is never reused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from .datasets import DatasetFormatError, DatasetNotFoundError, ImageDataset, default_data_root, load_dataset
from .specs import get_dataset_spec

__all__ = ["tensor_identity", "data_identity", "identity_changes", "try_data_identity"]

_CACHE: dict[tuple[str, str], dict[str, Any]] = {}


def tensor_identity(data: ImageDataset) -> dict[str, Any]:
    """``{"num_samples": N, "sha256": ...}`` over the images' shape and bytes and the labels' bytes."""
    h = hashlib.sha256()
    h.update(repr(tuple(data.images.shape)).encode())
    h.update(data.images.contiguous().numpy().tobytes())
    h.update(data.labels.contiguous().numpy().tobytes())
    return {"num_samples": len(data), "sha256": h.hexdigest()}


def data_identity(dataset: str, root: str | Path | None = None) -> dict[str, Any]:
    """``{"dataset", "train", "test"}`` (each split's :func:`tensor_identity`) of ``dataset`` under ``root``
    (default: ``$OTBR_DATA`` or ``./data``), computed once per process and root. Raises what
    :func:`~otbr_plugin.data.load_dataset` raises when the data cannot be loaded."""
    spec = get_dataset_spec(dataset)
    key = (spec.name, str(Path(root if root is not None else default_data_root()).resolve()))
    if key not in _CACHE:
        _CACHE[key] = {"dataset": spec.name,
                       **{split: tensor_identity(load_dataset(spec.name, split, root)) for split in ("train", "test")}}
    return dict(_CACHE[key])


def identity_changes(recorded: Any, current: dict[str, Any]) -> list[str]:
    """How ``recorded`` (a record's or bundle's ``data``) differs from ``current`` ("test 1000 -> 10000 samples");
    every split ``current`` holds must be recorded with the same size and hash."""
    if not isinstance(recorded, dict):
        return ["the data it was made on is not recorded"]
    out = []
    for split in ("train", "test"):
        if split not in current:
            continue
        old, new = recorded.get(split), current[split]
        if not isinstance(old, dict):
            out.append(f"its {split} data is not recorded")
        elif old.get("num_samples") != new["num_samples"]:
            out.append(f"{split} {old.get('num_samples')!r:.20} -> {new['num_samples']} samples")
        elif old.get("sha256") != new["sha256"]:
            out.append(f"the {split} data's content changed (same size)")
    return out


def try_data_identity(dataset: str, root: str | Path | None = None) -> dict[str, Any] | str:
    """:func:`data_identity`, or the reason it cannot be computed (a string)."""
    try:
        return data_identity(dataset, root)
    except (DatasetNotFoundError, DatasetFormatError, OSError) as err:
        return f"its data cannot be loaded ({str(err).splitlines()[0]})"
