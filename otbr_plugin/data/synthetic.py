"""Synthetic datasets written in the exact official on-disk formats, to exercise a dataset's whole path (reader,
attacks, defenses, tables) where the real data cannot be had (no network, no licence, CI).

CIFAR-10's format (https://www.cs.toronto.edu/~kriz/cifar.html): ``cifar-10-batches-py/`` holds ``data_batch_1`` ..
``data_batch_5``, ``test_batch`` and ``batches.meta``, each a pickled dict with bytes keys (pickle protocol 2, as
the official files are readable by Python 2): ``b"data"`` a uint8 numpy array (N, 3072), each row one 32x32 image
as 1024 red, 1024 green, 1024 blue values in row-major order; ``b"labels"`` a list of N ints in 0..9;
``b"batch_label"`` and ``b"filenames"`` bytes. ``batches.meta`` holds ``b"label_names"``,
``b"num_cases_per_batch"`` and ``b"num_vis"`` (3072).

The images are learnable: each class has a fixed blocky colour template (4x4 blocks of 8x8 pixels) and every
image is its class's template plus Gaussian noise, so a model's ACC, ASR and a defense's effect mean something.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from ..io import atomic_dir

__all__ = ["CIFAR10_LABEL_NAMES", "synthetic_images", "write_synthetic_cifar10"]

CIFAR10_LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def synthetic_images(n: int, num_classes: int, shape: tuple[int, int, int], rng: np.random.Generator,
                     templates: np.ndarray, noise: float = 40.0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 images (N, C, H, W) with balanced, shuffled labels: ``templates[label]`` plus noise (std
    ``noise`` on the 0..255 scale), clipped."""
    labels = rng.permutation(np.arange(n) % num_classes)
    images = templates[labels].astype(np.float32) + rng.normal(0.0, noise, (n, *shape)).astype(np.float32)
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), labels.astype(np.int64)


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def write_synthetic_cifar10(root: str | Path, train_per_batch: int = 2000, test: int = 2000, seed: int = 0,
                            overwrite: bool = False) -> Path:
    """Write a synthetic CIFAR-10 to ``<root>/cifar10/cifar-10-batches-py`` (the layout :func:`load_dataset`
    finds under data root ``root``) and return that folder. Five training batches of ``train_per_batch`` images
    and a test batch of ``test`` (the official sizes are 10000 and 10000). The folder is written whole or not at
    all; an existing one is refused unless ``overwrite``."""
    for name, value in (("train_per_batch", train_per_batch), ("test", test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 10:
            raise ValueError(f"{name} must be an integer >= 10 (one image per class), got {value!r}")
    rng = np.random.default_rng(seed)
    shape = (3, 32, 32)
    blocks = rng.integers(0, 256, (len(CIFAR10_LABEL_NAMES), 3, 4, 4))
    templates = blocks.repeat(8, axis=2).repeat(8, axis=3)
    target = Path(root) / "cifar10" / "cifar-10-batches-py"
    with atomic_dir(target, overwrite=overwrite) as tmp:
        batches = [(f"data_batch_{i}", f"training batch {i} of 5", train_per_batch) for i in range(1, 6)]
        for file, batch_label, n in batches + [("test_batch", "testing batch 1 of 1", test)]:
            images, labels = synthetic_images(n, len(CIFAR10_LABEL_NAMES), shape, rng, templates)
            _dump(tmp / file, {
                b"batch_label": batch_label.encode(),
                b"labels": [int(v) for v in labels],
                b"data": np.ascontiguousarray(images.reshape(n, 3 * 32 * 32)),
                b"filenames": [f"synthetic_{file}_{i:05d}.png".encode() for i in range(n)],
            })
        _dump(tmp / "batches.meta", {b"num_cases_per_batch": train_per_batch,
                                     b"label_names": [name.encode() for name in CIFAR10_LABEL_NAMES],
                                     b"num_vis": 3 * 32 * 32})
        (tmp / "readme.html").write_text("<p>Synthetic CIFAR-10 written by otbr-plugin "
                                         "(otbr_plugin.data.synthetic): not the real dataset.</p>\n")
    return target
