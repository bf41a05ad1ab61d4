"""The backdoored model's before metrics are computed once per checkpoint (cached beside the bundle) and reused by
every cell, worker task and resume; a damaged or foreign cache is recomputed, never an error."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace

import pytest

from otbr_plugin.aggregate.bootstrap import check_per_sample
from otbr_plugin.aggregate.records import read_record
from otbr_plugin.bench import evalcache
from otbr_plugin.bench import jobs as jobs_module
from otbr_plugin.bench.executors import run_grid
from otbr_plugin.bench.grid import Task, load_grid
from otbr_plugin.bench.runner import evaluate_model, evaluate_model_samples
from otbr_plugin.data import load_dataset
from otbr_plugin.runtime import RunSettings
from test_grid import grid_file


@pytest.fixture
def counted(monkeypatch):
    """Every evaluation of a backdoored model for its before metrics, counted."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return evaluate_model_samples(*args, **kwargs)

    monkeypatch.setattr(evalcache, "evaluate_model_samples", counting)
    return calls


def _trained(tmp_path, defenses=("none",)):
    grid = load_grid(grid_file(tmp_path, list(defenses)))
    settings = RunSettings.from_args("cpu", threads=1, progress=False, apply=False)
    out, bundles = tmp_path / "out", tmp_path / "out" / "bundles"
    assert jobs_module.run_task(grid, Task("train", "badnets", 0), str(out), str(bundles), "cpu", echo=False) == "trained"
    bundle = jobs_module.trained_bundle(grid, "badnets", 0, out, bundles, settings.device)
    return grid, settings, out, bundles, bundle


def test_worker_tasks_and_resumes_evaluate_a_checkpoint_once(tmp_path, counted):
    grid, settings, out, bundles, bundle = _trained(tmp_path, ["none", "test_exploding"])
    for defense in ("none", "test_exploding"):  # two jobs (other processes share nothing but the files)
        jobs_module.run_task(grid, Task("cell", "badnets", 0, defense), str(out), str(bundles), "cpu", echo=False)
    assert len(counted) == 1
    assert (bundles / "badnets-seed0.before.json").is_file()
    assert sorted(p.name for p in bundles.iterdir() if not p.name.startswith(".")) == [
        "badnets-seed0", "badnets-seed0.before.json"]  # beside the bundle, not inside it
    ok = read_record(out / "records" / "fashion_mnist__smallcnn__badnets__none__seed0.json")
    clean_test = load_dataset(grid.dataset, "test", grid.data_root)
    direct = evaluate_model(bundle.build_model(), bundle, clean_test, settings.device).to_dict()
    assert ok.metrics_before == direct  # the same numbers to the last digit
    # the cache keeps the per-sample outcomes too: the record's before bits are the direct evaluation's
    _, samples = evaluate_model_samples(bundle.build_model(), bundle, clean_test, settings.device)
    bits = check_per_sample(ok.per_sample, ok.metrics_before, ok.metrics_after)
    assert (bits["clean_before_correct"] == samples.clean.numpy()).all()
    assert (bits["poisoned_before_target"] == samples.target.numpy()).all()
    assert (bits["poisoned_before_true"] == samples.true.numpy()).all()
    # a resume of the sequential grid (the ok cell redone) reads them too
    (out / "records" / "fashion_mnist__smallcnn__badnets__none__seed0.json").unlink()
    run_grid(grid, out, log=lambda s: None, settings=settings)
    assert len(counted) == 1  # still one evaluation
    assert read_record(out / "records" / "fashion_mnist__smallcnn__badnets__none__seed0.json").metrics_before == direct


@pytest.mark.parametrize("tamper", ["nan", "wrong_sha", "above_one", "fifo", "garbage", "huge", "missing_field",
                                    "bool"])
def test_a_damaged_or_foreign_cache_is_recomputed(tmp_path, counted, tamper):
    grid, settings, out, bundles, bundle = _trained(tmp_path)
    clean_test = load_dataset(grid.dataset, "test", grid.data_root)
    good = evalcache.before_metrics(bundle, clean_test, settings.device)
    path = evalcache.before_cache_path(bundle.path)
    data = json.loads(path.read_text())
    if tamper == "nan":
        data["metrics"]["acc"] = math.nan
    elif tamper == "wrong_sha":
        data["key"]["model_sha256"] = "0" * 64
    elif tamper == "above_one":
        data["metrics"]["asr"] = 1.5
    elif tamper == "missing_field":
        del data["metrics"]["ra"]
    elif tamper == "bool":
        data["metrics"]["ra"] = True
    if tamper == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif tamper == "garbage":
        path.write_bytes(b"\x00{not json")
    elif tamper == "huge":
        path.write_text(json.dumps(data) + " " * evalcache._MAX_BYTES)  # beyond the bound, whatever it is
    else:
        path.write_text(json.dumps(data))
    assert evalcache.read_cached_before(path, evalcache.before_cache_key(bundle, clean_test, settings.device)) is None
    assert evalcache.before_metrics(bundle, clean_test, settings.device) == good
    assert len(counted) == 2  # recomputed, and the file rewritten sound
    assert path.is_file() and evalcache.before_metrics(bundle, clean_test, settings.device) == good
    assert len(counted) == 2


def test_another_test_set_or_device_setting_is_recomputed(tmp_path, counted):
    grid, settings, out, bundles, bundle = _trained(tmp_path)
    clean_test = load_dataset(grid.dataset, "test", grid.data_root)
    evalcache.before_metrics(bundle, clean_test, settings.device)
    evalcache.before_metrics(bundle, load_dataset(grid.dataset, "test", grid.data_root), settings.device)
    assert len(counted) == 1  # the same test set loaded again: the same identity
    changed = clean_test.labels.clone()
    changed[0] = (changed[0] + 1) % 10
    evalcache.before_metrics(bundle, replace(clean_test, labels=changed), settings.device)
    assert len(counted) == 2
    bd = bundle.bd_test
    other_bd = replace(bd, images=bd.images.flip(-1).contiguous())
    evalcache.before_metrics(replace(bundle, bd_test=other_bd), clean_test, settings.device)
    assert len(counted) == 3
    key = evalcache.before_cache_key(bundle, clean_test, settings.device)
    assert evalcache.read_cached_before(evalcache.before_cache_path(bundle.path), key) is None  # the last one won
    assert key["device_type"] == "cpu" and key["eval_batch"] == 512


def test_a_bundle_without_a_path_is_evaluated_and_nothing_is_written(tmp_path, counted):
    grid, settings, out, bundles, bundle = _trained(tmp_path)
    clean_test = load_dataset(grid.dataset, "test", grid.data_root)
    loose = replace(bundle, path=None)
    evalcache.before_metrics(loose, clean_test, settings.device)
    evalcache.before_metrics(loose, clean_test, settings.device)
    assert len(counted) == 2 and not evalcache.before_cache_path(bundle.path).exists()
