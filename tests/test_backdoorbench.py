"""BackdoorBench adapter: safe attack_result.pt reading, record <-> bundle, the defense face, the drop-in."""

from __future__ import annotations

import csv
import json
import os
import runpy
import subprocess
import sys
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from benchmark_adapters.backdoorbench import (
    ALLOWED_GLOBAL_NAMES,
    AttackResultError,
    UnsafeCheckpointError,
    load_attack_result,
    load_clean_test,
    state_dict_for_zoo,
    write_attack_result,
)
from benchmark_adapters.backdoorbench.install import DROPIN_DIR, install_dropin
from benchmark_adapters.bundle import load_bundle
from benchmark_adapters.checkpoints import load_checkpoint
from conftest import write_cifar_batch, write_mnist_like
from otbr_plugin.cli import main as cli_main
from otbr_plugin.defenses import Defense, DefenseConfig, DefenseContext, DefenseOutcome, get_defense, register_defense
from benchmark_adapters.backdoorbench.face import BackdoorBenchDefense
from otbr_plugin.defenses.registry import list_defenses
from otbr_plugin.models import create_model

REPO = Path(__file__).resolve().parents[1]
WIDTH = 0.0625  # preactresnet18 with 4..32 channels: fast on CPU
NAME = "badnet_0_1"


# ----------------------------------------------------------------------------------------------------------
# A BackdoorBench-like tree, written by hand in exactly the documented format (independent of our writer)
# ----------------------------------------------------------------------------------------------------------
def _trigger(img: np.ndarray) -> np.ndarray:
    out = img.copy()
    out[-4:-1, -4:-1] = 255
    return out


