"""``otbr-bench models`` and ``otbr-bench datasets``: what the zoo and the data readers offer."""

from __future__ import annotations

import argparse

from ..data import DATASETS, default_data_root, find_dataset
from ..models import create_model, list_models, model_options
from . import formatter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model zoo", formatter_class=formatter(),
                       epilog="example:\n  otbr-bench models")
    p.set_defaults(func=_models)
    p = sub.add_parser("datasets", help="list datasets and whether they are on disk", formatter_class=formatter(),
                       epilog="example:\n  otbr-bench datasets --data-root data")
    p.add_argument("--data-root", default=None, help="data root (default: $OTBR_DATA or ./data)")
    p.set_defaults(func=_datasets)


def _models(args: argparse.Namespace) -> int:
    print(f"{'model':<16} {'params (10 classes, 3x32x32, width 1.0)':>40}  options (--model-args / model.args)")
    for name in list_models():
        n = sum(p.numel() for p in create_model(name, 10, 3, 32, 1.0).parameters())
        opts = ", ".join(f"{k}={v}" for k, v in model_options(name).items()) or "-"
        print(f"{name:<16} {n:>40,}  {opts}")
    return 0


def _datasets(args: argparse.Namespace) -> int:
    root = args.data_root or str(default_data_root())
    print(f"{'dataset':<14} {'classes':>7} {'shape':>10}  {'found at':<40} description")
    for name, spec in sorted(DATASETS.items()):
        where = find_dataset(name, root)
        shape = "x".join(map(str, spec.input_shape))
        print(f"{name:<14} {spec.num_classes:>7} {shape:>10}  {str(where) if where else '-':<40} {spec.description}")
    return 0
