"""BackdoorBench records in and out: ``record/<name>/attack_result.pt`` <-> :class:`Bundle`.

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
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

import numpy as np
import torch

from otbr_plugin.data import ImageDataset, PoisonedTestSet, default_data_root, find_dataset, get_dataset_spec, load_dataset
from otbr_plugin.data.transforms import Normalizer
from otbr_plugin.models import ModelConfig, create_model

from ..bundle import Bundle, sha256_file
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
    "resolve_data_root",
    "load_clean_test",
    "check_clean_labels",
    "write_attack_result",
    "write_defense_result",
    "write_defense_summary",
]

ATTACK_RESULT = "attack_result.pt"
SIDECAR = "otbr_bundle_meta.json"  # written by bundle -> record conversion so a round trip keeps meta.json's fields
REQUIRED_KEYS = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test")
BD_TEST_KEYS = ("bd_data_container", "original_index_array", "poison_indicator")
CONTAINER_KEYS = ("save_folder_path", "data_dict")
# BackdoorBench model_name -> zoo name, and how to read the width multiplier off the weights:
# (key, dim, channels at width 1.0), best guess first
MODEL_NAMES = {"preactresnet18": "preactresnet18", "vgg19_bn": "vgg19_bn", "smallcnn": "smallcnn"}
_WIDTH_PROBES = {
    "preactresnet18": (("conv1.weight", 0, 64), ("linear.weight", 1, 512)),
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


def _local_png(record: Path, stored: str, container_folder: str) -> Path:
    """Map a stored path (relative to the BackdoorBench root, or absolute) into ``record``.

    The part after the container folder's name (``bd_test_dataset``) is kept, so the record folder can live
    anywhere; ``..`` is refused, so no path leads outside the record folder."""
    parts = PurePosixPath(str(stored).replace("\\", "/")).parts
    base = PurePosixPath(str(container_folder).replace("\\", "/")).name or "bd_test_dataset"
    if base not in parts:
        raise AttackResultError(f"{record}: image path {stored!r} does not lie in the bd_test folder {container_folder!r}")
    pos = len(parts) - 1 - parts[::-1].index(base)
    rest = parts[pos + 1:]
    if not rest or any(p in ("..", "") or p.startswith("/") for p in rest):
        raise AttackResultError(f"{record}: image path {stored!r} is not a file inside {base}/")
    return record.joinpath(base, *rest)


def _read_png(path: Path, channels: int, size: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """uint8 (C, H, W), and whether the file had another size and was resized (bilinear) to ``size``."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise AttackResultError(f"poisoned test image {path} is missing (the record's bd_test_dataset/ is incomplete)")
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            resized = img.size != (size[1], size[0])  # PIL size is (W, H)
            if resized:
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as err:
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
        extra=extra, path=record, model_sha256=sha256_file(pt),
    )


# ----------------------------------------------------------------------------------------------------------
# The clean test set
# ----------------------------------------------------------------------------------------------------------
def resolve_data_root(record: Path, dataset: str, data_path: str | None = None,
                      data_root: str | Path | None = None) -> Path | None:
    """The first data root under which ``dataset`` is found: the user's (``data_root`` or ``data_root/<dataset>``),
    else the record's ``data_path`` relative to the BackdoorBench root that holds ``record/<name>``, that
    root's ``data/``, and the default data root. None if not found."""
    spec = get_dataset_spec(dataset)
    if data_root is not None:
        candidates = [Path(data_root), Path(data_root) / spec.name]
    else:
        bb_root = record.resolve().parent.parent
        candidates = []
        if data_path:
            dp = Path(data_path)
            dp = dp if dp.is_absolute() else bb_root / dp
            candidates += [dp, dp.parent]
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


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------
def _atomic_dir(target: Path, overwrite: bool):
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists (pass overwrite=True / --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))


def _replace_dir(tmp: Path, target: Path) -> None:
    if target.exists():
        backup = target.with_name(f".{target.name}.old")
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(target, backup)
        os.replace(tmp, target)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(tmp, target)


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
    tmp = _atomic_dir(target, overwrite)
    try:
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
            with open(tmp / "attack_df_summary.csv", "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["", "test_acc", "test_asr", "test_ra"])
                writer.writerow([0, m["acc"], m["asr"], m["ra"]])
        side = {"model": cfg.to_dict(), "attack": bundle.attack, "metrics": bundle.metrics,
                "training": bundle.training,
                "extra": {k: v for k, v in bundle.extra.items() if k not in ("data_root", "backdoorbench")},
                "source_model_sha256": bundle.model_sha256}
        (tmp / SIDECAR).write_text(json.dumps(side, indent=2, sort_keys=True, default=str))
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_atomic(path: Path, write) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_defense_result(folder: str | Path, model_name: str, num_classes: int,
                         state_dict: Mapping[str, torch.Tensor]) -> Path:
    """``defense_result.pt`` as BackdoorBench writes it: {model_name, num_classes, model} (a dict of CPU tensors;
    loads with ``torch.load(weights_only=True)``)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"model_name": str(model_name), "num_classes": int(num_classes),
               "model": {k: v.detach().cpu().clone() for k, v in state_dict.items()}}
    return _write_atomic(out / "defense_result.pt", lambda p: torch.save(payload, p))


def write_defense_summary(folder: str | Path, name: str, acc: float, asr: float, ra: float) -> Path:
    """``<name>_df_summary.csv`` with BackdoorBench's columns test_acc, test_asr, test_ra (fractions), index first."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)

    def write(p: Path) -> None:
        with open(p, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["", "test_acc", "test_asr", "test_ra"])
            w.writerow([0, acc, asr, ra])

    return _write_atomic(out / f"{name}_df_summary.csv", write)
