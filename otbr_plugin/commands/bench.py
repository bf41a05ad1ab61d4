"""``otbr-bench bench``: run a grid of attacks x defenses x seeds and print the comparison table."""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

from ..bench.grid import load_grid, run_grid
from ..bench.tables import comparison_table, format_table, load_records, oracle_table, plot_acc_vs_asr
from ..config import parse_overrides
from ..io import folder_lock, write_text
from . import add_run_arguments, formatter, run_settings

EPILOG = """examples:
  otbr-bench bench configs/bench/fashion_mnist.yaml --out results/fashion_mnist
  otbr-bench bench configs/bench/quickstart.yaml --out runs/quickstart
  otbr-bench bench configs/bench/ci_slice.yaml --out runs/ci
  otbr-bench bench configs/bench/fashion_mnist.yaml --out runs/quick --set seeds=[0,1] --set attack_overrides.train.epochs=2

Re-running the same command resumes: a cell is skipped only when its record's fingerprint (resolved attack and
defense configs, checkpoint sha256, package version) matches; changed cells run again (the log says why) and
failed cells are retried. One run per --out at a time (<out>/.lock); an ok record is never replaced by a failed one.
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    grid = load_grid(args.grid, parse_overrides(args.overrides))
    settings = run_settings(args, device=args.device or grid.device)  # once for the whole grid
    out = Path(args.out)
    with contextlib.ExitStack() as locks:  # one writer per output folder (and per external bundles folder)
        locks.enter_context(folder_lock(out, "otbr-bench bench run"))
        if args.bundles is not None and out.resolve() not in Path(args.bundles).resolve().parents:
            locks.enter_context(folder_lock(args.bundles, "otbr-bench bench run (bundles folder)"))
        return _run_locked(args, grid, out, settings)


def _run_locked(args: argparse.Namespace, grid, out: Path, settings) -> int:
    print(f"grid {grid.name}: {len(grid.attacks)} attack(s) x {len(grid.defenses)} defense(s) x {len(grid.seeds)} "
          f"seed(s) on {grid.dataset}; output {out}")
    start = time.perf_counter()
    results = run_grid(grid, out, bundles_dir=args.bundles, progress=settings.progress, lock=False,
                       settings=settings)
    wall = time.perf_counter() - start
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "skipped", "failed")}
    print(f"\n{counts['ok']} cell(s) run, {counts['skipped']} skipped (already done), {counts['failed']} failed; "
          f"{wall / 60:.1f} min")
    records = [r for r in load_records(out / "records") if r.dataset == grid.dataset]
    if any(r.status == "ok" for r in records):
        mean, std = comparison_table(records)
        table = format_table(mean, std, "md")
        write_text(out / "table.md", table)
        plot_acc_vs_asr(records, out / "acc_vs_asr.png", title=f"{grid.name}: ACC vs ASR after defense")
        print(table)
        oracle = oracle_table(out / "oracle") if (out / "oracle").is_dir() else ""
        if oracle:
            write_text(out / "oracle_table.md", oracle)
            print(oracle)
        if not args.no_report:
            try:
                from ..bench.report import write_report

                print(f"report: {write_report(out)}")
            except Exception as err:  # noqa: BLE001 - the records and the table are the result; the page is extra
                print(f"report not written ({type(err).__name__}: {err}); retry with `otbr-bench report {out}`")
    failed = [r for r in results if r.status == "failed"]
    for r in failed:
        print(f"FAILED {r.attack}/{r.defense}/seed{r.seed}: {r.error}")
    return 1 if failed else 0
