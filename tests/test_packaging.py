"""The installed package carries its configs: build a wheel, install it into a fresh virtual environment and run
``otbr-bench defend`` from an empty folder; the record says the packaged config was used."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]


@pytest.mark.slow
def test_wheel_ships_configs_and_defend_uses_them(tmp_path, tiny_fashion_bundle):
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
    bundle, data_root = tiny_fashion_bundle
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
