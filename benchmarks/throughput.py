"""Training and evaluation throughput (images/s): the project's loop against a minimal plain-PyTorch loop.

For preactresnet18 on 1x28x28 (Fashion-MNIST's spec) and 3x32x32 (CIFAR-10's spec), on random uint8 data:

- ours, training: :func:`otbr_plugin.train.train_classifier` (what attacks and FP fine-tuning run), two epochs of
  ``--steps`` steps each, the second one timed (the first is the warm-up); its precision and memory format come
  from its own config (``TrainConfig.bf16`` / ``amp`` / ``channels_last``).
- ours, evaluation: :func:`otbr_plugin.metrics.predict` (what every ACC/ASR/RA goes through), float32 always, on
  the images as the harness holds them (uint8, on the CPU), with its default batch (``--eval-batch``) and memory
  format (channels last on an accelerator, contiguous on the CPU, where it keeps results bit-identical;
  ``--ours-eval-format``).
- plain: the same model, batch, input size, augmentation (random crop, flip where the dataset allows it) and
  precision, written as a tuned plain-PyTorch loop: uint8 data kept on the device and normalized there, channels
  last, autocast (bf16, or fp16 with a gradient scaler), fused SGD, no host synchronisation between steps,
  evaluation under ``inference_mode``. ``--compile`` compiles the model (both loops).

The evaluation ratio compares ours with the plain loop at the same batch (``--eval-batch``, default predict's for
the device), float32 (ours never evaluates at a lower precision, so metrics do not depend on it) and the same memory
format as ours (channels last on an accelerator, contiguous on the CPU, where channels last computes with other
kernels and would change results in the last bits): the ratio measures our loop's overhead, not a choice of format
that the CPU's bit-identity rules out. The plain evaluation at ``--precision`` in ``--memory-format`` (the tuned
loop) is printed beside it. A ratio below 0.9 is flagged.
Timings only, nothing is asserted. Examples:

    python benchmarks/throughput.py --device cuda --width 1.0 --precision bf16
    python benchmarks/throughput.py --device cuda --width 1.0 --precision fp32 --json runs/throughput_fp32.json
    python benchmarks/throughput.py --device cpu --width 0.25 --steps 10 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from otbr_plugin.data import Normalizer, get_dataset_spec
from otbr_plugin.data.specs import DatasetSpec
from otbr_plugin.io import write_json
from otbr_plugin.metrics import ACCELERATOR_EVAL_BATCH, CPU_EVAL_BATCH, predict
from otbr_plugin.models import create_model
from otbr_plugin.runtime import RunSettings
from otbr_plugin.train import TrainConfig, train_classifier

SHAPES = {"1x28x28": "fashion_mnist", "3x32x32": "cifar10"}
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize()


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _autocast(device: torch.device, precision: str):
    dtype = AUTOCAST[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _model(spec: DatasetSpec, width: float, device: torch.device, compile_model: bool) -> nn.Module:
    torch.manual_seed(0)
    model = create_model("preactresnet18", spec.num_classes, spec.in_channels, spec.image_size, width).to(device)
    return torch.compile(model) if compile_model else model


def _data(spec: DatasetSpec, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, *spec.input_shape), dtype=torch.uint8, generator=g)
    return images, torch.randint(0, spec.num_classes, (n,), generator=g)


def ours_train(spec: DatasetSpec, images, labels, device, width, batch, precision, channels_last, augment,
               compile_model) -> float:
    """images/s of the second of two epochs of train_classifier."""
    model = _model(spec, width, device, compile_model)
    cfg = TrainConfig(epochs=2, batch_size=batch, bf16=precision == "bf16", amp=precision == "fp16",
                      channels_last=channels_last, augment=augment, progress=False)
    history = train_classifier(model, images, labels, spec, cfg, device=device, progress=False)
    return images.shape[0] / history.epochs[-1]["seconds"]


def plain_train(spec: DatasetSpec, images, labels, device, width, batch, precision, channels_last, augment,
                compile_model, steps: int) -> float:
    """images/s of a minimal tuned training loop over the same data (``steps`` timed steps after 3 warm-up ones)."""
    model = _model(spec, width, device, compile_model).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    data, target = images.to(device), labels.to(device)  # uint8 on the device, once
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4,
                          fused=None if device.type == "cpu" else True)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    gen = torch.Generator(device).manual_seed(0)
    n, (c, h, w), pad = data.shape[0], spec.input_shape, spec.crop_padding
    rows, cols = torch.arange(h, device=device), torch.arange(w, device=device)

    def step(i: int) -> None:
        idx = torch.randint(0, n, (batch,), device=device, generator=gen)
        x = data[idx].float().div_(255)
        if augment:  # random crop from the zero-padded image, per-image offsets, then a random flip
            x = F.pad(x, (pad, pad, pad, pad))
            oy = torch.randint(0, 2 * pad + 1, (batch, 1), device=device, generator=gen)
            ox = torch.randint(0, 2 * pad + 1, (batch, 1), device=device, generator=gen)
            x = x.gather(2, (oy + rows)[:, None, :, None].expand(batch, c, h, x.shape[3]))
            x = x.gather(3, (ox + cols)[:, None, None, :].expand(batch, c, h, w))
            if spec.hflip:
                flip = torch.rand(batch, device=device, generator=gen) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
        x = ((x - mean) / std).contiguous(memory_format=fmt)
        with _autocast(device, precision):
            loss = F.cross_entropy(model(x), target[idx])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for i in range(3):
        step(i)
    seconds = _timed(lambda: [step(i) for i in range(steps)], device)
    return batch * steps / seconds


def ours_eval(model: nn.Module, spec: DatasetSpec, images, device, repeats: int,
              channels_last: bool | None = None, batch: int | None = None) -> float:
    """images/s of predict (float32; its default batch unless ``batch``) on CPU-held uint8 images."""
    norm = Normalizer.for_dataset(spec)

    def run() -> None:
        predict(model, images, norm, batch, device=device, channels_last=channels_last)

    run()  # warm-up
    return images.shape[0] * repeats / _timed(lambda: [run() for _ in range(repeats)], device)


def plain_eval(model: nn.Module, spec: DatasetSpec, images, device, precision, channels_last, eval_batch,
               repeats: int) -> float:
    """images/s of a minimal inference loop: data on the device, one copy of the predictions back per pass."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt).eval()
    data = images.to(device)
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)

    @torch.inference_mode()
    def run() -> torch.Tensor:
        out = []
        with _autocast(device, precision):
            for s in range(0, data.shape[0], eval_batch):
                x = ((data[s:s + eval_batch].float().div_(255) - mean) / std).contiguous(memory_format=fmt)
                out.append(model(x).argmax(1))
        return torch.cat(out).cpu()

    run()
    seconds = _timed(lambda: [run() for _ in range(repeats)], device)
    model.to(memory_format=torch.contiguous_format)
    return data.shape[0] * repeats / seconds


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as fh:
                name = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
        except OSError:
            name = ""
        return name or platform.processor() or "cpu"
    return device.type


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, ... (default auto)")
    ap.add_argument("--width", type=float, default=1.0, help="preactresnet18 channel multiplier (default 1.0)")
    ap.add_argument("--batch", type=int, default=128, help="training batch (default 128, BackdoorBench's)")
    ap.add_argument("--precision", choices=sorted(AUTOCAST), default="fp32",
                    help="fp32, bf16 autocast, or fp16 autocast with a gradient scaler (accelerators only)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (both loops)")
    ap.add_argument("--memory-format", choices=["channels_last", "contiguous"], default="channels_last",
                    help="training memory format of both loops (ours: TrainConfig.channels_last); default "
                         "channels_last")
    ap.add_argument("--no-augment", action="store_true", help="no random crop/flip in either loop")
    ap.add_argument("--ours-eval-format", choices=["default", "channels_last", "contiguous"], default="default",
                    help="predict's channels_last argument (default: predict's own choice: channels last on an "
                         "accelerator, contiguous on the CPU)")
    ap.add_argument("--steps", type=int, default=50, help="timed training steps per loop (default 50)")
    ap.add_argument("--eval-images", type=int, default=10000, help="images per evaluation pass (default 10000)")
    ap.add_argument("--eval-batch", type=int, default=None,
                    help=f"evaluation batch of both loops (default predict's: {CPU_EVAL_BATCH} on the CPU, "
                         f"{ACCELERATOR_EVAL_BATCH} on an accelerator)")
    ap.add_argument("--repeats", type=int, default=3, help="timed evaluation passes (default 3)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()
    settings = RunSettings.from_args(args.device, threads=args.threads)
    device = settings.device
    if args.precision == "fp16" and device.type == "cpu":
        ap.error("--precision fp16 needs an accelerator (the CPU autocasts to bf16 only)")
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    if args.eval_batch is not None and args.eval_batch < 1:
        ap.error(f"--eval-batch must be >= 1, got {args.eval_batch}")
    channels_last, augment = args.memory_format == "channels_last", not args.no_augment
    eval_batch = args.eval_batch or (CPU_EVAL_BATCH if device.type == "cpu" else ACCELERATOR_EVAL_BATCH)
    ours_format = {"default": None, "channels_last": True, "contiguous": False}[args.ours_eval_format]
    ours_channels_last = device.type != "cpu" if ours_format is None else ours_format  # predict's own default
    header = {"device": str(device), "device_name": _device_name(device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "width": args.width, "batch": args.batch,
              "precision": args.precision, "memory_format": args.memory_format, "augment": augment,
              "compile": args.compile, "ours_eval_format": "channels_last" if ours_channels_last else "contiguous",
              "steps": args.steps, "eval_images": args.eval_images, "eval_batch": eval_batch}
    print(", ".join(f"{k} {v}" for k, v in header.items()), flush=True)
    cols = ["input", "train ours", "train plain", "ratio", "eval ours", "eval plain fp32", "ratio",
            f"eval plain {args.precision} {args.memory_format}"]
    print(" | ".join(cols))
    rows = []
    for shape in shapes:
        spec = get_dataset_spec(SHAPES[shape])
        images, labels = _data(spec, args.batch * args.steps)
        common = dict(device=device, width=args.width, batch=args.batch, precision=args.precision,
                      channels_last=channels_last, augment=augment, compile_model=args.compile)
        tr_ours = ours_train(spec, images, labels, **common)
        tr_plain = plain_train(spec, images, labels, steps=args.steps, **common)
        eval_images, _ = _data(spec, args.eval_images)
        model = _model(spec, args.width, device, args.compile)
        ev_ours = ours_eval(model, spec, eval_images, device, args.repeats, ours_format, eval_batch)
        ev_plain32 = plain_eval(model, spec, eval_images, device, "fp32", ours_channels_last, eval_batch,
                                args.repeats)
        ev_plain = (ev_plain32 if args.precision == "fp32" and channels_last == ours_channels_last else
                    plain_eval(model, spec, eval_images, device, args.precision, channels_last, eval_batch,
                               args.repeats))
        row = {"input": shape, "train_ours": tr_ours, "train_plain": tr_plain, "train_ratio": tr_ours / tr_plain,
               "eval_ours": ev_ours, "eval_plain_fp32": ev_plain32, "eval_ratio": ev_ours / ev_plain32,
               f"eval_plain_{args.precision}_{args.memory_format}": ev_plain}
        rows.append(row)
        flag = lambda r: f"{r:.2f}" + (" (<0.9)" if r < 0.9 else "")  # noqa: E731
        print(f"{shape} | {tr_ours:.0f} | {tr_plain:.0f} | {flag(row['train_ratio'])} | {ev_ours:.0f} | "
              f"{ev_plain32:.0f} | {flag(row['eval_ratio'])} | {ev_plain:.0f}", flush=True)
    if args.json:
        write_json(args.json, {**header, "rows": rows})


if __name__ == "__main__":
    main()