def _write_cifar10(folder: Path, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for i in range(1, 6):
        write_cifar_batch(batches / f"data_batch_{i}", rng.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8),
                          rng.integers(0, 10, 8))
    x, y = rng.integers(0, 256, (30, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 30)
    write_cifar_batch(batches / "test_batch", x, y)
    return {"test": (x.transpose(0, 2, 3, 1), y)}  # HWC, as the PNGs hold them


def make_bb_tree(root: Path, name: str = NAME, data_parallel: bool = True, seed: int = 0, dataset: str = "mnist",
                 model_name: str = "preactresnet18", width: float = WIDTH) -> dict:
    """BB_ROOT/data/<dataset> (official format), BB_ROOT/record/<name>/{attack_result.pt, bd_test_dataset/,
    attack_df_summary.csv}, and the markers of a BackdoorBench checkout (defense/base.py, attack/, utils/,
    config/defense/) so that install-dropin takes it."""
    for folder in ("defense", "attack", "utils", "config/defense"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "defense" / "base.py").write_text("# BackdoorBench's defense base class\n")
    if dataset == "mnist":
        data = write_mnist_like(root / "data" / "mnist", n_train=40, n_test=30, seed=seed)
        channels, size, mode = 1, 28, "L"
    else:
        data = _write_cifar10(root / "data" / "cifar10", seed)
        channels, size, mode = 3, 32, "RGB"
    test_x, test_y = data["test"]
    record = root / "record" / name
    target = 2
    poisoned = np.flatnonzero(test_y != target).astype(np.int64)
    indicator = np.zeros(len(test_y), dtype=np.float64)
    indicator[poisoned] = 1.0
    stored = f"./record/{name}/bd_test_dataset"
    data_dict = {}
    for idx in poisoned:
        label = int(test_y[idx])
        (record / "bd_test_dataset" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(_trigger(test_x[idx]), mode=mode).save(record / "bd_test_dataset" / str(label) / f"{idx}.png")
        data_dict[np.int64(idx)] = {"path": f"{stored}/{label}/{idx}.png", "other_info": [target, label]}
    torch.manual_seed(seed)
    model = create_model(model_name, 10, channels, size, width)
    state = OrderedDict((("module." if data_parallel else "") + k, v) for k, v in model.state_dict().items())
    bd_train = {
        "bd_data_container": {"save_folder_path": f"./record/{name}/bd_train_dataset", "save_file_format": ".png",
                              "data_dict": {}},
        "getitem_all": True, "getitem_all_switch": False,
        "original_index_array": np.arange(40, dtype=np.int64), "poison_indicator": np.zeros(40, dtype=np.float64),
        "save_folder_path": f"./record/{name}/bd_train_dataset",
    }
    result = {
        "model_name": model_name,
        "num_classes": 10,
        "model": state,
        "data_path": f"./data/{dataset}",
        "img_size": (size, size, channels),
        "clean_data": dataset,
        "bd_train": bd_train,
        "bd_test": {
            "bd_data_container": {"save_folder_path": stored, "save_file_format": ".png", "data_dict": data_dict},
            "getitem_all": True,
            "getitem_all_switch": False,
            "original_index_array": poisoned,
            "poison_indicator": indicator,
            "save_folder_path": stored,
        },
    }
    torch.save(result, record / "attack_result.pt", pickle_protocol=2)
    with open(record / "attack_df_summary.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["", "test_acc", "test_asr", "test_ra"], [0, 0.9, 0.95, 0.04]])
    assert 0 < len(poisoned) < len(test_y)  # the target class's samples are left out
    return {"root": root, "record": record, "result": result, "model": model, "test_x": test_x, "test_y": test_y,
            "poisoned": poisoned, "target": target}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def bb(tmp_path: Path) -> dict:
    return make_bb_tree(tmp_path / "BackdoorBench")


def _rewrite_pickle(src: Path, dst: Path, edit) -> None:
    """Copy a torch zip archive, editing its data.pkl bytes."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info, edit(data) if info.filename.endswith("data.pkl") else data)


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------
def test_allowlist_is_exactly_the_documented_numpy_globals():
    expected = {"numpy.ndarray", "numpy.dtype", "numpy.dtypes.Int64DType", "numpy.dtypes.Float64DType"}
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        expected |= {f"{mod}._reconstruct", f"{mod}.scalar"}
    assert set(ALLOWED_GLOBAL_NAMES) == expected


@pytest.mark.parametrize("name", ["inputaware_0_1", "lf_0_1", "trojannn_0_1", "ssba_0_1"])
def test_records_of_the_learned_trigger_attacks_read_like_any_other(tmp_path, name):
    """BackdoorBench's inputaware, lf, trojannn and ssba write the same v2 record (bd_test as PNGs with
    [bd_label, original_label]); their learned triggers are already baked into those PNGs."""
    tree = make_bb_tree(tmp_path / "BackdoorBench", name=name)
    bundle = load_attack_result(tree["record"])
    assert bundle.attack["name"] == name and bundle.attack["target_class"] == tree["target"]
    assert bundle.bd_test.original_indices.tolist() == tree["poisoned"].tolist()
    expected = np.stack([_trigger(tree["test_x"][i]) for i in tree["poisoned"]])[:, None]
    assert torch.equal(bundle.bd_test.images, torch.from_numpy(expected))


def test_load_record_rebuilds_weights_and_poisoned_test_set(bb):
    bundle = load_attack_result(bb["record"])
    cfg = bundle.model_config
    assert (cfg.name, cfg.num_classes, cfg.in_channels, cfg.image_size, cfg.width) == ("preactresnet18", 10, 1, 28, WIDTH)
    assert len(bundle.state_dict) == 102  # module. prefixes stripped, BackdoorBench's exact keys
    for k, v in bb["model"].state_dict().items():
        assert torch.equal(bundle.state_dict[k], v), k
    model = bundle.build_model()  # strict load
    assert isinstance(model, torch.nn.Module)
    bd = bundle.bd_test
    poisoned = bb["poisoned"]
    assert bd.original_indices.tolist() == poisoned.tolist()
    assert bd.targets.tolist() == [bb["target"]] * len(poisoned)
    assert bd.original_labels.tolist() == bb["test_y"][poisoned].tolist()
    expected = np.stack([_trigger(bb["test_x"][i]) for i in poisoned])[:, None]
    assert torch.equal(bd.images, torch.from_numpy(expected))
    assert bundle.dataset == "mnist"
    assert bundle.attack == {"name": NAME, "source": "backdoorbench", "label_mode": "all2one", "target_class": 2}
    assert bundle.metrics == {"acc": 0.9, "asr": 0.95, "ra": 0.04}
    assert bundle.extra["backdoorbench"]["resized_bd_images"] == 0
    assert Path(bundle.extra["data_root"]).resolve() == (bb["root"] / "data" / "mnist").resolve()
    # the .pt file itself and the generic entry point give the same
    via_file = load_checkpoint(bb["record"] / "attack_result.pt")
    assert torch.equal(via_file.bd_test.images, bd.images)
    assert via_file.model_sha256 == bundle.model_sha256


def test_record_with_numpy1_module_names_loads(bb, tmp_path):
    """numpy 1 pickles name numpy.core.multiarray.*; the allowlist maps those names too."""
    pt = bb["record"] / "attack_result.pt"
    old = bb["record"] / "np1.pt"
    _rewrite_pickle(pt, old, lambda b: b.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    with zipfile.ZipFile(old) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"numpy.core.multiarray\n_reconstruct" in pkl and b"numpy._core" not in pkl
    os.replace(old, pt)
    bundle = load_attack_result(bb["record"])
    assert bundle.bd_test.original_indices.tolist() == bb["poisoned"].tolist()


def test_record_folder_can_live_anywhere_and_clean_test_comes_from_data_root(bb, tmp_path):
    moved = tmp_path / "elsewhere" / "my_record"
    moved.parent.mkdir()
    os.replace(bb["record"], moved)
    bundle = load_attack_result(moved)  # PNG paths still resolve (relative to the record folder)
    assert "data_root" not in bundle.extra  # the record's data_path no longer leads to the data
    clean = load_clean_test(bundle, bb["root"] / "data")  # BackdoorBench's data/<dataset> layout
    assert torch.equal(clean.labels, torch.from_numpy(bb["test_y"].astype(np.int64)))
    clean2 = load_clean_test(bundle, bb["root"] / "data" / "mnist")
    assert torch.equal(clean2.images, clean.images)


def test_clean_test_from_another_dataset_is_refused(bb, tmp_path):
    bundle = load_attack_result(bb["record"])
    write_mnist_like(tmp_path / "other" / "mnist", n_train=40, n_test=30, seed=7)  # same format, other labels
    with pytest.raises(AttackResultError, match="original label that differs"):
        load_clean_test(bundle, tmp_path / "other")


def test_cifar10_vgg19_bn_record(tmp_path):
    """RGB PNGs, BackdoorBench's data/cifar10/cifar-10-batches-py layout, vgg19_bn (torchvision keys)."""
    bb = make_bb_tree(tmp_path / "BB", dataset="cifar10", model_name="vgg19_bn", data_parallel=False)
    bundle = load_attack_result(bb["record"])
    cfg = bundle.model_config
    assert (cfg.name, cfg.in_channels, cfg.image_size, cfg.width) == ("vgg19_bn", 3, 32, WIDTH)
    expected = np.stack([_trigger(bb["test_x"][i]) for i in bb["poisoned"]]).transpose(0, 3, 1, 2)
    assert torch.equal(bundle.bd_test.images, torch.from_numpy(expected))
    clean = load_clean_test(bundle)  # found through the record's data_path, relative to the BackdoorBench root
    assert torch.equal(clean.labels, torch.from_numpy(bb["test_y"].astype(np.int64)))


@pytest.mark.parametrize("name, width", [("preactresnet18", 0.3), ("preactresnet18", 1.0), ("smallcnn", 0.5),
                                         ("vgg19_bn", 0.125), ("resnet18", 1.0), ("resnet18", 0.25)])
def test_width_is_inferred_from_the_weights(name, width):
    model = create_model(name, 10, 3, 32, width)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    cfg, clean = state_dict_for_zoo(name, state, 10, 3, 32)
    rebuilt = cfg.build()
    rebuilt.load_state_dict(clean, strict=True)
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------------------------------
# Security and bad input
# ----------------------------------------------------------------------------------------------------------
class _SystemPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _OpenPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("payload, global_name", [(_SystemPayload, f"{os.system.__module__}.system"),
                                                  (_OpenPayload, f"{open.__module__}.open")])
def test_pickle_payload_is_refused_and_never_runs(bb, tmp_path, payload, global_name):
    marker = tmp_path / "pwned"
    result = dict(bb["result"])
    result["bd_train"] = payload(marker)
    pt = bb["record"] / "attack_result.pt"
    torch.save(result, pt, pickle_protocol=2)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_attack_result(bb["record"])
    msg = str(info.value)
    assert global_name in msg and "trust=True" in msg
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError):  # the generic entry point and the CLI refuse it too
        load_checkpoint(bb["record"])
    assert cli_main(["convert", str(bb["record"]), str(tmp_path / "b")]) == 1
    assert not marker.exists() and not (tmp_path / "b").exists()


def test_truncated_file(bb):
    pt = bb["record"] / "attack_result.pt"
    pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    with pytest.raises(AttackResultError, match="truncated or corrupt"):
        load_attack_result(bb["record"])


def test_missing_keys(bb):
    result = {k: v for k, v in bb["result"].items() if k not in ("bd_test", "img_size")}
    torch.save(result, bb["record"] / "attack_result.pt", pickle_protocol=2)
    with pytest.raises(AttackResultError, match="missing key.*bd_test.*img_size|missing key.*img_size.*bd_test"):
        load_attack_result(bb["record"])


def test_state_dict_of_another_architecture(bb):
    result = dict(bb["result"])
    result["model"] = create_model("smallcnn", 10, 1, 28, 1.0).state_dict()
    torch.save(result, bb["record"] / "attack_result.pt", pickle_protocol=2)
    with pytest.raises(AttackResultError) as info:
        load_attack_result(bb["record"])
    msg = str(info.value)
    assert "preactresnet18" in msg and "missing keys: conv1.weight" in msg and "unexpected keys: features.0.weight" in msg


def test_state_dict_with_a_wrong_shape_is_named(bb):
    result = dict(bb["result"])
    state = OrderedDict(result["model"])
    state["module.linear.weight"] = torch.zeros(7, state["module.linear.weight"].shape[1])
    result["model"] = state
    torch.save(result, bb["record"] / "attack_result.pt", pickle_protocol=2)
    with pytest.raises(AttackResultError, match=r"shape mismatches: linear.weight: checkpoint \(7, 32\) vs model \(10, 32\)"):
        load_attack_result(bb["record"])


def test_unsupported_model_name(bb):
    result = dict(bb["result"], model_name="vit_b_16")
    torch.save(result, bb["record"] / "attack_result.pt", pickle_protocol=2)
    with pytest.raises(AttackResultError, match="vit_b_16.*supported: preactresnet18, resnet18, smallcnn, vgg19_bn"):
        load_attack_result(bb["record"])


def test_missing_png(bb):
    idx = int(bb["poisoned"][3])
    png = bb["record"] / "bd_test_dataset" / str(int(bb["test_y"][idx])) / f"{idx}.png"
    png.unlink()
    with pytest.raises(AttackResultError, match=f"{idx}.png is missing"):
        load_attack_result(bb["record"])


def test_png_of_another_size_is_resized_and_counted(bb):
    idx = int(bb["poisoned"][0])
    png = bb["record"] / "bd_test_dataset" / str(int(bb["test_y"][idx])) / f"{idx}.png"
    Image.open(png).resize((32, 32)).save(png)
    bundle = load_attack_result(bb["record"])
    assert bundle.bd_test.images.shape[1:] == (1, 28, 28)
    assert bundle.extra["backdoorbench"]["resized_bd_images"] == 1


def test_png_path_cannot_leave_the_record(bb, tmp_path):
    (tmp_path / "secret.png").write_bytes(b"x")
    result = dict(bb["result"])
    bd = dict(result["bd_test"])
    cont = dict(bd["bd_data_container"])
    dd = dict(cont["data_dict"])
    first = next(iter(dd))
    dd[first] = {"path": f"./record/{NAME}/bd_test_dataset/../../../secret.png", "other_info": [0, 1]}
    cont["data_dict"] = dd
    bd["bd_data_container"] = cont
    result["bd_test"] = bd
    torch.save(result, bb["record"] / "attack_result.pt", pickle_protocol=2)
    with pytest.raises(AttackResultError, match="not a file inside bd_test_dataset"):
        load_attack_result(bb["record"])


# ----------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------
def test_convert_record_to_bundle_and_back(bb, tmp_path):
    bundle_dir = tmp_path / "bundle"
    assert cli_main(["convert", str(bb["record"]), str(bundle_dir)]) == 0
    bundle = load_bundle(bundle_dir)
    assert "data_root" not in bundle.extra
    back = tmp_path / "record" / "again"
    assert cli_main(["convert", str(bundle_dir), str(back)]) == 0
    a = torch.load(bb["record"] / "attack_result.pt", weights_only=False)
    b = torch.load(back / "attack_result.pt", weights_only=False)
    assert list(b) == ["model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test"]
    strip = {k.removeprefix("module."): v for k, v in a["model"].items()}
    assert isinstance(b["model"], OrderedDict) and list(b["model"]) == list(strip)
    assert all(torch.equal(strip[k], b["model"][k]) for k in strip)
    assert (b["model_name"], b["num_classes"], b["img_size"], b["clean_data"]) == ("preactresnet18", 10, (28, 28, 1), "mnist")
    bd_a, bd_b = a["bd_test"], b["bd_test"]
    assert np.array_equal(bd_a["original_index_array"], bd_b["original_index_array"])
    assert bd_b["original_index_array"].dtype == np.int64 and bd_b["poison_indicator"].dtype == np.float64
    assert np.array_equal(bd_a["poison_indicator"], bd_b["poison_indicator"])
    dd_a, dd_b = bd_a["bd_data_container"]["data_dict"], bd_b["bd_data_container"]["data_dict"]
    assert all(type(k) is np.int64 for k in dd_b)
    assert sorted(dd_a) == sorted(dd_b)
    for k in dd_a:
        assert dd_a[k]["other_info"] == dd_b[k]["other_info"]
        assert dd_b[k]["path"] == f"./record/again/bd_test_dataset/{dd_a[k]['other_info'][1]}/{k}.png"
        pa = np.asarray(Image.open(bb["record"] / dd_a[k]["path"].split(f"{NAME}/", 1)[1]))
        pb = np.asarray(Image.open(back / dd_b[k]["path"].split("again/", 1)[1]))
        assert np.array_equal(pa, pb)
    # the written record is read by the weights-only loader like a genuine one
    assert torch.equal(load_attack_result(back).bd_test.images, bundle.bd_test.images)


def test_convert_bundle_to_record_and_back(bb, tmp_path):
    original = load_attack_result(bb["record"])
    original.extra.pop("data_root")
    original.attack = {"name": "badnets", "target_class": 2, "label_mode": "all2one", "poison_ratio": 0.1}
    from benchmark_adapters.bundle import save_bundle

    src = save_bundle(original, tmp_path / "src_bundle")
    record = tmp_path / "record" / "from_bundle"
    assert cli_main(["convert", str(src), str(record)]) == 0
    assert cli_main(["convert", str(src), str(record)]) == 1  # exists: refused without --overwrite
    dst = tmp_path / "dst_bundle"
    assert cli_main(["convert", str(record), str(dst)]) == 0
    a, b = load_bundle(src), load_bundle(dst)
    assert a.model_config == b.model_config
    assert set(a.state_dict) == set(b.state_dict) and all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    for field in ("images", "targets", "original_labels", "original_indices"):
        assert torch.equal(getattr(a.bd_test, field), getattr(b.bd_test, field)), field
    assert b.attack == a.attack and b.metrics == a.metrics and b.dataset == a.dataset
    assert a.model_sha256 == b.model_sha256  # identical safetensors bytes


# ----------------------------------------------------------------------------------------------------------
# The BackdoorBench-style face
# ----------------------------------------------------------------------------------------------------------
@dataclass
class _ScaleConfig(DefenseConfig):
    """Test defense: scales the last layer.

    scale: factor on linear.weight.
    """

    scale: float = 1.0
    flip: bool = False
    mode: str = "a"
    batch_size: int = 8

    def validate(self) -> None:
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")


if "_test_scale" not in list_defenses():
    @register_defense
    class _ScaleDefense(Defense):
        name = "_test_scale"
        config_class = _ScaleConfig
        description = "test-only defense"

        def mitigate(self, model, context: DefenseContext) -> DefenseOutcome:
            out = self.copy_model(model, context.device)
            with torch.no_grad():
                out.linear.weight.mul_(self.config.scale)
            return DefenseOutcome(model=out, diagnostics=self.config.to_dict(), data_used=context.data_used())


def _face_args(face: BackdoorBenchDefense, argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser()
    face.add_arguments(parser)
    return parser.parse_args(argv)


def test_face_yaml_defaults_overridden_by_cli(bb, tmp_path, monkeypatch):
    monkeypatch.chdir(bb["root"])
    cfg = tmp_path / "scale.yaml"
    cfg.write_text(yaml.safe_dump({"dataset": "mnist", "device": "cpu", "random_seed": 3, "scale": 2.0,
                                   "mode": "b", "batch_size": 16, "dataset_path": "./data", "progress": False}))
    face = BackdoorBenchDefense("_test_scale")
    args = _face_args(face, ["--result_file", NAME, "--yaml_path", str(cfg), "--scale", "0.5", "--flip", "true"])
    assert args.mode is None and args.random_seed is None  # CLI defaults are None so the YAML shows through
    settings = face.configure(args)
    assert settings["scale"] == 0.5 and settings["flip"] is True and settings["mode"] == "b" and settings["random_seed"] == 3
    result = face.defense(args.result_file)
    out = bb["record"] / "defense" / "_test_scale"
    assert Path(result["save_path"]) == Path("record") / NAME / "defense" / "_test_scale"
    assert result["config"] == {"scale": 0.5, "flip": True, "mode": "b", "batch_size": 16}
    saved = torch.load(out / "defense_result.pt", weights_only=True)
    assert set(saved) == {"model_name", "num_classes", "model"}
    assert saved["model_name"] == "preactresnet18" and saved["num_classes"] == 10
    assert torch.allclose(saved["model"]["linear.weight"], bb["model"].state_dict()["linear.weight"] * 0.5)
    with open(out / "_test_scale_df_summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[1:] == ["test_acc", "test_asr", "test_ra"]
    assert float(rows[0]["test_acc"]) == pytest.approx(result["after"]["acc"])
    record = json.loads((out / "record.json").read_text())
    assert record["seed"] == 3 and record["defense_config"]["scale"] == 0.5 and record["data_used"] == "none"
    assert list((out / "log").glob("*.log")) and (out / "model" / "meta.json").is_file()
    assert not face.logger.handlers  # handlers closed after the run


def test_face_rejects_unknown_keys_and_bad_values(bb, tmp_path):
    face = BackdoorBenchDefense("_test_scale")
    bad = tmp_path / "bad.yaml"
    bad.write_text("scal: 2.0\n")
    with pytest.raises(ValueError, match="unknown key.*scal.*valid keys"):
        face.configure(_face_args(face, ["--yaml_path", str(bad)]))
    typo = tmp_path / "typo.yaml"
    typo.write_text("random_seed: three\n")
    with pytest.raises(ValueError, match="random_seed must be int, got 'three'"):
        face.configure(_face_args(face, ["--yaml_path", str(typo)]))
    typo.write_text("progress: maybe\n")
    with pytest.raises(ValueError, match="progress must be true or false"):
        face.configure(_face_args(face, ["--yaml_path", str(typo)]))
    with pytest.raises(ValueError, match="scale must be > 0"):
        face.configure(_face_args(face, ["--scale", "-1"]))
    face.configure(_face_args(face, ["--dataset", "cifar10", "--record_dir", str(bb["root"] / "record")]))
    with pytest.raises(ValueError, match="--dataset cifar10 but the record"):
        face.set_result(NAME)


def test_defend_command_accepts_a_record_folder(bb, tmp_path):
    out = tmp_path / "out"
    assert cli_main(["defend", str(bb["record"]), "--defense", "none", "--out", str(out), "--device", "cpu",
                     "--no-progress"]) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["checkpoint_sha256"] == load_attack_result(bb["record"]).model_sha256
    assert record["metrics_before"] == record["metrics_after"]


# ----------------------------------------------------------------------------------------------------------
# The drop-in, in a BackdoorBench-like checkout, as a user runs it
# ----------------------------------------------------------------------------------------------------------
def _run_script(bb_root: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OTBR_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, f"./defense/{script}", *args], cwd=bb_root, env=env,
                          capture_output=True, text=True, timeout=1200)  # generous: shared CPUs


def test_install_dropin_and_run_it_end_to_end(bb):
    root = bb["root"]
    (root / "defense" / "anp.py").write_text("# BackdoorBench's own ANP\n")
    written = install_dropin(root, datasets=["cifar10", "mnist"])
    assert (root / "defense" / "anp.py").read_text() == "# BackdoorBench's own ANP\n"  # untouched
    names = {p.relative_to(root).as_posix() for p, _ in written}
    for save in ("otbr", "otbr_anp", "otbr_fp", "otbr_clp"):
        assert f"defense/{save}.py" in names and f"config/defense/{save}/mnist.yaml" in names
    assert yaml.safe_load((root / "config/defense/otbr/mnist.yaml").read_text())["dataset"] == "mnist"
    assert all(s == "unchanged" for _, s in install_dropin(root, datasets=["cifar10", "mnist"]))
    (root / "defense" / "otbr.py").write_text("edited\n")
    with pytest.raises(FileExistsError, match="--force"):
        install_dropin(root)
    assert cli_main(["backdoorbench", "install-dropin", str(root), "--force", "--datasets", "cifar10", "mnist"]) == 0
    assert (root / "defense" / "otbr.py").read_text() == (DROPIN_DIR / "defense" / "otbr.py").read_text()

    # the template, pointed at the always-present "none" defense, exactly as a user would run it
    script = (root / "defense" / "otbr.py").read_text().replace('DEFENSE = "otbr"', 'DEFENSE = "none"') \
        .replace('SAVE_NAME = "otbr"', 'SAVE_NAME = "nodefense"')
    (root / "defense" / "nodefense.py").write_text(script)
    (root / "config" / "defense" / "nodefense").mkdir()
    (root / "config" / "defense" / "nodefense" / "mnist.yaml").write_text(
        "dataset: cifar10\ndataset_path: ./data\ndevice: auto\nrandom_seed: 0\nprogress: true\n")
    proc = _run_script(root, "nodefense.py", "--result_file", NAME, "--yaml_path", "./config/defense/nodefense/mnist.yaml",
                       "--dataset", "mnist", "--device", "cpu", "--progress", "false")
    assert proc.returncode == 0, proc.stderr
    out = root / "record" / NAME / "defense" / "nodefense"
    saved = torch.load(out / "defense_result.pt", weights_only=True)
    assert all(torch.equal(saved["model"][k], v) for k, v in bb["model"].state_dict().items())
    assert (out / "nodefense_df_summary.csv").is_file() and "ACC" in proc.stdout
    bad = _run_script(root, "nodefense.py", "--result_file", "no_such_record", "--dataset", "mnist")
    assert bad.returncode == 1 and "no_such_record" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("save", ["otbr", "otbr_anp", "otbr_fp", "otbr_clp"])
def test_dropin_script_runs_its_defense(bb, save, monkeypatch):
    from benchmark_adapters.backdoorbench.install import DROPIN_DEFENSES

    if DROPIN_DEFENSES[save] not in list_defenses():
        pytest.skip(f"defense {DROPIN_DEFENSES[save]!r} is not in this checkout")
    quick = {"otbr": ["--unlearn_steps", "2"], "otbr_anp": ["--iterations", "3", "--ratio", "0.5"],
             "otbr_fp": ["--epochs", "1", "--ratio", "0.5"], "otbr_clp": []}[save]  # CPU-test sized
    run_installed_dropin(bb["root"], save, quick, monkeypatch)


def run_installed_dropin(root: Path, save: str, quick: list[str], monkeypatch) -> None:
    """Install the drop-in ``save`` into ``root`` and run it as __main__ in this process (the subprocess path is
    covered above) with the CPU-test sized flags ``quick``; checks its outputs."""
    install_dropin(root, defenses=[save], datasets=["mnist"])
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", [f"./defense/{save}.py", "--result_file", NAME, "--yaml_path",
                                      f"./config/defense/{save}/mnist.yaml", "--dataset", "mnist", "--device", "cpu",
                                      "--progress", "false", *quick])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(root / "defense" / f"{save}.py"), run_name="__main__")
    assert info.value.code == 0
    out = root / "record" / NAME / "defense" / save
    assert set(torch.load(out / "defense_result.pt", weights_only=True)) == {"model_name", "num_classes", "model"}
    assert (out / f"{save}_df_summary.csv").is_file()


