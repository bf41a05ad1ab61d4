"""The ``otbr-bench`` command. Each subcommand lives in its own module under ``otbr_plugin.commands`` and
exposes ``register(subparsers)``; this file only lists them."""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# name of the module in otbr_plugin.commands, in the order shown by --help
COMMAND_MODULES = ["info", "train", "attack", "defend", "bench", "results", "report", "convert", "backdoorbench"]

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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"otbr_plugin.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as err:
        print(f"otbr-bench {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
