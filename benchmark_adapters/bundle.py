"""Save and load the project's checkpoint bundle (the :class:`~otbr_plugin.bundle.Bundle` type lives in the
core): a folder with no pickle anywhere in it.

    model.safetensors     the state_dict
    bd_test.safetensors   poisoned test set: images (uint8), targets, original_labels, original_indices
    extra.safetensors     optional named tensors (e.g. an attack's poisoned training indices)
    meta.json             format version, model/dataset/attack/training/metrics (+ defense), sha256 of each file

meta.json itself is covered by a digest too: the sha256 of its content (without ``files``) is stored in
bd_test.safetensors' metadata (``otbr_meta_sha256``), whose own sha256 meta.json lists (model.safetensors holds
the weights alone, so its sha256 stays the checkpoint's identity). Bundles written before
the digest existed are still read (their meta.json is only validated).

Writing is atomic (a temporary folder renamed into place); loading verifies the schema, every value's type
and range (finite normalization with std > 0, the dataset's input shape, labels within the classes), the
hashes and the shapes and fails with :class:`BundleError` naming what is wrong.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from otbr_plugin._version import __version__
from otbr_plugin.bundle import Bundle, BundleError
from otbr_plugin.data.poisoned import PoisonedTestSet
from otbr_plugin.data.specs import get_dataset_spec
from otbr_plugin.data.transforms import Normalizer, check_normalization
from otbr_plugin.io import atomic_dir, check_replaceable, follow_umask, sha256_file
from otbr_plugin.models import ModelConfig

__all__ = ["Bundle", "BundleError", "save_bundle", "load_bundle", "verify_bundle", "sha256_file", "is_bundle", "bundle_meta", "meta_digest",
           "check_bundle_target",
           "BUNDLE_FORMAT_VERSION"]

BUNDLE_FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
BD_TEST_FILE = "bd_test.safetensors"
EXTRA_FILE = "extra.safetensors"
META_FILE = "meta.json"
BUNDLE_FILES = (META_FILE, MODEL_FILE, BD_TEST_FILE, EXTRA_FILE)
REQUIRED_META = ("format_version", "model", "dataset", "attack", "metrics", "files")
REQUIRED_MODEL = ("name", "num_classes", "in_channels", "image_size", "width")
REQUIRED_DATASET = ("name", "num_classes", "input_shape", "mean", "std")
BD_KEYS = ("images", "targets", "original_labels", "original_indices")
META_DIGEST_KEY = "otbr_meta_sha256"  # in bd_test.safetensors' metadata: sha256 of meta.json without "files"


def meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of ``meta`` without its ``files`` section, in a canonical JSON form."""
    body = {k: v for k, v in meta.items() if k != "files"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def bundle_meta(bundle: Bundle) -> dict[str, Any]:
    """The ``meta.json`` content of ``bundle`` (without ``files``, which the writer adds)."""
    spec = get_dataset_spec(bundle.dataset)
    meta = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "model": bundle.model_config.to_dict(),
        "dataset": {
            "name": spec.name,
            "num_classes": spec.num_classes,
            "input_shape": list(spec.input_shape),
            "mean": list(bundle.normalizer.mean),
            "std": list(bundle.normalizer.std),
        },
        "attack": bundle.attack,
        "metrics": bundle.metrics,
        "training": bundle.training,
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if bundle.defense is not None:
        meta["defense"] = bundle.defense
    if bundle.extra:
        meta["extra"] = bundle.extra
    return meta


def is_bundle(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / META_FILE).is_file()


def save_bundle(bundle: Bundle, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``bundle`` to the folder ``path`` atomically; returns the path."""
    target = Path(path)
    if overwrite:
        check_bundle_target(target, overwrite)
    meta = bundle_meta(bundle)
    _check_meta(meta, target / META_FILE)  # nothing is written that load_bundle would refuse
    meta = json.loads(json.dumps(meta))  # as it will be read back (tuples as lists)
    with atomic_dir(target, overwrite=overwrite) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in bundle.state_dict.items()}
        save_file(state, str(tmp / MODEL_FILE))
        bd = bundle.bd_test
        save_file({k: getattr(bd, k).cpu().contiguous() for k in BD_KEYS}, str(tmp / BD_TEST_FILE),
                  metadata={META_DIGEST_KEY: meta_digest(meta)})
        files = [MODEL_FILE, BD_TEST_FILE]
        if bundle.tensors:
            save_file({k: v.detach().cpu().contiguous() for k, v in bundle.tensors.items()}, str(tmp / EXTRA_FILE))
            files.append(EXTRA_FILE)
        for name in files:  # safetensors creates its files private (0600); a bundle follows the umask
            follow_umask(tmp / name)
        meta["files"] = {name: sha256_file(tmp / name) for name in files}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return target


def check_bundle_target(path: str | Path, overwrite: bool) -> None:
    """Refuse, before any work, a bundle path that is taken: without ``overwrite`` anything there; with it anything
    but a bundle folder (a folder holding other files or sub-folders, a file, a symlink), naming what is there."""
    target = Path(path)
    if not overwrite and os.path.lexists(target):
        raise FileExistsError(f"{target} already exists (pass --overwrite to replace a bundle there)")
    check_replaceable(target, _foreign_entries, f"a bundle folder ({', '.join(BUNDLE_FILES)})")


def _foreign_entries(folder: Path) -> list[str]:
    """The entries of ``folder`` that are not a bundle's files (empty: the folder is a bundle, safe to replace)."""
    return sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if p.name not in BUNDLE_FILES)


def _read_meta(folder: Path) -> dict[str, Any]:
    meta_path = folder / META_FILE
    if not folder.is_dir():
        raise BundleError(f"{folder} is not a bundle folder (it does not exist or is not a directory)")
    if not meta_path.is_file():
        raise BundleError(f"{folder}: no {META_FILE}; a bundle holds {MODEL_FILE}, {BD_TEST_FILE} and {META_FILE}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{meta_path}: not valid JSON ({err})") from err
    except RecursionError as err:
        raise BundleError(f"{meta_path}: JSON nested too deeply; expected the flat meta.json of a bundle") from err
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_path}: expected a JSON object")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise BundleError(f"{meta_path}: missing field(s) {', '.join(missing)}")
    if meta["format_version"] != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{meta_path}: format_version {meta['format_version']!r} is not supported (expected {BUNDLE_FORMAT_VERSION})"
        )
    for section, keys in (("model", REQUIRED_MODEL), ("dataset", REQUIRED_DATASET)):
        if not isinstance(meta[section], dict):
            raise BundleError(f"{meta_path}: '{section}' must be an object")
        miss = [k for k in keys if k not in meta[section]]
        if miss:
            raise BundleError(f"{meta_path}: '{section}' is missing field(s) {', '.join(miss)}")
    _check_meta(meta, meta_path)
    if not isinstance(meta["files"], dict):
        raise BundleError(f"{meta_path}: 'files' must map file names to sha256 digests")
    for name, digest in meta["files"].items():
        if name not in (MODEL_FILE, BD_TEST_FILE, EXTRA_FILE):
            raise BundleError(f"{meta_path}: 'files' lists unknown file {name!r}")
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise BundleError(f"{meta_path}: sha256 of {name} is not a 64-digit hex digest: {digest!r}")
    return meta


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_meta(meta: dict[str, Any], where: Path) -> None:
    """Types and ranges of meta.json's values; a BundleError names the first wrong field and what it should be."""
    def need(ok: bool, field: str, expected: str, value: Any) -> None:
        if not ok:
            raise BundleError(f"{where}: {field} must be {expected}, got {value!r:.80}")

    for section in ("model", "dataset"):
        need(isinstance(meta.get(section), dict), f"'{section}'", "an object", meta.get(section))
    for section in ("attack", "metrics"):
        need(isinstance(meta.get(section), dict), f"'{section}'", "an object", meta.get(section))
    for section in ("training", "extra"):
        if section in meta:
            need(isinstance(meta[section], dict), f"'{section}'", "an object", meta[section])
    if meta.get("defense") is not None:
        need(isinstance(meta["defense"], dict), "'defense'", "an object or null", meta["defense"])
    model, ds = meta["model"], meta["dataset"]
    need(isinstance(model.get("name"), str), "model.name", "a string", model.get("name"))
    for key in ("num_classes", "in_channels", "image_size"):
        need(_is_int(model.get(key)) and model[key] > 0, f"model.{key}", "a positive integer", model.get(key))
    need(_is_num(model.get("width")) and model["width"] > 0, "model.width", "a positive number", model.get("width"))
    if "args" in model:
        need(isinstance(model["args"], dict), "model.args", "an object of model options", model["args"])
    need(isinstance(ds.get("name"), str), "dataset.name", "a dataset name", ds.get("name"))
    try:
        spec = get_dataset_spec(ds["name"])
    except ValueError as err:
        raise BundleError(f"{where}: dataset.name: {err}") from err
    need(ds.get("num_classes") == spec.num_classes and _is_int(ds.get("num_classes")), "dataset.num_classes",
         f"{spec.num_classes} ({spec.name})", ds.get("num_classes"))
    shape = ds.get("input_shape")
    need(isinstance(shape, list) and list(shape) == list(spec.input_shape), "dataset.input_shape",
         f"{list(spec.input_shape)} ({spec.name}, C x H x W)", shape)
    for key in ("mean", "std"):
        v = ds.get(key)
        need(isinstance(v, list) and len(v) == spec.in_channels and all(_is_num(x) for x in v), f"dataset.{key}",
             f"a list of {spec.in_channels} finite number(s)", v)
    need(all(x > 0 for x in ds["std"]), "dataset.std", "positive (it divides the input)", ds["std"])
    try:
        check_normalization(ds["mean"], ds["std"])
    except ValueError as err:
        raise BundleError(f"{where}: dataset: {err}") from None
    need(model["num_classes"] == spec.num_classes, "model.num_classes", f"{spec.num_classes} ({spec.name})",
         model["num_classes"])
    need(model["in_channels"] == spec.in_channels, "model.in_channels",
         f"{spec.in_channels}, the channels of {spec.name}'s images", model["in_channels"])
    need(model["image_size"] == spec.image_size, "model.image_size", f"{spec.image_size} ({spec.name})",
         model["image_size"])


