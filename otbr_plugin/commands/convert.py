"""``otbr-bench convert SRC DST``: BackdoorBench record <-> bundle, either way."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import formatter
from .defend import add_plain_checkpoint_arguments, load_any_checkpoint

EPILOG = """examples:
  otbr-bench convert ~/BackdoorBench/record/badnet_0_1 bundles/badnet_0_1          (record -> bundle)
  otbr-bench convert runs/badnets ~/BackdoorBench/record/otbr_badnets              (bundle -> record)

  otbr-bench convert model.pt bundles/mine --model resnet18 --model-args stem=cifar --dataset fashion_mnist \\
      --attack-config configs/attack/badnets/fashion_mnist.yaml                  (plain state_dict -> bundle)

With --model, SRC is a plain state_dict (.safetensors or torch.save file) and becomes a bundle; the options are
those of `otbr-bench defend` (--model-args, --dataset, --poisoned-test | --attack-config, --target-class).
Otherwise the direction follows SRC: a bundle folder (meta.json) becomes a BackdoorBench record folder (attack_result.pt
in BackdoorBench's format, bd_test_dataset/<label>/<index>.png, attack_df_summary.csv); a record folder (or its
attack_result.pt) becomes a bundle. Weights and the poisoned test set survive a round trip bit for bit, and so
do a bundle's extra tensors (poison indices, learned-trigger state: extra.safetensors, kept beside the record with
its sha256). A record written from a bundle has bd_train None (a bundle holds no poisoned training set).
DST may not be SRC or a folder holding it (symlinks resolved); --overwrite replaces only a folder of the kind
convert writes (a bundle, or a record folder written by convert), never one holding anything else.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert between a BackdoorBench record and a bundle",
                       formatter_class=formatter(), epilog=EPILOG)
    p.add_argument("src", help="a bundle folder, or a BackdoorBench record folder / attack_result.pt")
    p.add_argument("dst", help="the folder to write (its name becomes the record name for bundle -> record)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST if it is a bundle / a record folder written by convert (nothing else)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle attack_result.pt without the allowlist (only for files you trust)")
    p.add_argument("--test-size", type=int, default=None,
                   help="bundle -> record: size of the clean test split for poison_indicator "
                        "(default: the bundle's meta, else the dataset's official size)")
    p.add_argument("--data-root", default=None, help="data root for --attack-config (default $OTBR_DATA or ./data)")
    add_plain_checkpoint_arguments(p)
    p.set_defaults(func=run)


def check_not_source(src: Path, dst: Path) -> None:
    """Refuse a DST that is SRC or holds it (symlinks resolved): writing DST replaces it, source included."""
    source, target = src.resolve(), dst.resolve()
    if target == source or target in source.parents:
        what = "is SRC" if target == source else "holds SRC"
        raise ValueError(f"DST {dst} {what} ({source}): writing it would replace the source; choose a DST outside "
                         f"{src}")


def run(args: argparse.Namespace) -> int:
    from benchmark_adapters.backdoorbench import is_record, load_attack_result, write_attack_result
    from benchmark_adapters.bundle import is_bundle, load_bundle, save_bundle

    src, dst = Path(args.src), Path(args.dst)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    check_not_source(src, dst)
    plain = (args.model, args.dataset, args.poisoned_test, args.attack_config, args.target_class)
    if any(v is not None for v in plain) or args.model_args:
        args.checkpoint = str(src)
        bundle = load_any_checkpoint(args)
        out = save_bundle(bundle, dst, overwrite=args.overwrite)
        print(f"plain state_dict {src} -> bundle {out} ({bundle.model_config.name} width "
              f"{bundle.model_config.width:g}, {len(bundle.bd_test)} poisoned test images)")
        return 0
    if is_bundle(src):
        bundle = load_bundle(src)
        out = write_attack_result(bundle, dst, overwrite=args.overwrite, test_size=args.test_size)
        print(f"bundle {src} -> BackdoorBench record {out} ({len(bundle.bd_test)} poisoned test images)")
        return 0
    if is_record(src):
        bundle = load_attack_result(src, trust=args.trust_checkpoint)
        bundle.extra.pop("data_root", None)  # a machine-local hint, not part of the checkpoint
        out = save_bundle(bundle, dst, overwrite=args.overwrite)
        print(f"BackdoorBench record {src} -> bundle {out} ({bundle.model_config.name} width "
              f"{bundle.model_config.width:g}, {len(bundle.bd_test)} poisoned test images)")
        return 0
    raise ValueError(f"{src} is neither a bundle folder (meta.json) nor a BackdoorBench record (attack_result.pt)")
