"""``otbr-bench regress``: tolerances (absolute, relative, per defense, std rule), baselines old and new, and the
JUnit / Markdown / JSON outputs, on hand-made records."""

import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from otbr_plugin.metrics import BackdoorMetrics, defense_effectiveness_rating
from otbr_plugin.aggregate.records import RunRecord, record_filename, write_record
from otbr_plugin.aggregate.regress import (Tolerance, ToleranceSpec, build_report, compare, format_junit, format_markdown,
                                       load_baseline, load_tolerance_file, make_baseline, parse_tolerance_layer)
from otbr_plugin.aggregate.tables import load_records
from otbr_plugin.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHA = "cd" * 32


def rec(attack="badnets", defense="otbr", seed=0, acc=0.9, asr=0.1, ra=0.8, version="0.1.0", **kw):
    b = BackdoorMetrics(0.92, 0.99, 0.01)
    a = BackdoorMetrics(acc, asr, ra)
    versions = {"otbr_plugin": version, "torch": "2.13.0+cpu", "numpy": "2.0", "python": "3.11"}
    return RunRecord(dataset="fashion_mnist", model={"name": "preactresnet18", "width": 0.25},
                     attack={"name": attack}, defense=defense, defense_config={"gamma": 0.05}, seed=seed,
                     checkpoint_sha256=SHA, metrics_before=b.to_dict(), metrics_after=a.to_dict(),
                     der=defense_effectiveness_rating(b, a), data_used="none", versions=versions, **kw)


def write_all(folder: Path, records) -> Path:
    for r in records:
        write_record(r, folder / record_filename(r.dataset, r.model["name"], r.attack_name, r.defense, r.seed))
    return folder


def setup_pair(tmp_path, base_records, cur_records, **baseline_kw):
    base = write_all(tmp_path / "base", base_records)
    cur = write_all(tmp_path / "cur", cur_records)
    baseline = make_baseline(load_records(base), tmp_path / "baseline.json", **baseline_kw)
    return baseline, cur


def regress(baseline, cur, *extra):
    return main(["regress", "--baseline", str(baseline), "--current", str(cur), *map(str, extra)])


# ------------------------------------------------------------------------------------------------ outputs
def test_junit_parses_and_names_each_failing_cell(tmp_path):
    base = [rec("badnets", "otbr"), rec("badnets", "clp", acc=0.91), rec("sig", "fp", asr=0.3)]
    cur = [rec("badnets", "otbr", asr=0.15), rec("badnets", "clp", acc=0.91)]  # otbr ASR +5 points; sig/fp missing
    baseline, cur_dir = setup_pair(tmp_path, base, cur)
    junit = tmp_path / "out" / "regress.xml"
    assert regress(baseline, cur_dir, "--junit", junit) == 1
    root = ET.parse(junit).getroot()
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == 3 * 4 and suite.get("tests") == "12"  # one per cell and metric
    failed = [c for c in cases if c.find("failure") is not None]
    errored = [c for c in cases if c.find("error") is not None]
    assert [(c.get("classname"), c.get("name")) for c in failed] == [
        ("fashion_mnist.preactresnet18.badnets.otbr", "ASR seeds=0"),
        ("fashion_mnist.preactresnet18.badnets.otbr", "DER seeds=0")]
    assert {c.get("classname") for c in errored} == {"fashion_mnist.preactresnet18.sig.fp"}
    assert suite.get("failures") == "2" and suite.get("errors") == "4"
    f = failed[0].find("failure")
    assert "badnets/otbr/seed0" in f.get("message") and "ASR 10.00 -> 15.00" in f.get("message")
    for word in ("baseline 10.00", "current 15.00", "delta +5.00", "tolerance 2.00"):
        assert word in f.text
    assert "no current record" in errored[0].find("error").get("message")


def test_markdown_one_row_per_cell_failing_first(tmp_path):
    base = [rec("badnets", d, seed=s) for d in ("none", "otbr", "clp") for s in (0, 1)]
    cur = [rec("badnets", d, seed=s, acc=0.85 if d == "clp" else 0.9) for d in ("none", "otbr", "clp") for s in (0, 1)]
    baseline, cur_dir = setup_pair(tmp_path, base, cur)
    md = tmp_path / "summary.md"
    assert regress(baseline, cur_dir, "--markdown", md) == 1
    text = md.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]  # minus header
    assert len(rows) == 3  # three cells, the two seeds of each are one cell
    assert "`clp`" in rows[0] and rows[0].startswith("| ❌")  # the failing cell first
    assert all(r.startswith("| ✅") for r in rows[1:])
    assert "**90.00 → 85.00 ↓5.00** ❌" in rows[0] and "| 0,1 |" in rows[0]
    assert text.startswith("### ❌ Defense-metric regression: 1 of 3 cells failed")


