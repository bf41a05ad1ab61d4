"""``otbr-bench defend``: run one defense on a checkpoint, evaluate before/after, write the results."""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmark_adapters.checkpoints import load_checkpoint

from ..bench.runner import run_defense, summarize, write_defense_outputs
from ..config import apply_overrides, default_config_path, load_yaml, parse_overrides
from ..defenses import get_defense, list_defenses
from . import formatter

EPILOG = """examples:
  otbr-bench defend runs/badnets --defense otbr --out runs/badnets-otbr
  otbr-bench defend runs/badnets --defense otbr --set gamma=0.1 --set lam=0.5 --out runs/badnets-otbr-g01
  otbr-bench defend runs/badnets --defense clp --config configs/defense/clp/fashion_mnist.yaml --out runs/badnets-clp

The defense config is read from --config, else configs/defense/<defense>/<dataset>.yaml when it exists,
else the defense's built-in defaults; --set key=value overrides single fields.
Outputs in --out: model/ (defended bundle), record.json (metrics before/after, DER, config, seconds),
and one CSV per diagnostic table (e.g. nwc.csv for OTBR).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("defend", help="run a defense on a checkpoint and evaluate it", formatter_class=formatter(),
                       epilog=EPILOG)
    add_defense_arguments(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing defended bundle in --out")
    p.set_defaults(func=run)


def add_defense_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a bundle folder (or a BackdoorBench record folder)")
    p.add_argument("--defense", required=True, help=f"one of: {', '.join(list_defenses())}")
    p.add_argument("--config", default=None, help="defense config YAML (flat key: value)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field (repeatable)")
    p.add_argument("--data-root", default=None, help="data root for the clean test/defense data (default $OTBR_DATA or ./data)")
    p.add_argument("--device", default="auto", help="auto (accelerator if present, else cpu), cpu, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clean-ratio", type=float, default=0.05,
                   help="size of the clean defense subset, as a share of the training set (data-dependent defenses only)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow arbitrary pickled objects in foreign checkpoints (only for files you trust)")
    p.add_argument("--no-progress", action="store_true")


def resolve_defense_config(name: str, dataset: str, config_path: str | None, overrides: list[str]) -> tuple[dict, str]:
    """The config mapping for ``name`` and where it came from."""
    path = Path(config_path) if config_path else default_config_path("defense", name, dataset)
    base = load_yaml(path) if path else {}
    return apply_overrides(base, parse_overrides(overrides)), (str(path) if path else "built-in defaults")


def load_for_defense(args: argparse.Namespace):
    bundle = load_checkpoint(args.checkpoint, data_root=args.data_root, trust=args.trust_checkpoint)
    if args.data_root is None and bundle.extra.get("data_root"):  # e.g. a BackdoorBench record's data/<dataset>
        args.data_root = bundle.extra["data_root"]
    cfg, source = resolve_defense_config(args.defense, bundle.dataset, args.config, args.overrides)
    defense = get_defense(args.defense)(cfg)
    return bundle, defense, source


def run(args: argparse.Namespace) -> int:
    bundle, defense, source = load_for_defense(args)
    print(f"{defense.name} config ({source}): {defense.config.to_dict()}")
    result = run_defense(bundle, defense, data_root=args.data_root, device=args.device, seed=args.seed,
                         clean_ratio=args.clean_ratio, progress=not args.no_progress)
    paths = write_defense_outputs(result, args.out, overwrite=args.overwrite)
    print(summarize(result))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
