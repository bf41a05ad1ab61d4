"""Issue 14, hardening: one test per probe. Each reproduces the probe as it was reported and fails on the code
before the fix (reads outside a record, stale or lost cells, silently wrong metrics, tracebacks, unsafe config)."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch
import yaml

from benchmark_adapters.backdoorbench import AttackResultError, load_attack_result
from benchmark_adapters.backdoorbench.face import BackdoorBenchDefense
from benchmark_adapters.backdoorbench.safe_load import safe_torch_load
from benchmark_adapters.bundle import BundleError, load_bundle, save_bundle
from otbr_plugin.bench import grid as grid_module
from otbr_plugin.bench.executors import run_grid
from otbr_plugin.bench.grid import load_grid
from otbr_plugin.bench.jobs import record_failure
from otbr_plugin.aggregate.records import read_record, run_fingerprint, write_record
from otbr_plugin.cli import main
from otbr_plugin.config import parse_overrides
from test_backdoorbench import make_bb_tree
from test_grid import grid_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _edit_attack_result(record: Path, edit) -> None:
    raw = torch.load(record / "attack_result.pt", weights_only=False)
    edit(raw)
    torch.save(raw, record / "attack_result.pt", pickle_protocol=2)


# ----------------------------------------------------------------------------------------------------------
# 1. No read outside a BackdoorBench record
# ----------------------------------------------------------------------------------------------------------
def test_record_cannot_borrow_its_images_from_a_sibling_record(tmp_path):
    tree = make_bb_tree(tmp_path / "BB", name="good")
    good = tree["record"]
    evil = good.parent / "evil"
    evil.mkdir()
    shutil.copy(good / "attack_result.pt", evil / "attack_result.pt")

    def point_at_sibling(raw):
        cont = raw["bd_test"]["bd_data_container"]
        cont["save_folder_path"] = ".."
        raw["bd_test"]["save_folder_path"] = ".."
        for idx, entry in cont["data_dict"].items():
            entry["path"] = f"../good/bd_test_dataset/{entry['other_info'][1]}/{idx}.png"

    _edit_attack_result(evil, point_at_sibling)
    with pytest.raises(AttackResultError, match="save_folder_path|outside the record"):
        load_attack_result(evil)


def test_symlinked_image_or_folder_outside_the_record_is_refused(tmp_path):
    tree = make_bb_tree(tmp_path / "BB")
    record = tree["record"]
    png = next((record / "bd_test_dataset").rglob("*.png"))
    outside = tmp_path / "outside.png"
    shutil.copy(png, outside)
    png.unlink()
    png.symlink_to(outside)
    with pytest.raises(AttackResultError, match="outside the record"):
        load_attack_result(record)
    png.unlink()
    shutil.copy(outside, png)
    load_attack_result(record)  # as written: fine

    moved = tmp_path / "elsewhere"
    shutil.move(str(record / "bd_test_dataset"), moved)
    (record / "bd_test_dataset").symlink_to(moved, target_is_directory=True)
    with pytest.raises(AttackResultError, match="outside the record"):
        load_attack_result(record)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height (8-bit grey): enough for PIL.Image.open to see its size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_decompression_bomb_png_is_a_clear_error(tmp_path):
    tree = make_bb_tree(tmp_path / "BB")
    png = next((tree["record"] / "bd_test_dataset").rglob("*.png"))
    png.write_bytes(_png_header(20000, 20000))
    with pytest.raises(AttackResultError, match="too large"):
        load_attack_result(tree["record"])


# ----------------------------------------------------------------------------------------------------------
# 2. No stale cells
# ----------------------------------------------------------------------------------------------------------
SMALL_OTBR = {"unlearn_steps": 1, "unlearn_batch_size": 8}


def _otbr_grid(tmp_path):
    path = grid_file(tmp_path, ["none"])
    raw = yaml.safe_load(path.read_text())
    raw["defenses"] = {"none": None, "otbr": SMALL_OTBR}
    path.write_text(yaml.safe_dump(raw))
    return path


def test_changed_defense_or_attack_config_reruns_the_cell(tmp_path):
    path = _otbr_grid(tmp_path)
    out = tmp_path / "out"
    run_grid(load_grid(path), out, progress=False, log=lambda s: None)
    record = out / "records" / "fashion_mnist__smallcnn__badnets__otbr__seed0.json"
    assert read_record(record).fingerprint

    logs: list[str] = []
    results = run_grid(load_grid(path, {"defense_overrides": {"otbr": {"gamma": 0.5}}}), out, progress=False,
                       log=logs.append)
    assert {(r.defense, r.status) for r in results} == {("none", "skipped"), ("otbr", "ok")}
    assert read_record(record).defense_config["gamma"] == 0.5
    assert any("otbr" in line and "gamma" in line and "running again" in line for line in logs)

    logs.clear()
    results = run_grid(load_grid(path, {"attack_overrides": {"train": {"epochs": 2}}}), out, progress=False,
                       log=logs.append)
    assert {r.status for r in results} == {"ok"}, results
    assert read_record(record).attack_config["train"]["epochs"] == 2
    assert any("epochs" in line for line in logs)

    results = run_grid(load_grid(path, {"attack_overrides": {"train": {"epochs": 2}}}), out, progress=False,
                       log=lambda s: None)
    assert {r.status for r in results} == {"skipped"}


def test_committed_records_without_fingerprint_stay_reusable():
    grid = load_grid(REPO / "configs" / "bench" / "fashion_mnist.yaml")
    records = REPO / "results" / "fashion_mnist" / "records"
    stale = {}
    for attack in grid.attacks:
        cfg = grid_module.attack_fingerprint_config(grid, attack, 0)
        for label in grid.defenses:
            path = records / f"fashion_mnist__preactresnet18__{attack}__{label}__seed0.json"
            assert path.exists(), path
            reason = grid_module.stale_reason(grid, path, cfg, label, None)
            if reason is not None:
                stale[path.name] = reason
    assert not stale
    # ... but not when the defense config differs from the one they were made with
    other = load_grid(REPO / "configs" / "bench" / "fashion_mnist.yaml", {"defense_overrides": {"otbr": {"gamma": 0.5}}})
    path = records / "fashion_mnist__preactresnet18__badnets__otbr__seed0.json"
    assert "gamma" in grid_module.stale_reason(other, path, grid_module.attack_fingerprint_config(other, "badnets", 0),
                                               "otbr", None)
    assert "checkpoint" in grid_module.stale_reason(grid, path, {}, "otbr", "0" * 64)


def test_options_added_later_at_their_default_keep_records_reusable(tmp_path):
    """A record written before a config class gained an option (OTBR's `ranking`, training's `bf16`; removed
    here, fingerprint as it was then) is reused while the grid leaves the option at its default, and runs again
    when the grid asks for another value."""
    path = _otbr_grid(tmp_path)
    out = tmp_path / "out"
    run_grid(load_grid(path), out, progress=False, log=lambda s: None)
    rpath = out / "records" / "fashion_mnist__smallcnn__badnets__otbr__seed0.json"
    record = read_record(rpath)
    del record.defense_config["ranking"]
    del record.attack_config["train"]["bf16"]
    record.fingerprint = run_fingerprint(record.attack_config, {"name": "otbr", "config": record.defense_config},
                                         record.checkpoint_sha256, {"clean_ratio": load_grid(path).clean_ratio})
    write_record(record, rpath)
    grid = load_grid(path)
    cfg = grid_module.attack_fingerprint_config(grid, "badnets", 0)
    assert grid_module.stale_reason(grid, rpath, cfg, "otbr", None) is None
    layer = load_grid(path, {"defense_overrides": {"otbr": {"ranking": "layer"}}})
    assert "ranking" in grid_module.stale_reason(layer, rpath, cfg, "otbr", None)
    bf16 = {**cfg, "train": {**cfg["train"], "bf16": True}}
    assert "bf16" in grid_module.stale_reason(grid, rpath, bf16, "otbr", None)
    results = run_grid(grid, out, progress=False, log=lambda s: None)
    assert {r.status for r in results} == {"skipped"}
    # a cached bundle trained before `bf16` existed is reused as well
    assert not grid_module.training_changes({**cfg, "train": {k: v for k, v in cfg["train"].items() if k != "bf16"}},
                                            "cpu", cfg, torch.device("cpu"))


def test_two_records_of_one_cell_are_an_error_in_table(tmp_path, capsys):
    src = REPO / "results" / "fashion_mnist" / "records" / "fashion_mnist__preactresnet18__badnets__otbr__seed0.json"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(src, tmp_path / "a" / src.name)
    shutil.copy(src, tmp_path / "b" / "copy.json")
    assert main(["table", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "copy.json" in err and "one record per" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------
# 3. Two runs on one --out
# ----------------------------------------------------------------------------------------------------------
def test_second_run_on_a_locked_folder_stops_at_once(tmp_path, capsys):
    path = grid_file(tmp_path, ["none"])
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "a+") as fh:  # what a first, still running process holds
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["bench", str(path), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "in use by another" in err and str(out) in err
    assert not (out / "bundles").exists() and not (out / "records").exists()
    assert main(["bench", str(path), "--out", str(out), "--no-progress"]) == 0  # released: runs


def test_ok_record_is_never_overwritten_by_a_failed_one(tmp_path):
    path = grid_file(tmp_path, ["none"])
    out = tmp_path / "out"
    grid = load_grid(path)
    run_grid(grid, out, progress=False, log=lambda s: None)
    record = out / "records" / "fashion_mnist__smallcnn__badnets__none__seed0.json"
    before = record.read_text()
    record_failure(grid, "badnets", "none", 0, record, None, FileExistsError("bundle exists"))
    assert record.read_text() == before and read_record(record).status == "ok"


# ----------------------------------------------------------------------------------------------------------
# 4. A config file cannot switch on unsafe unpickling
# ----------------------------------------------------------------------------------------------------------
def test_trust_checkpoint_in_yaml_is_refused_and_the_flag_warns(tmp_path, capsys):
    tree = make_bb_tree(tmp_path / "BB")
    cfg = tmp_path / "otbr.yaml"
    cfg.write_text("trust_checkpoint: true\ndevice: cpu\n")
    face = BackdoorBenchDefense("none")
    with pytest.raises(ValueError, match="trust_checkpoint.*command line"):
        face.configure({"yaml_path": str(cfg), "result_file": str(tree["record"])})
    cfg.write_text("trust_checkpoint: false\ndevice: cpu\n")  # false is harmless
    face.configure({"yaml_path": str(cfg)})
    capsys.readouterr()
    safe_torch_load(tree["record"] / "attack_result.pt", trust=True)
    err = capsys.readouterr().err
    assert "WARNING" in err and str(tree["record"] / "attack_result.pt") in err


# ----------------------------------------------------------------------------------------------------------
# 5. No silently wrong metric
# ----------------------------------------------------------------------------------------------------------
def _edit_meta(bundle: Path, edit) -> None:
    meta = json.loads((bundle / "meta.json").read_text())
    edit(meta)
    (bundle / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["dataset"].update(mean=[float("nan")]), "dataset.mean must be"),
    (lambda m: m["dataset"].update(std=[0.0]), "dataset.std must be positive"),
    (lambda m: m["dataset"].update(input_shape=None), "dataset.input_shape must be"),
    (lambda m: m["dataset"].update(input_shape=[1, 32, 32]), "dataset.input_shape must be"),
    (lambda m: m.update(attack="x"), "'attack' must be an object"),
    (lambda m: m["model"].update(in_channels=3), "model.in_channels must be 1"),
])
def test_bad_meta_values_are_refused(tiny_fashion_bundle, edit, message):
    bundle, _ = tiny_fashion_bundle
    _edit_meta(bundle, edit)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


def test_meta_json_is_covered_by_a_digest_and_old_bundles_still_load(tiny_fashion_bundle):
    bundle, _ = tiny_fashion_bundle
    from safetensors.torch import load_file, save_file

    from otbr_plugin.io import sha256_file

    good = (bundle / "meta.json").read_text()
    _edit_meta(bundle, lambda m: m["dataset"].update(mean=[0.4]))  # valid, but not what was written
    with pytest.raises(BundleError, match="changed after the bundle was written"):
        load_bundle(bundle)
    (bundle / "meta.json").write_text(good)
    load_bundle(bundle)
    # an older bundle (no digest in bd_test.safetensors) is still read
    save_file(load_file(str(bundle / "bd_test.safetensors")), str(bundle / "bd_test.safetensors"))
    _edit_meta(bundle, lambda m: m["files"].update({"bd_test.safetensors": sha256_file(bundle / "bd_test.safetensors")}))
    assert load_bundle(bundle).dataset == "fashion_mnist"


def test_bd_test_targets_outside_the_classes_are_refused(tiny_fashion_bundle, tmp_path):
    bundle = load_bundle(tiny_fashion_bundle[0])
    bundle.bd_test.targets[:] = 12
    path = save_bundle(bundle, tmp_path / "b")
    with pytest.raises(BundleError, match="targets must be class labels in \\[0, 9\\]"):
        load_bundle(path)


def test_record_with_a_wrongly_typed_metric_is_refused_on_read(tmp_path, capsys):
    src = REPO / "results" / "fashion_mnist" / "records" / "fashion_mnist__preactresnet18__badnets__otbr__seed0.json"
    data = json.loads(src.read_text())
    data["metrics_after"]["asr"] = "high"
    (tmp_path / src.name).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="metrics_after.asr"):
        read_record(tmp_path / src.name)
    assert main(["table", str(tmp_path)]) == 1
    assert "metrics_after.asr" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# 6. One line instead of a traceback
# ----------------------------------------------------------------------------------------------------------
def _defend(bundle, root, out, *extra):
    return main(["defend", str(bundle), "--defense", "none", "--out", str(out), "--data-root", str(root),
                 "--device", "cpu", "--no-progress", *extra])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_three_channel_bundle_on_one_channel_data_is_one_line(tiny_fashion_bundle, tmp_path, capsys):
    bundle, root = tiny_fashion_bundle
    _edit_meta(bundle, lambda m: m["model"].update(in_channels=3))
    assert _defend(bundle, root, tmp_path / "o") == 1
    assert "in_channels" in _one_error_line(capsys)


def test_unavailable_device_is_one_line(tiny_fashion_bundle, tmp_path, capsys):
    bundle, root = tiny_fashion_bundle
    if torch.accelerator.is_available() and torch.accelerator.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert main(["defend", str(bundle), "--defense", "none", "--out", str(tmp_path / "o"), "--data-root", str(root),
                 "--device", "cuda:7", "--no-progress"]) == 1
    assert "cuda:7" in _one_error_line(capsys)


def test_record_file_holding_a_list_does_not_abort_the_grid(tmp_path):
    path = grid_file(tmp_path, ["none"])
    out = tmp_path / "out"
    run_grid(load_grid(path), out, progress=False, log=lambda s: None)
    record = out / "records" / "fashion_mnist__smallcnn__badnets__none__seed0.json"
    record.write_text("[]")
    results = run_grid(load_grid(path), out, progress=False, log=lambda s: None)
    assert [r.status for r in results] == ["ok"] and read_record(record).status == "ok"


def test_deeply_nested_meta_is_one_line(tiny_fashion_bundle, tmp_path, capsys):
    bundle, root = tiny_fashion_bundle
    (bundle / "meta.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(BundleError, match="nested too deeply"):
        load_bundle(bundle)
    assert _defend(bundle, root, tmp_path / "o") == 1
    assert "meta.json" in _one_error_line(capsys)


def test_defend_refuses_an_out_holding_a_result_before_any_work(tiny_fashion_bundle, tmp_path, monkeypatch, capsys):
    bundle, root = tiny_fashion_bundle
    out = tmp_path / "o"
    assert _defend(bundle, root, out) == 0
    capsys.readouterr()

    def must_not_run(*a, **k):
        raise AssertionError("the defense ran although --out already holds a result")

    import otbr_plugin.commands.defend as defend_command

    monkeypatch.setattr(defend_command, "run_defense", must_not_run)
    monkeypatch.setattr(defend_command, "load_for_defense", must_not_run)
    assert _defend(bundle, root, out) == 1
    assert "--overwrite" in _one_error_line(capsys)


def test_old_format_pickle_error_says_why(tmp_path, capsys):
    path = tmp_path / "attack_result.pt"
    with open(path, "wb") as fh:
        pickle.dump({"model": {1, 2}}, fh, protocol=4)
    with pytest.raises(AttackResultError) as info:
        safe_torch_load(path)
    assert "see the chained error" not in str(info.value) and "Unsupported operand" in str(info.value)


def test_unexpected_error_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    import otbr_plugin.commands.info as info

    def boom(args):
        raise RuntimeError("conv2d: expected input with 1 channel")

    monkeypatch.setattr(info, "_models", boom)  # register() reads it when the parser is built
    assert main(["models"]) == 1
    assert "conv2d" in _one_error_line(capsys)
    with pytest.raises(RuntimeError):
        main(["models", "--debug"])


# ----------------------------------------------------------------------------------------------------------
# 7. Scientific notation and permissions
# ----------------------------------------------------------------------------------------------------------
def test_scientific_notation_parses_as_a_number(tmp_path):
    assert parse_overrides(["lr=1e-4", "x=5E3", "y=.5e1"]) == {"lr": 1e-4, "x": 5000.0, "y": 5.0}
    from otbr_plugin.config import load_yaml

    (tmp_path / "c.yaml").write_text("lr: 1e-4\nname: 1e\n")
    assert load_yaml(tmp_path / "c.yaml") == {"lr": 1e-4, "name": "1e"}


def test_outputs_follow_the_umask(tiny_fashion_bundle, tmp_path):
    old = os.umask(0o022)
    try:
        bundle = save_bundle(load_bundle(tiny_fashion_bundle[0]), tmp_path / "b")
        from otbr_plugin.io import write_json

        record = write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert bundle.stat().st_mode & 0o777 == 0o755
    assert record.stat().st_mode & 0o777 == 0o644