def test_json_output_and_passing_markdown(tmp_path):
    baseline, cur_dir = setup_pair(tmp_path, [rec()], [rec(acc=0.905)])
    out = tmp_path / "r.json"
    assert regress(baseline, cur_dir, "--json", out, "--markdown", tmp_path / "s.md") == 0
    data = json.loads(out.read_text())
    assert data["passed"] is True and data["summary"]["by_status"]["ok"] == 1
    acc = data["cells"][0]["metrics"]["acc"]
    assert acc["baseline"] == pytest.approx(0.9) and acc["delta"] == pytest.approx(0.005) and acc["status"] == "ok"
    assert (tmp_path / "s.md").read_text().startswith("### ✅")


# ------------------------------------------------------------------------------------------------ tolerances
def test_absolute_tolerance_boundary(tmp_path):
    baseline, cur_dir = setup_pair(tmp_path, [rec(acc=0.90)], [rec(acc=0.89)])
    assert regress(baseline, cur_dir, "--tolerance", "acc=0.01,der=0.05") == 0  # exactly at the tolerance
    write_all(cur_dir, [rec(acc=0.8899)])
    assert regress(baseline, cur_dir, "--tolerance", "acc=0.01,der=0.05") == 1  # just above


def test_relative_tolerance_boundary(tmp_path):
    # ASR 20.00 with a relative tolerance of 10% of the baseline: 2 points allowed, absolute switched off
    baseline, cur_dir = setup_pair(tmp_path, [rec(asr=0.20)], [rec(asr=0.22)])
    args = ("--tolerance", "asr=0,der=0.05", "--rel-tolerance", "asr=0.1")
    assert regress(baseline, cur_dir, *args) == 0
    write_all(cur_dir, [rec(asr=0.2201)])
    assert regress(baseline, cur_dir, *args) == 1
    assert regress(baseline, cur_dir, "--tolerance", "asr=0,der=0.05", "--rel-tolerance", "asr=0.11") == 0
    # the larger of absolute and relative applies
    assert Tolerance(abs=0.03, rel=0.1).allowed(0.2) == pytest.approx(0.03)
    assert Tolerance(abs=0.01, rel=0.1).allowed(0.5) == pytest.approx(0.05)


def test_std_rule_boundary_over_seed_means(tmp_path):
    # baseline ACC over seeds 0..2: 80, 82, 84 -> mean 82, sample std 2 points
    base = [rec(seed=s, acc=a) for s, a in zip((0, 1, 2), (0.80, 0.82, 0.84))]
    baseline, cur_dir = setup_pair(tmp_path, base, [rec(seed=s, acc=0.78) for s in (0, 1, 2)])
    loose = ("--tolerance", "der=0.1", "--std-factor", "2")
    assert regress(baseline, cur_dir, "--tolerance", "der=0.1") == 1  # 4 points down > 1 point
    assert regress(baseline, cur_dir, *loose) == 0  # exactly 2 std
    write_all(cur_dir, [rec(seed=s, acc=0.7799) for s in (0, 1, 2)])
    assert regress(baseline, cur_dir, *loose) == 1  # just above 2 std
    # means are compared: one noisy seed inside a good mean passes
    write_all(cur_dir, [rec(seed=0, acc=0.79), rec(seed=1, acc=0.83), rec(seed=2, acc=0.84)])
    rows = compare(load_baseline(baseline), load_records(cur_dir), ToleranceSpec(parse_tolerance_layer("der=0.1")))
    assert len(rows) == 1 and rows[0].status == "ok" and rows[0].seeds == (0, 1, 2)
    assert rows[0].checks["acc"].baseline_std == pytest.approx(0.02)
    # a missing seed fails the cell
    (cur_dir / record_filename("fashion_mnist", "preactresnet18", "badnets", "otbr", 2)).unlink()
    rows = compare(load_baseline(baseline), load_records(cur_dir))
    assert rows[0].status == "missing" and rows[0].problems == ["no current record for seed 2"]


