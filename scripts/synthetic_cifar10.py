"""Write a synthetic CIFAR-10 in the exact official format (cifar-10-batches-py pickle batches) under a data root.

The full-width CIFAR-10 path on a GPU, in two commands (see configs/bench/cifar10.yaml):

    python scripts/synthetic_cifar10.py --root data/synthetic
    otbr-bench bench configs/bench/cifar10.yaml --out runs/cifar10_synthetic --set data_root=data/synthetic \\
        --set attack_overrides.train.epochs=5 --no-progress

``--train-per-batch 10000 --test 10000`` gives the official sizes (50000 training, 10000 test images).
"""

from __future__ import annotations

import argparse
import sys

from otbr_plugin.data.synthetic import write_synthetic_cifar10


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="data root; the batches go to ROOT/cifar10/cifar-10-batches-py")
    ap.add_argument("--train-per-batch", type=int, default=2000, help="images per training batch, 5 batches "
                                                                       "(default 2000)")
    ap.add_argument("--test", type=int, default=2000, help="test images (default 2000)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the templates, noise and labels (default 0)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    args = ap.parse_args(argv)
    try:
        folder = write_synthetic_cifar10(args.root, args.train_per_batch, args.test, args.seed, args.overwrite)
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"synthetic CIFAR-10 written to {folder} ({5 * args.train_per_batch} training, {args.test} test images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
