"""``otbr-bench table``, ``otbr-bench leaderboard`` and ``otbr-bench regress``: everything that reads run records."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..aggregate.leaderboard import (SubmissionError, build_leaderboard, export_submission, leaderboard_note,
                                     load_submission)
from ..aggregate.regress import (ToleranceSpec, build_report, find_tolerance_file, format_junit, format_markdown,
                             format_report, load_baseline, load_tolerance_file, make_baseline, parse_tolerance_layer,
                             report_dict)
from ..aggregate.bootstrap import DEFAULT_BOOT, DEFAULT_BOOT_SEED
from ..aggregate.tables import (DEFAULT_ACC_DROP, METRICS, comparison_table, format_table, interval_table,
                                load_record_folders, oracle_table, plot_acc_vs_asr, unreadable_line)
from ..config import load_yaml
from ..io import write_json, write_text
from . import formatter

TABLE_EPILOG = """examples:
  otbr-bench table results/fashion_mnist
  otbr-bench table results/fashion_mnist --format latex --out table.tex
  otbr-bench table results/fashion_mnist --plot results/fashion_mnist/acc_vs_asr.png
  otbr-bench table runs/ci --ci            (95% bootstrap intervals from the records' per-sample outcomes)
  otbr-bench table runs/ci --ci --boot 2000 --boot-seed 1 --acc-drop 5
  otbr-bench table results/fashion_mnist --by-defense [--ci]   (one row per defense, ranks; rules in
                                                              docs/statistics.md)
  otbr-bench table results/fashion_mnist_defense_seeds results/fashion_mnist_anp_defense_seeds --by-defense --ci \
      --attacks badnets,blended,inputaware   (several folders as one set of records, some of their attacks)

--ci resamples test images, and a cell's training / defense seeds where it has several (two-level bootstrap; no
model is run): see otbr_plugin/aggregate/bootstrap.py for the procedure. Records written before schema 2 have no
per-sample outcomes; their cells are shown without an interval. Best marks (bold)
only go to defenses whose clean ACC is at most --acc-drop points below the backdoored model's; the others carry †.
"""
COMPARE_EPILOG = """examples:
  otbr-bench compare runs/ci
  otbr-bench compare runs/ci --defenses otbr,fp --metrics der,acc
  otbr-bench compare runs/ci --only-significant --format csv --out pairs.csv
  otbr-bench compare results/fashion_mnist_defense_seeds results/fashion_mnist_anp_defense_seeds --defenses otbr,anp

For two defenses on the same backdoored checkpoint: the difference of each metric (A - B, points) with a paired 95%
bootstrap interval over the same resampled test images (with several defense seeds, each side's seeds resampled
too, independently); "real" when it excludes 0. Needs records with per-sample outcomes (schema 2); older ones are
left out.
"""
LB_EPILOG = """examples:
  otbr-bench leaderboard export results/fashion_mnist --submitter "Jane Doe" --method "OTBR (reference)" --out sub.json
  otbr-bench leaderboard validate sub.json
  otbr-bench leaderboard build sub1.json sub2.json --out leaderboard.md
  otbr-bench leaderboard build sub1.json sub2.json --html leaderboard.html
"""
REGRESS_EPILOG = """examples:
  otbr-bench regress --baseline results/ci/baseline.json --current runs/ci
  otbr-bench regress --baseline results/ci/baseline.json --current runs/ci --tolerance acc=0.01,asr=0.02
  otbr-bench regress --baseline results/ci/baseline.json --current runs/ci --rel-tolerance asr=0.1,anp:acc=0.05
  otbr-bench regress --baseline results/ci/baseline.json --current runs/ci --ci-factor 1
  otbr-bench regress --baseline results/ci/baseline.json --current runs/ci --std-factor 2 \\
      --junit regress.xml --markdown regress.md --json regress.json
  otbr-bench regress --baseline results/ci/baseline.json --current runs/ci --write-baseline \\
      --grid configs/bench/ci_slice.yaml   (accept current)