def test_per_defense_tolerances_from_cli_and_discovered_file(tmp_path):
    base = [rec("badnets", "otbr", asr=0.10), rec("badnets", "anp", asr=0.10)]
    cur = [rec("badnets", "otbr", asr=0.10), rec("badnets", "anp", asr=0.14)]
    baseline, cur_dir = setup_pair(tmp_path, base, cur)
    assert regress(baseline, cur_dir) == 1
    assert regress(baseline, cur_dir, "--tolerance", "anp:asr=0.05,anp:der=0.05") == 0
    assert regress(baseline, cur_dir, "--tolerance", "otbr:asr=0.05,otbr:der=0.05") == 1
    # <baseline stem>.tolerances.yaml next to the baseline is found by itself
    (tmp_path / "baseline.tolerances.yaml").write_text(yaml.safe_dump(
        {"default": {"acc": 0.01, "asr": {"abs": 0.02}}, "defenses": {"anp": {"asr": 0.05, "der": {"abs": 0.05}}}}))
    assert regress(baseline, cur_dir) == 0
    assert regress(baseline, cur_dir, "--no-tolerance-file") == 1
    # the command line beats the file at the same scope, a defense scope beats a default
    assert regress(baseline, cur_dir, "--tolerance", "anp:asr=0.01") == 1
    assert regress(baseline, cur_dir, "--tolerance", "asr=0.01") == 0
    spec = ToleranceSpec(load_tolerance_file(tmp_path / "baseline.tolerances.yaml"))
    assert spec.resolve("anp", "asr") == Tolerance(0.05, 0.0) and spec.resolve("otbr", "asr") == Tolerance(0.02, 0.0)
    assert spec.resolve("anp", "ra") == Tolerance(0.02, 0.0)  # built-in default


def test_tolerance_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown metric"):
        parse_tolerance_layer("anp:speed=1")
    with pytest.raises(ValueError, match=">= 0"):
        parse_tolerance_layer("asr=-0.1", "rel")
    with pytest.raises(ValueError, match="fraction"):
        parse_tolerance_layer("asr=2")
    bad = tmp_path / "t.yaml"
    bad.write_text("defaults: {acc: 0.01}\n")
    with pytest.raises(ValueError, match="unknown key"):
        load_tolerance_file(bad)
    bad.write_text("default: {acc: {absolute: 0.01}}\n")
    with pytest.raises(ValueError, match="abs and/or rel"):
        load_tolerance_file(bad)
    baseline, cur_dir = setup_pair(tmp_path, [rec()], [rec()])
    assert regress(baseline, cur_dir, "--std-factor", "-1") == 1  # a clear error, exit 1


# ------------------------------------------------------------------------------------------------ baselines
def test_write_baseline_records_grid_versions_and_tolerances(tmp_path):
    write_all(tmp_path / "cur", [rec(), rec(defense="anp")])
    baseline = tmp_path / "b.json"
    assert main(["regress", "--baseline", str(baseline), "--current", str(tmp_path / "cur"), "--write-baseline",
                 "--grid", str(ROOT / "configs/bench/ci_slice.yaml"), "--tolerance", "anp:asr=0.05",
                 "--rel-tolerance", "acc=0.02", "--std-factor", "1.5"]) == 0
    data = json.loads(baseline.read_text())
    assert data["grid"] == "ci_slice" and data["package_version"] == "0.1.0"
    assert data["versions"]["torch"] == "2.13.0+cpu"
    assert data["tolerances"]["defenses"]["anp"]["asr"] == {"abs": 0.05, "rel": 0.0}
    assert data["tolerances"]["default"]["acc"] == {"abs": 0.01, "rel": 0.02} and data["std_factor"] == 1.5
    # the recorded tolerances are used by a later regress without flags
    write_all(tmp_path / "cur", [rec(defense="anp", asr=0.14)])
    assert regress(baseline, tmp_path / "cur", "--tolerance", "der=0.05") == 0
    assert regress(baseline, tmp_path / "cur", "--tolerance", "anp:asr=0.02,der=0.05") == 1


def test_warns_on_grid_and_package_mismatch(tmp_path, capsys):
    baseline, cur_dir = setup_pair(tmp_path, [rec()], [rec(version="0.2.0")], grid="ci_slice")
    md, js = tmp_path / "s.md", tmp_path / "r.json"
    assert regress(baseline, cur_dir, "--grid", "fashion_mnist", "--markdown", md, "--json", js) == 0  # verdict unchanged
    out = capsys.readouterr().out
    assert "warning: grid differs: the baseline was made from grid 'ci_slice', the current records from 'fashion_mnist'" in out
    assert "warning: package version differs: baseline made with otbr-plugin 0.1.0, current records with 0.2.0" in out
    assert md.read_text().count("⚠️ **warning:**") == 2 and len(json.loads(js.read_text())["warnings"]) == 2
    # same grid and version: no warning; the grid may also come from the records themselves
    write_all(cur_dir, [rec()])
    assert regress(baseline, cur_dir, "--grid", "ci_slice") == 0
    assert "warning" not in capsys.readouterr().out
    stamped = rec()
    stamped.attack["grid"] = "other_grid"
    write_all(cur_dir, [stamped])
    report = build_report(load_baseline(baseline), load_records(cur_dir))
    assert report.warnings == ["grid differs: the baseline was made from grid 'ci_slice', the current records from "
                               "'other_grid'"]


