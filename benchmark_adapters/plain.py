"""Plain PyTorch checkpoints: a state_dict file plus a zoo model name, a dataset and a poisoned test set.

``load_plain_checkpoint(path, model=..., dataset=..., poisoned_test=... | attack_config=...)`` returns a
:class:`~otbr_plugin.bundle.Bundle`, so a plain checkpoint goes through the same defense and evaluation path
as a bundle, and ``otbr-bench convert`` can write it as one.

Weights: ``.safetensors`` (read with safetensors, no pickle), or a ``torch.save`` file read with
``torch.load(weights_only=True)`` (plus the numpy allowlist of :mod:`.backdoorbench.safe_load`); a file that
needs other globals (e.g. a whole pickled ``nn.Module``) is refused with the globals named, unless
``trust=True`` (then a pickled module's ``state_dict()`` is used). A state_dict may be wrapped in a mapping
under one of :data:`STATE_KEYS`. ``module.`` / ``_orig_mod.`` prefixes (DataParallel, torch.compile) are
stripped; the load is strict and a mismatch names the missing, unexpected and misshapen keys.

Poisoned test set, one of:

- an image folder ``<orig_label>/<name>.png`` (as BackdoorBench writes ``bd_test_dataset``), targets from
  ``target_class`` (all2one);
- an ``.npz`` or ``.safetensors`` file with ``images`` (uint8, N x C x H x W or N x H x W x C or N x H x W)
  and ``original_labels`` (or ``labels``), optionally ``targets`` (else ``target_class``) and
  ``original_indices``;
- an attack run config (``configs/attack/<attack>/<dataset>.yaml``): the attack is re-applied to the clean
  test set, exactly as ``otbr-bench attack`` builds its poisoned test set.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from otbr_plugin.bundle import Bundle
from otbr_plugin.data import Normalizer, get_dataset_spec, load_dataset
from otbr_plugin.data.poisoned import PoisonedTestSet
from otbr_plugin.data.specs import DatasetSpec
from otbr_plugin.io import require_file
from otbr_plugin.models import ModelConfig, create_model

from .backdoorbench.record import _read_png, _strip_prefixes
from .backdoorbench.safe_load import UnsafeCheckpointError, safe_torch_load

__all__ = ["STATE_KEYS", "PlainCheckpointError", "read_state_dict", "state_dict_problems", "fit_model_config",
           "read_poisoned_test", "regenerate_poisoned_test", "load_plain_checkpoint"]

#: keys under which toolkits wrap a state_dict in a checkpoint mapping
STATE_KEYS = ("state_dict", "model_state_dict", "model", "net")
_IMAGE_SUFFIXES = (".png",)


class PlainCheckpointError(ValueError):
    """A plain checkpoint or poisoned test set cannot be read or does not fit the model."""


def _tensor_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in obj.items()):
        return dict(obj)
    return None


def read_state_dict(path: str | Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """The state_dict in ``path`` (CPU tensors, prefixes stripped); see the module docstring for the formats."""
    p = require_file(path, "checkpoint", "a .safetensors or torch.save file")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return _strip_prefixes(load_file(str(p)))
        except (SafetensorError, OSError) as err:
            raise PlainCheckpointError(f"{p}: not a readable safetensors file ({err})") from err
    try:
        obj = safe_torch_load(p, trust=trust)
    except UnsafeCheckpointError as err:
        found = f"global(s) {', '.join(err.globals)}" if err.globals else "objects the safe unpickler cannot read"
        raise PlainCheckpointError(
            f"{p}: refused to unpickle: it needs {found}, so it is not a plain state_dict of tensors (a whole pickled "
            "nn.Module?); nothing from it was run. Save model.state_dict() (or use safetensors), or, only if you "
            "trust where the file came from, pass --trust-checkpoint (trust=True).") from err
    if isinstance(obj, nn.Module):  # only reachable with trust=True: the safe loader refuses modules
        obj = obj.state_dict()
    state = _tensor_dict(obj)
    if state is None and isinstance(obj, Mapping):
        for key in STATE_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                inner = inner.state_dict()
            state = _tensor_dict(inner)
            if state is not None:
                break
    if state is None:
        keys = f" (top-level keys: {', '.join(map(str, list(obj)[:10]))})" if isinstance(obj, Mapping) else ""
        raise PlainCheckpointError(f"{p}: holds a {type(obj).__name__}{keys}, not a state_dict: expected a mapping of "
                                   f"parameter name -> tensor, possibly under one of {', '.join(STATE_KEYS)}")
    return _strip_prefixes({k: v.detach().cpu() for k, v in state.items()})


def state_dict_problems(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> list[str]:
    """Why ``state`` does not load strictly into a model whose state_dict is ``expected``: missing, unexpected
    and misshapen keys (empty list: it fits)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)})"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    out = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if keys:
            more = f" and {len(keys) - 10} more" if len(keys) > 10 else ""
            out.append(f"{what} ({len(keys)}): {', '.join(keys[:10])}{more}")
    return out