# ----------------------------------------------------------------------------------------------------------
# BackdoorBench's own flags and YAMLs (keys as in its defense/{fp,anp,clp}.py and config/defense/*/cifar10.yaml)
# ----------------------------------------------------------------------------------------------------------
BB_COMMON = {"device": "cpu", "amp": True, "pin_memory": True, "non_blocking": True, "prefetch": False,
             "checkpoint_load": None, "checkpoint_save": None, "log": None, "dataset_path": "./data",
             "dataset": "cifar10", "epochs": 100, "batch_size": 256, "num_workers": 4, "lr": 0.01,
             "lr_scheduler": "CosineAnnealingLR", "model": "preactresnet18", "client_optimizer": "sgd",
             "sgd_momentum": 0.9, "wd": 5.0e-4, "frequency_save": 0, "random_seed": 0}


def _bb_yaml(tmp_path: Path, name: str, **keys) -> Path:
    path = tmp_path / f"bb_{name}.yaml"
    path.write_text(yaml.safe_dump({**BB_COMMON, **keys}))
    return path


@pytest.mark.parametrize("defense", ["clp", "fp", "anp"])
def test_dropin_reads_backdoorbench_own_yaml(defense, tmp_path):
    keys = {"clp": {"u": 3, "u_min": 0, "u_max": 10, "u_num": 21},
            "fp": {"index": None, "acc_ratio": 0.1, "ratio": 0.05, "once_prune_ratio": 0.01, "num_classes": None,
                   "target_type": "all2one", "target_label": 0, "poison_rate": 0.1, "trigger_type": "squareTrigger"},
            "anp": {"index": None, "acc_ratio": 0.1, "ratio": 0.05, "print_every": 500, "nb_iter": 2000,
                    "anp_eps": 0.4, "anp_steps": 1, "anp_alpha": 0.2, "pruning_by": "threshold",
                    "pruning_max": 0.9, "pruning_step": 0.05}}[defense]
    face = BackdoorBenchDefense(defense, save_name=f"otbr_{defense}")
    face.configure(_face_args(face, ["--yaml_path", str(_bb_yaml(tmp_path, defense, **keys)),
                                     "--setting" if defense != "clp" else "--pairing", "backdoorbench"]))
    cfg = face.defense_obj.config
    report = "\n".join(face.bb_report())
    assert "ignored" in report and "amp" in report and "checkpoint_load" not in report  # None values drop out
    assert "num_workers" in face.bb_args.ignored  # data is held in memory: no loader workers
    if defense == "clp":
        assert "batch_size" in face.bb_args.ignored  # data-free: no batch size to set
        assert cfg.u == 3 and face.bb_args.sweep == {"u_min": 0.0, "u_max": 10.0, "u_num": 21}
        assert "u_step_df.csv" in report and "TEST" in report
    elif defense == "fp":
        assert (cfg.prune_step_ratio, cfg.epochs, cfg.batch_size, cfg.momentum, cfg.weight_decay) == (0.01, 100, 256, 0.9, 5e-4)
        assert "once_prune_ratio -> prune_step_ratio" in report and "trigger_type" in report
    else:
        assert (cfg.mask_lr, cfg.batch_size, cfg.iterations, cfg.eps, cfg.alpha, cfg.max_acc_drop) == (0.01, 256, 2000, 0.4, 0.2, 0.1)
        assert "lr -> mask_lr" in report and "nb_iter -> iterations" in report
        assert "sgd_momentum" in report.split("ignored")[1]  # BackdoorBench's ANP hard-codes its mask momentum


