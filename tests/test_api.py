"""The Python API (``otbr_plugin.defend`` / ``otbr_plugin.evaluate``): end to end on a tiny model, config
validation as on the CLI, the data rules, and the one code path it shares with the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import otbr_plugin
from otbr_plugin.bench import runner
from otbr_plugin.models import create_model

SHAPE = (1, 12, 12)
KW = dict(input_shape=SHAPE, num_classes=4, mean=(0.5,), std=(0.5,), device="cpu")
FAST_OTBR = dict(gamma=0.1, unlearn_steps=2, unlearn_batch_size=8)


def tiny(arch: str = "smallcnn", **args) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(arch, 4, 1, 12, 0.25, **args).eval()


def data(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8, generator=g), torch.arange(n) % 4


@pytest.mark.parametrize("arch,args", [("smallcnn", {}), ("resnet18", {"stem": "cifar"})])
def test_defend_end_to_end(arch, args):
    model = tiny(arch, **args)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = otbr_plugin.defend(model, "otbr", **KW, **FAST_OTBR)
    assert out.diagnostics["num_pruned"] > 0 and out.diagnostics["gamma_used"] == 0.1
    assert out.seconds is not None and out.seconds > 0 and set(out.stage_seconds) >= {"unlearning", "prune_fuse"}
    assert out.data_used == "none" and not out.model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the caller's model untouched
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        assert not torch.allclose(out.model(x), model(x))
    again = otbr_plugin.defend(model, "otbr", **KW, **FAST_OTBR)  # same seed, same result
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in out.model.state_dict().items())


def test_defend_validates_the_config_as_the_cli_does():
    model = tiny()
    with pytest.raises(ValueError, match="unknown key.*gama"):
        otbr_plugin.defend(model, "otbr", **KW, gama=0.1)
    with pytest.raises(ValueError, match="gamma"):
        otbr_plugin.defend(model, "otbr", **KW, gamma=1.5)
    with pytest.raises(ValueError, match="unknown defense 'otbrr'"):
        otbr_plugin.defend(model, "otbrr", **KW)
    with pytest.raises(ValueError, match="input_shape"):
        otbr_plugin.defend(model, "otbr", **{**KW, "input_shape": (12, 12)})
    with pytest.raises(ValueError, match="one value per input channel"):
        otbr_plugin.defend(model, "otbr", **{**KW, "mean": (0.5, 0.5, 0.5)})
    # a config file layer, then keyword overrides on top (later wins), as --config < --set
    out = otbr_plugin.defend(model, "otbr", **KW, config={"gamma": 0.2, "unlearn_steps": 1, "unlearn_batch_size": 4},
                             gamma=0.0)
    assert out.diagnostics["gamma_used"] == 0.0 and out.diagnostics["num_pruned"] == 0


def test_data_free_defenses_refuse_clean_data_and_data_defenses_need_it():
    model = tiny()
    images, labels = data()
    for name in ("otbr", "clp"):
        with pytest.raises(ValueError, match=f"'{name}' is data-free"):
            otbr_plugin.defend(model, name, **KW, clean_data=(images, labels))
    with pytest.raises(ValueError, match="'fp' needs clean data"):
        otbr_plugin.defend(model, "fp", **KW, epochs=0)
    with pytest.raises(ValueError, match="uint8"):
        otbr_plugin.defend(model, "fp", **KW, clean_data=(images.float(), labels), epochs=0)
    out = otbr_plugin.defend(model, "fp", **KW, clean_data=(images.numpy(), labels.numpy()), epochs=0,
                             prune_ratio=0.25)
    assert out.diagnostics["pruned_channels"] == 4 and out.data_used == "clean subset of 40"


def test_api_and_cli_share_one_code_path(monkeypatch, tiny_fashion_bundle, tmp_path):
    """otbr_plugin.defend and `otbr-bench defend` both run runner.defend_model."""
    from otbr_plugin.cli import main

    calls = []
    real = runner.defend_model

    def spy(model, defense, **kwargs):
        calls.append((defense.name, kwargs["input_shape"], kwargs["clean_data"] is not None))
        return real(model, defense, **kwargs)

    monkeypatch.setattr(runner, "defend_model", spy)
    otbr_plugin.defend(tiny(), "clp", **KW)
    bundle, root = tiny_fashion_bundle
    assert main(["defend", str(bundle), "--defense", "clp", "--data-root", str(root), "--device", "cpu",
                 "--no-progress", "--out", str(tmp_path / "out")]) == 0
    assert calls == [("clp", SHAPE, False), ("clp", (1, 28, 28), False)]


def test_evaluate_matches_hand_computed_metrics():
    model = tiny()
    images, labels = data(30)
    bd_images, true_labels = data(20, seed=1)
    with torch.no_grad():
        pred = model((images.float() / 255 - 0.5) / 0.5).argmax(1)
        bd_pred = model((bd_images.float() / 255 - 0.5) / 0.5).argmax(1)
    targets = torch.where(torch.arange(20) < 10, bd_pred, (bd_pred + 1) % 4)  # half hit, half miss
    m = otbr_plugin.evaluate(model, clean=(images, labels), poisoned=(bd_images, targets, true_labels),
                             mean=(0.5,), std=(0.5,), device="cpu")
    assert m.acc == pytest.approx(float((pred == labels).float().mean()))
    assert m.asr == pytest.approx(0.5)
    assert m.ra == pytest.approx(float((bd_pred == true_labels).float().mean()))
    with pytest.raises(ValueError, match="poisoned targets must be 20 integer labels"):
        otbr_plugin.evaluate(model, clean=(images, labels), poisoned=(bd_images, targets[:5], true_labels),
                             mean=(0.5,), std=(0.5,), device="cpu")
    with pytest.raises(ValueError, match="clean images must be uint8"):
        otbr_plugin.evaluate(model, clean=(images.float(), labels), poisoned=(bd_images, targets, true_labels),
                             mean=(0.5,), std=(0.5,), device="cpu")


def test_readme_python_example_runs(capsys):
    """The README's Python API example, run as written."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out
    assert "pruned" in printed and "ACC" in printed


def test_import_stays_light():
    import subprocess
    import sys

    code = "import sys, otbr_plugin; print(otbr_plugin.__version__, 'otbr_plugin.bench' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [otbr_plugin.__version__, "False"]
    assert callable(otbr_plugin.defend) and callable(otbr_plugin.evaluate)
    with pytest.raises(AttributeError):
        otbr_plugin.defence  # noqa: B018
