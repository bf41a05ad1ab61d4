"""Save and load the project's checkpoint bundle (the :class:`~otbr_plugin.bundle.Bundle` type lives in the
core): a folder with no pickle anywhere in it.

    model.safetensors     the state_dict
    bd_test.safetensors   poisoned test set: images (uint8), targets, original_labels, original_indices
    extra.safetensors     optional named tensors (e.g. an attack's poisoned training indices)
    meta.json             format version, model/dataset/attack/training/metrics (+ defense), sha256 of each file

Writing is atomic (a temporary folder renamed into place); loading verifies the schema, the hashes and
the shapes and fails with :class:`BundleError` naming what is wrong.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from otbr_plugin import __version__
from otbr_plugin.bundle import Bundle, BundleError
from otbr_plugin.data.poisoned import PoisonedTestSet
from otbr_plugin.data.specs import get_dataset_spec
from otbr_plugin.data.transforms import Normalizer
from otbr_plugin.io import atomic_dir, sha256_file
from otbr_plugin.models import ModelConfig

__all__ = ["Bundle", "BundleError", "save_bundle", "load_bundle", "verify_bundle", "sha256_file", "is_bundle", "bundle_meta",
           "BUNDLE_FORMAT_VERSION"]

BUNDLE_FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
BD_TEST_FILE = "bd_test.safetensors"
EXTRA_FILE = "extra.safetensors"
META_FILE = "meta.json"
REQUIRED_META = ("format_version", "model", "dataset", "attack", "metrics", "files")
REQUIRED_MODEL = ("name", "num_classes", "in_channels", "image_size", "width")
REQUIRED_DATASET = ("name", "num_classes", "input_shape", "mean", "std")
BD_KEYS = ("images", "targets", "original_labels", "original_indices")


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
    with atomic_dir(target, overwrite=overwrite) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in bundle.state_dict.items()}
        save_file(state, str(tmp / MODEL_FILE))
        bd = bundle.bd_test
        save_file({k: getattr(bd, k).cpu().contiguous() for k in BD_KEYS}, str(tmp / BD_TEST_FILE))
        files = [MODEL_FILE, BD_TEST_FILE]
        if bundle.tensors:
            save_file({k: v.detach().cpu().contiguous() for k, v in bundle.tensors.items()}, str(tmp / EXTRA_FILE))
            files.append(EXTRA_FILE)
        meta = bundle_meta(bundle)
        meta["files"] = {name: sha256_file(tmp / name) for name in files}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return target


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
    if not isinstance(meta["files"], dict):
        raise BundleError(f"{meta_path}: 'files' must map file names to sha256 digests")
    for name, digest in meta["files"].items():
        if name not in (MODEL_FILE, BD_TEST_FILE, EXTRA_FILE):
            raise BundleError(f"{meta_path}: 'files' lists unknown file {name!r}")
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise BundleError(f"{meta_path}: sha256 of {name} is not a 64-digit hex digest: {digest!r}")
    return meta


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
