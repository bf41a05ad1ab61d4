"""One entry point for every checkpoint format the harness accepts: ``load_checkpoint(path)``.

Formats register a reader with :func:`register_reader`; a reader returns a
:class:`~benchmark_adapters.bundle.Bundle` (weights, model config, dataset, poisoned test set, attack info).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

from .bundle import Bundle, is_bundle, load_bundle

__all__ = ["load_checkpoint", "register_reader", "CheckpointReader"]

# (name, probe(path) -> bool, load(path, **options) -> Bundle)
CheckpointReader = tuple[str, Callable[[Path], bool], Callable[..., Bundle]]
_READERS: list[CheckpointReader] = [("bundle", is_bundle, lambda p, **_: load_bundle(p))]
_OPTIONAL_READER_MODULES = ["benchmark_adapters.backdoorbench"]


def register_reader(name: str, probe: Callable[[Path], bool], load: Callable[..., Bundle]) -> None:
    """Add a checkpoint format: ``probe(path)`` says whether ``load(path, **options)`` can read it."""
    if any(r[0] == name for r in _READERS):
        return
    _READERS.append((name, probe, load))


def _load_optional_readers() -> None:
    for mod in _OPTIONAL_READER_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name is None or not mod.startswith(err.name):
                raise


def load_checkpoint(path: str | Path, **options: Any) -> Bundle:
    """Read a bundle folder or any registered format (e.g. a BackdoorBench record folder).

    ``options`` are passed to the reader (e.g. ``data_root``, ``trust``); readers ignore what they do not use.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    _load_optional_readers()
    for _name, probe, load in _READERS:
        if probe(p):
            return load(p, **options)
    raise ValueError(
        f"{p} is not a checkpoint this tool can read; expected one of: {', '.join(r[0] for r in _READERS)} "
        "(a bundle folder holds meta.json, model.safetensors and bd_test.safetensors)"
    )
