"""``otbr-bench table``, ``otbr-bench leaderboard`` and ``otbr-bench regress``: everything that reads run records."""

from __future__ import annotations

import argparse

from ..bench.leaderboard import SubmissionError, build_leaderboard, export_submission, load_submission
from ..bench.regress import compare, format_report, make_baseline, parse_tolerance, read_baseline
from ..bench.tables import comparison_table, format_table, load_records, oracle_table, plot_acc_vs_asr
from ..io import write_text
from . import formatter

TABLE_EPILOG = """examples:
  otbr-bench table results/fashion_mnist
  otbr-bench table results/fashion_mnist --format latex --out table.tex
  otbr-bench table results/fashion_mnist --plot results/fashion_mnist/acc_vs_asr.png
"""
LB_EPILOG = """examples:
  otbr-bench leaderboard export results/fashion_mnist --submitter "Jane Doe" --method "OTBR (reference)" --out sub.json
  otbr-bench leaderboard validate sub.json
  otbr-bench leaderboard build sub1.json sub2.json --out leaderboard.md
"""
REGRESS_EPILOG = """examples:
  otbr-bench regress --baseline results/ci/baseline.json --current runs/ci
  otbr-bench regress --baseline results/ci/baseline.json --current runs/ci --tolerance acc=0.01,asr=0.02
  otbr-bench regress --baseline results/ci/baseline.json --current runs/ci --write-baseline   (accept current)
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("table", help="comparison table (and plots) from run records", formatter_class=formatter(),
                       epilog=TABLE_EPILOG)
    p.add_argument("records", help="folder holding run records (searched recursively)")
    p.add_argument("--format", default="md", choices=["md", "csv", "latex", "html"])
    p.add_argument("--out", default=None, help="write the table here instead of printing it")
    p.add_argument("--plot", default=None, help="also write the ACC-vs-ASR plot (PNG) here")
    p.set_defaults(func=_table)

    p = sub.add_parser("leaderboard", help="export, validate and merge leaderboard submissions",
                       formatter_class=formatter(), epilog=LB_EPILOG)
    lb = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    e = lb.add_parser("export", help="write a submission file from run records")
    e.add_argument("records")
    e.add_argument("--submitter", required=True)
    e.add_argument("--method", required=True)
    e.add_argument("--description", default="")
    e.add_argument("--contact", default="")
    e.add_argument("--out", required=True)
    e.set_defaults(func=_lb_export)
    v = lb.add_parser("validate", help="check submission files; lists every problem")
    v.add_argument("files", nargs="+")
    v.set_defaults(func=_lb_validate)
    b = lb.add_parser("build", help="merge valid submissions into a leaderboard table")
    b.add_argument("files", nargs="+")
    b.add_argument("--format", default="md", choices=["md", "csv"])
    b.add_argument("--out", default=None)
    b.set_defaults(func=_lb_build)

    p = sub.add_parser("regress", help="compare run records against a committed baseline (CI)",
                       formatter_class=formatter(), epilog=REGRESS_EPILOG)
    p.add_argument("--baseline", required=True, help="baseline JSON file")
    p.add_argument("--current", required=True, help="folder of current run records")
    p.add_argument("--tolerance", default=None, help="absolute tolerances, e.g. acc=0.01,asr=0.02,ra=0.02,der=0.02")
    p.add_argument("--write-baseline", action="store_true", help="write the baseline from --current instead")
    p.set_defaults(func=_regress)


def _emit(text: str, out: str | None) -> None:
    if out:
        write_text(out, text)
        print(f"wrote {out}")
    else:
        print(text, end="")


def _table(args: argparse.Namespace) -> int:
    records = load_records(args.records)
    mean, std = comparison_table(records)
    _emit(format_table(mean, std, args.format), args.out)
    failed = [r for r in records if r.status != "ok"]
    if failed:
        print(f"note: {len(failed)} failed run(s) are not in the table: "
              + ", ".join(f"{r.attack_name}/{r.defense}/seed{r.seed}" for r in failed))
    if args.plot:
        print(f"wrote {plot_acc_vs_asr(records, args.plot)}")
    oracle = oracle_table(args.records)
    if oracle:
        print("\n" + oracle, end="")
    return 0


def _lb_export(args: argparse.Namespace) -> int:
    path = export_submission(load_records(args.records), args.out, args.submitter, args.method, args.description,
                             args.contact)
    print(f"wrote {path}")
    return 0


def _lb_validate(args: argparse.Namespace) -> int:
    bad = 0
    for f in args.files:
        try:
            data = load_submission(f)
            print(f"{f}: valid ({len(data['entries'])} entries)")
        except SubmissionError as err:
            bad += 1
            print(err)
    return 1 if bad else 0


def _lb_build(args: argparse.Namespace) -> int:
    subs = [load_submission(f) for f in args.files]
    board = build_leaderboard(subs)
    _emit(board.to_csv(index=False) if args.format == "csv" else _plain_md(board), args.out)
    return 0


def _plain_md(df) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _regress(args: argparse.Namespace) -> int:
    records = load_records(args.current)
    if args.write_baseline:
        print(f"wrote {make_baseline(records, args.baseline)}")
        return 0
    rows = compare(read_baseline(args.baseline), records, parse_tolerance(args.tolerance))
    print(format_report(rows))
    return 0 if all(r.status == "ok" for r in rows) else 1
