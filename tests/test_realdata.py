"""Checks on the real Fashion-MNIST files (Debian's dataset-fashion-mnist); skipped where they are absent."""

import pytest
import torch

from otbr_plugin.data import find_dataset, load_dataset

pytestmark = pytest.mark.realdata
needs_fmnist = pytest.mark.skipif(find_dataset("fashion_mnist") is None,
                                  reason="real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@needs_fmnist
def test_real_fashion_mnist_shapes_and_balance():
    train = load_dataset("fashion_mnist", "train", download=False)
    test = load_dataset("fashion_mnist", "test", download=False)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
