"""The checkpoint bundle: round trip, and tamper detection (changed byte, truncation, missing meta field)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmark_adapters import bundle as bundle_mod
from benchmark_adapters.bundle import Bundle, BundleError, load_bundle, save_bundle, verify_bundle
from otbr_plugin.data import Normalizer, PoisonedTestSet
from otbr_plugin.models import ModelConfig


def make_bundle(with_tensors: bool = True) -> Bundle:
    torch.manual_seed(0)
    cfg = ModelConfig("smallcnn", num_classes=10, in_channels=1, image_size=28, width=0.25)
    model = cfg.build()
    g = torch.Generator().manual_seed(1)
    bd = PoisonedTestSet(
        images=torch.randint(0, 256, (6, 1, 28, 28), generator=g, dtype=torch.int64).to(torch.uint8),
        targets=torch.zeros(6, dtype=torch.int64),
        original_labels=torch.tensor([1, 2, 3, 4, 5, 6]),
        original_indices=torch.tensor([1, 2, 3, 4, 5, 8]),
    )
    return Bundle(
        model_config=cfg,
        state_dict=model.state_dict(),
        dataset="fashion_mnist",
        normalizer=Normalizer((0.5,), (0.5,)),
        bd_test=bd,
        attack={"name": "badnets", "target_class": 0, "poison_ratio": 0.1, "poison_count": 3},
        metrics={"acc": 0.9, "asr": 0.95, "ra": 0.04},
        training={"config": {"epochs": 1}, "curve": [{"epoch": 1, "loss": 1.0}]},
        extra={"note": "test"},
        tensors={"poison_indices": torch.tensor([2, 5, 7])} if with_tensors else {},
    )


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return save_bundle(make_bundle(), tmp_path / "b")


def test_round_trip(saved: Path):
    original = make_bundle()
    b = load_bundle(saved)
    assert set(p.name for p in saved.iterdir()) == {"model.safetensors", "bd_test.safetensors", "extra.safetensors",
                                                      "meta.json"}
    assert b.model_config == original.model_config and b.dataset == "fashion_mnist"
    assert b.normalizer == original.normalizer
    assert b.state_dict.keys() == original.state_dict.keys()
    assert all(torch.equal(b.state_dict[k], v) for k, v in original.state_dict.items())
    for k in ("images", "targets", "original_labels", "original_indices"):
        assert torch.equal(getattr(b.bd_test, k), getattr(original.bd_test, k))
    assert b.attack == original.attack and b.metrics == original.metrics and b.training == original.training
    assert b.extra == original.extra
    assert torch.equal(b.tensors["poison_indices"], torch.tensor([2, 5, 7]))
    model = b.build_model()
    x = torch.zeros(2, 1, 28, 28)
    ref = original.model_config.build()
    ref.load_state_dict(original.state_dict)
    assert torch.allclose(model(x), ref.eval()(x))
    meta = json.loads((saved / "meta.json").read_text())
    assert meta["format_version"] == bundle_mod.BUNDLE_FORMAT_VERSION
    assert set(meta["files"]) == {"model.safetensors", "bd_test.safetensors", "extra.safetensors"}
    assert b.model_sha256 == bundle_mod.sha256_file(saved / "model.safetensors")


def test_bundle_without_extra_tensors(tmp_path: Path):
    path = save_bundle(make_bundle(with_tensors=False), tmp_path / "b")
    assert not (path / "extra.safetensors").exists()
    assert load_bundle(path).tensors == {}


def test_no_pickle_in_the_bundle(saved: Path):
    for f in saved.iterdir():
        data = f.read_bytes()
        if f.suffix == ".safetensors":  # 8-byte little-endian header length, then the JSON header
            assert data[8:9] == b"{", f"{f.name} is not a safetensors file"
        else:
            assert not data.startswith(b"\x80") and b"PK\x03\x04" not in data[:4], f"{f.name} looks pickled or zipped"


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_changed_weight_byte_is_detected(saved: Path):
    f = saved / "model.safetensors"
    _flip_byte(f, f.stat().st_size - 5)  # inside the tensor data, the header stays valid
    with pytest.raises(BundleError, match=r"model\.safetensors: sha256 .* does not match"):
        load_bundle(saved)
    with pytest.raises(BundleError, match="changed or truncated"):
        verify_bundle(saved)


def test_truncated_file_is_detected(saved: Path):
    f = saved / "bd_test.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(BundleError, match=r"bd_test\.safetensors: sha256"):
        load_bundle(saved)


def test_changed_extra_tensors_are_detected(saved: Path):
    f = saved / "extra.safetensors"
    _flip_byte(f, f.stat().st_size - 1)
    with pytest.raises(BundleError, match=r"extra\.safetensors: sha256"):
        load_bundle(saved)


def test_missing_file_is_detected(saved: Path):
    (saved / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="model.safetensors is missing"):
        load_bundle(saved)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.pop("attack"), "missing field.*attack"),
        (lambda m: m.pop("files"), "missing field.*files"),
        (lambda m: m["model"].pop("width"), "'model' is missing field.*width"),
        (lambda m: m["dataset"].pop("mean"), "'dataset' is missing field.*mean"),
        (lambda m: m.update(format_version=99), "format_version 99 is not supported"),
        (lambda m: m["files"].pop("bd_test.safetensors"), "no sha256 recorded for bd_test"),
        (lambda m: m["files"].update({"model.safetensors": "abc"}), "not a 64-digit hex digest"),
        (lambda m: m["files"].update({"evil.pkl": "0" * 64}), "unknown file 'evil.pkl'"),
        (lambda m: m["dataset"].update(input_shape=[3, 32, 32]), "input_shape must be"),
    ],
)
def test_bad_meta_is_detected(saved: Path, edit, message):
    meta_path = saved / "meta.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=message):
        load_bundle(saved)


def test_unreadable_meta_and_missing_folder(tmp_path: Path, saved: Path):
    (saved / "meta.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(saved)
    with pytest.raises(BundleError, match="not a bundle folder"):
        load_bundle(tmp_path / "nowhere")


def test_weights_that_do_not_fit_the_model_config(tmp_path: Path):
    b = make_bundle()
    b.state_dict = {k: v for k, v in b.state_dict.items() if not k.startswith("linear")}
    path = save_bundle(b, tmp_path / "b")
    with pytest.raises(BundleError, match="missing .*linear"):
        load_bundle(path).build_model()


def test_overwrite_rules_and_atomic_write(tmp_path: Path, saved: Path, monkeypatch):
    with pytest.raises(FileExistsError, match="already exists"):
        save_bundle(make_bundle(), saved)
    b = make_bundle()
    b.metrics = {"acc": 0.5, "asr": 0.5, "ra": 0.5}
    save_bundle(b, saved, overwrite=True)
    assert load_bundle(saved).metrics["acc"] == 0.5

    def boom(path):
        raise OSError("disk full")

    monkeypatch.setattr(bundle_mod, "sha256_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_bundle(make_bundle(), tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no half-written temp folder
