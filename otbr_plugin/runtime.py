"""Device choice, threads and seeding: the global state every command needs, decided once in RunSettings."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["RunSettings", "resolve_device", "seed_everything", "autocast_context"]


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

    @classmethod
    def from_args(cls, device: str | torch.device | None = "auto", seed: int = 0, threads: int | None = None,
                  progress: bool = True, apply: bool = True) -> "RunSettings":
        """Validate the device (an unavailable one is a one-line :class:`ValueError`), the seed and the
        thread count; with ``apply``, set torch's CPU thread count now."""
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"--threads must be an integer >= 1, got {threads!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        settings = cls(device=resolve_device(device), seed=seed, threads=threads, progress=bool(progress))
        if apply:
            settings.apply()
        return settings

    def apply(self) -> None:
        """Set torch's CPU thread count (when one was asked for)."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)
