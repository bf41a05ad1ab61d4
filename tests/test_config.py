"""One config resolution: built-in defaults < packaged YAML < user YAML < --set, and where each value came from."""

from __future__ import annotations

import importlib.resources

import pytest
import yaml

from otbr_plugin.config import find_config_file, packaged_config, resolve_config
from otbr_plugin.defenses import get_defense


def test_layers_in_order_and_named(tmp_path):
    packaged = yaml.safe_load(packaged_config("defense", "fp", "fashion_mnist").read_text())
    user = tmp_path / "fp.yaml"
    user.write_text("epochs: 2\nlr: 0.5\nprune_ratio: null\n")
    r = resolve_config("defense", "fp", "fashion_mnist", user, ["lr=0.1"])
    assert r.values["epochs"] == 2 and r.values["lr"] == 0.1  # user over packaged, --set over user
    assert r.values["holdout_ratio"] == packaged["holdout_ratio"]
    assert r.source == (f"built-in defaults < packaged configs/defense/fp/fashion_mnist.yaml < user {user} "
                        "< --set lr")
    get_defense("fp")(r.values)  # a valid config


def test_no_packaged_file_means_built_in_defaults():
    r = resolve_config("defense", "none", "fashion_mnist")
    assert r.values == {} and r.source == "built-in defaults"
    r = resolve_config("defense", "otbr", "no_such_dataset", {"gamma": 0.1}, user_label="grid inline")
    assert r.values == {"gamma": 0.1} and r.source == "built-in defaults < user grid inline"


def test_packaged_configs_are_package_resources(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./configs here: nothing is read from the current folder
    res = importlib.resources.files("otbr_plugin.configs").joinpath("defense", "otbr", "fashion_mnist.yaml")
    assert res.is_file()
    assert resolve_config("defense", "otbr", "fashion_mnist").source.endswith("configs/defense/otbr/fashion_mnist.yaml")
    assert find_config_file("configs/bench/ci_slice.yaml").is_file()  # grid paths fall back to the package
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_config_file("configs/bench/nope.yaml")
