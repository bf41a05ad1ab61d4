"""Loading BackdoorBench's torch-pickled files without unpickling arbitrary objects.

``attack_result.pt`` is a torch zip archive whose pickle holds plain containers, tensors and a handful of
numpy objects (arrays, int64 scalars used as dict keys, the dtypes of int64 and float64 arrays). With
torch >= 2.6, ``torch.load(weights_only=True)`` refuses those numpy globals; BackdoorBench's own loader
then fails. :func:`safe_torch_load` allowlists exactly them, for the duration of one load, under both the
numpy 2 (``numpy._core.multiarray``) and numpy 1 (``numpy.core.multiarray``) module names. Anything else
is refused with an error naming the globals the file asks for and the ``trust`` flag that loads it anyway.
"""

from __future__ import annotations

import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from otbr_plugin.io import path_kind

__all__ = [
    "AttackResultError",
    "UnsafeCheckpointError",
    "ALLOWED_GLOBAL_NAMES",
    "numpy_safe_globals",
    "safe_torch_load",
    "globals_in_checkpoint",
]

TRUST_HINT = "trust=True (CLI: --trust-checkpoint / --trust_checkpoint)"


class AttackResultError(ValueError):
    """A BackdoorBench record is missing, truncated, malformed or inconsistent."""


class UnsafeCheckpointError(AttackResultError):
    """The file needs pickle globals beyond the allowlist; it was NOT loaded (no code from it ran)."""

    def __init__(self, path: Path, globals_: list[str], reason: str = "") -> None:
        self.path = path
        self.globals = globals_
        if globals_:
            what = f"the file needs global(s) outside the BackdoorBench allowlist: {', '.join(globals_)}"
            if reason:
                what += f" (torch's safe unpickler: {reason})"
        else:
            what = (f"the safe unpickler cannot read it ({reason or 'no reason given'}); it is not a torch.save "
                    "archive of plain containers (a plain or old-protocol pickle?)")
        super().__init__(
            f"{path}: refused to unpickle: {what}. "
            f"A genuine attack_result.pt needs only numpy arrays, int64/float64 dtypes and numpy scalars. "
            f"Load it anyway only if you trust where it came from: pass {TRUST_HINT}."
        )


def _multiarray_module():
    try:  # numpy >= 2
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core import multiarray  # type: ignore[no-redef]
    return multiarray


def numpy_safe_globals() -> list[Callable | tuple[Callable, str]]:
    """The allowlist: ndarray, dtype, multiarray's ``_reconstruct`` and ``scalar`` (under the numpy 2 and the
    numpy 1 module names) and the dtype classes of int64 and float64 (``Int64DType``/``Float64DType``)."""
    ma = _multiarray_module()
    out: list[Callable | tuple[Callable, str]] = [np.ndarray, np.dtype]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        out.append((ma._reconstruct, f"{mod}._reconstruct"))
        out.append((ma.scalar, f"{mod}.scalar"))
    # numpy >= 1.25 names these numpy.dtypes.Int64DType / Float64DType; type(...) works on every version
    out.append(type(np.dtype(np.int64)))
    out.append(type(np.dtype(np.float64)))
    return out


def _global_name(entry: Callable | tuple[Callable, str]) -> str:
    if isinstance(entry, tuple):
        return entry[1]
    return f"{entry.__module__}.{entry.__qualname__}"


ALLOWED_GLOBAL_NAMES: frozenset[str] = frozenset(_global_name(e) for e in numpy_safe_globals())


def globals_in_checkpoint(path: Path) -> list[str]:
    """Globals in a torch zip checkpoint's pickle that neither torch nor our allowlist accept (read
    statically: nothing is executed). Empty when the file cannot be disassembled."""
    try:
        with torch.serialization.safe_globals(numpy_safe_globals()):
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - best effort: the caller falls back to torch's own message
        return []
    return sorted(g for g in found if g not in ALLOWED_GLOBAL_NAMES)


def _pickle_globals(path: Path) -> list[str]:
    """Globals named in a plain (non-zip) pickle file, read statically with :mod:`pickletools` (nothing runs)."""
    import pickletools

    found: set[str] = set()
    recent: list[str | None] = []  # what the last ops pushed (a string, or None for anything else)
    try:
        with open(path, "rb") as fh:
            for op, arg, _ in pickletools.genops(fh):
                if op.name == "GLOBAL" and isinstance(arg, str):
                    found.add(arg.replace(" ", "."))
                    recent.append(None)
                elif op.name == "STACK_GLOBAL":
                    if len(recent) >= 2 and isinstance(recent[-2], str) and isinstance(recent[-1], str):
                        found.add(f"{recent[-2]}.{recent[-1]}")
                    else:
                        found.add("(a global named through the memo)")
                    recent.append(None)
                elif op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "FRAME", "PROTO"):
                    continue
                else:
                    recent.append(arg if isinstance(arg, str) and "UNICODE" in op.name else None)
    except Exception:  # noqa: BLE001 - best effort
        pass
    return sorted(g for g in found if g not in ALLOWED_GLOBAL_NAMES)


def _unpickler_reason(text: str) -> str:
    """The line after torch's "WeightsUnpickler error:" (e.g. "Unsupported operand 100"), if any."""
    m = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    return m.group(1).strip().splitlines()[0] if m else ""


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+) was not an allowed global|got <class '([\w.]+)'>")


def _describe_load_error(path: Path, err: BaseException) -> AttackResultError:
    text = str(err)
    if isinstance(err, pickle.UnpicklingError) and ("Unsupported global" in text or "Can only build" in text
                                                    or "weights_only" in text.lower()):
        names = globals_in_checkpoint(path)
        if not names:
            names = sorted({a or b for a, b in _GLOBAL_RE.findall(text)})
        if not names and not zipfile.is_zipfile(path):
            names = _pickle_globals(path)
        return UnsafeCheckpointError(path, names, _unpickler_reason(text))
    if "zip archive" in text or "central directory" in text or isinstance(err, (EOFError, zipfile.BadZipFile)):
        return AttackResultError(
            f"{path}: not a readable torch archive ({_first_sentence(text) or type(err).__name__}); "
            "the file is truncated or corrupt (copy it again from the BackdoorBench record)"
        )
    first = text.splitlines()[0] if text else type(err).__name__
    return AttackResultError(f"{path}: cannot be read as a torch.save file ({type(err).__name__}: {first})")


def _first_sentence(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line.split(". ")[0]


def safe_torch_load(path: str | Path, trust: bool = False) -> Any:
    """``torch.load`` a BackdoorBench file to CPU with ``weights_only=True`` and only the numpy allowlist.

    ``trust=True`` falls back to full unpickling (``weights_only=False``): code in the file may run. Use it
    only for files you made or trust.
    """
    p = Path(path)
    if not p.is_file():
        kind = path_kind(p)
        raise AttackResultError(f"{p} {'does not exist' if kind == 'missing' else 'is ' + kind + ', not a file'} "
                                "(expected a BackdoorBench attack_result.pt)")
    if p.stat().st_size == 0:
        raise AttackResultError(f"{p} is empty (truncated copy?)")
    try:
        if trust:
            print(f"WARNING: unpickling {p} without the allowlist (trust flag): code in this file can run; do this "
                  "only for files you made or trust", file=sys.stderr, flush=True)
            return torch.load(p, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(numpy_safe_globals()):
            return torch.load(p, map_location="cpu", weights_only=True)
    except AttackResultError:
        raise
    except Exception as err:  # torch raises RuntimeError / UnpicklingError / EOFError / ... for bad files
        raise _describe_load_error(p, err) from err
