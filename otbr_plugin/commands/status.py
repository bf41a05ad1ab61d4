"""``otbr-bench status``: where the Slurm jobs of a bench folder stand, and its table once they have ended."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import formatter

EPILOG = """examples:
  otbr-bench status /shared/runs/fashion_mnist
  otbr-bench status /shared/runs/fashion_mnist --verbose

Reads <OUT>/jobs/jobs.json (written by `otbr-bench bench --executor slurm`), asks squeue which jobs are still
queued or running and reads the records of those that ended. It changes nothing: to wait for the jobs, write the
failed records of jobs that died (cancelled, out of time) and resubmit what is left, run the same `otbr-bench bench`
command again. Exit status: 0 when no job failed, 1 otherwise.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="progress of a bench folder's Slurm jobs (and its table when they are done)",
                       formatter_class=formatter(), epilog=EPILOG)
    p.add_argument("folder", metavar="OUT", help="the --out folder of `otbr-bench bench --executor slurm`")
    p.add_argument("--verbose", action="store_true", help="list every job by state")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..bench.executors import job_table
    from ..aggregate.tables import comparison_table, format_table, load_records

    out = Path(args.folder)
    if not out.is_dir():
        raise ValueError(f"{out} is not a folder (expected the --out folder of `otbr-bench bench`)")
    table = job_table(out)
    total = len(table.done) + table.live + len(table.failed)
    if total == 0:
        print(f"{out}: no Slurm jobs were submitted for this folder")
    else:
        print(f"{out}: {total} Slurm job(s): done {len(table.done)}, running {len(table.running)}, "
              f"pending {len(table.pending)}, failed {len(table.failed)}")
    if args.verbose:
        for state, keys in (("done", table.done), ("running", table.running), ("pending", table.pending)):
            for key in keys:
                print(f"  {state:8s} {key}")
    for key, error in table.failed.items():
        print(f"FAILED {key}: {error}")
    records = load_records(out / "records") if (out / "records").is_dir() else []
    if table.live:
        print(f"{sum(r.status == 'ok' for r in records)} cell record(s) written so far; the table follows once the "
              "jobs have ended")
    elif any(r.status == "ok" for r in records):
        mean, std = comparison_table(records)
        print(format_table(mean, std, "md"))
    return 1 if table.failed else 0
