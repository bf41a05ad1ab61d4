"""Development study of OTBR's neuron ranking (``ranking: global`` = the paper vs ``layer`` = the top gamma share of
each layer) on a bundle, scored on TRAINING-split data only (never the test set; sets of scripts/otbr_dev_eval.py).

One random unlearning (the paper's defaults, seed 0), then for every ranking x gamma x lambda the fused model and,
at the largest lambda, the pruned-only model. Also what the backdoored model predicts on uniform noise. Used to
develop the options in docs/otbr.md; never on reference checkpoints.

  python scripts/otbr_ranking_study.py BUNDLE --rankings global,layer --gammas 0.02,0.05,0.1 --lams 0.5,1.0
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmark_adapters.bundle import load_bundle
from otbr_plugin.data import get_dataset_spec
from otbr_plugin.defenses import get_defense
from otbr_plugin.metrics import predict
from otbr_plugin.otbr.pipeline import prune_and_fuse
from otbr_dev_eval import random_unlearning_scores, score, train_split_eval_sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--rankings", default="global,layer")
    ap.add_argument("--gammas", default="0.02,0.05,0.1,0.15")
    ap.add_argument("--lams", default="0.5,0.75,1.0")
    ap.add_argument("--n", type=int, default=1000, help="clean and triggered training-split images")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    args = ap.parse_args()
    bundle = load_bundle(args.bundle)
    model = bundle.build_model().eval()
    clean, bd = train_split_eval_sets(bundle, args.n)
    spec = get_dataset_spec(bundle.dataset)
    t0 = time.perf_counter()
    layers, scores = random_unlearning_scores(bundle, model)
    noise = (torch.rand((2000, *spec.input_shape), generator=torch.Generator().manual_seed(1)) * 255).round()
    on_noise = predict(model, noise.to(torch.uint8), bundle.normalizer, device=torch.device("cpu"))
    rows = [{"bundle": args.bundle, "ranking": "none", **score(model, clean, bd, bundle.normalizer),
             "unlearning_s": round(time.perf_counter() - t0, 1),
             "noise_predictions": torch.bincount(on_noise, minlength=spec.num_classes).tolist()}]
    print(json.dumps(rows[0]), flush=True)
    lams = [float(x) for x in args.lams.split(",")]
    base = get_defense("otbr")({}).config.fusion_options()
    for ranking in args.rankings.split(","):
        options = type(base)(**{**vars(base), "ranking": ranking})
        for gamma in (float(x) for x in args.gammas.split(",")):
            for lam in lams:
                res = prune_and_fuse(model, scores, layers, gamma=gamma, lam=lam, options=options)
                row = {"bundle": args.bundle, "ranking": ranking, "gamma": gamma, "lam": lam,
                       **score(res.model, clean, bd, bundle.normalizer),
                       "pruned_per_layer": {n: int(m.sum()) for n, m in res.masks.items() if m.any()}}
                if lam == max(lams):
                    row["pruned_only"] = score(res.pruned, clean, bd, bundle.normalizer)
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
