"""Subcommands of ``otbr-bench``; each module has ``register(subparsers)``."""

import argparse


def formatter() -> type[argparse.HelpFormatter]:
    return argparse.RawDescriptionHelpFormatter
