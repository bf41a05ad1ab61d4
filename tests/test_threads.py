"""`--threads auto`: never more torch threads than the CPUs this process may use and other processes leave free."""

from __future__ import annotations

import argparse

import pytest
import torch

from otbr_plugin.commands import add_run_arguments, run_settings
from otbr_plugin.runtime import (RunSettings, _cgroup_cpu_limit, auto_threads, busy_cpus, parse_threads,
                                 usable_cpus)


@pytest.mark.parametrize("cpus,load,workers,expected", [
    (2, 0.1, 1, 2),   # idle: every usable CPU
    (2, 1.0, 1, 1),   # one CPU-bound process elsewhere: the free one
    (2, 3.5, 1, 1),   # oversubscribed machine: one thread, never zero
    (8, 2.4, 1, 6),   # load rounded: 2 busy
    (8, 0.0, 3, 2),   # divided among workers, rounded down
    (2, 0.0, 4, 1),   # more workers than CPUs: one thread each
    (4, 7.0, 2, 1),
])
def test_auto_threads_rule(cpus, load, workers, expected):
    threads, why = auto_threads(workers, cpus=cpus, load=load, env={})
    assert threads == expected
    assert f"{cpus} usable" in why and f"{load:.1f} busy" in why


def test_omp_num_threads_wins_over_auto():
    assert auto_threads(1, cpus=8, load=0.0, env={"OMP_NUM_THREADS": "3"}) == (3, "OMP_NUM_THREADS=3")
    assert auto_threads(2, cpus=8, load=0.0, env={"OMP_NUM_THREADS": "1"})[0] == 1
    assert auto_threads(1, cpus=8, load=0.0, env={"OMP_NUM_THREADS": "junk"})[0] == 8  # not a count: ignored


def test_cgroup_quota_caps_usable_cpus(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert _cgroup_cpu_limit(tmp_path) == 1.5
    assert usable_cpus(tmp_path) <= 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_cpu_limit(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert _cgroup_cpu_limit(v1) == 0.5 and usable_cpus(v1) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert _cgroup_cpu_limit(v1) is None
    assert _cgroup_cpu_limit(tmp_path / "absent") is None


def test_parse_threads():
    assert parse_threads("auto") == "auto" and parse_threads(None) is None
    assert parse_threads("3") == 3 and parse_threads(2) == 2
    for bad in ("0", "-1", "two", 0, True, 1.5):
        with pytest.raises(ValueError, match="'auto' or an integer >= 1"):
            parse_threads(bad)


def test_run_settings_resolve_auto_once(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    old = torch.get_num_threads()
    try:
        s = RunSettings.from_args("cpu", threads="auto", workers=64)
        assert s.threads == 1 and torch.get_num_threads() == 1
        assert s.threads_reason.startswith("auto:") and "64 workers" in s.threads_reason
        fixed = RunSettings.from_args("cpu", threads=2, apply=False)
        assert fixed.threads == 2 and fixed.threads_reason == "--threads"
    finally:
        torch.set_num_threads(old)


def test_cli_threads_default_is_auto_and_printed(capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    p = argparse.ArgumentParser()
    add_run_arguments(p)
    assert p.parse_args([]).threads == "auto"
    old = torch.get_num_threads()
    try:
        settings = run_settings(p.parse_args(["--device", "cpu"]))
    finally:
        torch.set_num_threads(old)
    assert settings.threads == 1
    assert capsys.readouterr().out.strip() == "threads: 1 (auto: OMP_NUM_THREADS=1)"
    with pytest.raises(ValueError, match="'auto' or an integer >= 1"):
        run_settings(p.parse_args(["--device", "cpu", "--threads", "0"]))


def test_records_carry_the_thread_count():
    from otbr_plugin.aggregate.records import library_versions

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert library_versions()["torch_threads"] == "1"
    finally:
        torch.set_num_threads(old)


def test_busy_cpus_reads_the_share_of_each_cpu_busy_over_the_sample(tmp_path, monkeypatch):
    """Two /proc/stat readings 0 s apart (the file is swapped between them): cpu0 fully busy, cpu1 idle."""
    import otbr_plugin.runtime as runtime

    stat = tmp_path / "stat"
    first = "cpu  0 0 0 0 0 0 0 0\ncpu0 100 0 0 100 0 0 0 0\ncpu1 50 0 0 150 0 0 0 0\nintr 1\n"
    second = "cpu  0 0 0 0 0 0 0 0\ncpu0 200 0 0 100 0 0 0 0\ncpu1 50 0 0 250 0 0 0 0\nintr 1\n"
    stat.write_text(first)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr("time.sleep", lambda s: stat.write_text(second))
    assert busy_cpus(0.0, stat) == 1.0
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {1})  # only CPUs this process may use
    stat.write_text(first)
    assert busy_cpus(0.0, stat) == 0.0
    assert busy_cpus(0.0, tmp_path / "absent") is None