def test_dropin_reads_backdoorbench_own_nad_yaml(tmp_path):
    """BackdoorBench's NAD YAML holds epochs / momentum / weight_decay, which its nad.py never reads (it trains
    teacher and student for te_epochs with SGD(lr, sgd_momentum, wd)), under names that are fields of our NAD:
    in a BackdoorBench file they are BackdoorBench's, and te_epochs sets the student's epochs too."""
    nad_keys = {"index": None, "te_epochs": 10, "momentum": 0.9, "weight_decay": 1.0e-4, "ratio": 0.05,
                "beta1": 500, "beta2": 1000, "beta3": 1000, "p": 2.0, "teacher_model_loc": None}
    path = _bb_yaml(tmp_path, "nad", **nad_keys)
    face = BackdoorBenchDefense("nad", save_name="otbr_nad")
    face.configure(_face_args(face, ["--yaml_path", str(path)]))
    cfg = face.defense_obj.config
    assert (cfg.teacher_epochs, cfg.epochs, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.batch_size) == \
        (10, 10, 0.01, 0.9, 5e-4, 256)
    assert cfg.betas == [500.0, 1000.0, 1000.0]
    assert {"epochs", "momentum", "weight_decay"} <= set(face.bb_args.ignored)
    assert any("te_epochs" in line and "student" in line for line in face.bb_report())
    # the command line keeps our meaning: --epochs is the student's, --te_epochs alone sets both
    face.configure(_face_args(face, ["--yaml_path", str(path), "--epochs", "4"]))
    assert (face.defense_obj.config.teacher_epochs, face.defense_obj.config.epochs) == (10, 4)
    face.configure(_face_args(face, ["--yaml_path", str(path), "--te_epochs", "3"]))
    assert (face.defense_obj.config.teacher_epochs, face.defense_obj.config.epochs) == (3, 3)
    # a YAML of our own names (no BackdoorBench key of NAD's) keeps them as ours
    own = tmp_path / "own_nad.yaml"
    own.write_text("epochs: 7\nweight_decay: 0.001\nteacher_epochs: 2\n")
    face.configure(_face_args(face, ["--yaml_path", str(own)]))
    assert (face.defense_obj.config.epochs, face.defense_obj.config.weight_decay,
            face.defense_obj.config.teacher_epochs) == (7, 0.001, 2)


