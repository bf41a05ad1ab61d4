"""Plain PyTorch checkpoints through the CLI: a state_dict (.pt / .safetensors) with --model/--dataset and each
poisoned-test source (image folder, .npz / .safetensors arrays, attack config), `convert` to a bundle, and the
safety and strictness rules (no full-module unpickling without the trust flag, mismatches named by key)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from benchmark_adapters.bundle import load_bundle
from benchmark_adapters.plain import PlainCheckpointError, load_plain_checkpoint, read_poisoned_test
from otbr_plugin.cli import main
from otbr_plugin.data import get_dataset_spec
from otbr_plugin.models import create_model

SPEC = get_dataset_spec("fashion_mnist")
WIDTH = 0.0625


def resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("resnet18", 10, 1, 28, WIDTH, stem="cifar").eval()


@pytest.fixture
def plain_pt(tmp_path: Path) -> Path:
    """A resnet18 state_dict saved as DataParallel does (``module.`` prefixes)."""
    path = tmp_path / "model.pt"
    torch.save({f"module.{k}": v for k, v in resnet().state_dict().items()}, path)
    return path


def poisoned_arrays(n: int = 9, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(1, 10, n)


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    for i, (img, label) in enumerate(zip(images, labels)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / str(label) / f"{i}.png")
    return root


def defend(checkpoint: Path, out: Path, root: Path, *extra: str, defense: str = "clp") -> int:
    return main(["defend", str(checkpoint), "--model", "resnet18", "--model-args", "stem=cifar", "--dataset",
                 "fashion_mnist", "--defense", defense, "--data-root", str(root), "--device", "cpu", "--no-progress",
                 "--out", str(out), *extra])


def test_plain_state_dict_with_an_image_folder(tmp_path, plain_pt, tiny_fashion_bundle):
    _, root = tiny_fashion_bundle
    images, labels = poisoned_arrays()
    folder = write_folder(tmp_path / "bd_test_dataset", images, labels)
    assert defend(plain_pt, tmp_path / "out", root, "--poisoned-test", str(folder), "--target-class", "0") == 0
    record = json.loads((tmp_path / "out" / "record.json").read_text())
    assert record["checkpoint_sha256"] == hashlib.sha256(plain_pt.read_bytes()).hexdigest()
    assert record["model"] == {"name": "resnet18", "num_classes": 10, "in_channels": 1, "image_size": 28,
                               "width": WIDTH, "args": {"stem": "cifar"}}  # width read off the weights
    assert record["attack"]["target_class"] == 0 and record["defense"] == "clp"
    bd = load_bundle(tmp_path / "out" / "model").bd_test
    order = np.lexsort((np.arange(len(labels)), labels))  # folder order: label, then file number
    assert torch.equal(bd.images[:, 0], torch.from_numpy(images[order]))
    assert bd.original_labels.tolist() == labels[order].tolist() and bd.targets.tolist() == [0] * len(labels)
    assert bd.original_indices.tolist() == order.tolist()


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_plain_safetensors_with_array_files(tmp_path, tiny_fashion_bundle, fmt):
    _, root = tiny_fashion_bundle
    ckpt = tmp_path / "model.safetensors"
    save_file(resnet().state_dict(), str(ckpt))
    images, labels = poisoned_arrays()
    arrays = {"images": images[..., None], "labels": labels.astype(np.int64),  # N x H x W x C is accepted too
              "targets": np.full(len(labels), 3, dtype=np.int64)}
    path = tmp_path / f"bd.{fmt}"
    if fmt == "npz":
        np.savez(path, **arrays)
    else:
        from safetensors.numpy import save_file as save_np
        save_np(arrays, str(path))
    assert defend(ckpt, tmp_path / "out", root, "--poisoned-test", str(path)) == 0
    bd = load_bundle(tmp_path / "out" / "model").bd_test
    assert torch.equal(bd.images, torch.from_numpy(images[:, None])) and set(bd.targets.tolist()) == {3}
    assert bd.original_labels.tolist() == labels.tolist()


def test_plain_state_dict_with_a_regenerated_attack_and_convert(tmp_path, plain_pt, tiny_fashion_bundle):
    _, root = tiny_fashion_bundle
    attack = "configs/attack/badnets/fashion_mnist.yaml"
    assert defend(plain_pt, tmp_path / "out", root, "--attack-config", attack) == 0
    record = json.loads((tmp_path / "out" / "record.json").read_text())
    assert record["attack"]["name"] == "badnets" and record["attack"]["target_class"] == 0
    from otbr_plugin.data import load_dataset

    test = load_dataset("fashion_mnist", "test", root)
    bd = load_bundle(tmp_path / "out" / "model").bd_test
    assert len(bd) == int((test.labels != 0).sum())  # all2one: the target class's own images are left out
    assert torch.all(bd.images[:, :, -3:, -3:] == 255)  # the BadNets patch, bottom right
    # convert: the same checkpoint as a bundle, weights bit for bit (prefixes stripped)
    assert main(["convert", str(plain_pt), str(tmp_path / "converted"), "--model", "resnet18", "--model-args",
                 "stem=cifar", "--dataset", "fashion_mnist", "--attack-config", attack, "--data-root", str(root)]) == 0
    bundle = load_bundle(tmp_path / "converted")
    assert bundle.model_config.args == {"stem": "cifar"} and bundle.model_config.width == WIDTH
    assert all(torch.equal(v, bundle.state_dict[k]) for k, v in resnet().state_dict().items())
    assert torch.equal(bundle.bd_test.images, bd.images)
    model = bundle.build_model()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in resnet().parameters())


def test_a_pickled_module_is_refused_unless_trusted(tmp_path, tiny_fashion_bundle, capsys):
    _, root = tiny_fashion_bundle
    path = tmp_path / "module.pt"
    torch.save(resnet(), path)  # a whole nn.Module: unpickling it would run arbitrary code
    images, labels = poisoned_arrays()
    np.savez(tmp_path / "bd.npz", images=images, labels=labels)
    args = ("--poisoned-test", str(tmp_path / "bd.npz"), "--target-class", "0")
    assert defend(path, tmp_path / "out", root, *args) == 1
    err = capsys.readouterr().err
    assert "refused to unpickle" in err and "otbr_plugin.models.resnet.ResNet18" in err and "--trust-checkpoint" in err
    assert not (tmp_path / "out" / "record.json").exists()
    assert defend(path, tmp_path / "out", root, *args, "--trust-checkpoint") == 0


def test_mismatches_are_named_by_key(tmp_path):
    images, labels = poisoned_arrays()
    np.savez(tmp_path / "bd.npz", images=images, labels=labels)
    state = resnet().state_dict()
    state["classifier.weight"] = state.pop("fc.weight")
    state["layer1.0.conv1.weight"] = state["layer1.0.conv1.weight"][:2]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(PlainCheckpointError, match=r"missing \(1\): fc.weight.*unexpected \(1\): classifier.weight"
                                                   r".*shape mismatch \(1\): layer1.0.conv1.weight"):
        load_plain_checkpoint(tmp_path / "bad.pt", model="resnet18", model_args={"stem": "cifar"},
                              dataset="fashion_mnist", poisoned_test=tmp_path / "bd.npz", target_class=0)
    with pytest.raises(PlainCheckpointError, match="shape mismatch.*conv1.weight"):  # the wrong stem
        load_plain_checkpoint(tmp_path / "bad.pt", model="resnet18", dataset="fashion_mnist",
                              poisoned_test=tmp_path / "bd.npz", target_class=0)


def test_poisoned_test_inputs_are_checked(tmp_path):
    images, labels = poisoned_arrays()
    np.savez(tmp_path / "no_targets.npz", images=images, labels=labels)
    with pytest.raises(PlainCheckpointError, match="no attack targets.*--target-class"):
        read_poisoned_test(tmp_path / "no_targets.npz", SPEC)
    np.savez(tmp_path / "float.npz", images=images.astype(np.float32), labels=labels)
    with pytest.raises(PlainCheckpointError, match="uint8"):
        read_poisoned_test(tmp_path / "float.npz", SPEC, 0)
    np.savez(tmp_path / "size.npz", images=images[:, :20, :20], labels=labels)
    with pytest.raises(PlainCheckpointError, match="N x 1 x 28 x 28"):
        read_poisoned_test(tmp_path / "size.npz", SPEC, 0)
    (tmp_path / "folder" / "cat").mkdir(parents=True)
    with pytest.raises(PlainCheckpointError, match="one sub-folder per original label"):
        read_poisoned_test(tmp_path / "folder", SPEC, 0)
    with pytest.raises(PlainCheckpointError, match="out of range"):
        read_poisoned_test(tmp_path / "no_targets.npz", SPEC, 10)


def test_plain_options_need_model_and_one_source(tmp_path, plain_pt, tiny_fashion_bundle, capsys):
    bundle, root = tiny_fashion_bundle
    assert main(["defend", str(bundle), "--defense", "clp", "--dataset", "fashion_mnist", "--out",
                 str(tmp_path / "a")]) == 1
    assert "need --model NAME" in capsys.readouterr().err
    assert defend(plain_pt, tmp_path / "b", root) == 1
    assert "exactly one poisoned test source" in capsys.readouterr().err
    assert main(["defend", str(plain_pt), "--model", "resnet18", "--defense", "clp", "--out", str(tmp_path / "c"),
                 "--attack-config", "configs/attack/badnets/fashion_mnist.yaml"]) == 1
    assert "needs --dataset" in capsys.readouterr().err
