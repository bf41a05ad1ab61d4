import subprocess
import sys

import pytest

from otbr_plugin.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("models", "datasets", "train", "defend"):
        assert cmd in out


def test_models_and_datasets(capsys, tmp_path):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "preactresnet18" in out and "11,171,146" in out
    assert main(["datasets", "--data-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fashion_mnist" in out and "gtsrb" in out


def test_train_on_fixture_data(capsys, tmp_path):
    from conftest import write_mnist_like

    write_mnist_like(tmp_path / "fashion_mnist", n_train=64, n_test=32)
    assert main(["train", "--data-root", str(tmp_path), "--model", "smallcnn", "--epochs", "1", "--no-progress",
                 "--device", "cpu"]) == 0
    assert "test accuracy:" in capsys.readouterr().out


def test_errors_are_one_line_not_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "otbr_plugin.cli", "train", "--dataset", "cifar10", "--data-root",
                           str(tmp_path)], capture_output=True, text=True, env={**_env(), "OTBR_OFFLINE": "1"})
    assert proc.returncode == 1
    assert "error: dataset 'cifar10' not found" in proc.stderr and "OTBR_OFFLINE" in proc.stderr
    assert "Traceback" not in proc.stderr


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k in ("PYTHONPATH", "HOME", "PATH", "VIRTUAL_ENV")}
