"""``otbr-bench defend``: run one defense on a checkpoint, evaluate before/after, write the results."""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmark_adapters.checkpoints import load_checkpoint

from ..bench.runner import run_defense, summarize, write_defense_outputs
from ..bench.sweep import ORACLE_LABEL, oracle_sweep, parse_sweep, sweep_defenses, write_sweep
from ..data import get_dataset_spec, load_dataset
from ..config import ResolvedConfig, resolve_config
from ..defenses import get_defense, list_defenses
from . import add_run_arguments, formatter, run_settings

EPILOG = """examples:
  otbr-bench defend runs/badnets --defense otbr --out runs/badnets-otbr
  otbr-bench defend runs/badnets --defense otbr --set gamma=0.1 --set lam=0.5 --out runs/badnets-otbr-g01
  otbr-bench defend runs/badnets --defense clp --config configs/defense/clp/fashion_mnist.yaml --out runs/badnets-clp
  otbr-bench defend runs/badnets --defense otbr --out runs/badnets-otbr --sweep gamma=0.01,0.02,0.05,0.1,0.15,0.2

The defense config is layered, later wins: the defense's built-in defaults < the packaged
configs/defense/<defense>/<dataset>.yaml (when it exists) < --config < --set key=value. record.json says which
layers were used (config_source).
Outputs in --out: model/ (defended bundle), record.json (metrics before/after, DER, config, seconds),
and one CSV per diagnostic table (e.g. nwc.csv for OTBR).
--sweep KEY=V1,V2,... is an ORACLE DIAGNOSTIC: after the reported run it reruns the defense at each value and
scores it on the TEST set (oracle_sweep_KEY.csv/.png); it never changes the reported result.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("defend", help="run a defense on a checkpoint and evaluate it", formatter_class=formatter(),
                       epilog=EPILOG)
    add_defense_arguments(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing defended bundle in --out")
    p.add_argument("--sweep", default=None, metavar="KEY=V1,V2,...",
                   help="oracle diagnostic on the TEST set: also run each value of one config field "
                        "(e.g. gamma=0.01,0.05,0.1); writes oracle_sweep_KEY.csv/.png, never the reported result")
    p.set_defaults(func=run)


def add_defense_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a bundle folder (or a BackdoorBench record folder)")
    p.add_argument("--defense", required=True, help=f"one of: {', '.join(list_defenses())}")
    p.add_argument("--config", default=None, help="defense config YAML (flat key: value)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field (repeatable)")
    p.add_argument("--data-root", default=None, help="data root for the clean test/defense data (default $OTBR_DATA or ./data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clean-ratio", type=float, default=0.05,
                   help="size of the clean defense subset, as a share of the training set (data-dependent defenses only)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow arbitrary pickled objects in foreign checkpoints (only for files you trust)")
    add_run_arguments(p)




def load_for_defense(args: argparse.Namespace):
    bundle = load_checkpoint(args.checkpoint, data_root=args.data_root, trust=args.trust_checkpoint)
    if args.data_root is None and bundle.extra.get("data_root"):  # e.g. a BackdoorBench record's data/<dataset>
        args.data_root = bundle.extra["data_root"]
    resolved: ResolvedConfig = resolve_config("defense", args.defense, bundle.dataset, args.config, args.overrides)
    defense = get_defense(args.defense)(resolved.values)
    return bundle, defense, resolved.source


def check_out_folder(out: str | Path, overwrite: bool) -> None:
    """Refuse an output folder that already holds a defense result, before any work is done."""
    held = [name for name in ("model", "record.json") if (Path(out) / name).exists()]
    if held and not overwrite:
        raise FileExistsError(f"{out} already holds a defense result ({', '.join(held)}); pass --overwrite to replace "
                              "it or choose another --out")
    if Path(out).exists() and not Path(out).is_dir():
        raise FileExistsError(f"--out {out} is a file; expected a folder (new or holding an earlier result)")


def run(args: argparse.Namespace) -> int:
    check_out_folder(args.out, args.overwrite)
    settings = run_settings(args)  # an unavailable device is refused before the checkpoint is read
    bundle, defense, source = load_for_defense(args)
    print(f"{defense.name} config ({source}): {defense.config.to_dict()}")
    sweep = None
    if getattr(args, "sweep", None):
        key, values = parse_sweep(args.sweep)
        sweep = (key, sweep_defenses(defense, key, values))  # bad keys/values fail before anything runs
    clean_test = load_dataset(get_dataset_spec(bundle.dataset).name, "test", args.data_root)
    result = run_defense(bundle, defense, data_root=args.data_root, device=settings.device, seed=settings.seed,
                         clean_ratio=args.clean_ratio, progress=settings.progress, clean_test=clean_test,
                         config_source=source)
    paths = write_defense_outputs(result, args.out, overwrite=args.overwrite)
    print(summarize(result))
    if sweep is not None:
        key, defenses = sweep
        table = oracle_sweep(bundle, defenses, key, clean_test=clean_test, before=result.before,
                             data_root=args.data_root, device=settings.device, seed=settings.seed,
                             clean_ratio=args.clean_ratio, progress=settings.progress)
        paths.update(write_sweep(table, args.out, key, reported_value=getattr(defense.config, key),
                                 before=result.before,
                                 title=f"{defense.name} on {bundle.attack.get('name', '?')} / {bundle.dataset}"))
        print(f"{ORACLE_LABEL}, {key} sweep (not the reported result):")
        print(table.drop(columns=["diagnostic"]).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
