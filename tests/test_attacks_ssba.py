"""SSBA: the steganography encoder's residual (bounded, image-specific), the hidden secret (decodes on encoded images,
not on clean ones), the bundle state round trip, and clear errors for bad configs and state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from otbr_plugin.attacks import SSBA, AttackContext, create_attack, restore_attack
from otbr_plugin.attacks.ssba import StegaEncoder, parse_secret
from otbr_plugin.data.specs import DatasetSpec
from otbr_plugin.models import ModelConfig
from otbr_plugin.train import TrainConfig

SPEC = DatasetSpec("tiny16", 10, 1, 16, (0.5,), (0.5,), False)
# sized to learn an 8-bit secret in about half a minute on one thread
TINY = {"secret_length": 8, "epsilon": 0.1, "encoder_channels": 8, "encoder_epochs": 8, "encoder_batch_size": 32,
        "encoder_lr": 0.003, "encoder_holdout": 100}


pytestmark = pytest.mark.usefixtures("one_thread")


def smooth_images(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth 16x16 grey images (bilinear upsampling of 4x4 noise), uint8."""
    g = torch.Generator().manual_seed(seed)
    return (F.interpolate(torch.rand(n, 1, 4, 4, generator=g), size=16, mode="bilinear") * 255).round().to(torch.uint8)


def context(images: torch.Tensor) -> AttackContext:
    return AttackContext(images=images, labels=torch.arange(images.shape[0], dtype=torch.int64) % 10, spec=SPEC,
                         model_config=ModelConfig("smallcnn", 10, 1, 16, 0.25),
                         train=TrainConfig(epochs=1, batch_size=16, device="cpu", progress=False),
                         device=torch.device("cpu"))


