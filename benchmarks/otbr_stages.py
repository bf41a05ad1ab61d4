"""Seconds per OTBR stage for full-width preactresnet18 at 3x32x32 on the CPU, and the share of
pruning + fusion relative to random unlearning (target: under 20%).

Random weights are enough: the cost of every stage depends on the architecture, not on what the weights
learned. Prints figures; asserts nothing about wall time.

    PYTHONPATH=. python benchmarks/otbr_stages.py [--steps 20] [--batch-size 256] [--threads N] [--repeat 1]
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch

import time

from otbr_plugin.data import Normalizer
from otbr_plugin.defenses import build_context, get_defense
from otbr_plugin.models import create_model
from otbr_plugin.otbr import fuse_models, prune_neurons, target_masses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="preactresnet18")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="unlearning steps I (paper: 20)")
    p.add_argument("--batch-size", type=int, default=256, help="unlearning batch (paper: 256)")
    p.add_argument("--gamma", type=float, default=0.05)
    p.add_argument("--setting", default="fixed", choices=["fixed", "reference"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeat", type=int, default=1, help="runs; the median per stage is reported")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = create_model(args.model, args.num_classes, args.channels, args.image_size, args.width).eval()
    n_params = sum(p.numel() for p in model.parameters())
    shape = (args.channels, args.image_size, args.image_size)
    defense = get_defense("otbr")(setting=args.setting, gamma=args.gamma, unlearn_steps=args.steps,
                                  unlearn_batch_size=args.batch_size)
    ctx = build_context(defense, num_classes=args.num_classes, input_shape=shape,
                        normalizer=Normalizer((0.4914, 0.4822, 0.4465)[: args.channels], (0.247, 0.243, 0.261)[: args.channels]),
                        device=torch.device("cpu"), seed=0, progress=False)
    runs = []
    for _ in range(args.repeat):
        outcome = defense.mitigate(model, ctx)
        runs.append(outcome.stage_seconds)
    stages = ["unlearning", "nwc", "auto", "prune_fuse"]
    sec = {s: statistics.median(r.get(s, 0.0) for r in runs) for s in stages}

    print(f"OTBR stage timings: {args.model} width {args.width} ({n_params / 1e6:.2f} M parameters), input "
          f"{'x'.join(map(str, shape))}, I={args.steps}, batch {args.batch_size}, gamma {args.gamma}, "
          f"setting {args.setting}")
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeat} run(s)")
    d = outcome.diagnostics
    print(f"neurons ranked {d['num_neurons']}, pruned {d['num_pruned']}, fused layers {len(d['fused_layers'])} "
          f"(from {d['fusion_start']})")
    for s in stages:
        print(f"  {s:<11} {sec[s]:9.3f} s")
    total = sum(sec.values())
    print(f"  {'total':<11} {total:9.3f} s")
    per_step = sec["unlearning"] / args.steps
    print(f"unlearning per step: {per_step:.3f} s")
    ratio = sec["prune_fuse"] / sec["unlearning"]
    print(f"(pruning + fusion) / unlearning = {ratio * 100:.2f}%   (target < 20%)")
    print(f"(nwc + pruning + fusion) / unlearning = {(sec['nwc'] + sec['prune_fuse']) / sec['unlearning'] * 100:.2f}%")

    # worst case: the fusion starts at the very first target layer (a pruned neuron in the stem conv)
    table = outcome.tables["nwc"]
    layers = d["target_layers"]
    masks = {n: torch.tensor(g["pruned"].to_numpy()) for n, g in table.groupby("layer", sort=False)}
    scores = {n: torch.tensor(g["score"].to_numpy()) for n, g in table.groupby("layer", sort=False)}
    pruned = prune_neurons(model, masks)
    masses = {n: target_masses(scores[n], defense.config.target_mass, defense.config.mass_floor) for n in layers}
    cfg = defense.config
    t0 = time.perf_counter()
    fuse_models(pruned, model, layers, masses, start=layers[0], lam=cfg.lam, cost=cfg.cost, residual=cfg.residual,
                attached=cfg.attached, solver=cfg.solver, arithmetic=cfg.arithmetic)
    worst = time.perf_counter() - t0
    print(f"fusion over all {len(layers)} target layers (worst case): {worst:.3f} s; "
          f"(pruning + worst-case fusion) / unlearning = {(worst) / sec['unlearning'] * 100:.2f}%")


if __name__ == "__main__":
    main()
