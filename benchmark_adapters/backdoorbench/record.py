"""Read BackdoorBench records: ``record/<name>/attack_result.pt`` -> :class:`Bundle` (writing: :mod:`.writer`;
the clean test set that goes with a record: :mod:`.clean_test`).

The format (as a BackdoorBench v2 attack writes it):

``attack_result.pt``, a torch zip archive whose pickle (protocol 2) holds a plain dict:
    model_name   str, e.g. "preactresnet18"
    num_classes  int
    model        state_dict (OrderedDict of tensors; ``module.`` prefixes when saved from DataParallel)
    data_path    str, relative to the BackdoorBench root, e.g. "./data/cifar10"
    img_size     tuple (H, W, C)
    clean_data   dataset name, e.g. "cifar10"
    bd_train     dict like bd_test, or None (e.g. LIRA)
    bd_test      dict: bd_data_container {save_folder_path, save_file_format, data_dict}, getitem_all,
                 getitem_all_switch, original_index_array (int64), poison_indicator (float64 0/1 over the whole
                 test split), save_folder_path
``data_dict`` maps numpy int64 original indices to {"path": "./record/<name>/bd_test_dataset/<label>/<index>.png",
"other_info": [bd_label, original_label]}. Beside it: ``bd_test_dataset/`` (PNG per poisoned sample),
``attack_df_summary.csv`` (test_acc, test_asr, test_ra, ...), and files not needed to defend.

Reading never unpickles arbitrary objects (see :mod:`.safe_load`); PNG paths are resolved inside the record
folder, wherever it lives, and can never point outside it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from otbr_plugin.data import PoisonedTestSet, get_dataset_spec
from otbr_plugin.data.transforms import Normalizer
from otbr_plugin.models import ModelConfig, create_model
from otbr_plugin.bundle import Bundle
from otbr_plugin.io import is_inside, path_kind, sha256_file

from .clean_test import resolve_data_root
from .safe_load import AttackResultError, safe_torch_load

__all__ = [
    "ATTACK_RESULT",
    "REQUIRED_KEYS",
    "BD_TEST_KEYS",
    "MODEL_NAMES",
    "is_record",
    "record_folder",
    "read_attack_result",
    "load_attack_result",
    "poisoned_test_set",
    "poisoned_train_set",
    "state_dict_for_zoo",
]

ATTACK_RESULT = "attack_result.pt"
EXTRA_TENSORS = "extra.safetensors"  # a bundle's extra tensors (poison indices, trigger state), kept by conversion
SIDECAR = "otbr_bundle_meta.json"  # written by bundle -> record conversion so a round trip keeps meta.json's fields
REQUIRED_KEYS = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test")
BD_TEST_KEYS = ("bd_data_container", "original_index_array", "poison_indicator")
CONTAINER_KEYS = ("save_folder_path", "data_dict")
# BackdoorBench model_name -> zoo name, and how to read the width multiplier off the weights:
# (key, dim, channels at width 1.0), best guess first
# (BackdoorBench's resnet18 is torchvision's, ImageNet stem: the zoo's resnet18 with its default stem)
MODEL_NAMES = {"preactresnet18": "preactresnet18", "vgg19_bn": "vgg19_bn", "smallcnn": "smallcnn",
               "resnet18": "resnet18"}
_WIDTH_PROBES = {
    "preactresnet18": (("conv1.weight", 0, 64), ("linear.weight", 1, 512)),
    "resnet18": (("conv1.weight", 0, 64), ("fc.weight", 1, 512)),
    "vgg19_bn": (("features.0.weight", 0, 64), ("classifier.6.weight", 1, 4096)),
    "smallcnn": (("features.0.weight", 0, 16), ("linear.weight", 1, 64)),
}
# official test-split sizes, for poison_indicator when a bundle does not say how large its test set is
TEST_SIZES = {"cifar10": 10000, "cifar100": 10000, "gtsrb": 12630, "tiny": 10000, "mnist": 10000,
              "fashion_mnist": 10000}


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------
def record_folder(path: str | Path) -> tuple[Path, Path]:
    """``(record folder, attack_result.pt)`` for a record folder or the .pt file itself."""
    p = Path(path)
    if p.is_dir():
        return p, p / ATTACK_RESULT
    return p.parent, p


def is_record(path: str | Path) -> bool:
    """A folder holding ``attack_result.pt``, or such a file."""
    p = Path(path)
    return (p.is_dir() and (p / ATTACK_RESULT).is_file()) or (p.is_file() and p.name == ATTACK_RESULT)


def _as_int_array(value: Any, what: str, where: Path) -> np.ndarray:
    try:
        arr = np.asarray(value.numpy() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError) as err:
        raise AttackResultError(f"{where}: {what} is not an array ({err})") from err
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise AttackResultError(f"{where}: {what} must be a 1-d numeric array, got {arr.dtype} {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.equal(np.mod(arr, 1), 0)):
        raise AttackResultError(f"{where}: {what} must hold whole numbers")
    return arr.astype(np.int64)


def read_attack_result(path: str | Path, trust: bool = False) -> dict[str, Any]:
    """Load ``attack_result.pt`` safely and check its structure; returns the raw dict."""
    _, pt = record_folder(path)
    obj = safe_torch_load(pt, trust=trust)
    if not isinstance(obj, Mapping):
        raise AttackResultError(f"{pt}: expected a dict with keys {', '.join(REQUIRED_KEYS)}, got {type(obj).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise AttackResultError(
            f"{pt}: missing key(s) {', '.join(missing)} (a BackdoorBench attack_result.pt holds "
            f"{', '.join(REQUIRED_KEYS)}; found {', '.join(map(str, obj))})"
        )
    if not isinstance(obj["model"], Mapping) or not all(isinstance(v, torch.Tensor) for v in obj["model"].values()):
        raise AttackResultError(f"{pt}: 'model' must be a state_dict (a mapping of names to tensors)")
    img = obj["img_size"]
    if not isinstance(img, (tuple, list)) or len(img) != 3 or not all(isinstance(v, (int, np.integer)) for v in img):
        raise AttackResultError(f"{pt}: 'img_size' must be (H, W, C), got {img!r}")
    if not isinstance(obj["num_classes"], (int, np.integer)) or isinstance(obj["num_classes"], bool):
        raise AttackResultError(f"{pt}: 'num_classes' must be an integer, got {obj['num_classes']!r}")
    for key in ("model_name", "clean_data", "data_path"):
        if not isinstance(obj[key], str):
            raise AttackResultError(f"{pt}: '{key}' must be a string, got {type(obj[key]).__name__}")
    bd = obj["bd_test"]
    if not isinstance(bd, Mapping):
        raise AttackResultError(f"{pt}: 'bd_test' must be a dict (BackdoorBench v2 dataset state), got {type(bd).__name__}")
    miss = [k for k in BD_TEST_KEYS if k not in bd]
    if miss:
        raise AttackResultError(
            f"{pt}: 'bd_test' is missing {', '.join(miss)} (found {', '.join(map(str, bd))}); "
            "only BackdoorBench v2 records (PNG-backed bd_test_dataset) are supported"
        )
    cont = bd["bd_data_container"]
    if not isinstance(cont, Mapping) or any(k not in cont for k in CONTAINER_KEYS):
        raise AttackResultError(f"{pt}: bd_test['bd_data_container'] must be a dict with {', '.join(CONTAINER_KEYS)}")
    if not isinstance(cont["data_dict"], Mapping):
        raise AttackResultError(f"{pt}: bd_test['bd_data_container']['data_dict'] must be a dict")
    return dict(obj)


def _inside(record: Path, path: Path, stored: str) -> Path:
    """``path`` with every symlink resolved, required to lie inside the (resolved) record folder."""
    root = record.resolve()
    try:
        real = path.resolve(strict=False)
    except (OSError, RuntimeError) as err:  # a symlink loop
        raise AttackResultError(f"{record}: image path {stored!r} cannot be resolved ({err})") from err
    if real != root and root not in real.parents:
        raise AttackResultError(
            f"{record}: image path {stored!r} leads to {real}, outside the record folder {root} (through '..' or a "
            "symlink); a record's poisoned test images must lie in its own bd_test_dataset/"
        )
    return real


def _local_png(record: Path, stored: str, container_folder: str) -> Path:
    """Map a stored path (relative to the BackdoorBench root, or absolute) into ``record``.

    The part after the container folder's name (``bd_test_dataset``) is kept, so the record folder can live
    anywhere; ``..`` is refused, and the result, with symlinks resolved (of the files and of the folder), must
    lie inside the record folder."""
    parts = PurePosixPath(str(stored).replace("\\", "/")).parts
    base = PurePosixPath(str(container_folder).replace("\\", "/")).name or "bd_test_dataset"
    if base in ("", ".", "..") or "/" in base:
        raise AttackResultError(f"{record}: bd_test save_folder_path {container_folder!r} does not name a folder of the "
                                "record (expected .../bd_test_dataset)")
    if base not in parts:
        raise AttackResultError(f"{record}: image path {stored!r} does not lie in the bd_test folder {container_folder!r}")
    pos = len(parts) - 1 - parts[::-1].index(base)
    rest = parts[pos + 1:]
    if not rest or any(p in ("..", ".", "") or p.startswith("/") for p in rest):
        raise AttackResultError(f"{record}: image path {stored!r} is not a file inside {base}/")
    return _inside(record, record.joinpath(base, *rest), stored)


def _read_png(path: Path, channels: int, size: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """uint8 (C, H, W), and whether the file had another size and was resized (bilinear) to ``size``.

    An image far larger than any dataset's (PIL's decompression-bomb limit) is refused before it is decoded."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise AttackResultError(f"poisoned test image {path} is missing (the record's bd_test_dataset/ is incomplete)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img = img.convert("L" if channels == 1 else "RGB")
                resized = img.size != (size[1], size[0])  # PIL size is (W, H)
                if resized:
                    img = img.resize((size[1], size[0]), Image.BILINEAR)
                arr = np.asarray(img, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise AttackResultError(f"poisoned test image {path} is too large to decode safely ({err}); expected a "
                                f"{size[1]}x{size[0]} PNG") from err
    except (OSError, ValueError, UnidentifiedImageError) as err:
        raise AttackResultError(f"poisoned test image {path} cannot be decoded ({err})") from err
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)), resized


