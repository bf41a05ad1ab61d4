"""Subcommands of ``otbr-bench``; each module has ``register(subparsers)``."""

import argparse


def formatter() -> type[argparse.HelpFormatter]:
    return argparse.RawDescriptionHelpFormatter


def add_run_arguments(p: argparse.ArgumentParser, device_default: str | None = "auto",
                      device_help: str = "auto (accelerator if present, else cpu), cpu, cuda, cuda:N, mps, ...") -> None:
    """--device, --threads and --no-progress: the options every command that computes takes, turned into one
    :class:`~otbr_plugin.runtime.RunSettings` by :func:`run_settings`."""
    p.add_argument("--device", default=device_default, help=device_help)
    p.add_argument("--threads", default="auto",
                   help="CPU threads for torch: 'auto' (default: the CPUs this process may use, less those other "
                        "processes keep busy, divided among --workers; OMP_NUM_THREADS wins when set) or N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (training bars included)")


def run_settings(args: argparse.Namespace, device=None, seed: int | None = None, workers: int = 1):
    """The command's RunSettings, built once from --device (or ``device`` when the command decides it, e.g. a
    grid's or config's default), --threads (``auto`` resolved here, for ``workers`` processes, and printed
    once), --no-progress and the seed; an unavailable device is a one-line error before any work."""
    from ..runtime import RunSettings

    settings = RunSettings.from_args(device=args.device if device is None else device,
                                     seed=getattr(args, "seed", 0) if seed is None else seed,
                                     threads=args.threads, progress=not args.no_progress, workers=workers)
    if settings.device.type == "cpu" and settings.threads is not None:
        per = " per worker" if workers > 1 else ""
        print(f"threads: {settings.threads}{per} ({settings.threads_reason})")
    return settings
