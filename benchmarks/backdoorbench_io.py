"""Reading and writing BackdoorBench records: seconds for a CIFAR-10-sized poisoned test set.

Writes a record with N poisoned 3x32x32 images (default 9000, BadNets on CIFAR-10's 10000 test images) and
full-width preactresnet18 weights via the bundle -> record writer, then reads it back with the safe reader.
Prints seconds per step and the ratio of PNG decoding to the weights-only torch.load.

    python benchmarks/backdoorbench_io.py [--n 9000] [--out /tmp/bb_io]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmark_adapters.backdoorbench import load_attack_result, read_attack_result, write_attack_result
from benchmark_adapters.bundle import Bundle
from otbr_plugin.data import PoisonedTestSet, get_dataset_spec
from otbr_plugin.data.transforms import Normalizer
from otbr_plugin.models import ModelConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=9000, help="poisoned test images")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one, removed afterwards)")
    args = parser.parse_args()
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bb_io_"))
    spec = get_dataset_spec("cifar10")
    g = torch.Generator().manual_seed(0)
    cfg = ModelConfig("preactresnet18", 10, 3, 32, 1.0)
    torch.manual_seed(0)
    labels = torch.randint(1, 10, (args.n,), generator=g)
    bundle = Bundle(
        model_config=cfg, state_dict=cfg.build().state_dict(), dataset="cifar10",
        normalizer=Normalizer(spec.mean, spec.std),
        bd_test=PoisonedTestSet(torch.randint(0, 256, (args.n, 3, 32, 32), generator=g, dtype=torch.uint8),
                                torch.zeros(args.n, dtype=torch.int64), labels, torch.arange(args.n)),
        attack={"name": "synthetic"}, metrics={},
    )
    record = work / "record" / "synthetic"
    t0 = time.perf_counter()
    write_attack_result(bundle, record, overwrite=True, test_size=max(args.n, 10000))
    t1 = time.perf_counter()
    read_attack_result(record)
    t2 = time.perf_counter()
    loaded = load_attack_result(record)
    t3 = time.perf_counter()
    assert torch.equal(loaded.bd_test.images, bundle.bd_test.images)
    size_mb = (record / "attack_result.pt").stat().st_size / 2**20
    print(f"record with {args.n} poisoned 3x32x32 PNGs, preactresnet18 width 1.0 ({size_mb:.1f} MiB attack_result.pt)")
    rows = [("write (PNGs + torch.save)", f"{t1 - t0:7.2f} s"),
            ("torch.load (weights_only + allowlist)", f"{t2 - t1:7.2f} s"),
            (f"full read ({args.n} PNGs + strict load)", f"{t3 - t2:7.2f} s"),
            ("ratio full read / torch.load", f"{(t3 - t2) / max(t2 - t1, 1e-9):7.1f}x")]
    for label, value in rows:
        print(f"  {label:<42}{value}")
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
