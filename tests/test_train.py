import pytest
import torch

from otbr_plugin.data import get_dataset_spec
from otbr_plugin.models import create_model
from otbr_plugin.train import TrainConfig, train_classifier
from otbr_plugin.metrics import accuracy, predict
from otbr_plugin.data import Normalizer


def separable_problem(n=256, seed=0):
    """Class 1 images have a bright top half, class 0 a bright bottom half (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    x = torch.randint(0, 60, (n, 1, 28, 28), generator=g)
    top = labels.bool()
    x[top, :, :14] += 180
    x[~top, :, 14:] += 180
    return x.clamp(0, 255).to(torch.uint8), labels


def test_training_learns_a_separable_problem():
    spec = get_dataset_spec("fashion_mnist")
    x, y = separable_problem()
    model = create_model("smallcnn", 10, 1, 28, 0.5)
    hist = train_classifier(model, x, y, spec, TrainConfig(epochs=4, batch_size=32, lr=0.05, progress=False, device="cpu"))
    assert len(hist.epochs) == 4 and hist.epochs[-1]["loss"] < hist.epochs[0]["loss"]
    xt, yt = separable_problem(128, seed=1)
    assert accuracy(predict(model, xt, Normalizer.for_dataset(spec), device="cpu"), yt) > 0.95
    assert hist.epochs[-1]["lr"] < 0.05 * 0.1  # cosine schedule annealed


def test_training_is_deterministic_for_a_seed():
    spec = get_dataset_spec("fashion_mnist")
    x, y = separable_problem(64)
    weights = []
    for _ in range(2):
        torch.manual_seed(123)  # model init is seeded by the caller
        model = create_model("smallcnn", 10, 1, 28, 0.25)
        train_classifier(model, x, y, spec, TrainConfig(epochs=1, batch_size=16, seed=7, progress=False, device="cpu"))
        weights.append(torch.cat([p.flatten() for p in model.state_dict().values() if p.is_floating_point()]))
    assert torch.equal(weights[0], weights[1])


def test_bf16_and_channels_last_run_on_cpu():
    spec = get_dataset_spec("fashion_mnist")
    x, y = separable_problem(32)
    model = create_model("smallcnn", 10, 1, 28, 0.25)
    hist = train_classifier(model, x, y, spec, TrainConfig(epochs=1, batch_size=16, bf16=True, channels_last=True,
                                                           progress=False, device="cpu"))
    assert torch.isfinite(torch.tensor(hist.epochs[0]["loss"]))


def test_invalid_config_and_inputs():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1)
    spec = get_dataset_spec("fashion_mnist")
    with pytest.raises(ValueError, match="uint8"):
        train_classifier(create_model("smallcnn", 10, 1, 28), torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.long),
                         spec, TrainConfig(progress=False))
