"""Wall time of a small grid run sequentially vs on local worker processes (`bench --workers N`), and whether the
records agree. The grid: BadNets on synthetic data in Fashion-MNIST's IDX format (the tests' writer), preactresnet18
at width 0.25 (--model), 1 epoch, N seeds x defenses none / OTBR / CLP, one torch thread per process in both runs. Each run is
the full `otbr-bench bench` command in a fresh Python (start-up included). Prints seconds and the ratio; asserts
nothing about time.

    python benchmarks/workers.py [--workers 2] [--seeds 2] [--train 2000] [--test 500] [--model smallcnn]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import write_mnist_like  # noqa: E402 - the tests' IDX writer, reused

from otbr_plugin.aggregate.tables import load_records  # noqa: E402


def grid_yaml(folder: Path, seeds: int, n_train: int, n_test: int, model: str) -> Path:
    write_mnist_like(folder / "data" / "fashion_mnist", n_train=n_train, n_test=n_test)
    attack = {"attack": {"name": "badnets", "target_class": 0, "poison_ratio": 0.1}, "dataset": "fashion_mnist",
              "model": {"name": model, "width": 0.25},
              "train": {"epochs": 1, "batch_size": 128, "progress": False, "device": "cpu"}}
    grid = {"name": "workers_bench", "dataset": "fashion_mnist", "data_root": str(folder / "data"),
            "attacks": {"badnets": attack}, "defenses": {"none": {}, "otbr": {}, "clp": {}},
            "seeds": list(range(seeds)), "device": "cpu"}
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def timed_bench(grid: Path, out: Path, extra: list[str]) -> float:
    command = [sys.executable, "-m", "otbr_plugin.cli", "bench", str(grid), "--out", str(out), "--threads", "1",
               "--no-progress", "--no-report", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OTBR_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def metrics(out: Path) -> dict:
    return {r.key(): (r.metrics_after, r.der, r.checkpoint_sha256) for r in load_records(out / "records")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--train", type=int, default=2000, help="training images")
    ap.add_argument("--test", type=int, default=500, help="test images")
    ap.add_argument("--model", default="preactresnet18", help="e.g. smallcnn for a quicker run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        grid = grid_yaml(folder, args.seeds, args.train, args.test, args.model)
        seq = timed_bench(grid, folder / "seq", [])
        par = timed_bench(grid, folder / "par", ["--workers", str(args.workers)])
        same = metrics(folder / "seq") == metrics(folder / "par")
        cells = len(metrics(folder / "seq"))
    print(f"grid: {args.seeds} {args.model} model(s) to train, {cells} cells, {args.train} training images, "
          f"{os.cpu_count()} CPUs")
    print(f"sequential            {seq:7.1f} s")
    print(f"--workers {args.workers:<11} {par:7.1f} s   speed-up {seq / par:.2f}x")
    print(f"records equal (metrics, DER, checkpoint sha256): {same}")


if __name__ == "__main__":
    main()