def _reference_model(name: str, spec: DatasetSpec, width: float, args: Mapping[str, Any]) -> nn.Module:
    with torch.device("meta"):  # shapes only, no memory
        return create_model(name, spec.num_classes, spec.in_channels, spec.image_size, width, **dict(args))


def fit_model_config(name: str, spec: DatasetSpec, state: Mapping[str, torch.Tensor], args: Mapping[str, Any] | None = None,
                     where: str = "checkpoint") -> ModelConfig:
    """The zoo model config whose state_dict ``state`` loads strictly. ``args`` are the model's options; a
    ``width`` among them is the channel multiplier, otherwise it is read from the first conv's output channels."""
    args = dict(args or {})
    width = args.pop("width", None)
    if width is None:
        ref = _reference_model(name, spec, 1.0, args).state_dict()
        first = next((k for k, v in ref.items() if v.dim() == 4 and k in state and state[k].dim() == 4), None)
        width = state[first].shape[0] / ref[first].shape[0] if first else 1.0
    if isinstance(width, bool) or not isinstance(width, (int, float)):
        raise PlainCheckpointError(f"model width must be a number, got {width!r}")
    config = ModelConfig(name, spec.num_classes, spec.in_channels, spec.image_size, float(width), args)
    problems = state_dict_problems(_reference_model(name, spec, float(width), args).state_dict(), state)
    if problems:
        raise PlainCheckpointError(
            f"{where} does not load strictly into {name} (width {float(width):g}, {spec.num_classes} classes, "
            f"{spec.in_channels} input channel(s){', ' + ', '.join(f'{k}={v}' for k, v in args.items()) if args else ''}"
            f"): " + "; ".join(problems))
    return config


def _as_uint8_images(arr: np.ndarray, spec: DatasetSpec, where: str) -> torch.Tensor:
    if arr.dtype != np.uint8:
        raise PlainCheckpointError(f"{where}: images must be uint8 pixels (0-255), got {arr.dtype}")
    c, s = spec.in_channels, spec.image_size
    if arr.ndim == 3 and c == 1:
        arr = arr[:, None]
    if arr.ndim == 4 and arr.shape[1:] != (c, s, s) and arr.shape[1:] == (s, s, c):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.ndim != 4 or arr.shape[1:] != (c, s, s):
        raise PlainCheckpointError(f"{where}: images have shape {arr.shape}; {spec.name} needs N x {c} x {s} x {s} "
                                   f"(or N x {s} x {s} x {c})")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _labels(arr: Any, n: int, num_classes: int, what: str, where: str) -> torch.Tensor:
    a = np.asarray(arr)
    if a.shape != (n,) or not np.issubdtype(a.dtype, np.integer):
        raise PlainCheckpointError(f"{where}: {what} must be {n} integers, got {a.dtype} {a.shape}")
    if n and (a.min() < 0 or a.max() >= num_classes):
        raise PlainCheckpointError(f"{where}: {what} must lie in 0..{num_classes - 1}, got {a.min()}..{a.max()}")
    return torch.from_numpy(a.astype(np.int64))


def _read_arrays(p: Path) -> dict[str, np.ndarray]:
    if p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (ValueError, OSError) as err:
            raise PlainCheckpointError(f"{p}: not a readable .npz of plain arrays ({err})") from err
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(p))
    except (SafetensorError, OSError) as err:
        raise PlainCheckpointError(f"{p}: not a readable safetensors file ({err})") from err


