"""``otbr-bench backdoorbench install-dropin BB_ROOT``: put the drop-in defenses into a BackdoorBench checkout."""

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
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _install(args: argparse.Namespace) -> int:
    from benchmark_adapters.backdoorbench.install import install_dropin

    for path, status in install_dropin(args.bb_root, args.defenses, args.datasets, force=args.force):
        print(f"{status:9} {path}")
    return 0
