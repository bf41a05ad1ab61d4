"""BackdoorBench's pre-made SSBA data (``resource/ssba/<dataset>_ssba_{train,test}_b1.npy``): read safely, written in
its layout from an ``ssba`` bundle, and the poisoned test set BackdoorBench's SSBA evaluates rebuilt from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark_adapters.backdoorbench import (export_ssba_images, read_ssba_images, ssba_file_name,
                                              ssba_poisoned_test_set, write_ssba_images)
from benchmark_adapters.bundle import load_bundle, save_bundle
from otbr_plugin.attacks import SSBA, restore_attack
from otbr_plugin.bundle import Bundle
from otbr_plugin.data.transforms import Normalizer
from otbr_plugin.models import ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def images(n: int, c: int = 1, size: int = 28, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.int64).to(torch.uint8)


def ssba_bundle(test_x: torch.Tensor, test_y: torch.Tensor) -> Bundle:
    """An ssba bundle over 28x28 grey images whose encoder is built (seeded) but not trained: enough to encode."""
    attack = SSBA({"secret_length": 8, "encoder_channels": 4, "seed": 2})
    attack.build((1, 28, 28))
    config = ModelConfig("smallcnn", 10, 1, 28, 0.25)
    return Bundle(model_config=config, state_dict=config.build().state_dict(), dataset="mnist",
                  normalizer=Normalizer((0.5,), (0.5,)), bd_test=attack.poison_test(test_x, test_y, 10),
                  attack={**attack.params(), "poison_count": 0},
                  metrics={"acc": 0.5, "asr": 0.5, "ra": 0.5},
                  tensors={f"attack.{k}": v for k, v in attack.state_tensors().items()})


@pytest.mark.parametrize("c", [1, 3])
def test_write_then_read_keeps_the_images_in_backdoorbench_layout(tmp_path, c):
    x = images(5, c)
    path = write_ssba_images(tmp_path / "x.npy", x)
    raw = np.load(path, allow_pickle=False)
    assert raw.dtype == np.uint8 and raw.shape == ((5, 28, 28) if c == 1 else (5, 28, 28, 3))  # np.array(PIL) stacked
    assert torch.equal(read_ssba_images(path, shape=(c, 28, 28), count=5), x)
    assert ssba_file_name("cifar10", "train") == "cifar10_ssba_train_b1.npy"


def test_bad_files_are_refused_with_a_clear_error(tmp_path):
    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "ran",))

    np.save(tmp_path / "obj.npy", np.array([Payload()], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object arrays are refused"):
        read_ssba_images(tmp_path / "obj.npy")
    assert not (tmp_path / "ran").exists()  # never unpickled
    np.save(tmp_path / "f.npy", np.zeros((2, 16, 16), dtype=np.float32))
    with pytest.raises(ValueError, match="expected uint8 images"):
        read_ssba_images(tmp_path / "f.npy")
    np.save(tmp_path / "s.npy", np.zeros((2, 16, 16, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        read_ssba_images(tmp_path / "s.npy")
    write_ssba_images(tmp_path / "ok.npy", images(3))
    with pytest.raises(ValueError, match="holds 3 images but the split has 4"):
        read_ssba_images(tmp_path / "ok.npy", count=4)
    with pytest.raises(ValueError, match="the dataset's are"):
        read_ssba_images(tmp_path / "ok.npy", shape=(3, 28, 28))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="junk.npy"):
        read_ssba_images(tmp_path / "junk.npy")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_ssba_images(tmp_path / "missing.npy")


def test_exported_images_rebuild_the_bundles_poisoned_test_set(tmp_path):
    """A bundle -> BackdoorBench's pre-made files -> the poisoned test set BackdoorBench's SSBA evaluates: the same
    images, targets and indices as the bundle's own (and after a bundle save/load round trip)."""
    train_x, test_x = images(30, seed=1), images(20, seed=2)
    test_y = torch.arange(20, dtype=torch.int64) % 10
    bundle = ssba_bundle(test_x, test_y)
    save_bundle(bundle, tmp_path / "bundle")
    loaded = load_bundle(tmp_path / "bundle")
    out = export_ssba_images(loaded, train_x, test_x, tmp_path / "resource")
    assert sorted(Path(p).name for p in out["paths"].values()) == ["mnist_ssba_test_b1.npy", "mnist_ssba_train_b1.npy"]
    assert (out["target_class"], out["poison_ratio"], out["label_mode"]) == (0, 0.1, "all2one")
    replaced = read_ssba_images(out["paths"]["test"], shape=(1, 28, 28), count=20)
    bd = ssba_poisoned_test_set(replaced, test_y, 10)
    for name in ("images", "targets", "original_labels", "original_indices"):
        assert torch.equal(getattr(bd, name), getattr(loaded.bd_test, name)), name
    train = read_ssba_images(out["paths"]["train"], count=30)
    assert torch.equal(train, restore_attack(loaded.attack, loaded.tensors).apply_trigger(train_x))
    assert not torch.equal(train, train_x)


def test_export_needs_an_ssba_bundle_and_matching_labels(tmp_path):
    test_x, test_y = images(20), torch.arange(20, dtype=torch.int64) % 10
    bundle = ssba_bundle(test_x, test_y)
    bundle.attack = {"name": "badnets"}
    with pytest.raises(ValueError, match="only an ssba bundle"):
        export_ssba_images(bundle, test_x, test_x, tmp_path)
    with pytest.raises(ValueError, match="one uint8"):
        ssba_poisoned_test_set(test_x[:5], test_y, 10)
