"""The ``otbr-bench`` command. Each subcommand lives in its own module under ``otbr_plugin.commands`` and
exposes ``register(subparsers)``; this file only lists them."""

from __future__ import annotations

import argparse
import importlib
import sys

from ._version import __version__

# name of the module in otbr_plugin.commands, in the order shown by --help
COMMAND_MODULES = ["info", "train", "attack", "defend", "diagnose", "bench", "status", "results", "report", "convert",
                   "backdoorbench"]

EPILOG = """examples:
  otbr-bench models
  otbr-bench datasets --data-root data
  otbr-bench train --dataset fashion_mnist --model preactresnet18 --width 0.25 --epochs 1
  otbr-bench attack configs/attack/badnets/fashion_mnist.yaml --out runs/bundles/fashion_mnist/badnets
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otbr-bench",
        description="OTBR and baseline backdoor defenses in a BackdoorBench-style benchmark harness.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"otbr-plugin {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"otbr_plugin.commands.{name}").register(sub)
    return parser


def _one_line(err: BaseException) -> str:
    """The error's message on one line (the type named where the message alone would not say what happened)."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, RecursionError) or (isinstance(err, OSError) and err.errno is not None):
        text = f"{type(err).__name__}: {text}"  # e.g. "PermissionError: [Errno 13] Permission denied: 'x'"
    return text


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. An error becomes one line on stderr naming the input and what was expected (exit
    status 1); ``--debug`` shows the traceback instead."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:cut]  # accepted anywhere, also after the subcommand
    argv = [a for i, a in enumerate(argv) if not (a == "--debug" and i < cut)]
    args = parser.parse_args(argv)
    args.debug = debug
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RecursionError) as err:  # bad input: files, configs, checkpoints, devices
        if args.debug:
            raise
        print(f"otbr-bench {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - not an input error we know: still one line, the traceback on --debug
        if args.debug:
            raise
        print(f"otbr-bench {args.command}: error: {type(err).__name__}: {_one_line(err)} "
              "(run again with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
