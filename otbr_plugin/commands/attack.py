"""``otbr-bench attack``: train a backdoored model from a YAML config and write it as a bundle."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import apply_overrides, find_config_file, load_yaml, parse_overrides
from . import add_run_arguments, formatter, run_settings

EPILOG = """config sections (see configs/attack/<attack>/<dataset>.yaml):
  attack:  name (badnets, blended, sig, wanet, inputaware, lf, trojannn, ssba) and its parameters (target_class, label_mode, poison_ratio, seed, ...)
  dataset: fashion_mnist, cifar10, ...
  model:   {name: preactresnet18, width: 0.25}
  train:   TrainConfig fields (epochs, batch_size, lr, momentum, weight_decay, seed, device, bf16, ...)

examples:
  otbr-bench attack configs/attack/badnets/fashion_mnist.yaml --out runs/bundles/fashion_mnist/badnets
  otbr-bench attack configs/attack/blended/fashion_mnist.yaml --out runs/blended --set train.epochs=2 \\
      --set attack.alpha=0.15
  otbr-bench attack configs/attack/wanet/cifar10.yaml --out runs/wanet --data-root data --device auto --overwrite
  otbr-bench train --epochs 2 --save runs/clean.safetensors
  otbr-bench attack configs/attack/lf/fashion_mnist.yaml --out runs/lf --set attack.clean_model=runs/clean.safetensors
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attack", help="train a backdoored model and write a bundle", formatter_class=formatter(),
                       epilog=EPILOG)
    p.add_argument("config", help="attack run config (YAML)")
    p.add_argument("--out", required=True, help="bundle folder to write (model.safetensors, bd_test.safetensors, "
                                                "extra.safetensors, meta.json)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=2 --set attack.poison_ratio=0.05")
    p.add_argument("--data-root", default=None, help="data root (default: $OTBR_DATA or ./data)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out (only a bundle folder: anything else there is an error)")
    add_run_arguments(p, device_default=None, device_help="auto (accelerator if present, else cpu), cpu, ... "
                                                            "(default: the config's train.device)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from benchmark_adapters.bundle import check_bundle_target, save_bundle

    from ..attacks.runner import parse_attack_run, run_attack

    out = Path(args.out)
    check_bundle_target(out, args.overwrite)  # before training: --overwrite replaces only a bundle
    config = apply_overrides(load_yaml(find_config_file(args.config)), parse_overrides(args.overrides))
    train = dict(config.get("train") or {}) if isinstance(config.get("train", {}), dict) else config.get("train")
    if isinstance(train, dict):
        if args.device is not None:
            train["device"] = args.device
        if args.no_progress:
            train["progress"] = False
        config["train"] = train
    run_cfg = parse_attack_run(config)
    settings = run_settings(args, device=run_cfg.train.device, seed=run_cfg.train.seed)  # once, before any work
    bundle = run_attack(run_cfg, data_root=args.data_root, device=settings.device, progress=settings.progress)
    bundle.extra["config_file"] = str(args.config)
    bundle.extra["overrides"] = list(args.overrides)
    path = save_bundle(bundle, out, overwrite=args.overwrite)
    m = bundle.metrics
    print(json.dumps({"bundle": str(path), "attack": run_cfg.attack.name, "dataset": run_cfg.dataset,
                      "epochs": run_cfg.train.epochs, "acc": round(m["acc"], 4), "asr": round(m["asr"], 4),
                      "ra": round(m["ra"], 4), "minutes": round(bundle.training["minutes"], 2)}))
    return 0
