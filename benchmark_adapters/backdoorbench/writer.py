"""Write BackdoorBench's formats: a bundle as ``record/<name>/`` (``attack_result.pt`` in the documented
structure, ``bd_test_dataset/`` PNGs, ``attack_df_summary.csv``, a JSON sidecar), and a defense's
``defense_result.pt`` and ``<name>_df_summary.csv``. Every write is atomic (:mod:`otbr_plugin.io`)."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from otbr_plugin.bundle import Bundle
from otbr_plugin.data import get_dataset_spec
from safetensors.torch import save_file

from otbr_plugin.io import atomic_dir, check_replaceable, follow_umask, sha256_file, write_csv, write_with

from .record import ATTACK_RESULT, EXTRA_TENSORS, SIDECAR, TEST_SIZES

RECORD_FILES = (ATTACK_RESULT, "bd_test_dataset", "attack_df_summary.csv", SIDECAR, EXTRA_TENSORS)

__all__ = ["write_attack_result", "write_defense_result", "write_defense_summary"]


def _save_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    arr = image.cpu().numpy()
    img = Image.fromarray(arr[0], mode="L") if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0), mode="RGB")
    img.save(path, format="PNG")


def _zoo_order(bundle: Bundle) -> list[str]:
    """The state_dict keys in the model's own order (as ``model.state_dict()`` lists them; safetensors sorts)."""
    try:
        order = list(bundle.model_config.build().state_dict())
    except ValueError:
        order = []
    return order if set(order) == set(bundle.state_dict) else list(bundle.state_dict)


def write_attack_result(bundle: Bundle, record: str | Path, overwrite: bool = False,
                        test_size: int | None = None) -> Path:
    """Write ``bundle`` as a BackdoorBench record folder (atomically): attack_result.pt in the documented
    structure (protocol 2), bd_test_dataset/<original_label>/<index>.png, attack_df_summary.csv (when the
    bundle has ACC/ASR/RA) and a JSON sidecar with the bundle's meta. ``bd_train`` is None: a bundle has
    no poisoned training set (BackdoorBench stores None too, e.g. for LIRA)."""
    target = Path(record)
    if overwrite:
        check_replaceable(target, _foreign_entries, f"a record folder written from a bundle ({', '.join(RECORD_FILES)})")
    name = target.name
    cfg = bundle.model_config
    bd = bundle.bd_test
    spec = get_dataset_spec(bundle.dataset)
    if test_size is None:
        test_size = bundle.extra.get("clean_test", {}).get("num_samples") if isinstance(bundle.extra.get("clean_test"), dict) else None
        test_size = int(test_size) if test_size else TEST_SIZES.get(spec.name)
    indices = bd.original_indices.tolist()
    if len(set(indices)) != len(indices):
        raise ValueError("the bundle's poisoned test set has duplicate original indices; a record keys images by index")
    if test_size is None or (indices and max(indices) >= test_size):
        test_size = max(indices, default=-1) + 1 if test_size is None else test_size
        if indices and max(indices) >= test_size:
            raise ValueError(f"poisoned index {max(indices)} is beyond the {spec.name} test split ({test_size} samples)")
    with atomic_dir(target, overwrite=overwrite) as tmp:
        folder = tmp / "bd_test_dataset"
        stored_folder = f"./record/{name}/bd_test_dataset"
        data_dict: dict[np.int64, dict[str, Any]] = {}
        for i, idx in enumerate(indices):
            label, target_label = int(bd.original_labels[i]), int(bd.targets[i])
            (folder / str(label)).mkdir(parents=True, exist_ok=True)
            _save_png(bd.images[i], folder / str(label) / f"{idx}.png")
            data_dict[np.int64(idx)] = {"path": f"{stored_folder}/{label}/{idx}.png",
                                        "other_info": [target_label, label]}
        indicator = np.zeros(int(test_size), dtype=np.float64)
        indicator[np.asarray(indices, dtype=np.int64)] = 1.0
        bd_test = {
            "bd_data_container": {"save_folder_path": stored_folder, "save_file_format": ".png", "data_dict": data_dict},
            "getitem_all": True,
            "getitem_all_switch": False,
            "original_index_array": np.asarray(indices, dtype=np.int64),
            "poison_indicator": indicator,
            "save_folder_path": stored_folder,
        }
        bb_name = bundle.extra.get("backdoorbench", {}).get("model_name", cfg.name) \
            if isinstance(bundle.extra.get("backdoorbench"), dict) else cfg.name
        result = {
            "model_name": bb_name,
            "num_classes": int(cfg.num_classes),
            "model": OrderedDict((k, bundle.state_dict[k].detach().cpu().clone()) for k in _zoo_order(bundle)),
            "data_path": f"./data/{spec.name}",
            "img_size": (int(cfg.image_size), int(cfg.image_size), int(cfg.in_channels)),
            "clean_data": spec.name,
            "bd_train": None,
            "bd_test": bd_test,
        }
        torch.save(result, tmp / ATTACK_RESULT, pickle_protocol=2)
        m = bundle.metrics or {}
        if all(isinstance(m.get(k), (int, float)) for k in ("acc", "asr", "ra")):
            _write_summary(tmp / "attack_df_summary.csv", m["acc"], m["asr"], m["ra"])
        side = {"model": cfg.to_dict(), "attack": bundle.attack, "metrics": bundle.metrics,
                "training": bundle.training,
                "extra": {k: v for k, v in bundle.extra.items() if k not in ("data_root", "backdoorbench")},
                "source_model_sha256": bundle.model_sha256}
        if bundle.tensors:  # e.g. the poisoned training indices, a learned trigger: kept for the way back
            save_file({k: v.detach().cpu().contiguous() for k, v in bundle.tensors.items()}, str(tmp / EXTRA_TENSORS))
            follow_umask(tmp / EXTRA_TENSORS)
            side["extra_tensors"] = {"file": EXTRA_TENSORS, "sha256": sha256_file(tmp / EXTRA_TENSORS)}
        (tmp / SIDECAR).write_text(json.dumps(side, indent=2, sort_keys=True, default=str))
    return target


def _foreign_entries(folder: Path) -> list[str]:
    """What in ``folder`` :func:`write_attack_result` does not write (empty: it may replace the folder)."""
    return sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if p.name not in RECORD_FILES)


def write_defense_result(folder: str | Path, model_name: str, num_classes: int,
                         state_dict: Mapping[str, torch.Tensor]) -> Path:
    """``defense_result.pt`` as BackdoorBench writes it: {model_name, num_classes, model} (a dict of CPU tensors;
    loads with ``torch.load(weights_only=True)``)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"model_name": str(model_name), "num_classes": int(num_classes),
               "model": {k: v.detach().cpu().clone() for k, v in state_dict.items()}}
    return write_with(out / "defense_result.pt", lambda p: torch.save(payload, p))


def write_defense_summary(folder: str | Path, name: str, acc: float, asr: float, ra: float) -> Path:
    """``<name>_df_summary.csv`` with BackdoorBench's columns test_acc, test_asr, test_ra (fractions), index first."""
    return _write_summary(Path(folder) / f"{name}_df_summary.csv", acc, asr, ra)


def _write_summary(path: Path, acc: float, asr: float, ra: float) -> Path:
    return write_csv(path, rows=[["", "test_acc", "test_asr", "test_ra"], [0, acc, asr, ra]])
