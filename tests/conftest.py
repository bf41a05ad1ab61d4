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


@pytest.fixture
def tiny_fashion_bundle(tmp_path: Path) -> tuple[Path, Path]:
    """A random smallcnn (width 0.25) bundle on Fashion-MNIST-shaped data, and a data root with 30 training and
    24 test images in the official IDX format: (bundle folder, data root)."""
    import torch

    from benchmark_adapters.bundle import save_bundle
    from otbr_plugin.bundle import Bundle
    from otbr_plugin.data import Normalizer, PoisonedTestSet
    from otbr_plugin.models import ModelConfig

    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    (root / "fashion_mnist").mkdir(parents=True)
    for split, n in (("train", 30), ("t10k", 24)):
        write_idx(root / "fashion_mnist" / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / "fashion_mnist" / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n))
    cfg = ModelConfig("smallcnn", 10, 1, 28, 0.25)
    torch.manual_seed(0)
    bd = PoisonedTestSet(torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8), torch.zeros(12, dtype=torch.long),
                         torch.randint(1, 10, (12,)), torch.arange(12))
    bundle = save_bundle(Bundle(cfg, cfg.build().state_dict(), "fashion_mnist", Normalizer((0.5,), (0.5,)), bd,
                                {"name": "badnets", "target": 0}, {}), tmp_path / "bundle")
    return bundle, root


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one torch thread (and do not fight other processes for the cores); opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
