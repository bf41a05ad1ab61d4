"""``otbr-bench bench``: run a grid of attacks x defenses x seeds and print the comparison table."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from ..bench.executors import run_grid
from ..bench.grid import GridSpec, current_records, load_grid
from ..aggregate.tables import (comparison_table, format_table, interval_table, load_records, oracle_table,
                                plot_acc_vs_asr, unreadable_line)
from ..config import parse_overrides
from ..io import folder_lock, write_text
from ..runtime import parse_threads
from . import add_run_arguments, formatter, run_settings

EPILOG = """examples:
  otbr-bench bench configs/bench/fashion_mnist.yaml --out results/fashion_mnist
  otbr-bench bench configs/bench/quickstart.yaml --out runs/quickstart
  otbr-bench bench configs/bench/ci_slice.yaml --out runs/ci
  otbr-bench bench configs/bench/fashion_mnist.yaml --out runs/quick --set seeds=[0,1] --set attack_overrides.train.epochs=2
  otbr-bench bench configs/bench/fashion_mnist.yaml --out runs/fm --executor local --workers 4
  otbr-bench bench configs/bench/fashion_mnist.yaml --out /shared/runs/fm --executor slurm --device cuda \
      --partition gpu --gpus-per-task 1 --cpus-per-task 4 --mem 16G --time 2:00:00 --sbatch account=mylab
  otbr-bench bench configs/bench/fashion_mnist.yaml --out /shared/runs/fm --executor slurm --detach
  otbr-bench status /shared/runs/fm

