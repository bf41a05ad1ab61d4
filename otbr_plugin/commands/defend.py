"""``otbr-bench defend``: run one defense on a checkpoint, evaluate before/after, write the results."""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmark_adapters.checkpoints import load_checkpoint
from benchmark_adapters.plain import load_plain_checkpoint

from ..bench.runner import run_defense, summarize, write_defense_outputs
from ..bench.sweep import ORACLE_LABEL, oracle_sweep, parse_sweep, sweep_defenses, write_sweep
from ..data import get_dataset_spec, load_dataset
from ..config import ResolvedConfig, parse_overrides, resolve_config
from ..defenses import get_defense, list_defenses
from . import add_run_arguments, formatter, run_settings

EPILOG = """examples:
  otbr-bench defend runs/badnets --defense otbr --out runs/badnets-otbr
  otbr-bench defend model.pt --model resnet18 --model-args stem=cifar --dataset cifar10 \\
      --poisoned-test bd_test_dataset/ --target-class 0 --defense clp --out runs/mine-clp
  otbr-bench defend model.safetensors --model preactresnet18 --dataset fashion_mnist \\
      --attack-config configs/attack/badnets/fashion_mnist.yaml --defense otbr --out runs/mine-otbr
  otbr-bench defend runs/badnets --defense otbr --set gamma=0.1 --set lam=0.5 --out runs/badnets-otbr-g01
  otbr-bench defend runs/badnets --defense clp --config configs/defense/clp/fashion_mnist.yaml --out runs/badnets-clp
  otbr-bench defend runs/badnets --defense otbr --out runs/badnets-otbr --sweep gamma=0.01,0.02,0.05,0.1,0.15,0.2

A plain checkpoint (a state_dict in .safetensors or a torch.save file, read with weights_only=True) needs
--model (a zoo name; --model-args for its options and width, e.g. --model-args stem=cifar --model-args width=0.25;
the width is otherwise read from the weights), --dataset and one poisoned test source: --poisoned-test (an image
folder <orig_label>/<name>.png, or an .npz/.safetensors file with images, original_labels and optionally
targets; --target-class N when it has no targets) or --attack-config (the attack is re-applied to the clean test
set). `otbr-bench convert` writes such a checkpoint as a bundle.

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
    p.add_argument("checkpoint", help="a bundle folder, a BackdoorBench record folder, or a plain state_dict file "
                                      "(.safetensors / .pt, with --model and --dataset)")
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
    add_plain_checkpoint_arguments(p)
    add_run_arguments(p)


def add_plain_checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --model-args, --dataset and the poisoned test source of a plain state_dict checkpoint."""
    g = p.add_argument_group("plain state_dict checkpoints")
    g.add_argument("--model", default=None, help="zoo model the state_dict belongs to (otbr-bench models)")
    g.add_argument("--model-args", action="append", default=[], metavar="KEY=VALUE",
                   help="a model option or its width, e.g. stem=cifar or width=0.25 (repeatable)")
    g.add_argument("--dataset", default=None, help="dataset the model was trained on (otbr-bench datasets)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--poisoned-test", default=None, metavar="PATH",
                     help="poisoned test set: image folder <orig_label>/<name>.png, or .npz/.safetensors with "
                          "images, original_labels[, targets]")
    src.add_argument("--attack-config", default=None, metavar="ATTACK.yaml",
                     help="regenerate the poisoned test set by applying this attack config to the clean test set")
    g.add_argument("--target-class", type=int, default=None,
                   help="attack target (all2one) for a --poisoned-test that stores no targets")


def load_any_checkpoint(args: argparse.Namespace):
    """A bundle, a BackdoorBench record, or (with --model) a plain state_dict checkpoint, as a Bundle."""
    plain = {k: getattr(args, k, None) for k in ("dataset", "poisoned_test", "attack_config", "target_class")}
    if getattr(args, "model", None) is None:
        given = [f"--{k.replace('_', '-')}" for k, v in plain.items() if v is not None] + (
            ["--model-args"] if getattr(args, "model_args", None) else [])
        if given:
            raise ValueError(f"{', '.join(given)}: options of a plain state_dict checkpoint, which need --model NAME "
                             "(a bundle or BackdoorBench record knows its model, dataset and poisoned test set)")
        return load_checkpoint(args.checkpoint, data_root=args.data_root, trust=args.trust_checkpoint)
    if plain["dataset"] is None:
        raise ValueError("a plain state_dict checkpoint needs --dataset NAME (the dataset it was trained on)")
    return load_plain_checkpoint(args.checkpoint, model=args.model, dataset=plain["dataset"],
                                 model_args=parse_overrides(args.model_args), poisoned_test=plain["poisoned_test"],
                                 attack_config=plain["attack_config"], target_class=plain["target_class"],
                                 data_root=args.data_root, trust=args.trust_checkpoint)


def load_for_defense(args: argparse.Namespace):
    bundle = load_any_checkpoint(args)
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
