"""Wall time of ``otbr-bench diagnose`` per stage on one checkpoint (target: about 5 minutes for a width-0.25
Fashion-MNIST preactresnet18 bundle with the default 5 x 4 grid on 2 CPU cores). Prints figures; asserts
nothing about wall time.

    PYTHONPATH=. python benchmarks/diagnose_time.py BUNDLE [--out DIR] [--threads N] [--data-root ROOT]
                                                     [any further diagnose options, e.g. --eval-samples 0]

The diagnosis is written to --out (default: a temporary folder, removed afterwards). Stages: backdoored
evaluation, random unlearning + NWC, poison and clean unlearning, correlations, the ORACLE DIAGNOSTIC
(test set) grid (prune + fuse, evaluation), weight norms, writing (CSVs, plots).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from otbr_plugin.cli import main as cli_main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="a bundle folder (e.g. a width-0.25 Fashion-MNIST BadNets bundle)")
    p.add_argument("--out", default=None, help="where to write the diagnosis (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--data-root", default=None)
    args, extra = p.parse_known_args()  # anything else is passed on to `otbr-bench diagnose`

    tmp = None
    out = args.out
    if out is None:
        tmp = tempfile.mkdtemp(prefix="diagnose_time.")
        out = str(Path(tmp) / "out")
    argv = ["diagnose", args.bundle, "--out", out, "--no-progress", "--overwrite"]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.data_root:
        argv += ["--data-root", args.data_root]
    argv += [a for a in extra if a != "--"]
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        rc = cli_main(argv)
        total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if rc != 0:
            raise SystemExit(f"diagnose failed with exit status {rc}")
        summary = json.loads((Path(out) / "summary.json").read_text())
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    seconds = summary["seconds"]
    print()
    print(f"otbr-bench diagnose on {args.bundle}: {summary['model']['name']} width {summary['model']['width']}, "
          f"{summary['dataset']}, attack {summary['attack']}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    width = max(len(k) for k in seconds)
    for stage, sec in seconds.items():
        print(f"  {stage:<{width}}  {sec:8.1f} s  {sec / total * 100:5.1f}%")
    other = total - sum(seconds.values())
    print(f"  {'other (loading data, model)':<{width}}  {other:8.1f} s")
    print(f"  {'total':<{width}}  {total:8.1f} s  ({total / 60:.1f} min); CPU time of this process {cpu:.1f} s "
          "(wall >> CPU / threads means the machine was busy with other work)")
    for comp, v in summary["correlation_overall"].items():
        print(f"NWC {comp}: Pearson {v['pearson']:.3f}, Spearman {v['spearman']:.3f}")
    for a in summary["auc"]:
        print(f"ROC AUC {a['ranking']} vs top {a['top'] * 100:g}% {a['reference']}: {a['auc']:.3f}")


if __name__ == "__main__":
    main()
