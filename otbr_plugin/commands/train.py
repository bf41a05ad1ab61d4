"""``otbr-bench train``: train a clean classifier and print its test accuracy (the quick-start job)."""

from __future__ import annotations

import argparse
import time

import torch

from ..config import parse_overrides
from ..metrics import accuracy, predict
from ..data import Normalizer, load_dataset
from ..models import create_model, list_models
from ..train import TrainConfig, train_classifier
from . import add_run_arguments, formatter, run_settings

EPILOG = """examples:
  otbr-bench train --dataset fashion_mnist --model preactresnet18 --width 0.25 --epochs 1
  otbr-bench train --dataset fashion_mnist --model smallcnn --epochs 2 --train-subset 10000 --device cpu
  otbr-bench train --epochs 2 --save runs/clean.safetensors   # a clean model for LF / TrojanNN (attack.clean_model)
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a clean model and print its test accuracy",
                       formatter_class=formatter(), epilog=EPILOG)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--data-root", default=None, help="data root (default: $OTBR_DATA or ./data)")
    p.add_argument("--model", default="preactresnet18", choices=list_models())
    p.add_argument("--width", type=float, default=0.25, help="channel multiplier (1.0 = published size)")
    p.add_argument("--model-args", action="append", default=[], metavar="KEY=VALUE",
                   help="a model option, e.g. stem=cifar for resnet18 (repeatable; see otbr-bench models)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--train-subset", type=int, default=None, help="train on the first N training images only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--save", default=None, metavar="FILE",
                   help="write the trained weights as a safetensors state_dict (e.g. for attack.clean_model)")
    add_run_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = run_settings(args)  # an unavailable device is refused before the data is read
    device = settings.device
    train = load_dataset(args.dataset, "train", args.data_root)
    test = load_dataset(args.dataset, "test", args.data_root)
    if args.train_subset:
        train = train.subset(torch.arange(min(args.train_subset, len(train))))
    spec = train.spec
    torch.manual_seed(args.seed)  # weight init is part of "same seed, same result"
    model = create_model(args.model, spec.num_classes, spec.in_channels, spec.image_size, args.width,
                         **parse_overrides(args.model_args))
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=str(device),
                      bf16=args.bf16, channels_last=args.channels_last, progress=not args.no_progress)
    print(f"training {args.model} (width {args.width}) on {spec.name}: {len(train)} images, {args.epochs} epoch(s), "
          f"device {device}")
    start = time.perf_counter()
    hist = train_classifier(model, train.images, train.labels, spec, cfg, device=device, progress=settings.progress)
    acc = accuracy(predict(model, test.images, Normalizer.for_dataset(spec), device=device), test.labels)
    print(f"train loss {hist.epochs[-1]['loss']:.4f}, train acc {hist.epochs[-1]['train_acc']:.4f}, "
          f"{time.perf_counter() - start:.1f} s")
    print(f"test accuracy: {acc * 100:.2f}% on {len(test)} {spec.name} test images")
    if args.save:
        from safetensors.torch import save_file

        from ..io import write_with

        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        write_with(args.save, lambda tmp: save_file(state, str(tmp)))
        print(f"weights written to {args.save}")
    return 0
