"""One entry point for every checkpoint format the harness accepts: ``load_checkpoint(path)``.

Formats register a reader with :func:`register_reader`; a reader returns a
:class:`~benchmark_adapters.bundle.Bundle` (weights, model config, dataset, poisoned test set, attack info).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from otbr_plugin.bundle import Bundle
from otbr_plugin.io import path_kind
from otbr_plugin.registry import Registry

from .bundle import is_bundle, load_bundle

__all__ = ["READERS", "load_checkpoint", "register_reader", "CheckpointReader"]

# (probe(path) -> bool, load(path, **options) -> Bundle), tried in registration order
CheckpointReader = tuple[Callable[[Path], bool], Callable[..., Bundle]]
READERS: Registry[CheckpointReader] = Registry("checkpoint reader",
                                               builtins={"backdoorbench": "benchmark_adapters.backdoorbench"})


def _read_bundle(path: Path, **_: Any) -> Bundle:
    return load_bundle(path)


READERS.register("bundle", (is_bundle, _read_bundle))


def register_reader(name: str, probe: Callable[[Path], bool], load: Callable[..., Bundle]) -> None:
    """Add a checkpoint format: ``probe(path)`` says whether ``load(path, **options)`` can read it."""
    READERS.register(name, (probe, load))


def load_checkpoint(path: str | Path, **options: Any) -> Bundle:
    """Read a bundle folder or any registered format (e.g. a BackdoorBench record folder).

    ``options`` are passed to the reader (e.g. ``data_root``, ``trust``); readers ignore what they do not use.
    """
    p = Path(path)
    if not p.exists():
        kind = path_kind(p)
        raise FileNotFoundError(f"checkpoint {p} " + ("does not exist" if kind == "missing" else f"is {kind}")
                                + " (expected a bundle folder or a BackdoorBench record folder / attack_result.pt)")
    if not (p.is_dir() or p.is_file()):
        raise ValueError(f"checkpoint {p} is {path_kind(p)}; expected a bundle folder or a BackdoorBench record "
                         "folder / attack_result.pt")
    for _name, (probe, load) in READERS.items():
        if probe(p):
            return load(p, **options)
    missing = "".join(f"; {reason}" for reason in READERS.unavailable().values())
    raise ValueError(
        f"{p} is not a checkpoint this tool can read; expected one of: {', '.join(READERS.list())} "
        f"(a bundle folder holds meta.json, model.safetensors and bd_test.safetensors){missing}"
    )
