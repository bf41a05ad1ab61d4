"""The installed package carries its configs: build a wheel, install it into a fresh virtual environment and run
``otbr-bench defend`` from an empty folder; the record says the packaged config was used."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(str(path) + ".gz", "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def _tiny_bundle(tmp: Path) -> tuple[Path, Path]:
    from benchmark_adapters.bundle import save_bundle
    from otbr_plugin.bundle import Bundle
    from otbr_plugin.data import Normalizer, PoisonedTestSet
    from otbr_plugin.models import ModelConfig

    rng = np.random.default_rng(0)
    root = tmp / "data"
    (root / "fashion_mnist").mkdir(parents=True)
    for split, n in (("train", 30), ("t10k", 24)):
        _write_idx(root / "fashion_mnist" / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / "fashion_mnist" / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n))
    cfg = ModelConfig("smallcnn", 10, 1, 28, 0.25)
    torch.manual_seed(0)
    bd = PoisonedTestSet(torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8), torch.zeros(12, dtype=torch.long),
                         torch.randint(1, 10, (12,)), torch.arange(12))
    bundle = save_bundle(Bundle(cfg, cfg.build().state_dict(), "fashion_mnist", Normalizer((0.5,), (0.5,)), bd,
                                {"name": "badnets", "target": 0}, {}), tmp / "bundle")
    return bundle, root


@pytest.mark.slow
def test_wheel_ships_configs_and_defend_uses_them(tmp_path):
    # 1. a wheel built from a copy of the sources (the worktree stays clean)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("otbr_plugin", "benchmark_adapters", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = tmp_path / "wheels"
    subprocess.run([*PIP, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)],
                   check=True, capture_output=True, text=True)
    wheel = next(wheels.glob("otbr_plugin-*.whl"))

    # 2. a fresh virtual environment that sees this one's libraries (torch etc.) but not its editable install
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    vpy = venv / "bin" / "python"
    site = subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    libs = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "test_venv_libraries.pth").write_text("\n".join(sorted(libs)) + "\n")
    subprocess.run([*PIP, "--python", str(vpy), "install", "--no-deps", "-q", str(wheel)], check=True,
                   capture_output=True, text=True)

    # 3. defend from an empty folder: no ./configs to fall back on
    bundle, data_root = _tiny_bundle(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OTBR_CONFIGS")}
    env.update(OTBR_OFFLINE="1", OMP_NUM_THREADS="1")
    where = subprocess.run([str(vpy), "-c", "import otbr_plugin, otbr_plugin.config as c; "
                            "print(otbr_plugin.__file__); print(c.packaged_configs())"],
                           cwd=empty, env=env, check=True, capture_output=True, text=True).stdout.split()
    assert all(str(venv) in w for w in where), where  # the installed copy, not the sources
    out = empty / "out"
    run = subprocess.run([str(venv / "bin" / "otbr-bench"), "defend", str(bundle), "--defense", "otbr",
                          "--data-root", str(data_root), "--device", "cpu", "--no-progress",
                          "--set", "unlearn_steps=2", "--set", "unlearn_batch_size=8", "--out", str(out)],
                         cwd=empty, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    record = json.loads((out / "record.json").read_text())
    assert "packaged configs/defense/otbr/fashion_mnist.yaml" in record["config_source"]
    assert record["config_source"].endswith("--set unlearn_batch_size,unlearn_steps")
    assert record["defense_config"]["unlearn_steps"] == 2
    assert sorted(p.name for p in empty.iterdir()) == ["out"]