def _label(value: Any, what: str) -> int:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, np.ndarray):
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise AttackResultError(f"{what} must be an integer label, got {value!r}")
    return int(value)


def poisoned_test_set(raw: Mapping[str, Any], record: Path, stats: dict[str, Any] | None = None,
                      key: str = "bd_test", max_samples: int | None = None, seed: int = 0) -> PoisonedTestSet:
    """Rebuild the poisoned test set from bd_test: the poisoned original indices (in stored order), their PNGs
    and other_info's [bd_label, original_label]. PNGs of another size than img_size are resized (bilinear);
    ``stats["resized_images"]`` counts them. ``key="bd_train"`` reads the poisoned *training* samples the
    same way (targets are then their training labels); ``max_samples`` keeps a seeded random subset of them
    (in stored order) before any PNG is read."""
    bd = raw[key]
    where = record / ATTACK_RESULT
    if not isinstance(bd, Mapping) or any(k not in bd for k in BD_TEST_KEYS):
        raise AttackResultError(f"{where}: '{key}' must be a dict with {', '.join(BD_TEST_KEYS)}")
    indices = _as_int_array(bd["original_index_array"], f"{key}['original_index_array']", where)
    if bd["poison_indicator"] is None:  # some writers leave it out: every listed sample is then poisoned
        indicator = np.zeros(int(indices.max(initial=-1)) + 1, dtype=np.int64)
        indicator[indices] = 1
    else:
        indicator = _as_int_array(bd["poison_indicator"], f"{key}['poison_indicator']", where)
    if indices.size and (indices.min() < 0 or indices.max() >= indicator.size):
        raise AttackResultError(
            f"{where}: original_index_array holds indices outside the poison_indicator (length {indicator.size})"
        )
    if len(set(indices.tolist())) != indices.size:
        raise AttackResultError(f"{where}: original_index_array holds duplicate indices")
    poisoned = indices[indicator[indices] == 1]  # a bd_test that was not subset also lists clean samples
    if poisoned.size == 0:
        raise AttackResultError(f"{where}: {key} holds no poisoned sample (poison_indicator is 0 everywhere it points)")
    if max_samples is not None and poisoned.size > max_samples:
        keep = torch.randperm(poisoned.size, generator=torch.Generator().manual_seed(int(seed)))[:max_samples]
        poisoned = poisoned[np.sort(keep.numpy())]
    cont = bd["bd_data_container"]
    if not isinstance(cont, Mapping) or any(k not in cont for k in CONTAINER_KEYS) \
            or not isinstance(cont["data_dict"], Mapping):
        raise AttackResultError(f"{where}: {key}['bd_data_container'] must be a dict with {', '.join(CONTAINER_KEYS)}")
    data_dict = cont["data_dict"]
    h, w, c = (int(v) for v in raw["img_size"])
    images, targets, originals = [], [], []
    resized = 0
    for idx in poisoned.tolist():
        entry = data_dict.get(idx)
        if entry is None:
            entry = data_dict.get(np.int64(idx))
        if not isinstance(entry, Mapping) or "path" not in entry or "other_info" not in entry:
            raise AttackResultError(f"{where}: {key} data_dict has no entry {{path, other_info}} for poisoned index {idx}")
        info = entry["other_info"]
        if not isinstance(info, (list, tuple)) or len(info) < 2:
            raise AttackResultError(f"{where}: data_dict[{idx}]['other_info'] must be [bd_label, original_label], got {info!r}")
        targets.append(_label(info[0], f"data_dict[{idx}] bd_label"))
        originals.append(_label(info[1], f"data_dict[{idx}] original_label"))
        image, was_resized = _read_png(_local_png(record, entry["path"], str(cont["save_folder_path"])), c, (h, w))
        images.append(image)
        resized += was_resized
    if stats is not None:
        stats["resized_images"] = resized
    k = int(raw["num_classes"])
    bad = [t for t in targets + originals if not 0 <= t < k]
    if bad:
        raise AttackResultError(f"{where}: label {bad[0]} in {key} is out of range for {k} classes")
    return PoisonedTestSet(
        images=torch.from_numpy(np.stack(images)),
        targets=torch.tensor(targets, dtype=torch.int64),
        original_labels=torch.tensor(originals, dtype=torch.int64),
        original_indices=torch.from_numpy(poisoned.copy()),
    )


