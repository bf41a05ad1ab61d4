"""Trace InputAware on the training split: its mask pre-training step by step, or a trained bundle's trigger.

``mask CONFIG --out FILE.jsonl [--set KEY=VALUE ...]``: one epoch of the mask generator's pre-training (the same
loss, optimizer and pairing as ``InputAware._train_mask``; ``--set`` as for ``otbr-bench attack``), one JSON line
per step: loss terms, mean mask, the smallest pair distance between two masks, how many pairs coincide exactly,
gradient norm, largest weight. It stops at the first step whose loss or gradient is not finite. This found the NaN
of the 7-epoch Fashion-MNIST run (configs/attack/README.md).

``trigger BUNDLE``: the share of the bundle's poisoned training samples the model predicts as the target, with the
pattern generator in eval mode (running statistics, how the trigger is applied) and in train mode (batch
statistics, how it was trained). A gap means the trigger moved after the classifier stopped following it. In eval
mode it also breaks the fit down by how much the trigger changes the image (L1 distance, pixels in [0, 1]) and by
the sample's true class, and gives the share of pattern pixels saturated at exactly 0 or 1 (no gradient there).

  python scripts/inputaware_trace.py mask configs/attack/inputaware/fashion_mnist.yaml --out trace.jsonl
  python scripts/inputaware_trace.py trigger runs/bundles/inputaware-seed0
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from benchmark_adapters.bundle import load_bundle
from otbr_plugin.attacks.inputaware import EPSILON
from otbr_plugin.attacks.registry import restore_attack
from otbr_plugin.attacks.runner import parse_attack_run
from otbr_plugin.attacks.triggers import diversity_loss, mask_norm_loss, mix
from otbr_plugin.config import apply_overrides, find_config_file, load_yaml, parse_overrides
from otbr_plugin.data.datasets import load_dataset
from otbr_plugin.data.transforms import Normalizer, to_float
from otbr_plugin.io import write_text


def trace_mask_epoch(config_path: str, out: str, data_root: str | None = None,
                     overrides: list[str] | None = None) -> None:
    run = parse_attack_run(apply_overrides(load_yaml(find_config_file(config_path)), parse_overrides(overrides)))
    attack, cfg = run.attack, run.attack.config
    train = load_dataset(run.dataset, "train", data_root)
    attack.build(tuple(train.images.shape[1:]), Normalizer.for_dataset(train.spec))
    m = attack.mask_generator
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    opt = torch.optim.Adam(m.parameters(), lr=cfg.lr_M, betas=(0.5, 0.9))
    n, bs = train.images.shape[0], run.train.batch_size
    first, second = torch.randperm(n, generator=gen), torch.randperm(n, generator=gen)
    m.train()
    rows: list[dict[str, float]] = []
    for step in range(math.ceil(n / bs)):
        sl = slice(step * bs, (step + 1) * bs)
        x1, x2 = to_float(train.images[first[sl]]), to_float(train.images[second[sl]])
        m1, m2 = attack.masks(x1), attack.masks(x2)
        norm = mask_norm_loss(m1, cfg.mask_density)
        div = diversity_loss(x1, x2, m1, m2, EPSILON)
        loss = cfg.lambda_norm * norm + cfg.lambda_div * div
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            dist = (m1 - m2).pow(2).flatten(1).mean(1)
            grad = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in m.parameters() if p.grad is not None))
            rows.append({"step": step + 1, "loss": float(loss), "norm": float(norm), "diversity": float(div),
                         "mean_mask": float(m1.mean()), "min_pair_distance": float(dist.min().sqrt()),
                         "equal_pairs": int((dist == 0).sum()), "grad_norm": grad,
                         "max_abs_weight": max(float(p.abs().max()) for p in m.parameters())})
        if not (math.isfinite(rows[-1]["loss"]) and math.isfinite(grad)):
            print(f"not finite at step {step + 1}: {rows[-1]}")
            break
        opt.step()
    else:
        print(f"{len(rows)} steps finite; trace in {out}")
    write_text(out, "".join(json.dumps(row) + "\n" for row in rows))


def _poisoned_pass(attack, model, x_all: torch.Tensor, target: int, batch_size: int
                   ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per sample: predicted as ``target`` with its own trigger, and the trigger's L1 change of the image; plus
    the share of pattern pixels at exactly 0 or 1. Uses the generators' current train/eval modes."""
    hits, change, saturated = [], [], 0
    with torch.no_grad():
        for s in range(0, x_all.shape[0], batch_size):
            x = x_all[s:s + batch_size]
            pattern = attack.patterns(x)
            poisoned = mix(x, pattern, attack.masks(x))
            hits.append(model(attack.normalizer(poisoned)).argmax(1) == target)
            change.append((poisoned - x).abs().flatten(1).sum(1))
            saturated += int(((pattern == 0) | (pattern == 1)).sum())
    return torch.cat(hits), torch.cat(change), saturated / x_all.numel()


def trigger_fit(bundle_path: str, data_root: str | None = None, batch_size: int = 128) -> dict[str, float]:
    bundle = load_bundle(bundle_path)
    attack = restore_attack(bundle.attack, bundle.tensors)
    model = bundle.build_model()
    train = load_dataset(bundle.dataset, "train", data_root)
    idx = bundle.tensors["poison_indices"].long()
    x_all = to_float(train.images[idx])
    target = int(bundle.attack["target_class"])
    stored = {k: v.clone() for k, v in attack.generator.state_dict().items()}
    fits: dict[str, float] = {}
    for mode in ("train", "eval"):  # eval last: its pass is the one broken down below
        attack.generator.load_state_dict(stored)  # train-mode passes move the running statistics
        attack.generator.train(mode == "train")
        hit, l1, fits["saturated_pattern_share"] = _poisoned_pass(attack, model, x_all, target, batch_size)
        fits[mode] = float(hit.float().mean())
    edges = [0.0, 2.0, 4.0, 8.0, 16.0, float("inf")]
    for lo, hi in zip(edges, edges[1:]):
        sel = (l1 >= lo) & (l1 < hi)
        if sel.any():
            fits[f"fit_l1_{lo:g}_{hi:g}"] = fit = float(hit[sel].float().mean())
            print(f"  trigger L1 in [{lo:g}, {hi:g}): {int(sel.sum())} samples, fit {fit:.3f}")
    labels = train.labels[idx]
    for c in labels.unique().tolist():
        sel = labels == c
        print(f"  true class {c}: {int(sel.sum())} samples, fit {float(hit[sel].float().mean()):.3f}, median trigger "
              f"L1 {float(l1[sel].median()):.1f}")
    print(f"  pattern pixels saturated at exactly 0 or 1: {fits['saturated_pattern_share']:.3f}")
    print(f"poisoned training samples predicted as the target: generator in eval mode {fits['eval']:.4f}, "
          f"in train mode {fits['train']:.4f}")
    return fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("mask", help="trace one mask pre-training epoch")
    p.add_argument("config")
    p.add_argument("--out", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, as for otbr-bench attack")
    p.add_argument("--data-root")
    p = sub.add_parser("trigger", help="a bundle's trigger with the generator in eval and in train mode")
    p.add_argument("bundle")
    p.add_argument("--data-root")
    args = parser.parse_args()
    if args.what == "mask":
        trace_mask_epoch(args.config, args.out, args.data_root, args.overrides)
    else:
        trigger_fit(args.bundle, args.data_root)


if __name__ == "__main__":
    main()