@pytest.fixture(scope="module")
def trained() -> SSBA:
    """One encoder/decoder pair trained on 1000 smooth training images (100 more held out)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    attack = SSBA(TINY)
    attack.prepare(context(smooth_images(1100)))
    torch.set_num_threads(before)
    return attack


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("params, message", [
    ({"secret": "01x1", "secret_length": 4}, "secret must be a non-empty string of 0s and 1s"),
    ({"secret": "0101"}, "secret has 4 bits but secret_length is 32"),
    ({"secret_length": 0}, "secret_length must be an integer >= 1"),
    ({"epsilon": 0}, "epsilon must be a number in \\(0, 1\\]"),
    ({"epsilon": 1.5}, "epsilon must be a number in \\(0, 1\\]"),
    ({"epsilon": float("nan")}, "epsilon"),
    ({"encoder_epochs": 0}, "encoder_epochs must be an integer >= 1"),
    ({"encoder_samples": 1}, "encoder_samples must be an integer >= 2 or null"),
    ({"encoder_batch_size": True}, "encoder_batch_size"),
    ({"encoder_lr": -1}, "encoder_lr must be a number > 0"),
    ({"l2_weight": -0.5}, "l2_weight must be a number >= 0"),
    ({"bit_threshold": 1.5}, "bit_threshold must be a number in \\(0, 1\\]"),
    ({"epsilon_warmup": 0.5}, "epsilon_warmup must be a number >= 1"),
    ({"warmup_share": 1.5}, "warmup_share must be a number in \\[0, 1\\]"),
    ({"poison_ratio": 0}, "poison_ratio"),
    ({"secret_bits": 8}, "unknown key"),
])
def test_bad_config_values_raise_clear_errors(params, message):
    with pytest.raises(ValueError, match=message):
        create_attack("ssba", params)


def test_defaults_follow_backdoorbench_and_the_secret_is_seeded():
    cfg = SSBA().config
    assert (cfg.target_class, cfg.label_mode, cfg.poison_ratio, cfg.exclude_target) == (0, "all2one", 0.1, False)
    assert torch.equal(SSBA().secret, SSBA().secret) and SSBA().secret.numel() == 32
    assert not torch.equal(SSBA(seed=1).secret, SSBA().secret)
    assert torch.equal(SSBA(secret="1011", secret_length=4).secret, torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert torch.equal(parse_secret("10"), torch.tensor([1.0, 0.0]))


def test_trigger_before_the_encoder_is_trained_is_a_clear_error():
    with pytest.raises(ValueError, match="prepare\\(\\)"):
        SSBA().apply_trigger(smooth_images(2))


def test_holdout_larger_than_the_training_set_is_a_clear_error():
    with pytest.raises(ValueError, match="encoder_holdout"):
        SSBA({**TINY, "encoder_holdout": 50}).prepare(context(smooth_images(40)))


# ------------------------------------------------------------------------------------------------ residual bound
@pytest.mark.parametrize("epsilon", [0.02, 0.1])
def test_residual_bound_holds_even_for_a_saturated_encoder(epsilon):
    attack = SSBA({**TINY, "epsilon": epsilon})
    attack.build((1, 16, 16))
    with torch.no_grad():  # huge output weights: tanh saturates, the residual sits at the bound almost everywhere
        attack.encoder.out.weight.mul_(1e4)
    images = smooth_images(64, seed=3)
    images[:8] = 0
    images[8:16] = 255
    r = attack.residuals(images)
    assert float(r.abs().max()) <= epsilon + 1e-7 and float(r.abs().max()) > 0.9 * epsilon
    out = attack.apply_trigger(images)
    diff = (out.int() - images.int()).abs()
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert int(diff.max()) <= int(255 * epsilon + 0.5)  # round(255 * epsilon) grey levels


def test_encoder_needs_sides_divisible_by_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        StegaEncoder(1, 30, 30, 8, 4, 0.1)


# ------------------------------------------------------------------------------------------------ trained pair
def test_secret_decodes_on_encoded_images_and_not_on_clean_ones(trained):
    info = trained.info["encoder"]
    assert info["holdout_images"] == 100 and info["train_images"] == 1000 and len(info["curve"]) == 8
    assert info["detected_encoded"] >= 0.9 and info["detected_clean"] <= 0.1  # held-out training images
    fresh = smooth_images(200, seed=9)  # images the pair never saw
    encoded = trained.apply_trigger(fresh)
    acc_enc, acc_clean = trained.decode(encoded), trained.decode(fresh)
    assert float(acc_enc.mean()) >= 0.95 and float(acc_clean.mean()) <= 0.75
    assert float(trained.carries_secret(encoded).float().mean()) >= 0.9
    assert float(trained.carries_secret(fresh).float().mean()) <= 0.1
    # another secret in the same images is not read as this one
    other = SSBA({**TINY, "secret": "".join("1" if b == 0 else "0" for b in trained.secret.int().tolist())})
    other.load_state({**trained.state_tensors(), "secret": other.secret.to(torch.uint8)})
    assert float(trained.carries_secret(other.apply_trigger(fresh)).float().mean()) <= 0.1


def test_residual_differs_per_image(trained):
    images = smooth_images(50, seed=4)
    r = trained.residuals(images)
    # not one pattern for all images: every residual differs from every other one, by more than rounding
    flat = r.flatten(1)
    dist = torch.cdist(flat, flat)
    off = dist[~torch.eye(50, dtype=torch.bool)]
    assert float(off.min()) > 0.1 * float(flat.norm(dim=1).mean())
    assert trained.info["encoder"]["residual_specificity"] > 0.05
    # the same image gives the same residual (deterministic, batch-independent order)
    assert torch.equal(trained.apply_trigger(images[:5]), trained.apply_trigger(images)[:5])


def test_prepare_is_seeded():
    a, b = SSBA({**TINY, "encoder_epochs": 1}), SSBA({**TINY, "encoder_epochs": 1})
    a.prepare(context(smooth_images(300)))
    b.prepare(context(smooth_images(300)))
    sa, sb = a.state_tensors(), b.state_tensors()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_poisoning_follows_badnets_bookkeeping(trained):
    images = smooth_images(60, seed=5)
    labels = torch.arange(60, dtype=torch.int64) % 10
    p = trained.poison_train(images, labels, 10)
    assert p.poison_count == 6 and torch.all(p.labels[p.poison_indices] == 0)
    assert torch.equal(p.poison_indices, trained.select_indices(labels))
    assert torch.equal(p.images[p.poison_indices], trained.apply_trigger(images[p.poison_indices]))
    rest = torch.ones(60, dtype=torch.bool)
    rest[p.poison_indices] = False
    assert torch.equal(p.images[rest], images[rest])
    bd = trained.poison_test(images, labels, 10)
    assert len(bd) == 54 and torch.all(bd.targets == 0) and torch.all(bd.original_labels != 0)


# ------------------------------------------------------------------------------------------------ state round trip
def test_state_round_trip_rebuilds_the_same_poisoned_test_set(trained):
    state = {f"attack.{k}": v for k, v in trained.state_tensors().items()}
    assert all(v.dtype != torch.float64 for v in state.values())
    images, labels = smooth_images(40, seed=6), torch.arange(40, dtype=torch.int64) % 10
    back = restore_attack({**trained.params(), "poison_count": 4}, state)
    a, b = trained.poison_test(images, labels, 10), back.poison_test(images, labels, 10)
    assert torch.equal(a.images, b.images) and torch.equal(a.original_indices, b.original_indices)


def test_bad_state_is_a_clear_error(trained):
    state = trained.state_tensors()
    with pytest.raises(ValueError, match="needs 'image_shape'"):
        SSBA(TINY).load_state({k: v for k, v in state.items() if k != "secret"})
    with pytest.raises(ValueError, match="unknown state tensor"):
        SSBA(TINY).load_state({**state, "mask": torch.zeros(1)})
    with pytest.raises(ValueError, match="differs from the config's secret"):
        SSBA({**TINY, "seed": 1}).load_state(state)
    with pytest.raises(ValueError, match="do not fit"):
        SSBA({**TINY, "encoder_channels": 4}).load_state(state)
    bad = dict(state)
    bad["encoder.out.weight"] = torch.full_like(state["encoder.out.weight"], float("nan"))
    with pytest.raises(ValueError, match="finite"):
        SSBA(TINY).load_state(bad)
    with pytest.raises(ValueError, match="built for"):
        trained.apply_trigger(torch.zeros(2, 1, 20, 20, dtype=torch.uint8))
