"""BackdoorBench's SSBA data: the pre-made poisoned images its ``attack/ssba.py`` reads, in and out.

BackdoorBench does not encode SSBA's images itself. Its ``attack/ssba.py`` takes two NumPy files made beforehand
with a StegaStamp encoder (``resource/ssba/``), ``--attack_train_replace_imgs_path`` and
``--attack_test_replace_imgs_path`` (default ``./resource/ssba/<dataset>_ssba_{train,test}_b1.npy``): the *whole*
split, every image encoded, in split order, uint8 ``(N, H, W, C)`` (``(N, H, W)`` for grey images, as
``np.array(PIL image)`` stacks them). Poisoning then replaces a selected sample by the array's image at the same
position. Records of such runs (``attack_result.pt`` with ``bd_test_dataset/`` PNGs) are read like any other
record by :func:`~benchmark_adapters.backdoorbench.load_attack_result`.

* :func:`read_ssba_images` reads such a file (``allow_pickle=False``: an object array is refused, never unpickled)
  into uint8 ``(N, C, H, W)``, checking its size against the split;
* :func:`ssba_poisoned_test_set` builds the poisoned test set BackdoorBench's SSBA evaluates (every test sample
  whose label differs from the target, image replaced), so a model trained by BackdoorBench on its pre-made data can
  be defended here without a record;
* :func:`write_ssba_images` / :func:`export_ssba_images` write our encoder's images (an ``ssba`` bundle) in that
  layout, so BackdoorBench's ``attack/ssba.py`` can train on exactly the poisoned samples this project makes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from otbr_plugin.attacks import attack_targets, restore_attack
from otbr_plugin.bundle import Bundle
from otbr_plugin.data import PoisonedTestSet
from otbr_plugin.io import require_file, write_with

__all__ = ["ssba_file_name", "read_ssba_images", "write_ssba_images", "ssba_poisoned_test_set", "export_ssba_images"]


def ssba_file_name(dataset: str, split: str) -> str:
    """BackdoorBench's default name of a pre-made SSBA file: ``<dataset>_ssba_<split>_b1.npy``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return f"{dataset}_ssba_{split}_b1.npy"


def read_ssba_images(path: str | Path, shape: tuple[int, int, int] | None = None,
                     count: int | None = None) -> torch.Tensor:
    """The images of a pre-made SSBA file as uint8 ``(N, C, H, W)``. ``shape`` (C, H, W) and ``count`` (the split's
    size: BackdoorBench indexes the array by position in the split) are checked when given."""
    p = require_file(path, "SSBA image file", "a .npy array of uint8 images (N, H, W[, C])")
    try:
        arr = np.load(p, allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"{p}: not a plain NumPy array of images ({err}); object arrays are refused") from err
    except (OSError, EOFError) as err:
        raise ValueError(f"{p}: cannot be read as a .npy file ({err})") from err
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8:
        raise ValueError(f"{p}: expected uint8 images, got {getattr(arr, 'dtype', type(arr).__name__)}")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"{p}: expected images (N, H, W) or (N, H, W, C) with 1 or 3 channels, got shape {arr.shape}")
    images = torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))
    if shape is not None and tuple(images.shape[1:]) != tuple(shape):
        raise ValueError(f"{p}: images are {tuple(images.shape[1:])} (C, H, W), the dataset's are {tuple(shape)}")
    if count is not None and images.shape[0] != count:
        raise ValueError(f"{p}: holds {images.shape[0]} images but the split has {count}; BackdoorBench's SSBA file "
                         "holds every image of the split, in split order")
    return images


def write_ssba_images(path: str | Path, images: torch.Tensor) -> Path:
    """Write uint8 ``(N, C, H, W)`` images in BackdoorBench's layout (``(N, H, W)`` grey, ``(N, H, W, 3)`` colour),
    atomically."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 (N, C, H, W) with 1 or 3 channels, got {images.dtype} "
                         f"{tuple(images.shape)}")
    arr = images.cpu().numpy().transpose(0, 2, 3, 1)
    arr = np.ascontiguousarray(arr[..., 0] if arr.shape[-1] == 1 else arr)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)

    return write_with(path, save)


def ssba_poisoned_test_set(replaced: torch.Tensor, labels: torch.Tensor, num_classes: int, target_class: int = 0,
                           label_mode: str = "all2one") -> PoisonedTestSet:
    """The poisoned test set of BackdoorBench's SSBA: every test sample whose label differs from its target, its
    image taken from ``replaced`` (the pre-made test file, same order as the split)."""
    if replaced.dtype != torch.uint8 or replaced.dim() != 4 or replaced.shape[0] != labels.shape[0]:
        raise ValueError(f"replaced must hold one uint8 (C, H, W) image per test label ({labels.shape[0]}), got "
                         f"{replaced.dtype} {tuple(replaced.shape)}")
    targets = attack_targets(labels, label_mode, target_class, num_classes)
    keep = torch.nonzero(targets != labels).flatten()
    return PoisonedTestSet(images=replaced[keep].clone(), targets=targets[keep].clone(),
                           original_labels=labels[keep].clone(), original_indices=keep.long())


def export_ssba_images(bundle: Bundle, train_images: torch.Tensor, test_images: torch.Tensor,
                       out: str | Path) -> dict[str, Any]:
    """Encode both whole splits with an ``ssba`` bundle's encoder and write them under ``out`` with BackdoorBench's
    default names (``<dataset>_ssba_{train,test}_b1.npy``), for ``attack/ssba.py``'s replace paths."""
    attack_meta: Mapping[str, Any] = bundle.attack
    if attack_meta.get("name") != "ssba":
        raise ValueError(f"the bundle's attack is {attack_meta.get('name')!r}; only an ssba bundle holds an encoder")
    attack = restore_attack(attack_meta, bundle.tensors)
    folder = Path(out)
    paths = {}
    for split, images in (("train", train_images), ("test", test_images)):
        paths[split] = str(write_ssba_images(folder / ssba_file_name(bundle.dataset, split), attack.apply_trigger(images)))
    return {"paths": paths, "target_class": attack.config.target_class, "poison_ratio": attack.config.poison_ratio,
            "label_mode": attack.config.label_mode}