Executors: `local` runs the grid in this process (--workers 1) or on N worker processes (one GPU each where there
are several; CUDA_VISIBLE_DEVICES per worker); `slurm` submits one job per backdoored model and one per defense
cell (the cells wait for their model's job), through submitit, and waits with a progress bar over all jobs
(--detach: submit and return; run the same command again, or `otbr-bench status OUT`, to collect). Slurm options
come from the grid's `slurm:` section, then the command line. See docs/cluster.md.

Re-running the same command resumes: a cell is skipped only when its record's fingerprint (resolved attack and
defense configs, checkpoint sha256, package version) matches; changed cells run again (the log says why) and
failed cells are retried. One run per --out and per bundles folder at a time (<out>/.lock, <bundles>/.lock); an ok record is never replaced by a failed one.
Outputs in --out: records/*.json (one run record per cell), bundles/ (cached backdoored models), table.md,
acc_vs_asr.png, report.html (the self-contained HTML report of `otbr-bench report`). The exit status is 1 when any cell failed (the failures are listed at the end).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark grid (attacks x defenses x seeds)", formatter_class=formatter(),
                       epilog=EPILOG)
    p.add_argument("grid", help="grid YAML (configs/bench/<name>.yaml)")
    p.add_argument("--out", required=True, help="output folder (records, cached bundles, table)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a grid key, e.g. seeds=[0,1] or attack_overrides.train.epochs=2")
    p.add_argument("--bundles", default=None, help="folder of cached attack bundles (default: <out>/bundles)")
    add_run_arguments(p, device_default=None, device_help="auto, cpu, cuda, cuda:N, ... (default: the grid's "
                                                            "device key); attack training, evaluation and every "
                                                            "defense run on it")
    p.add_argument("--no-report", action="store_true", help="do not write <out>/report.html (see `otbr-bench report`)")
    g = p.add_argument_group("executors")
    g.add_argument("--executor", choices=["local", "slurm"], default="local",
                   help="local: this machine (default); slurm: one Slurm job per model and per cell, via submitit")
    g.add_argument("--workers", type=int, default=1,
                   help="--executor local: worker processes (default 1: this process); one GPU each where there are "
                        "several")
    g.add_argument("--detach", action="store_true",
                   help="--executor slurm: submit and return; collect later with the same command or "
                        "`otbr-bench status OUT`")
    g.add_argument("--poll", type=float, default=10.0, metavar="SECONDS",
                   help="--executor slurm: seconds between two looks at the queue (default 10)")
    s = p.add_argument_group("Slurm job options (override the grid's `slurm:` section)")
    s.add_argument("--partition", default=None)
    s.add_argument("--time", default=None, help="per job: minutes, or an sbatch time such as 2:00:00")
    s.add_argument("--gpus-per-task", type=int, default=None)
    s.add_argument("--cpus-per-task", type=int, default=None, help="also the torch threads of a job unless --threads")
    s.add_argument("--mem", default=None, help="memory per job, e.g. 16G")
    s.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra #SBATCH --KEY=VALUE line, e.g. account=mylab or gres=gpu:1 (repeatable)")
    s.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="a shell line run in each job before Python, e.g. 'module load cuda' (repeatable)")
    p.set_defaults(func=run)


SLURM_FLAGS = ("partition", "time", "gpus_per_task", "cpus_per_task", "mem")


def slurm_options(args: argparse.Namespace, grid: GridSpec):
    """The grid's Slurm options updated with the command line's."""
    extra = {}
    for item in args.sbatch:
        key, sep, value = item.partition("=")
        if not sep or not key.strip("-"):
            raise ValueError(f"--sbatch expects KEY=VALUE (an sbatch option without '--'), got {item!r}")
        extra[key.strip().lstrip("-")] = value
    time_value = args.time
    if isinstance(time_value, str) and time_value.isdigit():
        time_value = int(time_value)
    return grid.slurm.updated(partition=args.partition, time=time_value, gpus_per_task=args.gpus_per_task,
                              cpus_per_task=args.cpus_per_task, mem=args.mem, sbatch=extra or None,
                              setup=args.setup or None)


def _check_executor_args(args: argparse.Namespace) -> None:
    """Options that make no sense for the chosen executor are refused (what was given, what it needs)."""
    if isinstance(args.workers, bool) or args.workers < 1:
        raise ValueError(f"--workers must be an integer >= 1, got {args.workers}")
    if args.poll <= 0:
        raise ValueError(f"--poll must be a number of seconds > 0, got {args.poll}")
    if args.executor == "local":
        given = [f"--{f.replace('_', '-')}" for f in SLURM_FLAGS if getattr(args, f) is not None]
        given += ["--sbatch"] * bool(args.sbatch) + ["--setup"] * bool(args.setup) + ["--detach"] * args.detach
        if given:
            raise ValueError(f"{', '.join(given)} only apply to --executor slurm (this run is --executor local)")
    elif args.workers != 1:
        raise ValueError("--workers applies to --executor local; with --executor slurm every task is its own job "
                         "and the cluster decides how many run at once")


def run(args: argparse.Namespace) -> int:
    _check_executor_args(args)
    slurm = args.executor == "slurm"
    # the device of Slurm jobs is resolved on their nodes, not on this (login) machine
    grid = load_grid(args.grid, parse_overrides(args.overrides), check_device=not slurm)
    if slurm:
        settings = None
        options = slurm_options(args, grid)
        args.threads = parse_threads(args.threads)
        if args.threads == "auto":  # decided by each job on its node: its CPUs per task
            args.threads = None
    else:
        settings = run_settings(args, device=args.device or grid.device,  # once for the whole grid
                                workers=args.workers)
        options = None
    out = Path(args.out)
    with contextlib.ExitStack() as locks:  # one writer per output folder (and per external bundles folder)
        locks.enter_context(folder_lock(out, "otbr-bench bench run"))
        # the bundles folder too, also the default <out>/bundles: another run may name it with --bundles
        bundles = Path(args.bundles) if args.bundles else out / "bundles"
        if bundles.resolve() != out.resolve():
            locks.enter_context(folder_lock(bundles, "otbr-bench bench run (bundles folder)"))
        return _run_locked(args, grid, out, settings, options)


def _run_locked(args: argparse.Namespace, grid: GridSpec, out: Path, settings, options) -> int:
    from ..bench.executors import live_slurm_jobs, run_local_workers, run_slurm

    dseeds = f" x {len(grid.defense_seeds)} defense seed(s)" if grid.defense_seeds is not None else ""
    print(f"grid {grid.name}: {len(grid.attacks)} attack(s) x {len(grid.defenses)} defense(s) x {len(grid.seeds)} "
          f"seed(s){dseeds} on {grid.dataset}; output {out}")
    start = time.perf_counter()
    bundles = Path(args.bundles) if args.bundles else out / "bundles"
    if options is not None:
        results = run_slurm(grid, out, bundles, options=options, device=args.device or grid.device,
                            threads=args.threads, progress=not args.no_progress, detach=args.detach,
                            poll_s=args.poll)
        if results is None:
            print(f"submitted; `otbr-bench status {out}` shows where the jobs stand, and the same `otbr-bench bench` "
                  "command waits for them and prints the table")
            return 0
    else:
        live = live_slurm_jobs(out)
        if live:
            raise ValueError(f"{out}: {len(live)} Slurm job(s) of an earlier --executor slurm run are still queued or "
                             f"running (job ids {', '.join(sorted(set(live.values()))[:8])}); wait for them with "
                             "--executor slurm (or cancel them with scancel) before running here")
        if args.workers > 1:
            results = run_local_workers(grid, out, bundles, workers=args.workers, device=settings.device,
                                        threads=settings.threads, progress=settings.progress)
        else:
            results = run_grid(grid, out, bundles_dir=args.bundles, progress=settings.progress, lock=False,
                               settings=settings)
    wall = time.perf_counter() - start
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "skipped", "failed")}
    print(f"\n{counts['ok']} cell(s) run, {counts['skipped']} skipped (already done), {counts['failed']} failed; "
          f"{wall / 60:.1f} min")
    unreadable: list = []
    records, stale = current_records(grid, out, load_records(out / "records", unreadable))
    if unreadable:
        print(unreadable_line(unreadable), file=sys.stderr)
    if stale:
        print(f"left out of the table: {len(stale)} record(s) written with another config than this run's (an "
              f"earlier run's worker or job): {', '.join('/'.join(map(str, r.key()[2:])) for r in stale[:5])}"
              f"{', ...' if len(stale) > 5 else ''}; rerun to redo them")
    if any(r.status == "ok" for r in records):
        mean, std = comparison_table(records)
        lo, hi = interval_table(records, mean)  # NaN (no brackets) for records without per-sample outcomes
        table = format_table(mean, std, "md", lo, hi)
        write_text(out / "table.md", table)
        plot_acc_vs_asr(records, out / "acc_vs_asr.png", title=f"{grid.name}: ACC vs ASR after defense")
        print(table)
        oracle = oracle_table(out / "oracle") if (out / "oracle").is_dir() else ""
        if oracle:
            write_text(out / "oracle_table.md", oracle)
            print(oracle)
        if not args.no_report:
            try:
                from ..aggregate.report import write_report

                print(f"report: {write_report(out)}")
            except Exception as err:  # noqa: BLE001 - the records and the table are the result; the page is extra
                print(f"report not written ({type(err).__name__}: {err}); retry with `otbr-bench report {out}`")
    failed = [r for r in results if r.status == "failed"]
    for r in failed:
        print(f"FAILED {r.attack}/{r.defense}/seed{r.seed}{'' if r.dseed is None else f'/dseed{r.dseed}'}: {r.error}")
    return 1 if failed else 0
