"""Training and evaluation throughput (images/s) of preactresnet18.

Widths 1.0 and 0.25, inputs 1x28x28 and 3x32x32, fp32 and channels-last + bf16 autocast, on the device chosen
automatically (or --device). Prints a table and the speed-up ratios of channels-last+bf16 over fp32.

    python benchmarks/throughput.py [--device cpu] [--batch 128] [--steps 5]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from otbr_plugin.models import create_model
from otbr_plugin.runtime import autocast_context, resolve_device


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize()


def measure(width: float, shape: tuple[int, int, int], mode: str, device: torch.device, batch: int, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = create_model("preactresnet18", 10, shape[0], shape[1], width).to(device)
    fmt = torch.channels_last if mode == "cl+bf16" else torch.contiguous_format
    bf16 = mode == "cl+bf16"
    model.to(memory_format=fmt)
    x = torch.randn(batch, *shape, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train_step() -> None:
        with autocast_context(device, bf16=bf16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    train_step()  # warm-up
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        train_step()
    _sync(device)
    train_ips = batch * steps / (time.perf_counter() - t)

    model.eval()
    with torch.no_grad(), autocast_context(device, bf16=bf16):
        model(x)
        _sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            model(x)
        _sync(device)
    eval_ips = batch * steps / (time.perf_counter() - t)
    return train_ips, eval_ips


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--widths", default="1.0,0.25")
    args = ap.parse_args()
    device = resolve_device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"{args.steps} timed steps")
    print(f"{'width':>5} {'input':>8} {'mode':>8} {'train img/s':>12} {'eval img/s':>11}")
    results = {}
    for width in [float(w) for w in args.widths.split(",")]:
        for shape in [(1, 28, 28), (3, 32, 32)]:
            for mode in ("fp32", "cl+bf16"):
                tr, ev = measure(width, shape, mode, device, args.batch, args.steps)
                results[(width, shape, mode)] = (tr, ev)
                print(f"{width:>5} {'x'.join(map(str, shape)):>8} {mode:>8} {tr:>12.1f} {ev:>11.1f}", flush=True)
    print("\nspeed-up of channels-last+bf16 over fp32 (train, eval):")
    for width in [float(w) for w in args.widths.split(",")]:
        for shape in [(1, 28, 28), (3, 32, 32)]:
            a, b = results[(width, shape, "fp32")], results[(width, shape, "cl+bf16")]
            print(f"  width {width} {'x'.join(map(str, shape))}: {b[0] / a[0]:.2f}x, {b[1] / a[1]:.2f}x")


if __name__ == "__main__":
    main()
