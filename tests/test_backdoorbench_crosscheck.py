"""The BackdoorBench crosscheck (scripts/backdoorbench_crosscheck.py).

The end-to-end test is opt-in: it needs a real BackdoorBench checkout (``BACKDOORBENCH_ROOT``) and the Python of
an environment that holds BackdoorBench's requirements and otbr-plugin (``BACKDOORBENCH_PYTHON``, default: the
Python running the tests). It runs the crosscheck on its smallest setting (200 train / 100 test images, one
BadNets epoch, one seed, a few FP/ANP steps). Like the script, it reuses the record and the defense outputs that
already exist in the checkout (``record/otbrx_fmnist200_100_badnet/``); from scratch it takes about 30 minutes on
one thread of a loaded 2-core machine (its last run here, with the attack and FP/ANP outputs present: 14.4
minutes). CI does not need BackdoorBench.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "backdoorbench_crosscheck.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("backdoorbench_crosscheck", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_refuses_a_folder_that_is_not_a_backdoorbench_checkout(tmp_path):
    mod = _load_script()
    with pytest.raises(SystemExit, match="is not a BackdoorBench checkout"):
        mod.main([str(tmp_path), "--out", str(tmp_path / "out")])


def test_stratified_subsample_is_balanced_fixed_and_distinct():
    mod = _load_script()
    labels = np.repeat(np.arange(10), 50)
    a = mod._stratified_take(labels, 103, seed=0)
    assert len(a) == len(set(a.tolist())) == 103
    counts = np.bincount(labels[a], minlength=10)
    assert counts.max() - counts.min() <= 1
    assert np.array_equal(a, mod._stratified_take(labels, 103, seed=0))
    assert not np.array_equal(a, mod._stratified_take(labels, 103, seed=1))


def test_summary_csv_reads_the_last_row_of_a_backdoorbench_summary(tmp_path):
    mod = _load_script()
    p = tmp_path / "finetune_df_summary.csv"
    p.write_text(",test_acc,test_asr,test_ra\nlast,0.8,0.1,0.7\nvalid_max,0.9,0.95,0.75\nexist_nan_value,False,False,False\n")
    assert mod._read_summary(p) == {"acc": 0.8, "asr": 0.1, "ra": 0.7}
    q = tmp_path / "clp_df_summary.csv"
    q.write_text(",u,test_acc,test_asr,test_ra\n0,3.0,0.5,0.25,0.125\n")
    assert mod._read_summary(q) == {"acc": 0.5, "asr": 0.25, "ra": 0.125}


BB_ROOT = os.environ.get("BACKDOORBENCH_ROOT")
BB_PYTHON = os.environ.get("BACKDOORBENCH_PYTHON", sys.executable)


@pytest.mark.skipif(not BB_ROOT, reason="opt-in: set BACKDOORBENCH_ROOT to a BackdoorBench checkout (and "
                                        "BACKDOORBENCH_PYTHON to its environment's python, with otbr-plugin installed)")
def test_crosscheck_smallest_setting(tmp_path):
    import subprocess

    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), BB_ROOT, "--bb-python", BB_PYTHON, "--out", str(out),
           "--work", str(tmp_path / "work"), "--n-train", "200", "--n-test", "100", "--attacks", "badnet",
           "--attack-epochs", "1", "--attack-batch", "128", "--seeds", "0", "--fp-epochs", "1",
           "--fp-once-prune-ratio", "0.2", "--anp-iters", "2", "--anp-batch", "32", "--anp-pruning-step", "0.3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "SUBSAMPLED to 200 train / 100 test" in done.stdout
    with open(out / "crosscheck_runs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    seen = {(r["defense"], r["impl"]) for r in rows}
    for name in ("clp", "fp", "anp"):
        assert (name, "BackdoorBench") in seen and (name, "plug-in") in seen, seen
    assert ("otbr", "plug-in") in seen
    for r in rows:
        for k in ("acc", "asr", "ra", "der"):
            assert 0.0 <= float(r[k]) <= 1.0, r
        assert float(r["seconds"]) > 0
    result = json.loads((out / "crosscheck.json").read_text())
    clp = {c["variant"]: c for c in result["clp_weights"]}
    # BackdoorBench's CLP and the plug-in's with BackdoorBench's conv/BN pairing prune the same weights
    assert clp["pairing=backdoorbench"]["max_abs_dw"] == 0.0, clp
    assert result["versions"]["BackdoorBench commit"] != "unknown"
    table = (out / "crosscheck.md").read_text()
    assert "| BackdoorBench |" in table and "| plug-in" in table
