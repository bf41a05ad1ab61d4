"""Datasets in their official on-disk formats, loaded into uint8 tensors (N, C, H, W) and int64 labels.

Lookup order for each dataset: the data root the caller gives (or ``$OTBR_DATA``, else ``./data``), in the
layouts BackdoorBench and torchvision use; for Fashion-MNIST also the folder Debian's
``dataset-fashion-mnist`` package installs. If nothing is found and ``download`` allows it, the official
archive is downloaded into the root and its checksum checked. Otherwise a :class:`DatasetNotFoundError`
names the dataset, the folders searched and the layout expected.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .specs import DatasetSpec, get_dataset_spec

__all__ = [
    "ImageDataset",
    "DatasetNotFoundError",
    "DatasetFormatError",
    "load_dataset",
    "default_data_root",
    "find_dataset",
    "read_idx",
]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class DatasetNotFoundError(FileNotFoundError):
    """The dataset is neither on disk nor downloadable; the message says where we looked and what we expect."""


class DatasetFormatError(ValueError):
    """A dataset file exists but is corrupt, truncated or not in the official format."""


@dataclass
class ImageDataset:
    """A labelled image set held in memory: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    spec: DatasetSpec
    split: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must be int64 with one entry per image")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: torch.Tensor | Sequence[int]) -> "ImageDataset":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageDataset(self.images[idx], self.labels[idx], self.spec, self.split)


def default_data_root() -> Path:
    """``$OTBR_DATA`` if set, else ``./data`` (BackdoorBench keeps datasets under ``data/<name>``)."""
    return Path(os.environ.get("OTBR_DATA", "data"))


# ----------------------------------------------------------------------------------------------------------
# Low-level readers (each raises DatasetFormatError on bad content)
# ----------------------------------------------------------------------------------------------------------
def _open_maybe_gz(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DatasetFormatError(f"{path}: cannot read ({err}); the file is corrupt or truncated") from err


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST's format), gzipped or not; checks the magic number and the size."""
    data = _open_maybe_gz(path)
    if len(data) < 4:
        raise DatasetFormatError(f"{path}: too short to be an IDX file ({len(data)} bytes)")
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise DatasetFormatError(f"{path}: bad IDX magic {data[:4].hex()} (expected 0x0000 08 0N for uint8 data)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetFormatError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise DatasetFormatError(
            f"{path}: IDX header says {dims} = {expected} bytes of data but the file holds {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR's python batches: only numpy array reconstruction is allowed."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # protocol-2 pickles written by Python 3 encode bytes this way (harmless)
    }

    def find_class(self, module: str, name: str):  # noqa: D401
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python batch (a pickled dict) without allowing arbitrary globals."""
    try:
        with open(path, "rb") as fh:
            obj = _NumpyOnlyUnpickler(fh, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as err:
        raise DatasetFormatError(f"{path}: not a readable CIFAR batch ({err})") from err
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    obj = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if "data" not in obj or label_key not in obj:
        raise DatasetFormatError(f"{path}: missing 'data' or '{label_key}' (keys: {sorted(obj)})")
    data = np.asarray(obj["data"], dtype=np.uint8)
    labels = np.asarray(obj[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise DatasetFormatError(f"{path}: expected data (N, 3072) and N labels, got {data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _read_image(path: Path, size: int | None, channels: int) -> np.ndarray:
    """Read a PPM/PNG/JPEG into uint8 (C, H, W); resize (bilinear, antialiased) to size x size if given."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L")
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as err:
        raise DatasetFormatError(f"{path}: cannot decode image ({err})") from err
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


