"""``otbr-bench backdoorbench install-dropin BB_ROOT``: put the drop-in defenses into a BackdoorBench checkout;
``otbr-bench backdoorbench export-ssba BUNDLE --out DIR``: an ssba bundle's encoded splits as BackdoorBench's
pre-made SSBA files."""

from __future__ import annotations

import argparse

from . import formatter

EPILOG = """examples:
  otbr-bench backdoorbench install-dropin ~/BackdoorBench
  otbr-bench backdoorbench install-dropin ~/BackdoorBench --defenses otbr --datasets cifar10 gtsrb
then, from the BackdoorBench root:
  python ./defense/otbr.py --result_file badnet_0_1 --yaml_path ./config/defense/otbr/cifar10.yaml --dataset cifar10
  python ./defense/otbr_fp.py --result_file badnet_0_1 --yaml_path ./config/defense/fp/cifar10.yaml --setting backdoorbench
  (the drop-ins take BackdoorBench's own flags and YAMLs for the same defense; --oracle true scores FP's stopping
  point / ANP's threshold on the TEST set as BackdoorBench does, written apart to defense/<name>_oracle/)

Installs defense/otbr.py, defense/otbr_anp.py, defense/otbr_fp.py, defense/otbr_clp.py and
config/defense/<name>/<dataset>.yaml. BackdoorBench's own anp/fp/clp stay untouched; results go to
record/<result_file>/defense/<name>/. A folder that is not a BackdoorBench checkout (no defense/base.py,
attack/, utils/, config/defense/) is refused.
"""

SSBA_EPILOG = """examples:
  otbr-bench backdoorbench export-ssba runs/bundles/fashion_mnist/ssba --out ~/BackdoorBench/resource/ssba
then, from the BackdoorBench root (its SSBA reads pre-made poisoned images, every image of each split encoded):
  python ./attack/ssba.py --attack_train_replace_imgs_path ./resource/ssba/<dataset>_ssba_train_b1.npy \\
      --attack_test_replace_imgs_path ./resource/ssba/<dataset>_ssba_test_b1.npy ...

Encodes the dataset's whole training and test split with the bundle's encoder and secret and writes
<dataset>_ssba_{train,test}_b1.npy (uint8, (N, H, W) grey or (N, H, W, 3) colour), BackdoorBench's names.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backdoorbench", help="BackdoorBench integration (drop-in defense scripts)",
                       formatter_class=formatter(), epilog=EPILOG)
    bsub = p.add_subparsers(dest="bb_command", metavar="ACTION")
    q = bsub.add_parser("install-dropin", help="copy the drop-in scripts and configs into a BackdoorBench checkout",
                        formatter_class=formatter(), epilog=EPILOG)
    q.add_argument("bb_root", help="root of the BackdoorBench checkout (holds attack/, defense/, config/, record/)")
    q.add_argument("--defenses", nargs="+", default=None, help="otbr, otbr_anp, otbr_fp, otbr_clp (default: all)")
    q.add_argument("--datasets", nargs="+", default=None, help="one YAML per dataset (default: cifar10)")
    q.add_argument("--force", action="store_true", help="overwrite files that exist with other content")
    q.set_defaults(func=_install)
    e = bsub.add_parser("export-ssba", help="write an ssba bundle's encoded splits as BackdoorBench's SSBA files",
                        formatter_class=formatter(), epilog=SSBA_EPILOG)
    e.add_argument("bundle", help="a bundle made by `otbr-bench attack` with attack ssba")
    e.add_argument("--out", required=True, help="folder for <dataset>_ssba_{train,test}_b1.npy")
    e.add_argument("--data-root", default=None, help="data root (default: $OTBR_DATA or ./data)")
    e.set_defaults(func=_export_ssba)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _install(args: argparse.Namespace) -> int:
    from benchmark_adapters.backdoorbench.install import install_dropin

    for path, status in install_dropin(args.bb_root, args.defenses, args.datasets, force=args.force):
        print(f"{status:9} {path}")
    return 0


def _export_ssba(args: argparse.Namespace) -> int:
    from benchmark_adapters.backdoorbench.ssba import export_ssba_images
    from benchmark_adapters.bundle import load_bundle
    from otbr_plugin.data import load_dataset

    bundle = load_bundle(args.bundle)
    train = load_dataset(bundle.dataset, "train", args.data_root)
    test = load_dataset(bundle.dataset, "test", args.data_root)
    out = export_ssba_images(bundle, train.images, test.images, args.out)
    for split in ("train", "test"):
        print(f"wrote     {out['paths'][split]}")
    print(f"BackdoorBench: --attack_target {out['target_class']} --pratio {out['poison_ratio']} "
          f"--attack_label_trans {out['label_mode']}")
    return 0