def test_backdoorbench_flags_map_to_our_options_and_cli_wins(tmp_path):
    face = BackdoorBenchDefense("anp", save_name="otbr_anp")
    path = _bb_yaml(tmp_path, "anp", nb_iter=2000, print_every=500, anp_eps=0.4)
    face.configure(_face_args(face, ["--yaml_path", str(path), "--nb_iter", "700", "--anp_eps", "0.3",
                                     "--anp_steps", "2", "--anp_alpha", "0.5", "--pruning_by", "number",
                                     "--pruning_max", "30", "--pruning_step", "3", "-pm", "false"]))
    cfg = face.defense_obj.config
    # BackdoorBench runs ceil(nb_iter / print_every) blocks of print_every iterations
    assert (cfg.iterations, cfg.eps, cfg.anp_steps, cfg.alpha) == (1000, 0.3, 2, 0.5)
    assert (cfg.pruning_by, cfg.pruning_max, cfg.pruning_step) == ("number", 30.0, 3.0)
    assert any("1000 iterations" in line for line in face.bb_report())
    assert cfg.bb_print_every == 500 and cfg.random_stream == "plugin"  # print_every places the stream's draws
    face.configure(_face_args(face, ["--yaml_path", str(path), "--nb_iter", "24", "--print_every", "24",
                                     "--random_stream", "backdoorbench"]))
    cfg = face.defense_obj.config
    assert (cfg.iterations, cfg.bb_print_every, cfg.random_stream) == (24, 24, "backdoorbench")
    fp = BackdoorBenchDefense("fp", save_name="otbr_fp")
    fp.configure(_face_args(fp, ["--acc_ratio", "0.2", "--once_prune_ratio", "0.05", "--epochs", "3", "--wd", "0.001"]))
    assert (fp.defense_obj.config.acc_ratio, fp.defense_obj.config.prune_step_ratio,
            fp.defense_obj.config.epochs, fp.defense_obj.config.weight_decay) == (0.2, 0.05, 3, 0.001)


