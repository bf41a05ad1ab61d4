"""One device decision (issue 11): RunSettings is built once and the device it holds reaches every stage.

The machine has no accelerator, so the tests use a device label that is not the default one but still runs on the
CPU, ``cpu:0``, and spies on the functions each stage calls: a stage that guessed its own device (the model's, the
attack config's ``train.device``, "auto") would show up as ``cpu`` instead of ``cpu:0``.
"""

import pytest
import torch
import yaml
from torch import nn

from conftest import write_mnist_like
from otbr_plugin.attacks import base as attack_base
from otbr_plugin.bench import evalcache as evalcache_mod
from otbr_plugin.bench import jobs as jobs_mod
from otbr_plugin.bench import runner as bench_runner
from otbr_plugin.bench.executors import run_grid
from otbr_plugin.bench.grid import load_grid, training_changes
from otbr_plugin.cli import main
from otbr_plugin.data.transforms import Normalizer
from otbr_plugin.metrics import predict
from otbr_plugin.runtime import RunSettings

LABEL = torch.device("cpu", 0)  # not what "auto", "cpu" or a model's parameters would give


def _grid(tmp_path, train_device="cpu"):
    write_mnist_like(tmp_path / "data" / "fashion_mnist", n_train=120, n_test=60)
    attack = {"attack": {"name": "badnets", "target_class": 0, "poison_ratio": 0.1},
              "dataset": "fashion_mnist", "model": {"name": "smallcnn", "width": 0.25},
              "train": {"epochs": 1, "batch_size": 32, "device": train_device}}
    grid = {"name": "tiny", "dataset": "fashion_mnist", "data_root": str(tmp_path / "data"),
            "attacks": {"badnets": attack}, "defenses": {"none": {}}, "seeds": [0], "device": "cpu"}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


@pytest.fixture
def spies(monkeypatch):
    """Wrap the stage entry points; each records the device (and progress) it was given, then runs as usual."""
    seen: dict[str, list] = {"train": [], "train_progress": [], "attack": [], "evaluate": [], "defense": [],
                             "context": []}

    real_train = attack_base.train_classifier  # the shared loop behind Attack.train_model

    def train(*a, device=None, progress=None, **k):
        seen["train"].append(device)
        seen["train_progress"].append(progress)
        return real_train(*a, device=device, progress=progress, **k)

    real_attack = jobs_mod.run_attack

    def attack(*a, device=None, **k):
        seen["attack"].append(device)
        return real_attack(*a, device=device, **k)

    real_eval = bench_runner.evaluate_model_samples

    def evaluate(model, bundle, clean_test, device):
        seen["evaluate"].append(device)
        return real_eval(model, bundle, clean_test, device)

    real_defense = jobs_mod.run_defense

    def defense(*a, device, **k):
        seen["defense"].append(device)
        return real_defense(*a, device=device, **k)

    real_context = bench_runner.build_context

    def context(*a, **k):
        ctx = real_context(*a, **k)
        seen["context"].append(ctx.device)
        return ctx

    monkeypatch.setattr(attack_base, "train_classifier", train)
    monkeypatch.setattr(jobs_mod, "run_attack", attack)
    monkeypatch.setattr(evalcache_mod, "evaluate_model_samples", evaluate)  # the backdoored model's (once a checkpoint)
    monkeypatch.setattr(bench_runner, "evaluate_model_samples", evaluate)
    monkeypatch.setattr(jobs_mod, "run_defense", defense)
    monkeypatch.setattr(bench_runner, "build_context", context)
    return seen


def test_grid_device_reaches_training_evaluation_and_defense_context(tmp_path, spies):
    grid = load_grid(_grid(tmp_path))
    settings = RunSettings(device=LABEL, progress=False)
    results = run_grid(grid, tmp_path / "out", settings=settings, log=lambda s: None)
    assert [r.status for r in results] == ["ok"]
    assert spies["attack"] == [LABEL]  # grid -> attack training (not the config's train.device "cpu")
    assert spies["train"] == [LABEL]
    assert spies["train_progress"] == [False]  # --no-progress reaches the training bars
    # grid -> evaluation: the backdoored model (grid) and the defended one (run_defense)
    assert spies["evaluate"] and all(d == LABEL for d in spies["evaluate"])
    assert spies["defense"] == [LABEL] and spies["context"] == [LABEL]  # grid -> defense context
    bundle_meta = (tmp_path / "out" / "bundles" / "badnets-seed0" / "meta.json").read_text()
    assert '"device": "cpu:0"' in bundle_meta  # training.device: where it ran
    assert '"device": "cpu"' in bundle_meta  # the recorded config keeps the declared train.device


