"""Study OTBR's gamma on models and data that are never used for reporting.

Protocol (no test data anywhere): the Fashion-MNIST *training* split is cut by a seeded permutation into a
study-training part and a held-out part. Study models are trained on the poisoned study-training part
(other seed than the reporting bundles), OTBR is run at several gammas, and ACC/ASR/RA are measured on the
held-out part of the training split (clean, and with the trigger on the non-target samples). The result
can inform a default gamma; it never looks at the official test split.

    PYTHONPATH=. python scripts/otbr_gamma_study.py --out /work/artifacts/otbr/gamma_study \
        --attacks badnets blended --epochs 3 --gammas 0.01,0.02,0.03,0.05,0.075,0.1,0.15,0.2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

from otbr_plugin.attacks import create_attack
from otbr_plugin.metrics import evaluate_backdoor
from otbr_plugin.config import load_yaml
from otbr_plugin.data import Normalizer, load_dataset
from otbr_plugin.defenses import build_context, get_defense
from otbr_plugin.models import create_model
from otbr_plugin.runtime import seed_everything
from otbr_plugin.train import TrainConfig, train_classifier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--attacks", nargs="+", default=["badnets", "blended"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--holdout", type=int, default=10000, help="training-split images held out for evaluation")
    p.add_argument("--seed", type=int, default=1, help="study seed (the reporting bundles use 0)")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--gammas", default="0.01,0.02,0.03,0.05,0.075,0.1,0.15,0.2")
    p.add_argument("--settings", nargs="+", default=["fixed"])
    p.add_argument("--data-root", default=None)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gammas = [float(g) for g in args.gammas.split(",")]

    train = load_dataset("fashion_mnist", "train", args.data_root)  # the training split only
    spec = train.spec
    perm = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(args.seed))
    hold, fit = perm[: args.holdout], perm[args.holdout:]
    fit_x, fit_y = train.images[fit], train.labels[fit]
    hold_x, hold_y = train.images[hold], train.labels[hold]
    normalizer = Normalizer.for_dataset(spec)
    rows = []
    for name in args.attacks:
        cfg = load_yaml(f"configs/attack/{name}/fashion_mnist.yaml")
        attack = create_attack(name, {**{k: v for k, v in cfg["attack"].items() if k != "name"}, "seed": args.seed})
        ckpt = out / f"{name}_model.pt"
        seed_everything(args.seed)
        model = create_model("preactresnet18", spec.num_classes, spec.in_channels, spec.image_size, args.width)
        poisoned = attack.poison_train(fit_x, fit_y, spec.num_classes)
        bd_hold = attack.poison_test(hold_x, hold_y, spec.num_classes)
        if ckpt.is_file():
            model.load_state_dict(torch.load(ckpt, weights_only=True))
        else:
            tc = TrainConfig(**{**cfg.get("train", {}), "epochs": args.epochs, "seed": args.seed, "device": "cpu",
                                "progress": False})
            t0 = time.time()
            train_classifier(model, poisoned.images, poisoned.labels, spec, tc)
            torch.save(model.state_dict(), ckpt)
            print(f"{name}: trained {args.epochs} epochs in {time.time() - t0:.0f} s", flush=True)
        model.eval()

        def score(m):
            return evaluate_backdoor(m, hold_x, hold_y, bd_hold.images, bd_hold.targets, bd_hold.original_labels,
                                     normalizer, device=torch.device("cpu"))

        b = score(model)
        rows.append({"attack": name, "setting": "none", "gamma": 0.0, "acc": b.acc, "asr": b.asr, "ra": b.ra})
        print(f"{name} before: ACC {b.acc:.4f} ASR {b.asr:.4f} RA {b.ra:.4f}", flush=True)
        for setting in args.settings:
            base = get_defense("otbr")(setting=setting)
            for g in gammas:
                d = get_defense("otbr")(base.config.replace(gamma=g))
                d.share_work_with(base)
                ctx = build_context(d, num_classes=spec.num_classes, input_shape=spec.input_shape,
                                    normalizer=normalizer, device=torch.device("cpu"), seed=0, progress=False)
                seed_everything(0)
                a = score(d.mitigate(model, ctx).model)
                rows.append({"attack": name, "setting": setting, "gamma": g, "acc": a.acc, "asr": a.asr, "ra": a.ra})
                print(f"  {setting} gamma {g:.3f}: ACC {a.acc:.4f} ASR {a.asr:.4f} RA {a.ra:.4f}", flush=True)
        pd.DataFrame(rows).to_csv(out / "gamma_study.csv", index=False)
    (out / "protocol.json").write_text(json.dumps({**vars(args), "evaluation": "held-out part of the TRAINING split",
                                                   "test_split_used": False}, indent=2))
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
