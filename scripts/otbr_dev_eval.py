"""Development study of OTBR variants on a bundle, scored on TRAINING-split data only (never the test set).

ACC: share correct on clean training images outside the poisoned indices; ASR: share of triggered non-target
training images (outside the poisoned indices) classified as the target. The training images were seen by the
model, so ACC is optimistic in absolute terms; the study compares defenses against each other and against the
undefended model on the same images. Used to develop the data-free options (docs/otbr.md); never on reference
checkpoints.

  python scripts/otbr_dev_eval.py BUNDLE --variants otbr,otbr_reference,otbr_df --n 2000
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmark_adapters.bundle import load_bundle
from otbr_plugin.attacks import create_attack
from otbr_plugin.metrics import predict
from otbr_plugin.data import load_dataset
from otbr_plugin.defenses import get_defense
from otbr_plugin.defenses.base import build_context
from otbr_plugin.config import parse_overrides


def train_split_eval_sets(bundle, n: int, seed: int = 123):
    train = load_dataset(bundle.dataset, "train")
    used = set(bundle.tensors.get("poison_indices", torch.empty(0, dtype=torch.long)).tolist())
    used |= set(bundle.tensors.get("cross_indices", torch.empty(0, dtype=torch.long)).tolist())
    g = torch.Generator().manual_seed(seed)
    order = [i for i in torch.randperm(len(train.labels), generator=g).tolist() if i not in used]
    clean_idx = torch.tensor(order[:n])
    attack = create_attack(bundle.attack["name"], {k: v for k, v in bundle.attack.items()
                                                   if k not in ("name", "label", "poison_count", "poison_indices",
                                                                "poison_ratio_realized", "clean_label", "cross_count")})
    target = attack.config.target_class
    bd_pool = [i for i in order[n:] if int(train.labels[i]) != target][:n]
    bd_idx = torch.tensor(bd_pool)
    bd_images = attack.apply_trigger(train.images[bd_idx])
    return (train.images[clean_idx], train.labels[clean_idx]), (bd_images, train.labels[bd_idx], target)


def random_unlearning_scores(bundle, model):
    """OTBR's paper-default random unlearning (seed 0) on ``model``: (target layers, NWC scores per layer)."""
    from otbr_plugin.data import get_dataset_spec
    from otbr_plugin.otbr.unlearning import target_layer_names

    spec = get_dataset_spec(bundle.dataset)
    defense = get_defense("otbr")({})
    ctx = build_context(defense, num_classes=bundle.model_config.num_classes, input_shape=spec.input_shape,
                        normalizer=bundle.normalizer, device=torch.device("cpu"), seed=0, progress=False,
                        dataset=spec.name)
    layers = target_layer_names(model)
    nwc, _, _ = defense.random_nwc(model, ctx, layers)
    return layers, defense.config.scores(nwc, model, layers)


def score(model, clean, bd, normalizer):
    acc = float((predict(model, clean[0], normalizer, device=torch.device("cpu")) == clean[1]).float().mean())
    pred = predict(model, bd[0], normalizer, device=torch.device("cpu"))
    asr = float((pred == bd[2]).float().mean())
    ra = float((pred == bd[1]).float().mean())
    return {"acc": round(100 * acc, 2), "asr": round(100 * asr, 2), "ra": round(100 * ra, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--variant", action="append", default=[],
                    help="label:key=value;key=value (OTBR config overrides), repeatable")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="append JSON lines here")
    args = ap.parse_args()
    bundle = load_bundle(args.bundle)
    model = bundle.build_model()
    clean, bd = train_split_eval_sets(bundle, args.n)
    base = score(model, clean, bd, bundle.normalizer)
    print(json.dumps({"bundle": args.bundle, "variant": "none", **base}), flush=True)
    from otbr_plugin.data import get_dataset_spec
    spec = get_dataset_spec(bundle.dataset)
    for v in args.variant or ["otbr:"]:
        label, _, sets = v.partition(":")
        overrides = parse_overrides([s for s in sets.split(";") if s]) if sets else {}
        defense = get_defense("otbr")(overrides)
        ctx = build_context(defense, num_classes=bundle.model_config.num_classes, input_shape=spec.input_shape,
                            normalizer=bundle.normalizer, device=torch.device("cpu"), seed=args.seed, progress=False,
                            dataset=spec.name)
        t0 = time.perf_counter()
        out = defense.mitigate(model, ctx)
        sec = time.perf_counter() - t0
        row = {"bundle": args.bundle, "variant": label, "config": overrides, **score(out.model, clean, bd, bundle.normalizer),
               "seconds": round(sec, 1), "stage_seconds": {k: round(x, 1) for k, x in out.stage_seconds.items()},
               "auto": {k: out.diagnostics[k] for k in ("gamma_used", "lam_used", "repair") if k in out.diagnostics}}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
