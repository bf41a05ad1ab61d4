"""`--threads auto` against fixed thread counts, on an idle machine and under a controlled competing load.

The workload is what a benchmark cell spends its time on: evaluation (:func:`otbr_plugin.metrics.predict`) and a
few SGD steps of preactresnet18 (``--width``) on 1x28x28 random images. Each setting runs in a fresh process
(torch's thread pool is fixed per process) that resolves its threads through ``RunSettings`` exactly as the CLI
does, alternating settings over ``--repeats`` rounds. The competing load is ``--load`` busy-looping processes of
this benchmark's own, started ``--settle`` seconds before the first round.
Prints wall and CPU seconds per setting (median over rounds) and the ratio of ``auto`` to the best fixed setting;
nothing is asserted. Run it on a machine with nothing else going on (the printed load average says whether it was):

    python benchmarks/threads.py                      # idle, then one competing process
    python benchmarks/threads.py --load 0 1 2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time

WORKLOAD = r"""
import json, os, resource, sys, time
import torch
from otbr_plugin.metrics import predict
from otbr_plugin.data import Normalizer
from otbr_plugin.models import create_model
from otbr_plugin.runtime import RunSettings
threads, width, images, steps = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = RunSettings.from_args("cpu", threads="auto" if threads == "auto" else int(threads))
torch.manual_seed(0)
model = create_model("preactresnet18", 10, 1, 28, width=width)
x = torch.randint(0, 256, (images, 1, 28, 28), dtype=torch.uint8)
norm = Normalizer((0.5,), (0.5,))
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
start, cpu0 = time.perf_counter(), time.process_time()
model.train()
for _ in range(steps):
    xb = (x[:128].float() / 255 - 0.5) / 0.5
    loss = torch.nn.functional.cross_entropy(model(xb), torch.zeros(128, dtype=torch.long))
    opt.zero_grad(); loss.backward(); opt.step()
model.eval()
predict(model, x, norm, device=torch.device("cpu"))
print(json.dumps({"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu0, "threads": s.threads,
                  "why": s.threads_reason}))
"""


def _spin() -> None:
    while True:
        pass


def run_setting(threads: str, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", WORKLOAD, threads, str(args.width), str(args.images), str(args.steps)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", type=int, nargs="+", default=[0, 1], help="competing busy processes per scenario")
    p.add_argument("--fixed", nargs="+", default=None, help="fixed thread counts (default: 1..usable CPUs)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--settle", type=float, default=5.0, help="seconds between starting a load and timing")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    from otbr_plugin.runtime import busy_cpus, usable_cpus

    fixed = args.fixed or [str(n) for n in range(1, usable_cpus() + 1)]
    print(f"usable CPUs {usable_cpus()}, busy now {busy_cpus():.2f}, load average {os.getloadavg()[0]:.2f}; workload: {args.steps} SGD steps "
          f"(batch 128) + predict on {args.images} images, preactresnet18 width {args.width}")
    for n_load in args.load:
        spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(n_load)]
        for sp in spinners:
            sp.start()
        try:
            if n_load:
                time.sleep(args.settle)
            rows: dict[str, list[dict]] = {t: [] for t in [*fixed, "auto"]}
            for _ in range(args.repeats):
                for t in rows:
                    rows[t].append(run_setting(t, args))
            print(f"\ncompeting processes: {n_load} (load average {os.getloadavg()[0]:.2f} at the end)")
            print(f"{'threads':>10} {'resolved':>8} {'wall s':>8} {'cpu s':>8}")
            med = {t: statistics.median(r["wall"] for r in rs) for t, rs in rows.items()}
            for t, rs in rows.items():
                resolved = sorted({r["threads"] for r in rs})
                print(f"{t:>10} {','.join(map(str, resolved)):>8} {med[t]:8.2f} "
                      f"{statistics.median(r['cpu'] for r in rs):8.2f}")
            best = min(fixed, key=med.get)
            print(f"auto / best fixed ({best} thread(s)) wall: {med['auto'] / med[best]:.2f}")
        finally:
            for sp in spinners:
                sp.terminate()


if __name__ == "__main__":
    main()