def poisoned_train_set(path: str | Path, trust: bool = False, max_samples: int | None = None,
                       seed: int = 0) -> PoisonedTestSet | None:
    """The poisoned training samples of a BackdoorBench record (its ``bd_train``: PNGs in
    ``bd_train_dataset/``, training labels, original labels and indices), or None when the record has no
    ``bd_train`` (e.g. LIRA). ``max_samples``/``seed``: a seeded random subset, read alone."""
    record, pt = record_folder(path)
    raw = read_attack_result(pt, trust=trust)
    if raw["bd_train"] is None:
        return None
    return poisoned_test_set(raw, record, key="bd_train", max_samples=max_samples, seed=seed)


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        k = str(key)
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = value
    return out


def _shape_mismatch(model_state: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> list[str]:
    return [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
            for k, v in model_state.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]


def state_dict_for_zoo(
    bb_model_name: str, state: Mapping[str, torch.Tensor], num_classes: int, in_channels: int, image_size: int,
    width_hint: float | None = None, where: str = "checkpoint",
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Map a BackdoorBench model to the zoo: strip ``module.``, infer the width from the weights' shapes and
    check a strict load; a mismatch raises naming the missing, unexpected and misshapen keys."""
    if bb_model_name not in MODEL_NAMES:
        raise AttackResultError(
            f"{where}: model_name {bb_model_name!r} has no counterpart in the model zoo; supported: "
            f"{', '.join(sorted(MODEL_NAMES))}"
        )
    name = MODEL_NAMES[bb_model_name]
    clean = _strip_prefixes(state)
    widths: list[float] = [width_hint] if width_hint else []
    for key, dim, base in _WIDTH_PROBES[name]:
        if key in clean and clean[key].dim() > dim:
            widths.append(clean[key].shape[dim] / base)
    widths = [w for i, w in enumerate(widths) if 0 < w <= 4 and w not in widths[:i]] or [1.0]
    report = ""
    for width in widths:
        config = ModelConfig(name, int(num_classes), int(in_channels), int(image_size), float(width))
        try:
            model_state = create_model(name, int(num_classes), int(in_channels), int(image_size), float(width)).state_dict()
        except ValueError as err:
            raise AttackResultError(f"{where}: cannot build {name}: {err}") from err
        missing = sorted(set(model_state) - set(clean))
        unexpected = sorted(set(clean) - set(model_state))
        shapes = _shape_mismatch(model_state, clean)
        if not (missing or unexpected or shapes):
            model = create_model(name, int(num_classes), int(in_channels), int(image_size), float(width))
            model.load_state_dict(clean, strict=True)
            return config, {k: v.detach().cpu().clone() for k, v in clean.items()}
        if not report:
            def cut(items: list[str]) -> str:
                return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
            parts = [f"missing keys: {cut(missing)}" if missing else "",
                     f"unexpected keys: {cut(unexpected)}" if unexpected else "",
                     f"shape mismatches: {cut(shapes)}" if shapes else ""]
            report = "; ".join(p for p in parts if p)
    raise AttackResultError(
        f"{where}: the weights do not fit {name} ({num_classes} classes, {in_channels}x{image_size}x{image_size}, "
        f"width {widths[0]:g}): {report}. Is model_name right? (this state_dict has {len(clean)} entries)"
    )


def _attack_summary(record: Path) -> dict[str, float]:
    """ACC/ASR/RA from BackdoorBench's attack_df_summary.csv (last row), if present and readable."""
    path = record / "attack_df_summary.csv"
    if not path.is_file():
        return {}
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError):
        return {}
    out: dict[str, float] = {}
    if rows:
        for ours, theirs in (("acc", "test_acc"), ("asr", "test_asr"), ("ra", "test_ra")):
            try:
                out[ours] = float(rows[-1][theirs])
            except (KeyError, TypeError, ValueError):
                pass
    return out


def _sidecar(record: Path) -> dict[str, Any]:
    path = record / SIDECAR
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _extra_tensors(record: Path, side: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The extra tensors a bundle -> record conversion kept beside the record (``extra.safetensors``, its sha256
    in the sidecar); none when the sidecar lists none. A listed file that is missing, not a regular file inside the
    record, or changed is an error: a round trip never silently drops them."""
    entry = side.get("extra_tensors")
    if entry is None:
        return {}
    path = record / EXTRA_TENSORS
    if not (isinstance(entry, dict) and entry.get("file") == EXTRA_TENSORS and isinstance(entry.get("sha256"), str)):
        raise AttackResultError(f"{record / SIDECAR}: 'extra_tensors' must be {{file: {EXTRA_TENSORS}, sha256: ...}}")
    if not (path.is_file() and not path.is_symlink() and is_inside(path, record)):
        raise AttackResultError(f"{path}: the record's extra tensors (listed in {SIDECAR}) are {path_kind(path)}; "
                                "expected the regular file written by `otbr-bench convert`")
    if sha256_file(path) != entry["sha256"]:
        raise AttackResultError(f"{path}: sha256 does not match {SIDECAR}; the file was changed after conversion")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise AttackResultError(f"{path}: not a readable safetensors file ({err})") from err


def load_attack_result(path: str | Path, trust: bool = False, data_root: str | Path | None = None) -> Bundle:
    """Read a BackdoorBench record (its folder or its attack_result.pt) into a :class:`Bundle`.

    Nothing is unpickled beyond the numpy allowlist unless ``trust=True``. The poisoned test set is rebuilt
    from bd_test's PNGs; the weights are loaded strictly into the zoo model. ``data_root`` is only used to
    find the clean dataset for later evaluation (recorded as ``extra["data_root"]`` when found); the
    clean test set itself is loaded by :func:`load_clean_test`.
    """
    record, pt = record_folder(path)
    raw = read_attack_result(pt, trust=trust)
    try:
        spec = get_dataset_spec(raw["clean_data"])
    except ValueError as err:
        raise AttackResultError(f"{pt}: clean_data {raw['clean_data']!r}: {err}") from err
    h, w, c = (int(v) for v in raw["img_size"])
    if h != w:
        raise AttackResultError(f"{pt}: img_size {raw['img_size']!r} is not square; the model zoo takes square inputs")
    if (c, h, w) != spec.input_shape:
        raise AttackResultError(f"{pt}: img_size {raw['img_size']!r} does not match {spec.name} {spec.input_shape} (C, H, W)")
    if int(raw["num_classes"]) != spec.num_classes:
        raise AttackResultError(f"{pt}: num_classes {raw['num_classes']} but {spec.name} has {spec.num_classes}")
    side = _sidecar(record)
    hint = side.get("model", {}).get("width") if isinstance(side.get("model"), dict) else None
    config, state = state_dict_for_zoo(raw["model_name"], raw["model"], int(raw["num_classes"]), c, h,
                                       width_hint=float(hint) if isinstance(hint, (int, float)) else None,
                                       where=str(pt))
    stats: dict[str, Any] = {}
    bd = poisoned_test_set(raw, record, stats)
    targets = sorted(set(bd.targets.tolist()))
    attack = side.get("attack") if isinstance(side.get("attack"), dict) else None
    if attack is None:
        attack = {"name": record.name, "source": "backdoorbench",
                  "label_mode": "all2one" if len(targets) == 1 else "all2all"}
        if len(targets) == 1:
            attack["target_class"] = targets[0]
    metrics = _attack_summary(record) or (side.get("metrics") if isinstance(side.get("metrics"), dict) else {})
    indicator = raw["bd_test"]["poison_indicator"]
    extra: dict[str, Any] = dict(side.get("extra", {})) if isinstance(side.get("extra"), dict) else {}
    extra.update({
        "backdoorbench": {"record": record.name, "model_name": raw["model_name"], "data_path": raw["data_path"],
                          "img_size": [h, w, c], "bd_train": None if raw["bd_train"] is None else "present",
                          "resized_bd_images": stats.get("resized_images", 0)},
    })
    if indicator is not None:  # its length is the size of the clean test split
        extra["clean_test"] = {"dataset": spec.name, "split": "test", "num_samples": int(np.asarray(indicator).size)}
    root = resolve_data_root(record, spec.name, raw["data_path"], data_root)
    if root is not None:
        extra["data_root"] = str(root)
    return Bundle(
        model_config=config, state_dict=state, dataset=spec.name, normalizer=Normalizer(spec.mean, spec.std),
        bd_test=bd, attack=attack, metrics=metrics,
        training=side.get("training", {}) if isinstance(side.get("training"), dict) else {},
        extra=extra, tensors=_extra_tensors(record, side), path=record, model_sha256=sha256_file(pt),
    )
