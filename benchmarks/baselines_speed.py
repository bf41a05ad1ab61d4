"""Cost of the baselines' inner loops on synthetic data: seconds per ANP mask iteration, seconds of FP's
full pruning curve (cached feature maps) and of one forward pass over the held-out part it replaces per
count, and CLP's scoring time. Prints figures and ratios; asserts nothing.

    python benchmarks/baselines_speed.py [--model preactresnet18] [--width 0.25] [--device cpu] [--iters 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from otbr_plugin.data import Normalizer
from otbr_plugin.defenses import CleanData, build_context, create_defense
from otbr_plugin.defenses import anp as anp_mod
from otbr_plugin.defenses import fp as fp_mod
from otbr_plugin.defenses.structure import feature_site, tail_module
from otbr_plugin.models import create_model
from otbr_plugin.runtime import resolve_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="preactresnet18")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--iters", type=int, default=5, help="ANP iterations to time")
    ap.add_argument("--samples", type=int, default=600, help="held-out samples for the FP curve")
    args = ap.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = create_model(args.model, 10, args.channels, args.size, args.width).to(device).eval()
    shape = (args.channels, args.size, args.size)
    n = max(args.samples, 256)
    clean = CleanData(torch.randint(0, 256, (n, *shape), dtype=torch.uint8), torch.arange(n) % 10)
    norm = Normalizer((0.5,) * args.channels, (0.5,) * args.channels)

    clp = create_defense("clp")
    ctx = build_context(clp, num_classes=10, input_shape=shape, normalizer=norm, device=device, progress=False)
    t = time.perf_counter()
    clp.mitigate(model, ctx)
    print(f"clp: {time.perf_counter() - t:.3f} s for the whole defense")

    anp = create_defense("anp", iterations=args.iters)
    ctx = build_context(anp, num_classes=10, input_shape=shape, normalizer=norm, device=device, progress=False,
                        clean_data=clean)
    t = time.perf_counter()
    anp_mod.optimize_masks(anp.copy_model(model, device), clean.images, clean.labels, ctx, anp.config)
    per_iter = (time.perf_counter() - t) / max(1, args.iters)
    print(f"anp: {per_iter:.3f} s / iteration (batch {anp.config.batch_size}); 2000 iterations ~ {2000 * per_iter / 60:.1f} min, "
          f"200 ~ {200 * per_iter / 60:.1f} min")

    site = feature_site(model)
    tail = tail_module(model, site.node)
    fp = create_defense("fp")
    ctx = build_context(fp, num_classes=10, input_shape=shape, normalizer=norm, device=device, progress=False,
                        clean_data=clean)
    hold = clean.images[: args.samples]
    t = time.perf_counter()
    feats = fp_mod._features(model, site, hold, ctx, 512)
    full_pass = time.perf_counter() - t
    order = torch.arange(feats.shape[1])
    t = time.perf_counter()
    fp_mod.pruning_curve(tail, feats, clean.labels[: args.samples], order, feats.shape[1] - 1, device)
    curve = time.perf_counter() - t
    print(f"fp: full pruning curve over {feats.shape[1]} counts on cached features {curve:.2f} s; one full forward "
          f"pass {full_pass:.2f} s; re-running the network per count would take ~{full_pass * feats.shape[1]:.1f} s "
          f"({full_pass * feats.shape[1] / max(curve, 1e-9):.0f}x)")


if __name__ == "__main__":
    main()
