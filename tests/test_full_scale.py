"""Full scale (issue 11), the parts a CPU can check: the full-width grid config, the CIFAR-10 path on a synthetic
dataset in the exact official format (format, reader, attack -> defend -> table through the CLI), the throughput
benchmark's command line, and the synthetic-data script."""

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from otbr_plugin.bench.grid import load_grid
from otbr_plugin.aggregate.records import read_record
from otbr_plugin.cli import main
from otbr_plugin.data import load_dataset
from otbr_plugin.data.synthetic import CIFAR10_LABEL_NAMES, write_synthetic_cifar10

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------
# configs/bench/fashion_mnist_full.yaml
# ----------------------------------------------------------------------------------------------------------
def test_full_width_grid_config():
    grid = load_grid(ROOT / "configs" / "bench" / "fashion_mnist_full.yaml")
    variants = load_grid(ROOT / "configs" / "bench" / "fashion_mnist_otbr_variants.yaml")
    assert grid.dataset == "fashion_mnist" and grid.seeds == [0, 1, 2] and grid.device == "auto"
    assert list(grid.attacks) == ["badnets", "blended", "sig", "wanet"]
    for attack, cfg in grid.attacks.items():
        assert cfg["model"] == {"name": "preactresnet18", "width": 1.0}, attack
        assert cfg["train"]["epochs"] == 10 and cfg["train"]["bf16"] and cfg["train"]["channels_last"]
        assert cfg["attack"]["poison_ratio"] == (0.05 if attack == "sig" else 0.1)
    # the defenses and OTBR variants of the variants grid, with the same resolved configs
    assert grid.defenses == variants.defenses and grid.defense_names == variants.defense_names
    text = (ROOT / "configs" / "bench" / "fashion_mnist_full.yaml").read_text()
    assert "# Epochs: 10." in text  # the choice is explained where it is made


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10 on a synthetic dataset in the official format
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_cifar10(tmp_path_factory) -> Path:
    """A data root holding a small synthetic CIFAR-10 (5 x 40 training, 100 test images) in the official layout."""
    root = tmp_path_factory.mktemp("data")
    write_synthetic_cifar10(root, train_per_batch=40, test=100, seed=0)
    return root


def test_synthetic_cifar10_is_in_the_official_format(synthetic_cifar10):
    folder = synthetic_cifar10 / "cifar10" / "cifar-10-batches-py"
    names = {f"data_batch_{i}" for i in range(1, 6)} | {"test_batch", "batches.meta", "readme.html"}
    assert {p.name for p in folder.iterdir()} == names
    for name, n in [(f"data_batch_{i}", 40) for i in range(1, 6)] + [("test_batch", 100)]:
        with open(folder / name, "rb") as fh:
            raw = fh.read()
        assert raw[:2] == b"\x80\x02"  # pickle protocol 2, as the official (Python 2 readable) files
        batch = pickle.loads(raw, encoding="bytes")  # how the dataset's own page says to read it
        assert set(batch) == {b"batch_label", b"labels", b"data", b"filenames"}
        assert isinstance(batch[b"data"], np.ndarray) and batch[b"data"].dtype == np.uint8
        assert batch[b"data"].shape == (n, 3072) and batch[b"data"].flags["C_CONTIGUOUS"]
        assert isinstance(batch[b"labels"], list) and all(type(v) is int and 0 <= v < 10 for v in batch[b"labels"])
        assert len(batch[b"labels"]) == n and len(batch[b"filenames"]) == n
        assert np.bincount(batch[b"labels"], minlength=10).tolist() == [n // 10] * 10  # balanced
    with open(folder / "batches.meta", "rb") as fh:
        meta = pickle.load(fh, encoding="bytes")
    assert meta == {b"num_cases_per_batch": 40, b"label_names": [s.encode() for s in CIFAR10_LABEL_NAMES],
                    b"num_vis": 3072}


def test_reader_reads_the_synthetic_cifar10(synthetic_cifar10):
    train = load_dataset("cifar10", "train", synthetic_cifar10, download=False)
    test = load_dataset("cifar10", "test", synthetic_cifar10, download=False)
    assert train.images.shape == (200, 3, 32, 32) and test.images.shape == (100, 3, 32, 32)
    with open(synthetic_cifar10 / "cifar10" / "cifar-10-batches-py" / "data_batch_2", "rb") as fh:
        second = pickle.load(fh, encoding="bytes")
    # rows are 1024 red, 1024 green, 1024 blue values, row-major: (N, 3072) -> (N, 3, 32, 32); batch order kept
    assert torch.equal(train.images[40:80], torch.from_numpy(second[b"data"].reshape(-1, 3, 32, 32)))
    assert train.labels[40:80].tolist() == second[b"labels"]
    # learnable: images of one class are closer to their class mean than to another class's
    x, y = train.images.float().flatten(1), train.labels
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    assert (torch.cdist(x, means).argmin(1) == y).float().mean() > 0.9


def test_synthetic_cifar10_is_seeded_validated_and_not_overwritten(tmp_path):
    a = write_synthetic_cifar10(tmp_path / "a", 10, 10, seed=1)
    b = write_synthetic_cifar10(tmp_path / "b", 10, 10, seed=1)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in ("data_batch_3", "test_batch"))
    with pytest.raises(FileExistsError):
        write_synthetic_cifar10(tmp_path / "a", 10, 10)
    write_synthetic_cifar10(tmp_path / "a", 10, 10, seed=2, overwrite=True)
    assert (a / "test_batch").read_bytes() != (b / "test_batch").read_bytes()
    with pytest.raises(ValueError, match="train_per_batch"):
        write_synthetic_cifar10(tmp_path / "c", 5, 10)
    assert not (tmp_path / "c" / "cifar10" / "cifar-10-batches-py").exists()


