"""Each reader on small fixture files written in the exact official formats, plus corrupt and missing data."""

import gzip
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_cifar_batch, write_idx, write_mnist_like
from otbr_plugin.data import DatasetFormatError, DatasetNotFoundError, find_dataset, load_dataset
from otbr_plugin.data.datasets import read_idx


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name,folder", [("fashion_mnist", "fashion_mnist"), ("mnist", "mnist"),
                                          ("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw")])
def test_idx_datasets(tmp_path, gz, name, folder):
    data = write_mnist_like(tmp_path / folder, gz=gz)
    for split in ("train", "test"):
        ds = load_dataset(name, split, tmp_path, download=False)
        imgs, lbls = data[split]
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(imgs), 1, 28, 28)
        assert torch.equal(ds.images[:, 0], torch.from_numpy(imgs))
        assert torch.equal(ds.labels, torch.from_numpy(lbls.astype(np.int64)))
        assert ds.labels.dtype == torch.int64


def test_cifar10(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        imgs = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
        lbls = rng.integers(0, 10, 4)
        write_cifar_batch(folder / name, imgs, lbls)
        batches.append((imgs, lbls))
    train = load_dataset("cifar10", "train", tmp_path, download=False)
    test = load_dataset("cifar10", "test", tmp_path, download=False)
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert torch.equal(train.images[4:8], torch.from_numpy(batches[1][0]))  # batch order kept
    assert torch.equal(test.labels, torch.from_numpy(batches[5][1].astype(np.int64)))


def test_cifar100_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar100" / "cifar-100-python"
    folder.mkdir(parents=True)
    imgs = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    for name in ("train", "test"):
        write_cifar_batch(folder / name, imgs, np.array([99, 0, 5, 7, 50, 1]), label_key=b"fine_labels")
    ds = load_dataset("cifar100", "train", tmp_path, download=False)
    assert ds.labels.tolist() == [99, 0, 5, 7, 50, 1]
    assert torch.equal(ds.images, torch.from_numpy(imgs))


def test_cifar_batch_with_foreign_global_is_refused(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        write_cifar_batch(folder / name, np.zeros((1, 3, 32, 32), np.uint8), np.array([0]))

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(folder / "data_batch_1", "wb") as fh:
        pickle.dump({b"data": Payload(), b"labels": [0]}, fh, protocol=2)
    with pytest.raises(DatasetFormatError, match="not allowed"):
        load_dataset("cifar10", "train", tmp_path, download=False)
    assert not marker.exists()


def _ppm(path, color, size):
    Image.new("RGB", size, color).save(path, format="PPM")


def test_gtsrb_official_layout_resized_to_32(tmp_path):
    root = tmp_path / "gtsrb"
    train_dir = root / "GTSRB" / "Final_Training" / "Images"
    for cls in range(43):
        cdir = train_dir / f"{cls:05d}"
        cdir.mkdir(parents=True)
        rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
        if cls < 2:
            for j in range(2):
                fname = f"00000_{j:05d}.ppm"
                _ppm(cdir / fname, (cls * 100, 10, 200), (40 + j, 37))
                rows.append(f"{fname};40;37;5;5;35;32;{cls}")
        (cdir / f"GT-{cls:05d}.csv").write_text("\n".join(rows) + "\n")
    test_dir = root / "GTSRB" / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for j, cls in enumerate([42, 0, 7]):
        _ppm(test_dir / f"{j:05d}.ppm", (0, 255, 0), (50, 50))
        rows.append(f"{j:05d}.ppm;50;50;5;5;45;45;{cls}")
    (test_dir / "GT-final_test.csv").write_text("\n".join(rows) + "\n")

    train = load_dataset("gtsrb", "train", tmp_path, download=False)
    test = load_dataset("gtsrb", "test", tmp_path, download=False)
    assert train.images.shape == (4, 3, 32, 32)
    assert train.labels.tolist() == [0, 0, 1, 1]
    assert train.images[2, :, 16, 16].tolist() == [100, 10, 200]
    assert test.labels.tolist() == [42, 0, 7]
    assert test.images[0, :, 0, 0].tolist() == [0, 255, 0]


def test_tiny_imagenet_layout(tmp_path):
    root = tmp_path / "tiny" / "tiny-imagenet-200"
    wnids = [f"n{i:08d}" for i in range(200)]
    (root).mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")  # file order is not label order
    for w in wnids:
        (root / "train" / w / "images").mkdir(parents=True)
    for w, val in ((wnids[0], 0), (wnids[5], 255)):
        Image.new("RGB", (64, 64), (val, val, val)).save(root / "train" / w / "images" / f"{w}_0.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64), (255, 255, 255)).save(root / "val" / "images" / "val_0.JPEG")
    (root / "val" / "val_annotations.txt").write_text(f"val_0.JPEG\t{wnids[7]}\t0\t0\t63\t63\n")
    train = load_dataset("tiny", "train", tmp_path, download=False)
    test = load_dataset("tiny", "test", tmp_path, download=False)
    assert train.images.shape == (2, 3, 64, 64)
    assert train.labels.tolist() == [0, 5]
    assert abs(int(train.images[1].float().mean()) - 255) <= 2  # JPEG is lossy, but a flat image stays flat
    assert test.labels.tolist() == [7]


def test_truncated_idx_is_a_format_error(tmp_path):
    write_mnist_like(tmp_path / "mnist", gz=False)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetFormatError, match="header says"):
        load_dataset("mnist", "train", tmp_path, download=False)


def test_corrupt_gzip_is_a_format_error(tmp_path):
    write_mnist_like(tmp_path / "mnist", gz=True)
    path = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetFormatError, match="corrupt or truncated"):
        load_dataset("mnist", "test", tmp_path, download=False)


def test_bad_idx_magic(tmp_path):
    p = tmp_path / "x.idx"
    p.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(DatasetFormatError, match="magic"):
        read_idx(p)


def test_mismatched_image_and_label_counts(tmp_path):
    write_mnist_like(tmp_path / "mnist", n_train=10, gz=False)
    write_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte", np.zeros(9, np.uint8), gz=False)
    with pytest.raises(DatasetFormatError, match="do not match"):
        load_dataset("mnist", "train", tmp_path, download=False)


def test_corrupt_image_is_a_format_error(tmp_path):
    root = tmp_path / "tiny" / "tiny-imagenet-200"
    (root / "train").mkdir(parents=True)
    wnids = [f"n{i:08d}" for i in range(200)]
    (root / "wnids.txt").write_text("\n".join(wnids))
    for w in wnids:
        (root / "train" / w / "images").mkdir(parents=True)
    (root / "train" / wnids[0] / "images" / "bad.JPEG").write_bytes(b"not a jpeg")
    (root / "val").mkdir()
    (root / "val" / "val_annotations.txt").write_text("")
    with pytest.raises(DatasetFormatError, match="bad.JPEG"):
        load_dataset("tiny", "train", tmp_path, download=False)


def test_missing_dataset_error_names_dataset_root_and_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", "train", tmp_path / "nowhere", download=False)
    msg = str(info.value)
    assert "'cifar10'" in msg and str(tmp_path / "nowhere") in msg and "cifar-10-batches-py" in msg


def test_offline_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    import urllib.request

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.delenv("OTBR_OFFLINE", raising=False)
    monkeypatch.setattr(urllib.request, "urlopen", offline)  # simulated: no real network access
    with pytest.raises(DatasetNotFoundError, match="download failed: network unreachable"):
        load_dataset("mnist", "train", tmp_path, download=True)
    assert not any(p.name.startswith(".mnist-download") for p in tmp_path.iterdir())  # nothing half-written


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet-22k")
    with pytest.raises(ValueError, match="split"):
        load_dataset("mnist", "validation")


def test_find_dataset(tmp_path):
    assert find_dataset("mnist", tmp_path) is None
    write_mnist_like(tmp_path / "mnist")
    assert find_dataset("mnist", tmp_path) == tmp_path / "mnist"
