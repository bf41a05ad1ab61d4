"""Device choice, threads and seeding: the global state every command needs, decided once in RunSettings."""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["RunSettings", "resolve_device", "seed_everything", "autocast_context", "usable_cpus", "busy_cpus", "auto_threads",
           "parse_threads"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Return the device to run on.

    ``"auto"`` (or ``None``) picks the current accelerator when one is present (CUDA, ROCm, MPS, XPU, ...)
    and the CPU otherwise; any other value is passed to :class:`torch.device` unchanged, so ``"cpu"``
    always forces the CPU.
    """
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        if torch.accelerator.is_available():
            accel = torch.accelerator.current_accelerator()
            if accel is not None:
                return torch.device(accel.type)
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}: expected 'auto', 'cpu' or an accelerator name") from err
    if dev.type in ("cpu", "meta"):
        return dev
    accel = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    count = torch.accelerator.device_count() if accel is not None else 0
    if accel is None or accel.type != dev.type or (dev.index is not None and dev.index >= count):
        here = f"{accel.type}:0..{count - 1}" if accel is not None else "no accelerator"
        raise ValueError(f"device {device!r} is not available on this machine ({here}); expected 'auto', 'cpu'"
                         + (f" or {accel.type}[:N] with N < {count}" if accel is not None else ""))
    return dev


def _cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (v2 ``cpu.max`` or v1 ``cfs_quota_us``), None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota (rounded up)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    limit = _cgroup_cpu_limit(cgroup_root)
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return max(1, cpus)


def _cpu_times(stat_path: Path, cpus: set[int] | None) -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies of each CPU line of ``/proc/stat`` (only ``cpus`` when given)."""
    out = {}
    for line in stat_path.read_text().splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
            continue
        index = int(name[3:])
        if cpus is not None and index not in cpus:
            continue
        values = [int(v) for v in fields[:8]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        out[index] = (sum(values) - idle, sum(values))
    return out


def busy_cpus(sample_s: float = 0.25, stat_path: Path = Path("/proc/stat")) -> float | None:
    """How many of this process's CPUs other processes keep busy *now*: the busy share of each CPU over
    ``sample_s`` seconds of ``/proc/stat`` (this process sleeps meanwhile), summed; None where unreadable.

    The 1-minute load average lags: it still counts a job that ended seconds ago (e.g. the previous command),
    and takes a minute to see one that just started."""
    import time

    try:
        cpus = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = None
    try:
        before = _cpu_times(stat_path, cpus)
        time.sleep(sample_s)
        after = _cpu_times(stat_path, cpus)
    except (OSError, ValueError, IndexError):
        return None
    busy = 0.0
    for index, (b1, t1) in after.items():
        b0, t0 = before.get(index, (b1, t1))
        if t1 > t0:
            busy += min(1.0, max(0.0, (b1 - b0) / (t1 - t0)))
    return busy if after else None


def auto_threads(workers: int = 1, *, cpus: int | None = None, load: float | None = None,
                 env: dict[str, str] | None = None) -> tuple[int, str]:
    """Torch CPU threads per process that never oversubscribe the machine, and why.

    An explicit ``OMP_NUM_THREADS`` wins (the user's choice). Otherwise: the usable CPUs (affinity, cgroup
    quota) less the CPUs other processes keep busy (``load``; measured by :func:`busy_cpus`, or the 1-minute
    load average where ``/proc/stat`` cannot be read), rounded, at least 1, divided among ``workers``
    processes. OpenMP threads that wait for a CPU held by another process spin at the next barrier, so on a
    busy machine fewer threads are faster, not only fairer."""
    env = os.environ if env is None else env
    given = env.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) >= 1:
        return max(1, int(given) // max(1, workers)), f"OMP_NUM_THREADS={given}"
    cpus = usable_cpus() if cpus is None else cpus
    if load is None:
        load = busy_cpus()
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    free = max(1, min(cpus, cpus - int(load + 0.5)))
    per_worker = max(1, free // max(1, workers))
    why = f"{cpus} usable CPU(s), {load:.1f} busy" + (f", {workers} workers" if workers > 1 else "")
    return per_worker, why


def parse_threads(value: str | int | None) -> int | str | None:
    """``--threads``: ``auto``, an integer >= 1, or None (torch's own choice)."""
    if value is None or value == "auto":
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"--threads must be 'auto' or an integer >= 1, got {value!r}")
    return value


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); return a CPU generator seeded the same way.

    String hashing (PYTHONHASHSEED) is fixed at interpreter start and cannot be changed here; nothing in the
    results depends on it."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def autocast_context(device: torch.device, bf16: bool = False, amp: bool = False):
    """Autocast for the step: bf16 on CPU when asked, fp16 AMP on an accelerator when asked, else off."""
    if device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    dtype = torch.bfloat16 if bf16 else torch.float16
    return torch.autocast(device.type, dtype=dtype, enabled=bf16 or amp)


@dataclass(frozen=True)
class RunSettings:
    """Where and how a command runs, decided once (by :meth:`from_args`) and passed down to attack training,
    evaluation and defenses; nothing below a command resolves ``"auto"`` or reads the device elsewhere."""

    device: torch.device
    seed: int = 0
    threads: int | None = None
    progress: bool = True
    threads_reason: str = ""

    @classmethod
    def from_args(cls, device: str | torch.device | None = "auto", seed: int = 0, threads: int | str | None = None,
                  progress: bool = True, apply: bool = True, workers: int = 1) -> "RunSettings":
        """Validate the device (an unavailable one is a one-line :class:`ValueError`), the seed and the
        thread count (``"auto"``: :func:`auto_threads` for ``workers`` processes, decided here once); with
        ``apply``, set torch's CPU thread count now."""
        threads = parse_threads(threads)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        reason = "--threads" if isinstance(threads, int) else ""
        if threads == "auto":
            threads, why = auto_threads(workers)
            reason = f"auto: {why}"
        settings = cls(device=resolve_device(device), seed=seed, threads=threads, progress=bool(progress),
                       threads_reason=reason)
        if apply:
            settings.apply()
        return settings

    def apply(self) -> None:
        """Set torch's CPU thread count (when one was asked for)."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)