def test_warns_when_a_cells_defense_config_changed(tmp_path):
    baseline, cur_dir = setup_pair(tmp_path, [rec()], [rec()])
    changed = rec()
    changed.defense_config["gamma"] = 0.1
    write_all(cur_dir, [changed])
    report = build_report(load_baseline(baseline), load_records(cur_dir))
    assert report.passed and report.warnings == ["defense config differs from the baseline's for 1 cell(s): "
                                                 "badnets/otbr/seed0"]


def test_old_baseline_format_still_read(tmp_path, capsys):
    """A baseline in the first format (no grid, versions, tolerances or config hashes; results/ci/baseline.json
    until it was rewritten) works unchanged."""
    new_format = json.loads((ROOT / "results" / "ci" / "baseline.json").read_text())
    old_format = {"schema_version": 1, "kind": new_format["kind"], "note": "",
                  "cells": [{k: v for k, v in c.items() if k != "defense_config_sha256"} for c in new_format["cells"]]}
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(old_format))
    b = load_baseline(path)
    assert b.grid is None and b.package_version is None and b.tolerances is None and len(b.cells) == 5
    cells = json.loads(path.read_text())["cells"]
    cur = []
    for c in cells:
        r = rec(c["attack"], c["defense"], c["seed"], acc=c["acc"], asr=c["asr"], ra=c["ra"])
        r.der = c["der"]
        cur.append(r)
    write_all(tmp_path / "cur", cur)
    junit, md = tmp_path / "r.xml", tmp_path / "s.md"
    assert regress(path, tmp_path / "cur", "--tolerance", "acc=0.01,asr=0.02,ra=0.02,der=0.02",  # as in .ci/run
                   "--junit", junit, "--markdown", md) == 0
    assert "warning" not in capsys.readouterr().out
    assert ET.parse(junit).getroot().find("testsuite").get("failures") == "0"
    assert format_markdown(build_report(b, load_records(tmp_path / "cur"))).count("| ✅") == 5
    assert format_junit(build_report(b, load_records(tmp_path / "cur"))).startswith("<?xml")


# ------------------------------------------------------------------------------------------------ CI workflows
WORKFLOWS = {"github-actions.yml": "vendor.github-workflows", "gitlab-ci.yml": "vendor.gitlab-ci"}


def test_workflow_files_parse_and_have_the_steps():
    gh = yaml.safe_load((ROOT / "docs/ci/github-actions.yml").read_text())
    on = gh.get("on", gh.get(True))  # PyYAML reads the bare key `on` as True
    assert "pull_request" in on and "push" in on
    job = next(iter(gh["jobs"].values()))
    assert job["runs-on"].startswith("ubuntu")
    text = json.dumps(job["steps"])
    for needle in ("actions/cache", "download.pytorch.org/whl/cpu", "otbr-bench bench", "otbr-bench regress",
                   "--junit", "--markdown", "GITHUB_STEP_SUMMARY", "actions/upload-artifact"):
        assert needle in text, needle
    gl = yaml.safe_load((ROOT / "docs/ci/gitlab-ci.yml").read_text())
    jobs = {k: v for k, v in gl.items() if isinstance(v, dict) and "script" in v}
    assert len(jobs) == 1
    job = next(iter(jobs.values()))
    assert job["artifacts"]["reports"]["junit"] and job["artifacts"]["when"] == "always"
    caches = job["cache"] if isinstance(job["cache"], list) else [job["cache"]]
    assert any("bundles" in p for c in caches for p in c["paths"])
    script = "\n".join(job["script"])
    for needle in ("download.pytorch.org/whl/cpu", "otbr-bench bench", "otbr-bench regress", "--junit", "--markdown"):
        assert needle in script, needle


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_files_match_their_schemas(name):
    exe = shutil.which("check-jsonschema") or (Path(__import__("sys").executable).parent / "check-jsonschema")
    if not Path(exe).exists():
        pytest.skip("check-jsonschema is not installed (pip install -e '.[test]' adds it)")
    res = subprocess.run([str(exe), "--builtin-schema", WORKFLOWS[name], str(ROOT / "docs/ci" / name)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_tolerance_file_reads_scientific_notation_as_numbers(tmp_path):
    from otbr_plugin.aggregate.regress import load_tolerance_file

    f = tmp_path / "baseline.tolerances.yaml"
    f.write_text("asr: 2e-2\nacc: 1e-2\n")
    layer = load_tolerance_file(f)
    assert "2e-2" not in repr(layer) and "0.02" in repr(layer)
    f.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="tolerance file"):
        load_tolerance_file(f)