@pytest.mark.parametrize("argv, message", [
    (["--pruning_number", "0.3"], "pruning_number is not supported"),
    (["--anp_eps", "0.3", "--eps", "0.2"], "eps=0.2 and BackdoorBench's anp_eps=0.3"),
])
def test_backdoorbench_keys_we_do_not_implement_are_named(argv, message):
    face = BackdoorBenchDefense("anp", save_name="otbr_anp")
    with pytest.raises(ValueError, match=message):
        face.configure(_face_args(face, argv))


@pytest.mark.parametrize("key, value, message", [("client_optimizer", "adam", "client_optimizer='adam'"),
                                                 ("lr_scheduler", "StepLR", "lr_scheduler='StepLR'")])
def test_fp_training_keys_we_do_not_implement_are_named(key, value, message, tmp_path):
    face = BackdoorBenchDefense("fp", save_name="otbr_fp")
    with pytest.raises(ValueError, match=re.escape(message)):
        face.configure(_face_args(face, ["--yaml_path", str(_bb_yaml(tmp_path, "fp", **{key: value}))]))


def test_install_dropin_refuses_a_folder_that_is_not_backdoorbench(tmp_path):
    (tmp_path / "defense").mkdir()
    with pytest.raises(ValueError, match="not a BackdoorBench checkout.*defense/base.py.*attack/.*utils/.*config/defense/"):
        install_dropin(tmp_path)
    assert not any((tmp_path / "defense").iterdir())  # nothing written
    assert cli_main(["backdoorbench", "install-dropin", str(tmp_path)]) == 1
    (tmp_path / "defense" / "base.py").write_text("")
    for folder in ("attack", "utils", "config/defense"):
        (tmp_path / folder).mkdir(parents=True)
    assert install_dropin(tmp_path, defenses=["otbr_clp"])