def _read_folder(p: Path, spec: DatasetSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    def order(f: Path) -> tuple[int, int | str]:
        return (0, int(f.stem)) if f.stem.isdigit() else (1, f.stem)

    folders = sorted((d for d in p.iterdir() if d.is_dir()), key=lambda d: (not d.name.isdigit(), d.name))
    bad = [d.name for d in folders if not d.name.isdigit()]
    if bad or not folders:
        raise PlainCheckpointError(f"{p}: expected one sub-folder per original label (0 .. {spec.num_classes - 1}) "
                                   f"holding .png images; found {', '.join(bad) if bad else 'none'}")
    images, labels, indices = [], [], []
    for d in sorted(folders, key=lambda d: int(d.name)):
        for f in sorted((f for f in d.iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES), key=order):
            arr, _ = _read_png(f, spec.in_channels, (spec.image_size, spec.image_size))
            images.append(arr)
            labels.append(int(d.name))
            indices.append(int(f.stem) if f.stem.isdigit() else len(indices))
    if not images:
        raise PlainCheckpointError(f"{p}: no .png images in its label folders")
    return (torch.from_numpy(np.stack(images)), _labels(labels, len(labels), spec.num_classes, "folder labels", str(p)),
            torch.tensor(indices, dtype=torch.int64))


def read_poisoned_test(path: str | Path, spec: DatasetSpec, target_class: int | None = None) -> PoisonedTestSet:
    """A poisoned test set from an image folder or an .npz/.safetensors file (see the module docstring)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"poisoned test set {p} does not exist")
    if p.is_dir():
        images, labels, indices = _read_folder(p, spec)
        targets = None
    elif require_file(p, "poisoned test set", "an image folder, .npz or .safetensors file") and p.suffix in (".npz", ".safetensors"):
        arrays = _read_arrays(p)
        if "images" not in arrays:
            raise PlainCheckpointError(f"{p}: no 'images' array (found: {', '.join(arrays) or 'none'})")
        images = _as_uint8_images(arrays["images"], spec, str(p))
        n = images.shape[0]
        key = "original_labels" if "original_labels" in arrays else "labels"
        if key not in arrays:
            raise PlainCheckpointError(f"{p}: no 'original_labels' (or 'labels') array with the true labels")
        labels = _labels(arrays[key], n, spec.num_classes, key, str(p))
        targets = _labels(arrays["targets"], n, spec.num_classes, "targets", str(p)) if "targets" in arrays else None
        indices = (_labels(arrays["original_indices"], n, 2**62, "original_indices", str(p))
                   if "original_indices" in arrays else torch.arange(n, dtype=torch.int64))
    else:
        raise PlainCheckpointError(f"{p}: expected an image folder (<orig_label>/<name>.png), an .npz or a "
                                   ".safetensors file")
    if targets is None:
        if target_class is None:
            raise PlainCheckpointError(f"{p} holds no attack targets: pass the target class (--target-class N, "
                                       "all2one) or store a 'targets' array")
        if not 0 <= int(target_class) < spec.num_classes:
            raise PlainCheckpointError(f"target class {target_class} is out of range for {spec.name} "
                                       f"({spec.num_classes} classes)")
        targets = torch.full_like(labels, int(target_class))
    return PoisonedTestSet(images=images, targets=targets, original_labels=labels, original_indices=indices)


def regenerate_poisoned_test(attack_config: str | Path | Mapping[str, Any], spec: DatasetSpec,
                             data_root: str | Path | None = None) -> tuple[PoisonedTestSet, dict[str, Any]]:
    """Re-apply the attack of an attack run config to ``spec``'s clean test set; returns the poisoned test set
    and the attack's parameters."""
    from otbr_plugin.attacks.runner import parse_attack_run
    from otbr_plugin.config import find_config_file, load_yaml

    config = attack_config if isinstance(attack_config, Mapping) else load_yaml(find_config_file(attack_config))
    run = parse_attack_run(config)
    if run.dataset != spec.name:
        raise PlainCheckpointError(f"attack config {attack_config} is for {run.dataset}, the checkpoint for {spec.name}")
    test = load_dataset(spec.name, "test", data_root)
    return run.attack.poison_test(test.images, test.labels, spec.num_classes), run.attack.params()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_plain_checkpoint(
    path: str | Path,
    *,
    model: str,
    dataset: str,
    model_args: Mapping[str, Any] | None = None,
    poisoned_test: str | Path | None = None,
    attack_config: str | Path | Mapping[str, Any] | None = None,
    target_class: int | None = None,
    data_root: str | Path | None = None,
    trust: bool = False,
) -> Bundle:
    """A :class:`Bundle` from a plain state_dict file, a zoo model name (``model_args``: its options and
    ``width``), a dataset and exactly one poisoned test source (``poisoned_test`` or ``attack_config``)."""
    if (poisoned_test is None) == (attack_config is None):
        raise PlainCheckpointError("a plain checkpoint needs exactly one poisoned test source: an image folder or "
                                   ".npz/.safetensors file (--poisoned-test) or an attack config (--attack-config)")
    spec = get_dataset_spec(dataset)
    p = Path(path)
    state = read_state_dict(p, trust=trust)
    config = fit_model_config(model, spec, state, model_args, where=str(p))
    if poisoned_test is not None:
        bd = read_poisoned_test(poisoned_test, spec, target_class)
        attack: dict[str, Any] = {"name": "external", "poisoned_test": str(poisoned_test)}
        if target_class is not None:
            attack["target_class"] = int(target_class)
    else:
        bd, attack = regenerate_poisoned_test(attack_config, spec, data_root)  # type: ignore[arg-type]
    return Bundle(model_config=config, state_dict=state, dataset=spec.name, normalizer=Normalizer(spec.mean, spec.std),
                  bd_test=bd, attack=attack, metrics={}, extra={"source": {"format": "plain state_dict", "path": str(p)}},
                  model_sha256=_sha256(p))
