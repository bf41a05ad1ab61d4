"""The BackdoorBench drop-in scripts of i-BAU, RNP and SAU: installed into a fake BackdoorBench checkout and run as
``__main__``, as a user would (the checkout and record come from test_backdoorbench's ``make_bb_tree``)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
import yaml

from benchmark_adapters.backdoorbench.install import DROPIN_DEFENSES, install_dropin
from test_backdoorbench import NAME, make_bb_tree

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
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", [f"./defense/{save}.py", "--result_file", NAME, "--yaml_path",
                                      f"./config/defense/{save}/mnist.yaml", "--dataset", "mnist", "--device", "cpu",
                                      "--progress", "false", *QUICK[save]])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(root / "defense" / f"{save}.py"), run_name="__main__")
    assert info.value.code == 0
    out = root / "record" / NAME / "defense" / save
    assert set(torch.load(out / "defense_result.pt", weights_only=True)) == {"model_name", "num_classes", "model"}
    assert (out / f"{save}_df_summary.csv").is_file()