def _check_meta_digest(folder: Path, meta: dict[str, Any]) -> None:
    """meta.json against the digest stored in bd_test.safetensors (absent in older bundles: nothing to check)."""
    try:
        with safe_open(str(folder / BD_TEST_FILE), framework="pt") as fh:
            stored = (fh.metadata() or {}).get(META_DIGEST_KEY)
    except (SafetensorError, OSError) as err:
        raise BundleError(f"{folder / BD_TEST_FILE}: cannot read safetensors file ({err})") from err
    if stored is not None and stored != meta_digest(meta):
        raise BundleError(f"{folder / META_FILE} was changed after the bundle was written (its digest in "
                          f"{BD_TEST_FILE} does not match); restore it or write the bundle again")


def verify_bundle(path: str | Path) -> dict[str, Any]:
    """Check the schema and every file's sha256; returns the meta. Raises :class:`BundleError`."""
    folder = Path(path)
    meta = _read_meta(folder)
    names = [MODEL_FILE, BD_TEST_FILE] + ([EXTRA_FILE] if EXTRA_FILE in meta["files"] else [])
    for name in names:
        expected = meta["files"].get(name)
        if expected is None:
            raise BundleError(f"{folder / META_FILE}: no sha256 recorded for {name}")
        if not (folder / name).is_file():
            raise BundleError(f"{folder}: {name} is missing")
        actual = sha256_file(folder / name)
        if actual != expected:
            raise BundleError(
                f"{folder / name}: sha256 {actual[:16]}... does not match meta.json ({expected[:16]}...): "
                "the file was changed or truncated after the bundle was written"
            )
    _check_meta_digest(folder, meta)
    return meta


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Load and check a bundle (schema, hashes, tensor shapes and dtypes)."""
    folder = Path(path)
    meta = verify_bundle(folder) if verify else _read_meta(folder)
    try:
        state = load_file(str(folder / MODEL_FILE))
        bd = load_file(str(folder / BD_TEST_FILE))
        tensors = load_file(str(folder / EXTRA_FILE)) if EXTRA_FILE in meta["files"] else {}
    except (SafetensorError, OSError) as err:
        raise BundleError(f"{folder}: cannot read safetensors file ({err})") from err
    missing = [k for k in BD_KEYS if k not in bd]
    if missing:
        raise BundleError(f"{folder / BD_TEST_FILE}: missing tensor(s) {', '.join(missing)}")
    try:
        model_config = ModelConfig.from_dict(meta["model"])
        poisoned = PoisonedTestSet(**{k: bd[k] for k in BD_KEYS})
    except (TypeError, ValueError) as err:
        raise BundleError(f"{folder}: {err}") from err
    ds = meta["dataset"]
    if list(poisoned.images.shape[1:]) != list(ds["input_shape"]):
        raise BundleError(
            f"{folder}: poisoned images have shape {tuple(poisoned.images.shape[1:])}, meta says {ds['input_shape']}"
        )
    k = model_config.num_classes
    for name in ("targets", "original_labels"):
        t = getattr(poisoned, name)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= k):
            raise BundleError(f"{folder / BD_TEST_FILE}: {name} must be class labels in [0, {k - 1}], found "
                              f"{int(t.min()) if int(t.min()) < 0 else int(t.max())}")
    return Bundle(
        model_config=model_config,
        state_dict=state,
        dataset=ds["name"],
        normalizer=Normalizer(tuple(ds["mean"]), tuple(ds["std"])),
        bd_test=poisoned,
        attack=meta["attack"],
        metrics=meta["metrics"],
        training=meta.get("training", {}),
        defense=meta.get("defense"),
        extra=meta.get("extra", {}),
        tensors=tensors,
        path=folder,
        model_sha256=meta["files"][MODEL_FILE],
    )