def test_cifar10_attack_defend_table_through_the_cli(synthetic_cifar10, tmp_path, capsys):
    """The packaged CIFAR-10 grid (all four attacks, every defense), at a tiny width and CPU-sized settings, on the
    synthetic dataset, through `otbr-bench bench` and `otbr-bench table`."""
    out = tmp_path / "out"
    sets = ["data_root=" + str(synthetic_cifar10), "device=cpu", "clean_ratio=0.25", "oracle_sweeps.otbr.gamma=[0.05]",
            "attack_overrides.model.width=0.125", "attack_overrides.train={epochs: 1, batch_size: 50}",
            "defense_overrides.otbr={unlearn_steps: 2, unlearn_batch_size: 16}",
            "defense_overrides.anp={iterations: 2, batch_size: 16}", "defense_overrides.fp={epochs: 1}"]
    argv = ["bench", "configs/bench/cifar10.yaml", "--out", str(out), "--no-progress", "--threads", "1"]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0, capsys.readouterr().out
    records = sorted((out / "records").glob("*.json"))
    assert len(records) == 4 * 5
    for path in records:
        record = read_record(path)
        assert record.status == "ok" and record.dataset == "cifar10" and record.device == "cpu", path.name
        assert record.model["width"] == 0.125 and record.model["in_channels"] == 3
    capsys.readouterr()
    assert main(["table", str(out)]) == 0
    table = capsys.readouterr().out
    for attack in ("badnets", "blended", "sig", "wanet"):
        assert f"| {attack} |" in table
    assert all(d in table for d in ("otbr", "clp", "fp", "anp"))


# ----------------------------------------------------------------------------------------------------------
# scripts and benchmarks (run as a user would; tiny settings, nothing timed is asserted)
# ----------------------------------------------------------------------------------------------------------
def test_synthetic_cifar10_script(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "synthetic_cifar10.py"), "--root", str(tmp_path),
           "--train-per-batch", "10", "--test", "20"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert load_dataset("cifar10", "test", tmp_path, download=False).images.shape == (20, 3, 32, 32)
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)  # exists: one line, status 1
    assert again.returncode == 1 and again.stderr.startswith("error:") and len(again.stderr.splitlines()) == 1


def test_throughput_benchmark_runs(tmp_path):
    out = tmp_path / "t.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--device", "cpu", "--width", "0.125",
           "--batch", "8", "--steps", "2", "--eval-images", "32", "--repeats", "1", "--shapes", "1x28x28",
           "--threads", "1", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    result = yaml.safe_load(out.read_text())
    assert result["device"] == "cpu" and [r["input"] for r in result["rows"]] == ["1x28x28"]
    row = result["rows"][0]
    assert all(row[k] > 0 for k in ("train_ours", "train_plain", "eval_ours", "eval_plain_fp32"))
    fp16 = subprocess.run(cmd[:2] + ["--device", "cpu", "--precision", "fp16"], capture_output=True, text=True, cwd=ROOT)
    assert fp16.returncode == 2 and "accelerator" in fp16.stderr