Tolerances are fractions (0.01 = 1 point); a DEFENSE: prefix scopes one to a defense label. A metric fails when it
gets worse by more than max(absolute, relative x baseline, std-factor x baseline std over seeds, ci-factor x half
width of the cell's 95% bootstrap interval over test images and, where it has several, its seeds). They come from,
lowest first: built-in defaults, the baseline file, the tolerance file (--tolerance-file, else
<baseline stem>.tolerances.yaml next to the baseline), the command line; a defense-scoped value beats a default.
Exit status: 0 when every cell is within tolerance, 1 otherwise.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("table", help="comparison table (and plots) from run records", formatter_class=formatter(),
                       epilog=TABLE_EPILOG)
    p.add_argument("records", nargs="+", help="folder(s) holding run records (searched recursively); a cell found in "
                   "several is counted once when its records are one measurement, else it is an error")
    p.add_argument("--format", default="md", choices=["md", "csv", "latex", "html"])
    p.add_argument("--out", default=None, help="write the table here instead of printing it")
    p.add_argument("--plot", default=None, help="also write the ACC-vs-ASR plot (PNG) here")
    p.add_argument("--by-defense", action="store_true",
                   help="one row per defense instead: data used, attacks covered, mean ACC drop / ASR / RA / DER, rank "
                        "by mean DER among all and among data-free defenses, median and total seconds per cell")
    p.add_argument("--attacks", default=None, help="comma-separated attack labels to keep, in the table and the oracle "
                                                   "diagnostic under it (default: every attack)")
    add_bootstrap_arguments(p)
    p.set_defaults(func=_table)

    p = sub.add_parser("compare", help="paired differences between defenses, with bootstrap intervals",
                       formatter_class=formatter(), epilog=COMPARE_EPILOG)
    p.add_argument("records", nargs="+", help="folder(s) holding run records (searched recursively); a cell found in "
                   "several is counted once when its records are one measurement, else it is an error")
    p.add_argument("--defenses", default=None, help="comma-separated defense labels to compare (default: all but none)")
    p.add_argument("--attacks", default=None, help="comma-separated attack labels to keep (default: every attack)")
    p.add_argument("--metrics", default=",".join(METRICS), help="comma-separated metrics (default acc,asr,ra,der)")
    p.add_argument("--include-none", action="store_true", help="also compare each defense with no defense")
    p.add_argument("--only-significant", action="store_true", help="print only the differences whose interval "
                   "excludes 0")
    p.add_argument("--format", default="md", choices=["md", "csv"])
    p.add_argument("--out", default=None, help="write the comparison here instead of printing it")
    add_bootstrap_arguments(p, ci_flag=False)
    p.set_defaults(func=_compare)

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
    b.add_argument("--html", default=None, metavar="FILE",
                   help="also write a self-contained HTML page (board, comparison table, plots; as `otbr-bench report`)")
    b.set_defaults(func=_lb_build)

    p = sub.add_parser("regress", help="compare run records against a committed baseline (CI)",
                       formatter_class=formatter(), epilog=REGRESS_EPILOG)
    p.add_argument("--baseline", required=True, help="baseline JSON file")
    p.add_argument("--current", required=True, help="folder of current run records")
    p.add_argument("--tolerance", default=None,
                   help="absolute tolerances, e.g. acc=0.01,asr=0.02,ra=0.02,der=0.02 or anp:asr=0.05")
    p.add_argument("--rel-tolerance", default=None,
                   help="relative tolerances (fraction of the baseline value), e.g. asr=0.1,otbr:acc=0.02")
    p.add_argument("--tolerance-file", default=None,
                   help="YAML tolerances (default: <baseline stem>.tolerances.yaml next to the baseline, if present)")
    p.add_argument("--no-tolerance-file", action="store_true", help="do not auto-discover a tolerance file")
    p.add_argument("--std-factor", type=float, default=None, metavar="K",
                   help="with several seeds, also allow K x the baseline's std over seeds (default 0)")
    p.add_argument("--ci-factor", type=float, default=0.0, metavar="K",
                   help="also allow K x the half width of the cell's 95%% bootstrap interval over test images and, "
                        "where the cell has several, its training and defense seeds (the baseline's, else the current "
                        "records'; needs records with per-sample outcomes; default 0: off)")
    p.add_argument("--grid", default=None,
                   help="grid name or grid YAML of the current records (recorded by --write-baseline; warns on mismatch)")
    p.add_argument("--junit", default=None, metavar="FILE", help="also write a JUnit XML report")
    p.add_argument("--markdown", default=None, metavar="FILE", help="also write a Markdown summary (PR comment, job summary)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    p.add_argument("--write-baseline", action="store_true", help="write the baseline from --current instead")
    p.set_defaults(func=_regress)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of points >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number of points >= 0, got {text!r}")
    return value


def add_bootstrap_arguments(p: argparse.ArgumentParser, ci_flag: bool = True) -> None:
    """``--ci``, ``--boot``, ``--boot-seed`` and ``--acc-drop`` (shared by table, compare and report)."""
    if ci_flag:
        p.add_argument("--ci", action="store_true",
                       help="show 95%% bootstrap intervals over test images and, where a cell has several, its seeds "
                            "(from the records' per-sample outcomes)")
    p.add_argument("--boot", type=_positive_int, default=DEFAULT_BOOT, metavar="N",
                   help=f"bootstrap replicates (default {DEFAULT_BOOT})")
    p.add_argument("--boot-seed", type=int, default=DEFAULT_BOOT_SEED, metavar="S",
                   help=f"seed of the resampling (default {DEFAULT_BOOT_SEED})")
    p.add_argument("--acc-drop", type=_non_negative, default=DEFAULT_ACC_DROP, metavar="POINTS",
                   help=f"clean-accuracy bound of the best marks, in points below the backdoored model's ACC "
                        f"(default {DEFAULT_ACC_DROP:g})")


def _records(folders: str | list[str]) -> list:
    """The run records under one or more folders as one set; the record files that cannot be read, and the cells
    found in several folders (counted once), are named on stderr."""
    unreadable: list = []
    repeated: list = []
    records = load_record_folders([folders] if isinstance(folders, str) else folders, unreadable, repeated)
    if unreadable:
        print(unreadable_line(unreadable), file=sys.stderr)
    if repeated:
        print(f"note: {len(repeated)} cell(s) found in more than one folder with the same checkpoint, config and "
              f"outcome, counted once (e.g. {repeated[0][1]} is {repeated[0][0]} again)", file=sys.stderr)
    return records


def _attack_names(attacks: str | None) -> list[str] | None:
    """``--attacks a,b`` as a list of labels (None when not given)."""
    return [a.strip() for a in attacks.split(",") if a.strip()] if attacks else None


def _only_attacks(records: list, attacks: str | None) -> list:
    """``--attacks``: the records of the named attack labels; a name no record has is a ValueError listing those
    there are."""
    if not attacks:
        return records
    wanted = _attack_names(attacks)
    have = sorted({r.attack_name for r in records})
    missing = [a for a in wanted if a not in have]
    if missing or not wanted:
        raise ValueError(f"--attacks: no records of {', '.join(missing) or '(none given)'}; the records hold "
                         f"{', '.join(have) or 'no attack'}")
    return [r for r in records if r.attack_name in wanted]


def _emit(text: str, out: str | None) -> None:
    if out:
        write_text(out, text)
        print(f"wrote {out}")
    else:
        print(text, end="")


def _table(args: argparse.Namespace) -> int:
    records = _only_attacks(_records(args.records), args.attacks)
    if args.by_defense:
        return _by_defense(args, records)
    mean, std = comparison_table(records)
    lo, hi = interval_table(records, mean, args.boot, args.boot_seed) if args.ci else (None, None)
    _emit(format_table(mean, std, args.format, lo, hi, args.acc_drop), args.out)
    if args.ci and lo is not None and lo.isna().all().all():
        print("note: no record here keeps per-sample outcomes (written before record schema 2): no intervals",
              file=sys.stderr)
    # notes go to stderr: stdout holds the table alone (an --format html/csv/latex table piped to a file stays valid)
    _failed_note(records)
    if args.plot:
        print(f"wrote {plot_acc_vs_asr(records, args.plot)}", file=sys.stderr)
    oracle = "\n".join(t for t in (oracle_table(f, _attack_names(args.attacks)) for f in args.records) if t)
    if oracle:  # Markdown: after a Markdown table on stdout, else on stderr
        print("\n" + oracle, end="", file=sys.stdout if args.format == "md" and not args.out else sys.stderr)
    return 0


def _failed_note(records: list) -> None:
    failed = [r for r in records if r.status != "ok"]
    if failed:
        print(f"note: {len(failed)} failed run(s) are not in the table: "
              + ", ".join(f"{r.attack_name}/{r.defense}/seed{r.seed}" for r in failed), file=sys.stderr)


def _by_defense(args: argparse.Namespace, records: list) -> int:
    """``table --by-defense``: the per-defense summary (notes under a Markdown or HTML table, else on stderr)."""
    from ..aggregate.summary import defense_summary, format_summary, summary_notes

    summary = defense_summary(records, args.acc_drop, args.ci, args.boot, args.boot_seed)
    _emit(format_summary(summary, args.format, args.ci), args.out)
    if args.format in ("csv", "latex"):
        for note in summary_notes(summary, args.ci):
            print(f"note: {note}", file=sys.stderr)
    _failed_note(records)
    if args.plot:
        print(f"wrote {plot_acc_vs_asr(records, args.plot)}", file=sys.stderr)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from ..aggregate.compare import format_comparisons, paired_comparisons

    metrics = [m.strip().lower() for m in args.metrics.split(",") if m.strip()]
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ValueError(f"--metrics: unknown metric(s) {', '.join(bad) or '(none given)'}; expected some of "
                         f"{', '.join(METRICS)}")
    defenses = [d.strip() for d in args.defenses.split(",") if d.strip()] if args.defenses else None
    records = _only_attacks(_records(args.records), args.attacks)
    df = paired_comparisons(records, metrics, args.boot, args.boot_seed, defenses, args.include_none)
    if df.empty:
        raise ValueError(f"{', '.join(args.records)}: no two defenses on the same checkpoint with per-sample outcomes "
                         "(records of schema 2, written by this version) to compare")
    _emit(format_comparisons(df, args.format, args.only_significant), args.out)
    return 0


def _lb_export(args: argparse.Namespace) -> int:
    records = _records(args.records)
    path = export_submission(records, args.out, args.submitter, args.method, args.description,
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
    note = leaderboard_note(board.attrs.get("levels", ("test images",)))
    if args.format == "csv":
        _emit(board.to_csv(index=False), args.out)
        if note:
            print(note, file=sys.stderr)
    else:
        _emit(_plain_md(board) + (f"\n{note}\n" if note else ""), args.out)
    if args.html:
        from ..aggregate.report import render_leaderboard_page

        print(f"wrote {write_text(args.html, render_leaderboard_page(subs, board))}")
    return 0


def _plain_md(df) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _grid_name(value: str | None) -> str | None:
    """``--grid``: a grid YAML (its ``name``, else the file stem) or a plain name."""
    if not value:
        return None
    path = Path(value)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return str(load_yaml(path).get("name") or path.stem)
    return value


def _regress(args: argparse.Namespace) -> int:
    records = _records(args.current)
    grid = _grid_name(args.grid)
    tol_file = args.tolerance_file or (None if args.no_tolerance_file else find_tolerance_file(args.baseline))
    file_layer = load_tolerance_file(tol_file) if tol_file else None
    cli_layers = [parse_tolerance_layer(args.tolerance, "abs"), parse_tolerance_layer(args.rel_tolerance, "rel")]
    if args.write_baseline:
        spec = ToleranceSpec(file_layer, *cli_layers, std_factor=args.std_factor)
        print(f"wrote {make_baseline(records, args.baseline, grid=grid, tolerance=spec)}")
        return 0
    baseline = load_baseline(args.baseline)
    spec = ToleranceSpec(baseline.tolerances, file_layer, *cli_layers, std_factor=args.std_factor)
    report = build_report(baseline, records, spec, grid=grid, current_path=str(args.current),
                          tolerance_file=str(tol_file) if tol_file else None, ci_factor=args.ci_factor)
    print(format_report(report))
    if args.junit:
        print(f"wrote {write_text(args.junit, format_junit(report))}")
    if args.markdown:
        print(f"wrote {write_text(args.markdown, format_markdown(report))}")
    if args.json:
        print(f"wrote {write_json(args.json, report_dict(report))}")
    return 0 if report.passed else 1