def test_cached_bundle_is_reused_when_the_grid_device_has_the_same_type(tmp_path, spies):
    path = _grid(tmp_path, train_device="cpu")
    out = tmp_path / "out"
    run_grid(load_grid(path), out, settings=RunSettings(device=torch.device("cpu"), progress=False),
             log=lambda s: None)
    assert len(spies["attack"]) == 1
    # the same grid, its attack config now saying train.device: auto, the grid's device cpu:0: nothing retrains
    path = _grid(tmp_path, train_device="auto")
    logs = []
    results = run_grid(load_grid(path), out, settings=RunSettings(device=LABEL, progress=False), log=logs.append)
    assert len(spies["attack"]) == 1, logs
    assert any("using cached bundle" in line for line in logs), logs
    assert all(r.status in ("skipped", "ok") for r in results)


def test_training_changes_rule():
    cfg = {"train": {"device": "cpu", "epochs": 1, "progress": True}, "attack": {"name": "badnets"}}
    auto = {"train": {"device": "auto", "epochs": 1, "progress": False}, "attack": {"name": "badnets"}}
    assert training_changes(cfg, "cpu", auto, torch.device("cpu")) == []
    assert training_changes(cfg, None, auto, torch.device("cpu")) == []  # no training.device: the config's
    assert training_changes({**cfg, "train": {**cfg["train"], "device": "cuda"}}, "cuda:1", auto,
                            torch.device("cuda", 0)) == []  # the index never forces a retrain
    assert training_changes(cfg, "cpu", auto, torch.device("cuda")) == ["train.device 'cpu' -> 'cuda'"]
    assert training_changes(cfg, "cpu", {**auto, "train": {**auto["train"], "epochs": 2}},
                            torch.device("cpu")) == ["train.epochs 1 -> 2"]


def test_predict_leaves_the_model_where_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3)).train()
    before = {k: (v.device, v.data_ptr()) for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (10, 1, 2, 2), dtype=torch.uint8)
    norm = Normalizer((0.5,), (0.5,))
    on_label = predict(model, images, norm, device=LABEL)
    assert {k: (v.device, v.data_ptr()) for k, v in model.state_dict().items()} == before
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(on_label, predict(model, images, norm, device="cpu"))  # same numbers on the same hardware
    assert model.training


def test_predict_needs_a_device():
    with pytest.raises(TypeError):
        predict(nn.Linear(1, 1), torch.zeros(1, 1, 1, 1, dtype=torch.uint8), Normalizer((0.0,), (1.0,)))


def test_run_settings_validates_once():
    s = RunSettings.from_args("cpu", seed=3, threads=None, progress=False)
    assert s == RunSettings(device=torch.device("cpu"), seed=3, threads=None, progress=False)
    with pytest.raises(ValueError, match="threads"):
        RunSettings.from_args("cpu", threads=0)
    with pytest.raises(ValueError, match="seed"):
        RunSettings.from_args("cpu", seed=-1)
    if not (torch.accelerator.is_available() and torch.accelerator.device_count() > 7):
        with pytest.raises(ValueError, match="cuda:7"):
            RunSettings.from_args("cuda:7")
    old = torch.get_num_threads()
    try:
        assert RunSettings.from_args("cpu", threads=1).threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(old)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("command", ["train", "attack", "bench", "diagnose"])
def test_unavailable_device_is_one_line_on_every_command(command, tmp_path, capsys):
    if torch.accelerator.is_available() and torch.accelerator.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    argv = {
        "train": ["train", "--dataset", "fashion_mnist", "--model", "smallcnn"],
        "attack": ["attack", "configs/attack/badnets/fashion_mnist.yaml", "--out", str(tmp_path / "b")],
        "bench": ["bench", str(_grid(tmp_path)), "--out", str(tmp_path / "g")],
        "diagnose": ["diagnose", str(tmp_path / "no-bundle"), "--out", str(tmp_path / "d")],
    }[command]
    assert main([*argv, "--device", "cuda:7", "--no-progress"]) in (1, 2)
    assert "cuda:7" in _one_line(capsys)


@pytest.mark.parametrize("command", ["train", "attack", "defend", "diagnose", "bench"])
def test_threads_and_no_progress_on_every_computing_command(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "--threads" in text and "--no-progress" in text and "--device" in text


def test_bad_threads_is_one_line(tmp_path, capsys):
    assert main(["train", "--dataset", "fashion_mnist", "--model", "smallcnn", "--threads", "0"]) == 1
    assert "--threads" in _one_line(capsys)
