"""Attack zoo: triggers checked exactly on small tensors, poison bookkeeping, label modes, the attack CLI."""

from __future__ import annotations

import gzip
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from otbr_plugin.attacks import (
    BadNets,
    Blended,
    PoisonedTrainSet,
    SIG,
    WaNet,
    attack_targets,
    create_attack,
    get_attack,
    list_attacks,
    select_poison_indices,
)
from otbr_plugin.attacks import triggers as T
from otbr_plugin.attacks.runner import parse_attack_run
from otbr_plugin.cli import main


def rand_images(n: int, c: int, h: int, w: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w or h), generator=g, dtype=torch.int64).to(torch.uint8)


def balanced_labels(n: int, k: int = 10) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64) % k


# ------------------------------------------------------------------------------------------------ registry
def test_registry_lists_the_attacks_and_rejects_unknown_names():
    assert {"badnets", "blended", "sig", "wanet", "inputaware", "lf", "trojannn", "ssba"} <= set(list_attacks())
    assert get_attack("BadNets") is BadNets
    with pytest.raises(ValueError, match="unknown attack 'nope'.*badnets"):
        get_attack("nope")


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("badnets", {"poison_ratio": 0.0}, "poison_ratio"),
        ("badnets", {"poison_ratio": 1.5}, "poison_ratio"),
        ("badnets", {"label_mode": "all2some"}, "label_mode"),
        ("badnets", {"target_class": -1}, "target_class"),
        ("badnets", {"patch_value": 300}, "patch_value"),
        ("badnets", {"corner": "middle"}, "corner"),
        ("badnets", {"colour": 3}, "unknown key"),
        ("blended", {"alpha": 0.0}, "alpha"),
        ("blended", {"alpha": "high"}, "alpha"),
        ("sig", {"label_mode": "all2all"}, "clean-label"),
        ("sig", {"delta": -5}, "delta"),
        ("wanet", {"k": 0}, "k must be"),
        ("wanet", {"s": -1}, "s must be"),
        ("wanet", {"cross_ratio": -0.5}, "cross_ratio"),
        ("wanet", {"seed": 1.5}, "seed"),
    ],
)
def test_bad_config_values_raise_clear_errors(name, params, message):
    with pytest.raises(ValueError, match=message):
        create_attack(name, params)


def test_config_defaults_follow_backdoorbench():
    assert BadNets().config.patch_size is None and BadNets().config.patch_value == 255
    assert Blended().config.alpha == 0.2
    sig = SIG().config
    assert (sig.delta, sig.frequency) == (20.0, 6.0)
    w = WaNet().config
    assert (w.k, w.s, w.grid_rescale, w.cross_ratio, w.noise_mode) == (4, 0.5, 1.0, 2.0, True)
    for name in list_attacks():
        cfg = create_attack(name).config
        assert (cfg.target_class, cfg.label_mode, cfg.poison_ratio) == (0, "all2one", 0.1)


# ------------------------------------------------------------------------------------------------ BadNets
@pytest.mark.parametrize("c, size", [(1, 28), (3, 32), (3, 64), (1, 8)])
def test_badnets_patch_pixels_and_location(c, size):
    x = rand_images(3, c, size)
    out = BadNets().apply_trigger(x)
    side = {28: 3, 32: 3, 64: 6, 8: 1}[size]
    assert T.scaled_patch_size(size) == side
    assert torch.all(out[:, :, size - side :, size - side :] == 255)
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[size - side :, size - side :] = True
    assert torch.equal(out[:, :, ~mask], x[:, :, ~mask])
    assert torch.equal(x, rand_images(3, c, size)), "the input must not be modified"


def test_badnets_explicit_patch_corner_margin_and_value():
    x = torch.zeros(2, 3, 10, 10, dtype=torch.uint8)
    out = BadNets({"patch_size": 2, "corner": "top_left", "margin": 1, "patch_value": 200}).apply_trigger(x)
    expected = torch.zeros(10, 10, dtype=torch.uint8)
    expected[1:3, 1:3] = 200
    assert torch.equal(out, expected.expand(2, 3, 10, 10))
    with pytest.raises(ValueError, match="does not fit"):
        BadNets({"patch_size": 10, "margin": 1}).apply_trigger(x)


