"""Atomic writes: every file and folder the project writes goes through here, so nothing half-written is
ever left behind (a temporary sibling is written, flushed and renamed into place).

``write_text``, ``write_bytes``, ``write_json``, ``write_csv`` (a DataFrame or rows), ``save_figure`` (PNG),
``write_with`` (any writer that takes a path, e.g. ``torch.save``) and ``atomic_dir`` (a whole folder).
Files and folders get the permissions the user's umask gives (``mkstemp``/``mkdtemp`` alone would make them
private). ``folder_lock`` makes one writer per output folder at a time; ``file_lock`` locks one file (e.g. one cached bundle).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

__all__ = ["FolderLockedError", "file_lock", "folder_lock", "write_with", "write_text", "write_bytes", "write_json", "write_csv", "save_figure", "plain_text_plots", "atomic_dir",
           "sha256_file", "json_default"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _chmod_default(path: Path, folder: bool) -> None:
    """The mode ``open``/``mkdir`` would have given ``path`` under the current umask."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


class FolderLockedError(FileExistsError):
    """Another process holds the lock of an output folder."""


@contextmanager
def file_lock(path: str | Path, what: str = "run", *, wait: bool = False) -> Iterator[Path]:
    """Hold an exclusive ``fcntl.flock`` on the file ``path`` (created if absent) for the block.

    Without ``wait``, a lock held elsewhere (another process, or a second lock in this one) raises
    :class:`FolderLockedError` at once, naming the pid written by the holder; with ``wait``, the block waits for
    it. The lock goes with the process, also when it is killed; on NFS, Linux maps ``flock`` to a POSIX lock held
    by the server, so it holds across the nodes of a cluster."""
    import fcntl

    lock = Path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fh = open(lock, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise FolderLockedError(
                f"{lock.parent} is in use by another {what} (pid {holder} holds {lock}); wait for it to finish or "
                "pass another output folder"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield lock
    finally:
        fh.close()  # releases the lock


@contextmanager
def folder_lock(folder: str | Path, what: str = "run") -> Iterator[Path]:
    """Hold ``<folder>/.lock`` (:func:`file_lock`) for the block: one writer per folder at a time. A second
    process (or a second lock in this one) gets :class:`FolderLockedError` at once, naming the folder and the pid
    written by the holder."""
    root = Path(folder)
    with file_lock(root / ".lock", what):
        yield root


def write_with(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path`` (atomic on POSIX)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + target.suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        _chmod_default(tmp, folder=False)
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def write_bytes(path: str | Path, data: bytes) -> Path:
    return write_with(path, lambda p: p.write_bytes(data))


def write_text(path: str | Path, text: str) -> Path:
    return write_with(path, lambda p: p.write_text(text))


def json_default(obj: Any) -> Any:
    """JSON for tensors/arrays (``tolist``), paths and tuples."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_json(path: str | Path, data: Any, default: Callable[[Any], Any] | None = json_default) -> Path:
    """Indented, key-sorted JSON."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=True, default=default))


def write_csv(path: str | Path, table: Any = None, *, rows: Iterable[Sequence[Any]] | None = None) -> Path:
    """A pandas DataFrame (written without its index) or plain ``rows`` (the first one the header)."""
    if (table is None) == (rows is None):
        raise TypeError("write_csv takes a DataFrame or rows=, not both")
    if table is not None:
        return write_with(path, lambda p: table.to_csv(p, index=False))

    def write(p: Path) -> None:
        with open(p, "w", newline="") as fh:
            csv.writer(fh).writerows(rows)

    return write_with(path, write)


def plain_text_plots() -> None:
    """Select matplotlib's Agg backend and draw all text as plain text. Plot labels come from records and configs
    (untrusted input): with mathtext on, a ``$...$`` in an attack or defense label is parsed as TeX and a malformed
    one crashes the plot (and the table, report or bench command drawing it)."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False


def save_figure(fig: Any, path: str | Path, **savefig: Any) -> Path:
    """A matplotlib figure as PNG (``savefig`` options passed on)."""
    return write_with(path, lambda p: fig.savefig(p, format="png", **savefig))


@contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder in a temporary sibling and move it into place when the block ends without error::

        with atomic_dir(out / "model") as tmp:
            (tmp / "meta.json").write_text(...)

    An existing folder is refused unless ``overwrite``; then it is replaced only once the new one is complete.
    On error the temporary folder is removed and the old one, if any, is left as it was."""
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists (pass overwrite=True / --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _chmod_default(tmp, folder=True)
        yield tmp
        if target.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, backup / "old")
            os.replace(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