def _run_face(defense: str, argv: list[str]) -> tuple[BackdoorBenchDefense, dict]:
    face = BackdoorBenchDefense(defense, save_name=f"otbr_{defense}")
    settings = face.configure(_face_args(face, ["--result_file", NAME, "--dataset", "mnist", "--device", "cpu",
                                                "--progress", "false", *argv]))
    return face, face.defense(settings["result_file"])


def test_fp_dropin_without_oracle_never_scores_on_test_data(bb, monkeypatch, capsys):
    import otbr_plugin.bench.runner as runner

    monkeypatch.chdir(bb["root"])
    calls = []
    real = runner.evaluate_model_samples  # every test-set evaluation of the harness goes through it
    monkeypatch.setattr(runner, "evaluate_model_samples", lambda *a, **k: calls.append(1) or real(*a, **k))
    face, result = _run_face("fp", ["--setting", "backdoorbench", "--epochs", "0", "--ratio", "0.5",
                                    "--amp", "true", "--once_prune_ratio", "0.1"])
    assert len(calls) == 2  # before and after the defense: nothing in between
    out = bb["record"] / "defense" / "otbr_fp"
    log = list(csv.DictReader(open(out / "prune_log.csv", newline="")))
    assert log and "holdout_acc" in log[0] and "test_acc" not in log[0]
    record = json.loads((out / "record.json").read_text())
    assert "TEST" not in record["data_used"] and record["defense_config"]["oracle"] is False
    printed = capsys.readouterr().out
    assert "setting=backdoorbench" in printed and "oracle=False" in printed and "ignored" in printed and "amp" in printed
    saved = torch.load(out / "defense_result.pt", weights_only=True)["model"]
    assert "linear.weight_orig" in saved and "linear.weight_mask" in saved  # as BackdoorBench saves FP


def test_fp_dropin_oracle_is_labelled_and_kept_apart(bb, monkeypatch):
    monkeypatch.chdir(bb["root"])
    face, result = _run_face("fp", ["--setting", "backdoorbench", "--oracle", "true", "--epochs", "0",
                                    "--ratio", "0.5", "--once_prune_ratio", "0.25"])
    out = bb["record"] / "defense" / "otbr_fp_oracle"
    assert Path(result["save_path"]) == Path("record") / NAME / "defense" / "otbr_fp_oracle"
    assert not (bb["record"] / "defense" / "otbr_fp" / "record.json").exists()
    record = json.loads((out / "record.json").read_text())
    assert "TEST set" in record["data_used"] and record["diagnostics"]["oracle"] == "oracle diagnostic (test set)"
    log = list(csv.DictReader(open(out / "prune_log.csv", newline="")))
    assert {"test_acc", "test_asr", "test_ra", "diagnostic"} <= set(log[0])


def test_oracle_config_is_refused_outside_the_dropin(bb, tmp_path, capsys):
    assert cli_main(["defend", str(bb["record"]), "--defense", "fp", "--set", "setting=backdoorbench",
                     "--set", "oracle=true", "--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress"]) == 1
    assert "oracle: true selects on the TEST set" in capsys.readouterr().err
    assert not (tmp_path / "o" / "record.json").exists()


def test_anp_and_clp_dropins_write_backdoorbench_tables(bb, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(bb["root"])
    _run_face("anp", ["--setting", "backdoorbench", "--nb_iter", "2", "--print_every", "1", "--ratio", "0.5",
                      "--batch_size", "8"])
    rows = list(csv.DictReader(open(bb["record"] / "defense" / "otbr_anp" / "threshold_df.csv", newline="")))
    assert len(rows) == 19 and {"threshold", "value", "holdout_acc", "chosen"} <= set(rows[0])
    yaml_path = _bb_yaml(tmp_path, "clp", dataset="mnist", u=3, u_min=0, u_max=4, u_num=3)
    face, _ = _run_face("clp", ["--yaml_path", str(yaml_path), "--pairing", "backdoorbench"])
    rows = list(csv.DictReader(open(bb["record"] / "defense" / "otbr_clp" / "u_step_df.csv", newline="")))
    assert [float(r["u"]) for r in rows] == [0.0, 2.0, 4.0]
    assert {r["diagnostic"] for r in rows} == {"oracle diagnostic (test set)"} and "test_acc" in rows[0]
    assert "pairing=backdoorbench" in capsys.readouterr().out


# ------------------------------------------------------------------ BackdoorBench's own clean subset (paired seeds)
def _stdlib_draws(n: int, ratio: float, seed: int, draws: int) -> list[list[int]]:
    """BackdoorBench's fix_random + choose_index, independently: the global stream, seeded, sampled ``draws`` times."""
    import random

    state = random.getstate()
    try:
        random.seed(seed)
        return [random.sample(range(n), int(n * ratio)) for _ in range(draws)]
    finally:
        random.setstate(state)


@pytest.mark.parametrize("n, ratio, seed", [(1000, 0.05, 0), (1000, 0.05, 2), (60000, 0.05, 7), (37, 0.5, 3)])
def test_backdoorbench_stream_is_backdoorbenchs_own_draw(n, ratio, seed):
    import random

    from otbr_plugin.data.subsets import backdoorbench_stream_indices

    first, second = _stdlib_draws(n, ratio, seed, 2)
    state = random.getstate()
    assert backdoorbench_stream_indices(n, ratio, seed) == first
    assert backdoorbench_stream_indices(n, ratio, seed, draw=2) == second != first
    assert random.getstate() == state  # the global stream is left alone
    # FP uses BackdoorBench's fp.py's second draw (it logs and saves the first), ANP anp.py's first
    assert get_defense("fp").backdoorbench_draw == 2 and get_defense("anp").backdoorbench_draw == 1
    with pytest.raises(ValueError, match="0 images"):
        backdoorbench_stream_indices(10, 0.05, seed)


def test_clean_subset_backdoorbench_stream_and_given_indices():
    from types import SimpleNamespace

    from otbr_plugin.data.subsets import clean_defense_subset

    n = 40  # image i holds the value i
    train = SimpleNamespace(images=torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous(),
                            labels=torch.arange(n) % 10, split="train")
    second = _stdlib_draws(n, 0.25, 5, 2)[1]
    sub = clean_defense_subset(train, 0.25, 5, "backdoorbench_stream", draw=2)
    assert sub.images[:, 0, 0, 0].tolist() == second  # BackdoorBench's order kept
    given = clean_defense_subset(train, 0.25, 5, "stratified", indices=[7, 3, 39])
    assert given.images[:, 0, 0, 0].tolist() == [7, 3, 39]
    with pytest.raises(ValueError, match="index 40 is out of range"):
        clean_defense_subset(train, 0.25, 5, indices=[1, 40])
    with pytest.raises(ValueError, match="sampling must be one of"):
        clean_defense_subset(train, 0.25, 5, "shuffled")


@pytest.mark.parametrize("text, message", [
    ("3\n1.5\n", "line 2: '1.5' is not an integer"),
    ("", "no indices"),
    ("# only a comment\n", "no indices"),
    ("4\n2\n4\n", "index 4 appears more than once"),
    ("-1\n", "index -1 is out of range"),
    ("0x10\n", "'0x10' is not an integer"),
])
def test_index_file_errors(tmp_path, text, message):
    from otbr_plugin.data.subsets import read_index_file

    path = tmp_path / "index.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        read_index_file(path)


def test_index_file_is_read_as_text_never_unpickled(tmp_path):
    import pickle

    from otbr_plugin.data.subsets import read_index_file

    good = tmp_path / "index.txt"
    good.write_text("# BackdoorBench's np.savetxt writes one per line\n12\n 3\n7 8\n")
    assert read_index_file(good) == [12, 3, 7, 8]
    bad = tmp_path / "index.pkl"
    bad.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="--index .*index.pkl"):
        read_index_file(bad)
    with pytest.raises(ValueError, match="cannot read"):
        read_index_file(tmp_path / "missing.txt")


