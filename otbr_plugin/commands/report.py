"""``otbr-bench report``: one self-contained HTML page from a folder of run records."""

from __future__ import annotations

import argparse
import sys

from ..aggregate.report import write_report
from ..aggregate.tables import unreadable_line
from . import formatter

EPILOG = """examples:
  otbr-bench report runs/quickstart                      (writes runs/quickstart/report.html)
  otbr-bench report results/fashion_mnist --out results/fashion_mnist/report.html
  otbr-bench report runs/fashion_mnist --out /tmp/report.html --title "Fashion-MNIST, 3 seeds"

The page holds the comparison table (mean ± std over seeds, the 95% bootstrap interval under each value where the
records keep per-sample outcomes, best per attack and metric marked among the defenses within the clean-accuracy
bound --acc-drop), the paired differences between defenses ("which differences are real"), ACC-vs-ASR scatter
per defense, grouped ACC/ASR/RA bars per attack, the `otbr-bench diagnose` outputs found in DIR/diagnose*/
(summary.md and PNGs), the oracle sweeps (oracle_sweep_*.csv) in their own labelled section, and provenance
(versions, configs, checkpoint hashes, device, seconds per cell) from the run records. Images are embedded and
the CSS is inline: the file opens offline in any browser and can be mailed or attached as one file.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="self-contained HTML report from run records", formatter_class=formatter(),
                       epilog=EPILOG)
    p.add_argument("folder", metavar="DIR", help="folder holding run records (searched recursively), e.g. a bench --out")
    p.add_argument("--out", default=None, help="HTML file to write (default: DIR/report.html)")
    p.add_argument("--title", default=None, help="page title (default: from DIR's name)")
    from .results import add_bootstrap_arguments

    add_bootstrap_arguments(p, ci_flag=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    unreadable: list = []
    path = write_report(args.folder, args.out, args.title, unreadable, acc_drop=args.acc_drop, n_boot=args.boot,
                        boot_seed=args.boot_seed)
    if unreadable:
        print(unreadable_line(unreadable), file=sys.stderr)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")
    return 0
