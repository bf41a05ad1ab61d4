"""Development study of OTBR's data-free mean compensation (``repair: mean``, otbr_plugin/otbr/meanshift.py) on a
bundle, scored on TRAINING-split data only (never the test set; sets of scripts/otbr_dev_eval.py).

First how well the estimated conv output means match the means the batch norms measured in training (block
``conv1`` -> ``bn2``), then for a few ranking x gamma x lambda settings the pruned-only and the fused model with and
without the compensation. Used to develop the option in docs/otbr.md; never on reference checkpoints.

  python scripts/otbr_mean_study.py BUNDLE
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmark_adapters.bundle import load_bundle
from otbr_plugin.otbr.meanshift import compensate_means, expected_conv_outputs
from otbr_plugin.otbr.pipeline import FusionOptions, prune_and_fuse
from otbr_dev_eval import random_unlearning_scores, score, train_split_eval_sets

SETTINGS = [("layer", 0.05, 0.5), ("global", 0.05, 0.5), ("global", 0.1, 1.0), ("layer", 0.05, 1.0),
            ("global", 0.1, 0.5)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--n", type=int, default=1000, help="clean and triggered training-split images")
    args = ap.parse_args()
    bundle = load_bundle(args.bundle)
    model = bundle.build_model().eval()
    modules = dict(model.named_modules())
    for name, (mean, _) in expected_conv_outputs(model).items():
        bn = modules.get(name.replace("conv1", "bn2")) if name.endswith(".conv1") else None
        if bn is not None:
            measured = bn.running_mean.double()
            print(json.dumps({"layer": name, "pearson": round(float(torch.corrcoef(torch.stack([mean, measured]))[0, 1]), 4),
                              "mean_abs_error": round(float((mean - measured).abs().mean()), 4),
                              "mean_abs": round(float(measured.abs().mean()), 4)}))
    clean, bd = train_split_eval_sets(bundle, args.n)
    layers, scores = random_unlearning_scores(bundle, model)
    print(json.dumps({"bundle": args.bundle, "none": score(model, clean, bd, bundle.normalizer)}), flush=True)
    for ranking, gamma, lam in SETTINGS:
        res = prune_and_fuse(model, scores, layers, gamma=gamma, lam=lam, options=FusionOptions(ranking=ranking))
        row = {"ranking": ranking, "gamma": gamma, "lam": lam}
        for name, m in (("pruned", res.pruned), ("fused", res.model)):
            row[name] = score(m, clean, bd, bundle.normalizer)
            row[name + "+mean"] = score(compensate_means(model, m)[0], clean, bd, bundle.normalizer)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
