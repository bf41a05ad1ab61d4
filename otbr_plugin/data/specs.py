"""Per-dataset facts: classes, shape, BackdoorBench's normalization constants, augmentation."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DatasetSpec", "DATASETS", "get_dataset_spec", "list_datasets"]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool  # horizontal flip is a label-preserving augmentation for this dataset
    crop_padding: int = 4
    description: str = ""

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)


# Normalization constants are BackdoorBench's (utils' get_dataset_normalization). BackdoorBench has no
# Fashion-MNIST; we give it MNIST's (0.5, 0.5), the closest dataset it does define.
DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in [
        DatasetSpec("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261), True,
                    description="CIFAR-10, python pickle batches (cifar-10-batches-py/)"),
        DatasetSpec("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True,
                    description="CIFAR-100, python pickle files (cifar-100-python/)"),
        DatasetSpec("gtsrb", 43, 3, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), False,
                    description="GTSRB, official PPM + CSV folders, resized to 32x32"),
        DatasetSpec("tiny", 200, 3, 64, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262), True,
                    description="Tiny-ImageNet-200 folders (test split = the labelled val split)"),
        DatasetSpec("mnist", 10, 1, 28, (0.5,), (0.5,), False, description="MNIST, IDX files (.gz or plain)"),
        DatasetSpec("fashion_mnist", 10, 1, 28, (0.5,), (0.5,), False,
                    description="Fashion-MNIST, IDX files (.gz or plain); the embedded default"),
    ]
}


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def get_dataset_spec(name: str) -> DatasetSpec:
    key = name.lower().replace("-", "_")
    if key in ("fashionmnist", "fmnist"):
        key = "fashion_mnist"
    if key in ("tiny_imagenet", "tinyimagenet"):
        key = "tiny"
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}")
    return DATASETS[key]