def test_index_flag_is_read_by_the_face(tmp_path):
    path = tmp_path / "index.txt"
    path.write_text("5\n1\n")
    face = BackdoorBenchDefense("anp", save_name="otbr_anp")
    face.configure(_face_args(face, ["--index", str(path)]))
    assert face.clean_indices == [5, 1] and any("2 training images" in line for line in face.bb_report())
    (tmp_path / "bad.txt").write_text("5\nfive\n")
    with pytest.raises(ValueError, match="'five' is not an integer"):
        face.configure(_face_args(face, ["--index", str(tmp_path / "bad.txt")]))
    clp = BackdoorBenchDefense("clp", save_name="otbr_clp")  # data-free: accepted, reported as ignored
    clp.configure(_face_args(clp, ["--index", str(path)]))
    assert clp.clean_indices is None and "index" in clp.bb_args.ignored


def _capture_subsets(monkeypatch) -> list:
    import otbr_plugin.bench.runner as runner

    seen = []
    real = runner.clean_defense_subset

    def spy(train, ratio, seed, sampling, **kw):
        seen.append((train, seed, sampling, kw, real(train, ratio, seed, sampling, **kw)))
        return seen[-1][-1]

    monkeypatch.setattr(runner, "clean_defense_subset", spy)
    return seen


def test_dropin_draws_backdoorbenchs_subset_and_takes_index(bb, monkeypatch, tmp_path):
    monkeypatch.chdir(bb["root"])
    seen = _capture_subsets(monkeypatch)
    _run_face("fp", ["--setting", "backdoorbench", "--subset_sampling", "backdoorbench_stream", "--epochs", "0",
                     "--ratio", "0.5", "--once_prune_ratio", "0.25", "--random_seed", "3"])
    train, seed, sampling, kw, sub = seen[-1]
    n = len(train.labels)
    assert (seed, sampling, kw["draw"], kw["indices"]) == (3, "backdoorbench_stream", 2, None)
    assert torch.equal(sub.images, train.images[_stdlib_draws(n, 0.5, 3, 2)[1]])
    index = tmp_path / "index.txt"
    index.write_text("\n".join(map(str, [n - 1, 0, 5, 2])) + "\n")
    _run_face("anp", ["--setting", "backdoorbench", "--nb_iter", "1", "--print_every", "1", "--batch_size", "4",
                      "--index", str(index)])
    train, _, _, kw, sub = seen[-1]
    assert kw["indices"] == [n - 1, 0, 5, 2] and torch.equal(sub.images, train.images[[n - 1, 0, 5, 2]])
    record = json.loads((bb["record"] / "defense" / "otbr_anp" / "record.json").read_text())
    assert record["data"]["clean_indices"] == [n - 1, 0, 5, 2]


def test_dropin_fp_takes_backdoorbench_cos_t_max(tmp_path):
    keys = {"acc_ratio": 0.1, "ratio": 0.05, "once_prune_ratio": 0.01}
    face = BackdoorBenchDefense("fp", save_name="otbr_fp")
    face.configure(_face_args(face, ["--yaml_path", str(_bb_yaml(tmp_path, "fp", **keys)), "--setting", "backdoorbench"]))
    assert face.defense_obj.config.cos_t_max == 100  # BackdoorBench's YAML has none: its factory's T_max 100
    assert "cos_t_max" in "\n".join(face.bb_report())  # the lr_scheduler note names the option
    face = BackdoorBenchDefense("fp", save_name="otbr_fp")
    face.configure(_face_args(face, ["--yaml_path", str(_bb_yaml(tmp_path, "fp", cos_t_max=2, **keys)),
                                     "--setting", "backdoorbench"]))
    assert face.defense_obj.config.cos_t_max == 2  # BackdoorBench's YAML key
    face = BackdoorBenchDefense("fp", save_name="otbr_fp")
    face.configure(_face_args(face, ["--yaml_path", str(_bb_yaml(tmp_path, "fp", cos_t_max=2, **keys)),
                                     "--setting", "backdoorbench", "--cos_t_max", "0"]))
    assert face.defense_obj.config.cos_t_max == 0  # the command line wins; 0: ours, per iteration
    face = BackdoorBenchDefense("fp", save_name="otbr_fp")
    with pytest.raises(ValueError, match="cos_t_max must be an integer >= 1"):
        face.configure(_face_args(face, ["--yaml_path", str(_bb_yaml(tmp_path, "fp", cos_t_max=-2, **keys))]))
