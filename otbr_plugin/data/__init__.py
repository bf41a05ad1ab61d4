"""Datasets (uint8 tensors from official formats), per-dataset specs and batched transforms."""

from .datasets import (
    DatasetFormatError,
    DatasetNotFoundError,
    ImageDataset,
    default_data_root,
    find_dataset,
    load_dataset,
)
from .identity import data_identity, identity_changes, tensor_identity, try_data_identity
from .poisoned import PoisonedTestSet
from .subsets import CleanData, clean_defense_subset, stratified_indices
from .specs import DATASETS, DatasetSpec, get_dataset_spec, list_datasets
from .transforms import Normalizer, Preprocess, normalize, random_crop, random_hflip, to_float

__all__ = [
    "CleanData", "clean_defense_subset", "stratified_indices",
    "DatasetFormatError", "DatasetNotFoundError", "ImageDataset", "PoisonedTestSet", "default_data_root", "find_dataset",
    "load_dataset", "DATASETS", "DatasetSpec", "get_dataset_spec", "list_datasets", "Normalizer", "Preprocess",
    "normalize", "random_crop", "random_hflip", "to_float", "data_identity", "identity_changes", "tensor_identity",
    "try_data_identity",
]
