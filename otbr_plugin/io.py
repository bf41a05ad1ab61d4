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
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

__all__ = ["FolderLockedError", "file_lock", "folder_lock", "read_regular", "path_kind", "is_inside", "safe_name",
           "follow_umask", "check_replaceable", "require_file", "write_with", "write_text", "write_bytes", "write_json", "write_csv", "save_figure", "plain_text_plots", "atomic_dir",
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


_PID_TEXT = re.compile(rb"^\s*\d*\s*$")  # what a lock file holds: the pid of its last holder (or nothing)


def _open_lock(lock: Path) -> tuple[int, bool]:
    """An fd on the lock file ``lock`` (created when absent) and whether this call created it. Never follows a
    symlink and refuses anything but a regular file, so a planted ``.lock`` cannot point the lock at another
    file."""
    flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    created = False
    try:
        fd = os.open(lock, flags | os.O_CREAT | os.O_EXCL, 0o666)
        created = True
    except FileExistsError:
        try:
            fd = os.open(lock, flags)
        except OSError as err:
            if path_kind(lock) != "a regular file":
                raise ValueError(_not_a_lock(lock)) from err
            raise PermissionError(f"cannot open the lock file {lock} ({err.strerror}); it belongs to another user or "
                                  "is read-only: use an output folder you can write") from err
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ValueError(_not_a_lock(lock))
    return fd, created


def _not_a_lock(lock: Path) -> str:
    return (f"lock file {lock} is {path_kind(lock)}; a lock must be a regular file, never a symlink: refusing to use "
            "it (remove it; otbr-bench creates its lock files itself)")


@contextmanager
def file_lock(path: str | Path, what: str = "run", *, wait: bool = False) -> Iterator[Path]:
    """Hold an exclusive ``fcntl.flock`` on the file ``path`` (created if absent) for the block.

    Without ``wait``, a lock held elsewhere (another process, or a second lock in this one) raises
    :class:`FolderLockedError` at once, naming the pid written by the holder; with ``wait``, the block waits for
    it. The lock goes with the process, also when it is killed; on NFS, Linux maps ``flock`` to a POSIX lock held
    by the server, so it holds across the nodes of a cluster.

    The lock file is opened without following symlinks, must be a regular file, and its content (the holder's
    pid) is replaced only when this call created it or it holds nothing but a pid: a planted ``.lock`` (a symlink
    or hard link to another file) is never truncated or written."""
    import fcntl

    lock = Path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd, created = _open_lock(lock)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            holder = holder if holder.isdigit() else "unknown"
            raise FolderLockedError(
                f"{lock.parent} is in use by another {what} (pid {holder} holds {lock}); wait for it to finish or "
                "pass another output folder"
            ) from None
        info = os.fstat(fd)
        if created or (info.st_nlink == 1 and info.st_size <= 32 and _PID_TEXT.match(os.pread(fd, 64, 0))):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock
    finally:
        os.close(fd)  # releases the lock


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


def check_replaceable(target: str | Path, foreign: Callable[[Path], list[str]], kind: str) -> None:
    """Refuse to replace ``target`` (``--overwrite``) unless it is absent or a folder of the kind this command
    writes: ``foreign(folder)`` lists what in it is not of that kind (empty: it may be replaced). A file, a
    symlink or a folder holding anything else is a FileExistsError naming what is there."""
    p = Path(target)
    if not os.path.lexists(p):
        return
    if p.is_symlink() or not p.is_dir():
        raise FileExistsError(f"{p} is {path_kind(p)}, not {kind}: refusing to replace it (--overwrite replaces only "
                              "such a folder); remove it yourself or choose another path")
    others = foreign(p)
    if others:
        shown = ", ".join(others[:8]) + (f" and {len(others) - 8} more" if len(others) > 8 else "")
        raise FileExistsError(f"{p} is not {kind}: it holds {shown}; refusing to replace it (--overwrite replaces "
                              "only such a folder); remove it yourself or choose another path")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def follow_umask(path: str | Path) -> Path:
    """Give the file ``path`` the mode ``open`` would have given it under the current umask (writers such as
    safetensors create their files private, 0600)."""
    _chmod_default(Path(path), folder=False)
    return Path(path)


def path_kind(path: str | Path) -> str:
    """What is at ``path``, in words: "a regular file", "a directory", "a FIFO", "a symlink to nowhere", ... or
    "missing"; for a symlink, what it points at ("a symlink to a directory")."""
    p = Path(path)
    try:
        mode = os.lstat(p).st_mode
    except OSError:
        return "missing"
    if stat.S_ISLNK(mode):
        try:
            target = os.stat(p).st_mode
        except OSError:
            return "a symlink to nowhere"
        return "a symlink to " + _mode_kind(target)
    return _mode_kind(mode)


def _mode_kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def require_file(path: str | Path, what: str, expected: str) -> Path:
    """``path`` when it is a regular file (symlinks followed); else a one-line error saying what is there instead:
    FileNotFoundError when nothing is, ValueError for a directory, FIFO, device, socket or dangling symlink."""
    p = Path(path)
    kind = path_kind(p)
    if kind == "missing":
        raise FileNotFoundError(f"{what} {p} does not exist (expected {expected})")
    if kind not in ("a regular file", "a symlink to a regular file"):
        raise ValueError(f"{what} {p} is {kind}, not a file (expected {expected})")
    return p


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path``, symlinks resolved, is ``folder`` (resolved) or lies under it."""
    target, root = Path(path).resolve(), Path(folder).resolve()
    return target == root or root in target.parents


def read_regular(path: str | Path, max_bytes: int, *, inside: str | Path | None = None, tail: bool = False) -> bytes:
    """The bytes of the regular file ``path``, at most ``max_bytes`` of them, for files that come from folders the
    tool does not trust (records, results, job folders). A FIFO, device, directory or socket (also behind a
    symlink) is refused without blocking, a file over ``max_bytes`` too (``tail``: its last ``max_bytes`` are
    read instead), and, with ``inside``, a path whose resolved location is not under that folder. Raises
    ``FileNotFoundError`` when nothing is there, ``ValueError`` (naming the path and what is there) otherwise."""
    p = Path(path)
    if inside is not None and not is_inside(p, inside):
        raise ValueError(f"{p} resolves to {p.resolve()}, outside {Path(inside)}; refusing to read it")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(p, flags)  # FileNotFoundError when missing
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{p} is {path_kind(p)}, not a regular file")
        if info.st_size > max_bytes and not tail:
            raise ValueError(f"{p} is {info.st_size} bytes, more than the {max_bytes} this file may have")
        start = max(0, info.st_size - max_bytes) if tail else 0
        chunks, left = [], max_bytes + (0 if tail else 1)
        while left > 0:
            chunk = os.pread(fd, min(left, 1 << 20), start)
            if not chunk:
                break
            chunks.append(chunk)
            start += len(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > max_bytes:  # grew while being read
            raise ValueError(f"{p} is more than the {max_bytes} bytes this file may have")
        return data
    finally:
        os.close(fd)


_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")  # used with fullmatch: no trailing newline


def safe_name(value: object, what: str) -> str:
    """``value`` when it can be one part of a path: letters, digits, ``_``, ``-`` and ``.``, no leading dot, at
    most 128 characters (so no ``..``, ``/``, hidden or empty names); else a one-line ValueError naming ``what``."""
    if not isinstance(value, str) or not _SAFE_NAME.fullmatch(value):
        raise ValueError(f"{what} {str(value)[:80]!r} is not a safe name: use letters, digits, '_', '-' and '.' "
                         "(not first), at most 128 characters; it becomes part of file names")
    return value