def test_triggers_reject_non_uint8_or_bad_shapes():
    with pytest.raises(ValueError, match="uint8"):
        BadNets().apply_trigger(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        BadNets().apply_trigger(torch.zeros(1, 2, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        WaNet().apply_trigger(torch.zeros(8, 8, dtype=torch.uint8))


# ------------------------------------------------------------------------------------------------ Blended
@pytest.mark.parametrize("c, size", [(1, 28), (3, 32)])
def test_blend_formula_exact(c, size):
    x = rand_images(4, c, size, seed=1)
    attack = Blended({"alpha": 0.2, "pattern_seed": 7})
    out = attack.apply_trigger(x)
    t = attack.pattern((c, size, size))
    assert t.dtype == torch.uint8 and t.shape == (c, size, size)
    expected = np.round(0.8 * x.numpy().astype(np.float64) + 0.2 * t.numpy().astype(np.float64)[None])
    np.testing.assert_array_equal(out.numpy(), expected.astype(np.uint8))


def test_blend_noise_pattern_is_seeded_and_alpha_one_gives_the_pattern():
    a = T.noise_pattern((3, 16, 16), seed=3)
    assert torch.equal(a, T.noise_pattern((3, 16, 16), seed=3))
    assert not torch.equal(a, T.noise_pattern((3, 16, 16), seed=4))
    assert int(a.min()) < 20 and int(a.max()) > 235  # spans the uint8 range: a uniform noise pattern
    x = rand_images(2, 3, 16)
    assert torch.equal(T.blend(x, a, 1.0), a.expand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="pattern must be uint8 of shape"):
        T.blend(x, a[:1], 0.2)


def test_blend_with_an_image_file(tmp_path):
    from PIL import Image

    rgb = rand_images(1, 3, 12, seed=5)[0]
    path = tmp_path / "trigger.png"
    Image.fromarray(rgb.permute(1, 2, 0).numpy(), "RGB").save(path)
    attack = Blended({"trigger_image": str(path), "alpha": 0.5})
    assert torch.equal(attack.pattern((3, 12, 12)), rgb)
    grey = attack.pattern((1, 24, 24))
    assert grey.shape == (1, 24, 24) and grey.dtype == torch.uint8
    x = rand_images(2, 3, 12)
    expected = np.round(0.5 * x.numpy().astype(np.float64) + 0.5 * rgb.numpy().astype(np.float64)[None])
    np.testing.assert_array_equal(attack.apply_trigger(x).numpy(), expected.astype(np.uint8))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Blended({"trigger_image": str(tmp_path / "missing.png")}).apply_trigger(x)


# ------------------------------------------------------------------------------------------------ SIG
@pytest.mark.parametrize("c, size", [(1, 28), (3, 32)])
def test_sig_signal_exact(c, size):
    x = rand_images(3, c, size, seed=2)
    out = SIG().apply_trigger(x)
    j = np.arange(size, dtype=np.float64)
    v = 20.0 * np.sin(2 * np.pi * j * 6.0 / size)
    ref = x.numpy().astype(np.float64) + v[None, None, None, :]
    expected = np.clip(np.round(ref), 0, 255)
    near_half = np.abs(np.abs(ref - np.floor(ref)) - 0.5) < 1e-4  # float32 vs float64 rounding ties
    assert near_half.mean() < 0.01
    np.testing.assert_array_equal(out.numpy()[~near_half], expected[~near_half].astype(np.uint8))
    # a horizontal signal: the added value depends on the column only
    zeros = torch.full((1, c, size, size), 128, dtype=torch.uint8)
    sig = SIG().apply_trigger(zeros)
    assert torch.equal(sig, sig[:, :, :1, :].expand_as(sig))
    assert not torch.equal(sig[..., 0], sig[..., 1])


def test_sig_poisons_only_target_class_training_images_and_keeps_labels():
    n = 200
    x = rand_images(n, 1, 28)
    y = balanced_labels(n)
    attack = SIG({"target_class": 3, "poison_ratio": 0.05})
    p = attack.poison_train(x, y, 10)
    assert p.poison_count == round(0.05 * n) == 10
    assert torch.all(y[p.poison_indices] == 3)
    assert torch.equal(p.labels, y) and torch.equal(p.original_labels, y)
    assert torch.equal(p.images[p.poison_indices], T.apply_sig(x[p.poison_indices], 20.0, 6.0))
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[p.poison_indices] = False
    assert torch.equal(p.images[untouched], x[untouched])
    # all target-class images at the default ratio (10% of a balanced 10-class set)
    full = SIG({"target_class": 3}).poison_train(x, y, 10)
    assert torch.equal(full.poison_indices, torch.nonzero(y == 3).flatten())
    with pytest.raises(ValueError, match="only 20 training samples of class 3"):
        SIG({"target_class": 3, "poison_ratio": 0.2}).poison_train(x, y, 10)


def test_sig_test_set_uses_every_non_target_image_and_optional_test_delta():
    x = rand_images(50, 1, 28)
    y = balanced_labels(50)
    bd = SIG({"delta_test": 40}).poison_test(x, y, 10)
    keep = torch.nonzero(y != 0).flatten()
    assert torch.equal(bd.original_indices, keep)
    assert torch.equal(bd.images, T.apply_sig(x[keep], 40.0, 6.0))
    assert torch.all(bd.targets == 0) and torch.equal(bd.original_labels, y[keep])


# ------------------------------------------------------------------------------------------------ WaNet
def test_wanet_identity_when_strength_is_zero():
    for c, size in ((1, 28), (3, 32)):
        x = rand_images(5, c, size)
        assert torch.equal(WaNet({"s": 0.0}).apply_trigger(x), x)
        assert torch.equal(T.warp(x, T.identity_grid(size, size)), x)


def test_wanet_warp_is_deterministic_for_a_seed_and_changes_with_it():
    x = rand_images(6, 3, 32)
    a = WaNet({"trigger_seed": 1}).apply_trigger(x)
    b = WaNet({"trigger_seed": 1}).apply_trigger(x)
    c = WaNet({"trigger_seed": 2}).apply_trigger(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a != x).float().mean() > 0.5  # a real warp on random images moves most pixels
    grid = WaNet().grid(32, 32)
    assert grid.shape == (1, 32, 32, 2) and float(grid.abs().max()) <= 1.0
    # the displacement is s * P / H with P normalised to mean |P| = 1
    disp = grid - T.identity_grid(32, 32)
    assert math.isclose(float(disp.abs().mean()), 0.5 / 32, rel_tol=0.35)


def test_wanet_noise_grid_follows_the_paper():
    p = T.wanet_noise_grid(4, 16, 16, seed=0)
    assert p.shape == (1, 16, 16, 2)
    gen = torch.Generator().manual_seed(0)
    ins = torch.rand(1, 2, 4, 4, generator=gen) * 2 - 1
    ins = ins / ins.abs().mean()
    # align_corners upsampling keeps the control points at the corners
    assert torch.allclose(p[0, 0, 0], ins[0, :, 0, 0], atol=1e-5)
    assert torch.allclose(p[0, -1, -1], ins[0, :, -1, -1], atol=1e-5)


def test_wanet_training_set_poison_and_noise_mode_bookkeeping():
    n = 300
    x = rand_images(n, 1, 28)
    y = balanced_labels(n)
    attack = WaNet({"poison_ratio": 0.1, "seed": 4})
    p = attack.poison_train(x, y, 10)
    assert p.poison_count == 30 and p.cross_indices.numel() == 60
    assert not set(p.poison_indices.tolist()) & set(p.cross_indices.tolist())
    assert torch.equal(p.images[p.poison_indices], attack.apply_trigger(x[p.poison_indices]))
    assert torch.all(p.labels[p.poison_indices] == 0)
    assert torch.equal(p.labels[p.cross_indices], y[p.cross_indices])  # noise mode keeps labels
    cross = p.images[p.cross_indices]
    assert not torch.equal(cross, x[p.cross_indices])
    assert not torch.equal(cross, attack.apply_trigger(x[p.cross_indices]))
    rest = torch.ones(n, dtype=torch.bool)
    rest[p.poison_indices] = False
    rest[p.cross_indices] = False
    assert torch.equal(p.images[rest], x[rest]) and torch.equal(p.labels[rest], y[rest])
    again = WaNet({"poison_ratio": 0.1, "seed": 4}).poison_train(x, y, 10)
    assert torch.equal(again.images, p.images) and torch.equal(again.cross_indices, p.cross_indices)
    off = WaNet({"noise_mode": False}).poison_train(x, y, 10)
    assert off.cross_indices.numel() == 0
    with pytest.raises(ValueError, match="noise-mode samples"):
        WaNet({"poison_ratio": 0.5, "cross_ratio": 2.0}).poison_train(x, y, 10)


# ------------------------------------------------------------------------------------------------ bookkeeping
@pytest.mark.parametrize("name", ["badnets", "blended", "wanet"])
def test_dirty_label_poison_ratio_and_index_bookkeeping(name):
    n = 500
    x = rand_images(n, 3, 16)
    y = balanced_labels(n)
    attack = create_attack(name, {"poison_ratio": 0.1, "seed": 11, "target_class": 2})
    p = attack.poison_train(x, y, 10)
    assert isinstance(p, PoisonedTrainSet)
    assert p.poison_count == 50 and p.realized_ratio == pytest.approx(0.1)
    idx = p.poison_indices
    assert idx.dtype == torch.int64 and torch.equal(idx, torch.sort(idx).values) and idx.unique().numel() == 50
    assert torch.equal(p.images[idx], attack.apply_trigger(x[idx]))
    assert torch.all(p.labels[idx] == 2)
    assert torch.equal(p.original_labels, y)
    clean = torch.ones(n, dtype=torch.bool)
    clean[idx] = False
    clean[p.cross_indices] = False
    assert torch.equal(p.labels[clean], y[clean]) and torch.equal(p.images[clean], x[clean])
    # BackdoorBench draws dirty-label poison from all samples (target class included) ...
    assert torch.any(y[idx] == 2)
    # ... unless asked to skip the target class
    ex = create_attack(name, {"poison_ratio": 0.1, "seed": 11, "target_class": 2, "exclude_target": True})
    assert not torch.any(y[ex.poison_train(x, y, 10).poison_indices] == 2)
    # seeded: same seed same indices, other seed other indices
    assert torch.equal(create_attack(name, {"seed": 11, "target_class": 2}).select_indices(y), idx)
    assert not torch.equal(create_attack(name, {"seed": 12, "target_class": 2}).select_indices(y), idx)


def test_select_poison_indices_counts_and_errors():
    y = balanced_labels(20)
    got = select_poison_indices(y, 5, seed=0, candidates=torch.tensor([1, 3, 5, 7, 9, 11]))
    assert got.numel() == 5 and set(got.tolist()) <= {1, 3, 5, 7, 9, 11}
    with pytest.raises(ValueError, match="cannot draw 7"):
        select_poison_indices(y, 7, seed=0, candidates=torch.arange(6))
    with pytest.raises(ValueError, match="rounds to 0"):
        BadNets({"poison_ratio": 0.01}).poison_train(rand_images(20, 1, 8), y, 10)


def test_all2all_label_mapping_train_and_test():
    y = torch.tensor([0, 1, 2, 9, 5])
    assert attack_targets(y, "all2all", 0, 10).tolist() == [1, 2, 3, 0, 6]
    assert attack_targets(y, "all2one", 4, 10).tolist() == [4] * 5
    with pytest.raises(ValueError, match="out of range"):
        attack_targets(y, "all2one", 10, 10)
    n = 100
    x = rand_images(n, 1, 12)
    labels = balanced_labels(n)
    attack = BadNets({"label_mode": "all2all", "poison_ratio": 0.2})
    p = attack.poison_train(x, labels, 10)
    assert torch.equal(p.labels[p.poison_indices], (labels[p.poison_indices] + 1) % 10)
    bd = attack.poison_test(x, labels, 10)
    assert len(bd) == n  # every sample's all2all target differs from its label
    assert torch.equal(bd.targets, (labels + 1) % 10) and torch.equal(bd.original_labels, labels)


def test_poisoned_test_set_all2one():
    n = 60
    x = rand_images(n, 3, 16)
    y = balanced_labels(n)
    bd = BadNets({"target_class": 7}).poison_test(x, y, 10)
    keep = torch.nonzero(y != 7).flatten()
    assert len(bd) == 54 and torch.equal(bd.original_indices, keep)
    assert torch.all(bd.targets == 7) and torch.equal(bd.original_labels, y[keep])
    assert T.scaled_patch_size(16) == 2
    assert torch.equal(bd.images, T.apply_patch(x[keep], 2))
    with pytest.raises(ValueError, match="out of range"):
        BadNets({"target_class": 12}).poison_test(x, y, 10)
    with pytest.raises(ValueError, match="labels must be int64"):
        BadNets().poison_test(x, y.int(), 10)


# ------------------------------------------------------------------------------------------------ run config
def test_parse_attack_run_validates_sections():
    run = parse_attack_run({"attack": {"name": "badnets", "poison_ratio": 0.05}, "dataset": {"name": "fashion_mnist"},
                            "model": {"name": "smallcnn", "width": 0.5}, "train": {"epochs": 2}})
    assert run.attack.config.poison_ratio == 0.05 and run.train.epochs == 2
    mc = run.model_config()
    assert (mc.name, mc.in_channels, mc.image_size, mc.num_classes, mc.width) == ("smallcnn", 1, 28, 10, 0.5)
    cases = [
        ({"attack": {"name": "badnets"}, "dataset": "mnist", "oops": 1}, "unknown config section"),
        ({"dataset": "mnist"}, "'attack' section with a 'name'"),
        ({"attack": {"name": "badnets"}}, "needs a 'dataset'"),
        ({"attack": {"name": "badnets"}, "dataset": "imagenet22k"}, "unknown dataset"),
        ({"attack": {"name": "badnets"}, "dataset": "mnist", "model": {"name": "resnet1000"}}, "not in the zoo"),
        ({"attack": {"name": "badnets"}, "dataset": "mnist", "train": {"epochs": 0}}, "epochs"),
        ({"attack": {"name": "badnets"}, "dataset": "mnist", "train": {"lr_typo": 0.1}}, "unknown key"),
        ({"attack": {"name": "badnets", "target_class": 10}, "dataset": "mnist"}, "out of range"),
    ]
    for cfg, msg in cases:
        with pytest.raises(ValueError, match=msg):
            parse_attack_run(cfg)


@pytest.mark.parametrize("attack", ["badnets", "blended", "sig", "wanet", "inputaware", "lf", "trojannn", "ssba"])
@pytest.mark.parametrize("dataset", ["fashion_mnist", "cifar10"])
def test_shipped_configs_parse(attack, dataset):
    from otbr_plugin.config import load_yaml

    path = Path(__file__).resolve().parents[1] / "configs" / "attack" / attack / f"{dataset}.yaml"
    run = parse_attack_run(load_yaml(path))
    assert run.attack.name == attack and run.dataset == dataset
    expected_ratio = 0.05 if (attack, dataset) == ("sig", "fashion_mnist") else 0.1
    assert (run.attack.config.target_class, run.attack.config.poison_ratio) == (0, expected_ratio)
    assert (run.train.lr, run.train.momentum, run.train.weight_decay, run.train.batch_size) == (0.01, 0.9, 5e-4, 128)
    assert run.model.name == "preactresnet18"


# ------------------------------------------------------------------------------------------------ CLI end to end
def _write_idx(path: Path, arr: np.ndarray) -> None:
    with gzip.open(path, "wb") as fh:
        fh.write(bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    """A tiny Fashion-MNIST-shaped IDX dataset (200 train / 60 test images) under a temporary root."""
    folder = tmp_path / "data" / "fashion_mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem, n in (("train", 200), ("t10k", 60)):
        _write_idx(folder / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path / "data"


def _config(tmp_path: Path, attack: str, **params) -> Path:
    import yaml

    cfg = {"attack": {"name": attack, "poison_ratio": 0.1, **params}, "dataset": "fashion_mnist",
           "model": {"name": "smallcnn", "width": 0.25}, "train": {"epochs": 1, "batch_size": 64, "device": "cpu"}}
    path = tmp_path / f"{attack}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


FAST = {  # learned triggers, searched in seconds on the tiny data
    "lf": {"uap_samples": 40, "uap_passes": 1, "clean_epochs": 1},
    "trojannn": {"trigger_iters": 5, "clean_epochs": 1},
    "inputaware": {"mask_epochs": 1, "generator_channels": 4},
    "ssba": {"encoder_channels": 4, "encoder_holdout": 20, "secret_length": 8},
}


@pytest.mark.parametrize("attack", ["badnets", "sig", "wanet", "lf", "trojannn", "inputaware", "ssba"])
def test_attack_cli_end_to_end(tmp_path, tiny_root, attack, capsys):
    from benchmark_adapters.bundle import load_bundle
    from otbr_plugin.attacks import restore_attack
    from otbr_plugin.data import load_dataset

    out = tmp_path / "bundle"
    cfg = _config(tmp_path, attack, **FAST.get(attack, {}))
    rc = main(["attack", str(cfg), "--out", str(out), "--data-root", str(tiny_root), "--no-progress",
               "--set", "train.epochs=2", "--set", "attack.seed=3"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["attack"] == attack and summary["epochs"] == 2
    b = load_bundle(out)
    assert b.model_config.name == "smallcnn" and b.model_config.in_channels == 1 and b.dataset == "fashion_mnist"
    assert b.attack["name"] == attack and b.attack["seed"] == 3 and b.attack["poison_count"] == 20
    labels = torch.arange(200) % 10
    expected_idx = create_attack(attack, {"poison_ratio": 0.1, "seed": 3}).select_indices(labels)
    assert torch.equal(b.tensors["poison_indices"], expected_idx)
    if attack == "wanet":
        assert b.tensors["cross_indices"].numel() == 40 == b.attack["cross_count"]
    if attack == "inputaware":
        assert b.tensors["cross_indices"].numel() == 20 == b.attack["cross_count"]
    if attack in FAST:  # the learned trigger is in the bundle (safetensors) and rebuilds the poisoned test set
        assert b.attack["state"] == "extra.safetensors:attack.*" and "trigger_search" in b.attack
        assert any(k.startswith("attack.") for k in b.tensors)
        test = load_dataset("fashion_mnist", "test", tiny_root)
        rebuilt = restore_attack(b.attack, b.tensors).poison_test(test.images, test.labels, 10)
        assert torch.equal(rebuilt.images, b.bd_test.images)
    if attack == "ssba":  # BackdoorBench's pre-made files from the bundle give the bundle's poisoned test set
        from benchmark_adapters.backdoorbench import read_ssba_images, ssba_poisoned_test_set

        assert b.attack["trigger_search"]["encoder"]["holdout_images"] == 20
        res = tmp_path / "resource"
        capsys.readouterr()
        assert main(["backdoorbench", "export-ssba", str(out), "--out", str(res), "--data-root", str(tiny_root)]) == 0
        assert "--attack_target 0 --pratio 0.1" in capsys.readouterr().out
        replaced = read_ssba_images(res / "fashion_mnist_ssba_test_b1.npy", shape=(1, 28, 28), count=60)
        assert torch.equal(ssba_poisoned_test_set(replaced, test.labels, 10).images, b.bd_test.images)
        assert read_ssba_images(res / "fashion_mnist_ssba_train_b1.npy").shape == (200, 1, 28, 28)
    if attack not in FAST:
        assert not any(k.startswith("attack.") for k in b.tensors) and "state" not in b.attack
    assert len(b.bd_test) == 54 and torch.all(b.bd_test.targets == 0)
    assert set(b.metrics) == {"acc", "asr", "ra"} and all(0 <= v <= 1 for v in b.metrics.values())
    curve = b.training["curve"]
    assert [e["epoch"] for e in curve] == [1, 2] and {"loss", "acc", "asr", "ra", "seconds", "poison_train_fit"} <= set(curve[0])
    assert b.training["config"]["epochs"] == 2 and b.training["minutes"] > 0
    assert b.extra["clean_test"] == {"dataset": "fashion_mnist", "split": "test", "num_samples": 60}
    assert b.metrics["acc"] == curve[-1]["acc"]
    b.build_model()  # weights fit the recorded model config (strict)
    # an existing bundle is not replaced without --overwrite
    assert main(["attack", str(cfg), "--out", str(out), "--data-root", str(tiny_root), "--no-progress"]) == 1
    assert "already exists" in capsys.readouterr().err


def test_attack_cli_is_deterministic_and_reports_bad_configs(tmp_path, tiny_root, capsys):
    from benchmark_adapters.bundle import load_bundle

    cfg = _config(tmp_path, "blended")
    for name in ("a", "b"):
        assert main(["attack", str(cfg), "--out", str(tmp_path / name), "--data-root", str(tiny_root),
                     "--no-progress"]) == 0
    a, b = load_bundle(tmp_path / "a"), load_bundle(tmp_path / "b")
    assert a.model_sha256 == b.model_sha256
    assert torch.equal(a.bd_test.images, b.bd_test.images)
    capsys.readouterr()
    rc = main(["attack", str(cfg), "--out", str(tmp_path / "c"), "--data-root", str(tiny_root),
               "--set", "attack.alpha=2"])
    assert rc == 1 and "alpha must be" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    rc = main(["attack", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "d")])
    assert rc == 1 and "does not exist" in capsys.readouterr().err


def test_attack_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["attack", "--help"])
    assert "examples:" in capsys.readouterr().out


def test_train_save_gives_the_clean_model_of_the_trigger_search(tmp_path, tiny_root, capsys):
    """`otbr-bench train --save` writes the weights LF/TrojanNN would train with clean_epochs (so one clean training
    can be shared through attack.clean_model)."""
    from safetensors.torch import load_file

    from otbr_plugin.attacks import AttackContext
    from otbr_plugin.attacks.clean import clean_model
    from otbr_plugin.data import load_dataset
    from otbr_plugin.models import ModelConfig
    from otbr_plugin.train import TrainConfig

    path = tmp_path / "clean.safetensors"
    assert main(["train", "--model", "smallcnn", "--epochs", "1", "--save", str(path), "--data-root", str(tiny_root),
                 "--device", "cpu", "--no-progress", "--threads", "1"]) == 0
    assert "weights written" in capsys.readouterr().out
    train = load_dataset("fashion_mnist", "train", tiny_root)
    ctx = AttackContext(train.images, train.labels, train.spec, ModelConfig("smallcnn", 10, 1, 28, 0.25),
                        TrainConfig(epochs=5, device="cpu", progress=False), torch.device("cpu"))
    model, info = clean_model(ctx, 1, None)
    saved = load_file(str(path))
    assert info["source"] == "trained" and saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
