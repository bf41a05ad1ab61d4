import math

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


def _reference_cpu_training(model, images, labels, spec, cfg):
    """The CPU training semantics written out plainly, independently of train_classifier: seeded shuffling; per
    step the crop offsets (rows, then columns) and the flip draws from the same generator; float32 [0, 1] images,
    zero-padded crop, flip, per-channel normalization; SGD with momentum and weight decay, cosine schedule stepped
    per iteration. Returns the per-epoch (mean loss, train accuracy)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps = -(-images.shape[0] // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    pad = spec.crop_padding
    out = []
    for _ in range(cfg.epochs):
        model.train()
        order = torch.randperm(images.shape[0], generator=gen)
        total, correct = 0.0, 0
        for step in range(steps):
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            x = images[idx].float() / 255
            n, _, h, w = x.shape
            oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
            ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
            padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
            x = torch.stack([padded[i, :, oy[i]:oy[i] + h, ox[i]:ox[i] + w] for i in range(n)])
            if spec.hflip:
                flip = torch.rand(n, generator=gen) < 0.5
                x = torch.stack([xi.flip(-1) if f else xi for xi, f in zip(x, flip)])
            logits = model((x - mean) / std)
            loss = torch.nn.functional.cross_entropy(logits, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * n
            correct += int((logits.argmax(1) == labels[idx]).sum())
        out.append((total / images.shape[0], correct / images.shape[0]))
    return out


@pytest.mark.parametrize("dataset", ["fashion_mnist", "cifar10"])
def test_cpu_training_is_bit_identical_to_the_plain_reference(dataset):
    """The committed CPU results depend on every draw and every operation of the CPU step: the speed work on the
    accelerator path must leave them exactly as they were (same weights, same history, bit for bit)."""
    spec = get_dataset_spec(dataset)
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (40, *spec.input_shape), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (40,), generator=g)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, seed=3, progress=False, device="cpu")
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(create_model("smallcnn", 10, spec.in_channels, spec.image_size, 0.25))
    history = train_classifier(models[0], images, labels, spec, cfg, device=torch.device("cpu"))
    expected = _reference_cpu_training(models[1], images, labels, spec, cfg)
    assert [(e["loss"], e["train_acc"]) for e in history.epochs] == expected
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(a, b), name


def test_training_reads_the_device_once_per_epoch(monkeypatch):
    """No host read of a tensor inside the step (each one makes an accelerator wait): the loss and accuracy sums are
    read once per epoch. Counted on the CPU by spying on the tensor -> Python number conversions."""
    spec = get_dataset_spec("fashion_mnist")
    x, y = separable_problem(64)
    reads = []
    for name in ("__float__", "__int__", "__bool__", "item", "tolist"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **k):
            reads.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    model = create_model("smallcnn", 10, 1, 28, 0.25)
    train_classifier(model, x, y, spec, TrainConfig(epochs=2, batch_size=8, progress=False), device=torch.device("cpu"))
    monkeypatch.undo()
    assert len(reads) <= 2 * 2, reads  # 8 steps per epoch: the old loop read 2 per step


def _step_lrs(monkeypatch, config, n=24):
    """Train a tiny model and record the lr of every optimizer step (what each update really used)."""
    lrs: list[float] = []
    real_step = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    x, y = separable_problem(n)
    hist = train_classifier(create_model("smallcnn", 10, 1, 28, 0.25), x, y, get_dataset_spec("fashion_mnist"), config)
    return lrs, hist


@pytest.mark.parametrize("epochs,t_max", [(5, 3), (4, 100), (3, 1), (2, 2)])
def test_epoch_cosine_lr_per_epoch_is_backdoorbench_stepped_cosine(monkeypatch, epochs, t_max):
    lr, spe = 0.05, 3  # 24 images, batch 8: three steps per epoch
    cfg = TrainConfig(epochs=epochs, batch_size=8, lr=lr, progress=False, device="cpu", epoch_cosine_t_max=t_max)
    lrs, hist = _step_lrs(monkeypatch, cfg)
    assert len(lrs) == epochs * spe
    per_epoch = [lrs[e * spe:(e + 1) * spe] for e in range(epochs)]
    assert all(len(set(chunk)) == 1 for chunk in per_epoch)  # constant within an epoch
    used = [chunk[0] for chunk in per_epoch]
    closed = [lr * (1 + math.cos(math.pi * e / t_max)) / 2 for e in range(epochs)]
    # torch's own scheduler stepped once per epoch, on a separate optimizer (an independent derivation)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max)
    reference = []
    for _ in range(epochs):
        reference.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert used == pytest.approx(closed, abs=1e-12) and used == pytest.approx(reference, abs=1e-12)
    assert [e["epoch_lr"] for e in hist.epochs] == pytest.approx(closed, abs=1e-12)
    if t_max == 100:
        assert min(used) > 0.99 * lr  # BackdoorBench's FP at few epochs barely anneals


def test_default_schedule_is_cosine_over_all_steps_per_iteration(monkeypatch):
    lr, epochs, spe = 0.05, 3, 3
    lrs, hist = _step_lrs(monkeypatch, TrainConfig(epochs=epochs, batch_size=8, lr=lr, progress=False, device="cpu"))
    total = epochs * spe
    assert lrs == pytest.approx([lr * (1 + math.cos(math.pi * k / total)) / 2 for k in range(total)], abs=1e-12)
    assert hist.epochs[-1]["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "100"])
def test_epoch_cosine_t_max_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="epoch_cosine_t_max must be an integer >= 1"):
        TrainConfig(epoch_cosine_t_max=bad)
