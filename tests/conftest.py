"""Shared fixtures: writers for tiny datasets in the exact official on-disk formats."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

os.environ["OTBR_OFFLINE"] = "1"  # tests never reach the network


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    """Write a uint8 array in IDX format (magic 0x00 0x00 0x08 ndim, big-endian dims)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)
    return path


def write_mnist_like(folder: Path, n_train: int = 40, n_test: int = 20, gz: bool = True, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "train": (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_train, dtype=np.uint8)),
        "test": (rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_test, dtype=np.uint8)),
    }
    write_idx(folder / "train-images-idx3-ubyte", data["train"][0], gz)
    write_idx(folder / "train-labels-idx1-ubyte", data["train"][1], gz)
    write_idx(folder / "t10k-images-idx3-ubyte", data["test"][0], gz)
    write_idx(folder / "t10k-labels-idx1-ubyte", data["test"][1], gz)
    return data


def write_cifar_batch(path: Path, images: np.ndarray, labels: np.ndarray, label_key: bytes = b"labels") -> None:
    """A CIFAR python batch: pickled dict with bytes keys, data (N, 3072) uint8, labels list."""
    obj = {b"batch_label": b"test batch", label_key: labels.tolist(), b"data": images.reshape(len(images), -1),
           b"filenames": [b"x.png"] * len(images)}
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


@pytest.fixture
def mnist_root(tmp_path: Path):
    data = write_mnist_like(tmp_path / "fashion_mnist")
    return tmp_path, data