# ----------------------------------------------------------------------------------------------------------
# Per-dataset layouts
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layout:
    candidates: Callable[[Path], list[Path]]  # folders that may hold the dataset, best first
    found: Callable[[Path], bool]  # does this folder hold it?
    read: Callable[[Path, str, DatasetSpec], tuple[np.ndarray, np.ndarray]]
    expected: str  # human description of the layout
    downloads: tuple[tuple[str, str], ...] = ()  # (url, md5) archives or files
    download_subdir: str = ""  # where downloads go, relative to the root


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_path(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _idx_found(folder: Path) -> bool:
    return all(_idx_path(folder, s) is not None for pair in _IDX_FILES.values() for s in pair)


def _idx_read(folder: Path, split: str, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    img_stem, lbl_stem = _IDX_FILES[split]
    images = read_idx(_idx_path(folder, img_stem))  # type: ignore[arg-type]
    labels = read_idx(_idx_path(folder, lbl_stem))  # type: ignore[arg-type]
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DatasetFormatError(
            f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match (expected (N, 28, 28) and (N,))"
        )
    if labels.max(initial=0) >= spec.num_classes:
        raise DatasetFormatError(f"{folder}: label {labels.max()} out of range for {spec.num_classes} classes")
    return images[:, None].copy(), labels.astype(np.int64)


def _mnist_like(name: str, torchvision_dir: str, extra: list[Path], urls: tuple[tuple[str, str], ...]) -> _Layout:
    return _Layout(
        candidates=lambda r: [r / name, r / name.replace("_", "-"), r / torchvision_dir / "raw", r] + extra,
        found=_idx_found,
        read=_idx_read,
        expected=(
            "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
            f"t10k-labels-idx1-ubyte[.gz] in <root>/{name}/"
        ),
        downloads=urls,
        download_subdir=name,
    )


def _cifar_read(batch_dir: str, train_files: list[str], test_files: list[str], label_key: str):
    def read(folder: Path, split: str, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
        files = train_files if split == "train" else test_files
        parts = [read_cifar_batch(folder / batch_dir / f, label_key) for f in files]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    return read


_CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


def _gtsrb_train_dir(r: Path) -> Path | None:
    for d in (r / "Train", r / "GTSRB" / "Final_Training" / "Images", r / "Final_Training" / "Images", r / "GTSRB" / "Training"):
        if (d / "00000" / "GT-00000.csv").is_file():
            return d
    return None


def _gtsrb_test_csv(r: Path) -> Path | None:
    for d in (r / "Test", r / "GTSRB" / "Final_Test" / "Images", r / "Final_Test" / "Images", r, r / "GTSRB"):
        if (d / "GT-final_test.csv").is_file():
            return d / "GT-final_test.csv"
    return None


def _gtsrb_test_images(r: Path, csv_path: Path) -> Path:
    for d in (csv_path.parent, r / "Test", r / "GTSRB" / "Final_Test" / "Images", r / "Final_Test" / "Images"):
        if d.is_dir() and any(d.glob("*.ppm")):
            return d
    return csv_path.parent


def _read_gtsrb_csv(path: Path) -> list[tuple[str, int]]:
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh, delimiter=";")
            rows = list(reader)
            columns = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetFormatError(f"{path}: unreadable GTSRB annotation CSV ({err})") from err
    if "Filename" not in columns or "ClassId" not in columns:
        raise DatasetFormatError(f"{path}: expected a ';'-separated CSV with columns Filename and ClassId")
    try:
        return [(row["Filename"], int(row["ClassId"])) for row in rows]
    except (TypeError, ValueError) as err:
        raise DatasetFormatError(f"{path}: bad ClassId value ({err})") from err


def _gtsrb_read(folder: Path, split: str, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    items: list[tuple[Path, int]] = []
    if split == "train":
        train_dir = _gtsrb_train_dir(folder)
        assert train_dir is not None
        for cls in range(spec.num_classes):
            cdir = train_dir / f"{cls:05d}"
            csv_path = cdir / f"GT-{cls:05d}.csv"
            if not csv_path.is_file():
                raise DatasetFormatError(f"{cdir}: missing {csv_path.name} (every class folder 00000..00042 needs one)")
            items += [(cdir / f, c) for f, c in _read_gtsrb_csv(csv_path)]
    else:
        csv_path = _gtsrb_test_csv(folder)
        assert csv_path is not None
        img_dir = _gtsrb_test_images(folder, csv_path)
        items = [(img_dir / f, c) for f, c in _read_gtsrb_csv(csv_path)]
    bad = [c for _, c in items if not 0 <= c < spec.num_classes]
    if bad:
        raise DatasetFormatError(f"{folder}: ClassId {bad[0]} out of range 0..{spec.num_classes - 1}")
    images = np.stack([_read_image(p, spec.image_size, 3) for p, _ in items])
    return images, np.array([c for _, c in items], dtype=np.int64)


def _tiny_read(folder: Path, split: str, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    wnids = [w.strip() for w in (folder / "wnids.txt").read_text().split() if w.strip()]
    if len(wnids) != spec.num_classes:
        raise DatasetFormatError(f"{folder / 'wnids.txt'}: expected {spec.num_classes} class ids, found {len(wnids)}")
    index = {w: i for i, w in enumerate(sorted(wnids))}  # sorted, as an ImageFolder over train/ would do
    items: list[tuple[Path, int]] = []
    if split == "train":
        for w in sorted(wnids):
            img_dir = folder / "train" / w / "images"
            if not img_dir.is_dir():
                raise DatasetFormatError(f"{folder}: missing folder train/{w}/images")
            items += [(p, index[w]) for p in sorted(img_dir.iterdir()) if p.suffix.lower() in (".jpeg", ".jpg", ".png")]
    else:
        ann = folder / "val" / "val_annotations.txt"
        for line in ann.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) < 2 or parts[1] not in index:
                raise DatasetFormatError(f"{ann}: bad line {line!r} (expected 'file<TAB>wnid<TAB>...')")
            items.append((folder / "val" / "images" / parts[0], index[parts[1]]))
    images = np.stack([_read_image(p, spec.image_size, 3) for p, _ in items])
    return images, np.array([c for _, c in items], dtype=np.int64)


_LAYOUTS: dict[str, _Layout] = {
    "mnist": _mnist_like(
        "mnist",
        "MNIST",
        [],
        tuple(
            (f"https://ossci-datasets.s3.amazonaws.com/mnist/{f}.gz", md5)
            for f, md5 in [
                ("train-images-idx3-ubyte", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
                ("train-labels-idx1-ubyte", "d53e105ee54ea40749a09fcbcd1e9432"),
                ("t10k-images-idx3-ubyte", "9fb629c4189551a2d022fa330f9573f3"),
                ("t10k-labels-idx1-ubyte", "ec29112dd5afa0611ce80d1b7f02629c"),
            ]
        ),
    ),
    "fashion_mnist": _mnist_like(
        "fashion_mnist",
        "FashionMNIST",
        [DEBIAN_FASHION_MNIST],
        tuple(
            (f"http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{f}.gz", md5)
            for f, md5 in [
                ("train-images-idx3-ubyte", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
                ("train-labels-idx1-ubyte", "25c81989df183df01b3e8a0aad5dffbe"),
                ("t10k-images-idx3-ubyte", "bef4ecab320f06d8554ea6380940ec79"),
                ("t10k-labels-idx1-ubyte", "bb300cfdad3c16e7a12a480ee83cd310"),
            ]
        ),
    ),
    "cifar10": _Layout(
        candidates=lambda r: [r / "cifar10", r / "cifar-10", r],
        found=lambda d: all((d / "cifar-10-batches-py" / f).is_file() for f in _CIFAR10_TRAIN + ["test_batch"]),
        read=_cifar_read("cifar-10-batches-py", _CIFAR10_TRAIN, ["test_batch"], "labels"),
        expected="<root>/cifar10/cifar-10-batches-py/{data_batch_1..5,test_batch} (python pickle batches)",
        downloads=(("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
        download_subdir="cifar10",
    ),
    "cifar100": _Layout(
        candidates=lambda r: [r / "cifar100", r / "cifar-100", r],
        found=lambda d: all((d / "cifar-100-python" / f).is_file() for f in ("train", "test")),
        read=_cifar_read("cifar-100-python", ["train"], ["test"], "fine_labels"),
        expected="<root>/cifar100/cifar-100-python/{train,test} (python pickle files)",
        downloads=(("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),),
        download_subdir="cifar100",
    ),
    "gtsrb": _Layout(
        candidates=lambda r: [r / "gtsrb", r / "GTSRB", r],
        found=lambda d: _gtsrb_train_dir(d) is not None and _gtsrb_test_csv(d) is not None,
        read=_gtsrb_read,
        expected=(
            "<root>/gtsrb/ with training folders Train/00000..00042/{GT-000NN.csv,*.ppm} (or the official "
            "GTSRB/Final_Training/Images/...) and the test set GT-final_test.csv + *.ppm (Test/ or GTSRB/Final_Test/Images/)"
        ),
        downloads=(
            ("https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/GTSRB-Training_fixed.zip",
             "513f3c79a4c5141765e10e952eaa2478"),
            ("https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/GTSRB_Final_Test_Images.zip",
             "c7e4e6327067d32654124b0fe9e82185"),
            ("https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/GTSRB_Final_Test_GT.zip",
             "fe31e9c9270bbcd7b84b7f21a9d9d9e5"),
        ),
        download_subdir="gtsrb",
    ),
    "tiny": _Layout(
        candidates=lambda r: [r / "tiny" / "tiny-imagenet-200", r / "tiny-imagenet-200", r / "tiny"],
        found=lambda d: (d / "wnids.txt").is_file() and (d / "train").is_dir() and (d / "val" / "val_annotations.txt").is_file(),
        read=_tiny_read,
        expected="<root>/tiny/tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt}",
        downloads=(("http://cs231n.stanford.edu/tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de"),),
        download_subdir="tiny",
    ),
}


def _after_download_fixups(name: str, target: Path) -> None:
    """Put the GTSRB test CSV next to the test images (the official archives keep them apart)."""
    if name == "gtsrb":
        gt = target / "GT-final_test.csv"
        img_dir = target / "GTSRB" / "Final_Test" / "Images"
        if gt.is_file() and img_dir.is_dir():
            shutil.copy(gt, img_dir / "GT-final_test.csv")


# ----------------------------------------------------------------------------------------------------------
# Finding and downloading
# ----------------------------------------------------------------------------------------------------------
def find_dataset(name: str, root: str | Path | None = None) -> Path | None:
    """The folder holding ``name`` under ``root`` (or the known system folders), or None."""
    spec = get_dataset_spec(name)
    layout = _LAYOUTS[spec.name]
    for cand in layout.candidates(Path(root) if root is not None else default_data_root()):
        if cand.is_dir() and layout.found(cand):
            return cand
    return None


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(name: str, root: Path, timeout: float = 20.0) -> Path:
    """Download and unpack the official files of ``name`` into ``root/<subdir>``; all-or-nothing."""
    layout = _LAYOUTS[name]
    target = root / layout.download_subdir
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-download-") as tmp:
        stage = Path(tmp) / "stage"
        stage.mkdir()
        for url, md5 in layout.downloads:
            fname = Path(tmp) / url.rsplit("/", 1)[-1]
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(fname, "wb") as out:
                shutil.copyfileobj(resp, out)
            digest = _md5(fname)
            if digest != md5:
                raise DatasetFormatError(f"{url}: checksum mismatch (md5 {digest}, expected {md5})")
            if fname.name.endswith(".tar.gz"):
                with tarfile.open(fname) as tar:
                    tar.extractall(stage, filter="data")
            elif fname.suffix == ".zip":
                with zipfile.ZipFile(fname) as zf:
                    zf.extractall(stage)
            else:
                shutil.copy(fname, stage / fname.name)
        if target.exists():
            for item in stage.iterdir():
                dest = target / item.name
                if not dest.exists():
                    shutil.move(str(item), dest)
        else:
            shutil.move(str(stage), target)
    _after_download_fixups(name, target)
    return target


def load_dataset(
    name: str, split: str = "train", root: str | Path | None = None, download: bool = True
) -> ImageDataset:
    """Load ``split`` ("train" or "test") of dataset ``name`` as uint8 images and int64 labels.

    ``download`` fetches the official files when nothing is found; setting ``OTBR_OFFLINE=1`` forbids it.

    Raises:
        DatasetNotFoundError: not on disk and not downloadable (offline, or ``download=False``).
        DatasetFormatError: a file is corrupt, truncated or in the wrong format.
    """
    spec = get_dataset_spec(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    layout = _LAYOUTS[spec.name]
    root_path = Path(root) if root is not None else default_data_root()
    folder = find_dataset(spec.name, root_path)
    offline = os.environ.get("OTBR_OFFLINE", "") not in ("", "0")
    why = "download disabled" + (" by OTBR_OFFLINE" if offline and download else "")
    if folder is None and download and not offline and layout.downloads:
        try:
            _download(spec.name, root_path)
        except DatasetFormatError:
            raise
        except OSError as err:  # offline, DNS failure, HTTP error, disk full ...
            why = f"download failed: {err}"
        folder = find_dataset(spec.name, root_path)
    if folder is None:
        searched = ", ".join(str(p) for p in layout.candidates(root_path))
        raise DatasetNotFoundError(
            f"dataset {spec.name!r} not found (searched {searched}; {why}).\n"
            f"Expected layout: {layout.expected}.\n"
            f"Put the official files there or pass another root (--data-root / $OTBR_DATA)."
            + ("\nOn Debian: apt-get install dataset-fashion-mnist" if spec.name == "fashion_mnist" else "")
        )
    images, labels = layout.read(folder, split, spec)
    if images.shape[1:] != spec.input_shape:
        raise DatasetFormatError(f"{folder}: images have shape {images.shape[1:]}, expected {spec.input_shape}")
    return ImageDataset(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels), spec, split)
