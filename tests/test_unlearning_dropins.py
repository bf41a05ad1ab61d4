"""The BackdoorBench drop-in scripts of i-BAU, RNP and SAU: installed into a fake BackdoorBench checkout and run as
``__main__``, as a user would (the checkout and record come from test_backdoorbench's ``make_bb_tree``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from benchmark_adapters.backdoorbench.install import DROPIN_DEFENSES, install_dropin
from test_backdoorbench import make_bb_tree, run_installed_dropin

QUICK = {"otbr_ibau": ["--rounds", "1", "--ratio", "0.2"],
         "otbr_rnp": ["--unlearning_epochs", "1", "--recovering_epochs", "1", "--ratio", "0.2"],
         "otbr_sau": ["--rounds", "1", "--ratio", "0.2"]}  # CPU-test sized


@pytest.mark.parametrize("save", sorted(QUICK))
def test_dropin_installs_and_runs_its_defense(tmp_path: Path, save, monkeypatch):
    torch.set_num_threads(1)
    root = make_bb_tree(tmp_path / "BackdoorBench")["root"]
    written = {p.relative_to(root).as_posix() for p, _ in install_dropin(root, defenses=[save], datasets=["mnist"])}
    assert written == {f"defense/{save}.py", f"config/defense/{save}/mnist.yaml"}
    config = yaml.safe_load((root / "config" / "defense" / save / "mnist.yaml").read_text())
    assert config["dataset"] == "mnist" and config["ratio"] == 0.05  # the template, then the resolved defaults
    assert DROPIN_DEFENSES[save] == save.removeprefix("otbr_")
    run_installed_dropin(root, save, QUICK[save], monkeypatch)
