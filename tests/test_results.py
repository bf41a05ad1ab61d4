"""Run records, comparison tables, leaderboard files and regression checks on hand-made records."""

import json
import os

import pytest

from otbr_plugin.aggregate.leaderboard import (SubmissionError, build_leaderboard, entries_digest, export_submission,
                                           load_submission, validate_submission)
from otbr_plugin.aggregate.records import RunRecord, read_record, record_filename, write_record
from otbr_plugin.io import write_json as write_json_atomic
from otbr_plugin.aggregate.regress import compare, make_baseline, parse_tolerance, read_baseline
from otbr_plugin.aggregate.tables import comparison_table, format_table, load_records, plot_acc_vs_asr
from otbr_plugin.cli import main

SHA = "ab" * 32


def rec(attack="badnets", defense="otbr", seed=0, acc=0.9, asr=0.1, ra=0.8, before=(0.92, 0.99, 0.01), **kw):
    from otbr_plugin.metrics import BackdoorMetrics, defense_effectiveness_rating

    b = BackdoorMetrics(*before)
    a = BackdoorMetrics(acc, asr, ra)
    return RunRecord(dataset="fashion_mnist", model={"name": "preactresnet18", "width": 0.25},
                     attack={"name": attack}, defense=defense, defense_config={"gamma": 0.05}, seed=seed,
                     checkpoint_sha256=SHA, metrics_before=b.to_dict(), metrics_after=a.to_dict(),
                     der=defense_effectiveness_rating(b, a), data_used="none", **kw)


def write_all(folder, records):
    for r in records:
        write_record(r, folder / record_filename(r.dataset, r.model["name"], r.attack_name, r.defense, r.seed))


def test_record_round_trip(tmp_path):
    r = rec(seconds={"defense_total": 1.5}, diagnostics={"pruned": [1, 2]})
    path = write_record(r, tmp_path / "r.json")
    back = read_record(path)
    assert back == r
    assert back.versions["torch"] and back.schema_version == 2


def test_record_validation(tmp_path):
    with pytest.raises(ValueError, match="metrics_after and der"):
        rec().__class__(**{**rec().to_dict(), "metrics_after": None})
    bad = rec().to_dict()
    bad["schema_version"] = 99
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="schema_version"):
        read_record(tmp_path / "bad.json")


def test_interrupted_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    write_json_atomic(target, {"old": True})

    def crash(*a, **k):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(target, {"new": True, "big": list(range(1000))})
    assert json.loads(target.read_text()) == {"old": True}  # previous content intact
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind


def test_table_cell_by_cell(tmp_path):
    records = [
        rec("badnets", "none", 0, 0.92, 0.99, 0.01), rec("badnets", "otbr", 0, 0.90, 0.10, 0.80),
        rec("badnets", "otbr", 1, 0.88, 0.20, 0.70), rec("badnets", "clp", 0, 0.91, 0.05, 0.85),
        rec("blended", "none", 0, 0.92, 0.95, 0.03), rec("blended", "otbr", 0, 0.89, 0.50, 0.40),
        rec("blended", "clp", 0, 0.80, 0.60, 0.30),
    ]
    write_all(tmp_path, records)
    (tmp_path / "not_a_record.json").write_text('{"hello": 1}')
    mean, std = comparison_table(load_records(tmp_path))
    assert list(mean.index) == ["badnets", "blended", "average"]
    assert list(mean.columns.get_level_values(0).unique()) == ["none", "otbr", "clp"]
    assert mean.at["badnets", ("otbr", "acc")] == pytest.approx(89.0)  # mean of 90 and 88
    assert std.at["badnets", ("otbr", "asr")] == pytest.approx(7.0710678)  # std of 10 and 20 (ddof 1)
    assert mean.at["average", ("clp", "asr")] == pytest.approx((5 + 60) / 2)
    md = format_table(mean, std, "md")
    lines = md.splitlines()
    assert lines[0].startswith("| attack | none ACC | none ASR |")
    badnets = lines[2].split(" | ")
    header = lines[0].split(" | ")
    cell = dict(zip(header, badnets))
    assert cell["otbr ACC"] == "89.00 ± 1.41"
    assert cell["clp ASR"] == "**5.00**"  # best (lowest) ASR among defenses in this row
    assert cell["clp ACC"] == "**91.00**"
    assert cell["none ACC"] == "92.00"  # "none" is never marked
    blended = dict(zip(header, lines[3].split(" | ")))
    # clp drops ACC 12 points (92 -> 80), beyond the 10-point bound: marked †, never best
    assert blended["otbr ASR"] == "**50.00**" and blended["clp ASR"] == "60.00†"
    csv = format_table(mean, std, "csv").splitlines()
    assert csv[0].split(",")[:3] == ["attack", "none ACC", "none ASR"]
    assert "5.00*" in csv[1]
    assert "\\textbf{5.00}" in format_table(mean, std, "latex")
    assert "<b>5.00</b>" in format_table(mean, std, "html")
    png = plot_acc_vs_asr(load_records(tmp_path), tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_rejects_mixed_datasets_and_empty(tmp_path):
    r2 = rec()
    r2.dataset = "cifar10"
    with pytest.raises(ValueError, match="mix datasets"):
        comparison_table([rec(), r2])
    with pytest.raises(ValueError, match="no successful"):
        comparison_table([])


def test_table_command(tmp_path, capsys):
    write_all(tmp_path, [rec("badnets", "none"), rec("badnets", "otbr")])
    assert main(["table", str(tmp_path), "--format", "csv"]) == 0
    assert "badnets" in capsys.readouterr().out


@pytest.fixture
def submission(tmp_path):
    records = [rec("badnets", "otbr", 0), rec("blended", "otbr", 0, 0.85, 0.3, 0.6)]
    path = export_submission(records, tmp_path / "sub.json", "Jane Doe", "OTBR")
    return path


def test_leaderboard_export_validate_build(submission):
    data = load_submission(submission)
    assert len(data["entries"]) == 2 and data["entries_sha256"] == entries_digest(data["entries"])
    board = build_leaderboard([data])
    assert board.loc[0, "cells"] == 2 and board.loc[0, "der"] == pytest.approx(
        round(100 * (rec().der + rec("blended", "otbr", 0, 0.85, 0.3, 0.6).der) / 2, 2))


def _mutate(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    return data


def test_validate_rejects_tampered_hash(submission):
    data = _mutate(submission, lambda d: d["entries"][0]["metrics_after"].__setitem__("asr", 0.0))
    problems = validate_submission(data)
    assert any("entries_sha256" in p for p in problems)
    data = _mutate(submission, lambda d: d["entries"][0].__setitem__("checkpoint_sha256", "cd" * 32))
    data["entries_sha256"] = entries_digest(data["entries"])
    assert any("not listed in 'checkpoints'" in p for p in validate_submission(data))


def test_validate_rejects_out_of_range_metric(submission):
    def f(d):
        d["entries"][1]["metrics_after"]["acc"] = 85.0  # percent instead of fraction
        d["entries_sha256"] = entries_digest(d["entries"])

    problems = validate_submission(_mutate(submission, f))
    assert any("entries[1].metrics_after.acc: 85.0 is out of range" in p for p in problems)


def test_validate_rejects_missing_field(submission):
    def f(d):
        del d["entries"][0]["data_used"]
        del d["submitter"]
        d["entries_sha256"] = entries_digest(d["entries"])

    problems = validate_submission(_mutate(submission, f))
    assert any("entries[0]: missing field(s) data_used" in p for p in problems)
    assert any(p.startswith("submitter.name") for p in problems)


def test_validate_rejects_duplicate_and_names_every_problem(submission, tmp_path):
    def f(d):
        d["entries"].append(dict(d["entries"][0]))
        d["entries"][1]["der"] = 0.123
        d["entries_sha256"] = entries_digest(d["entries"])

    data = _mutate(submission, f)
    problems = validate_submission(data)
    assert any("entries[2]: duplicate of entries[0]" in p for p in problems)
    assert any("entries[1].der" in p and "does not follow" in p for p in problems)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SubmissionError) as info:
        load_submission(path)
    assert len(info.value.problems) == 2
    assert main(["leaderboard", "validate", str(path)]) == 1


def test_regress_passes_on_identical_and_fails_on_degraded(tmp_path, capsys):
    base_dir, cur_dir = tmp_path / "base", tmp_path / "cur"
    records = [rec("badnets", "otbr"), rec("badnets", "clp", acc=0.91, asr=0.05, ra=0.85)]
    write_all(base_dir, records)
    baseline = make_baseline(load_records(base_dir), tmp_path / "baseline.json")
    write_all(cur_dir, records)
    rows = compare(read_baseline(baseline), load_records(cur_dir), parse_tolerance(None))
    assert [r.status for r in rows] == ["ok", "ok"]
    assert main(["regress", "--baseline", str(baseline), "--current", str(cur_dir)]) == 0

    write_all(cur_dir, [rec("badnets", "otbr", asr=0.135)])  # ASR up 3.5 points > 2 point tolerance
    rows = compare(read_baseline(baseline), load_records(cur_dir), parse_tolerance(None))
    by_defense = {r.key[3]: r for r in rows}
    assert by_defense["clp"].status == "ok"
    assert by_defense["otbr"].status == "regressed" and by_defense["otbr"].problems[0].startswith("ASR 10.00 -> 13.50")
    assert main(["regress", "--baseline", str(baseline), "--current", str(cur_dir)]) == 1
    assert "REGRESSED" in capsys.readouterr().out
    # a looser tolerance accepts it
    assert main(["regress", "--baseline", str(baseline), "--current", str(cur_dir), "--tolerance",
                 "asr=0.05,der=0.05"]) == 0


def test_regress_missing_cell_fails(tmp_path):
    write_all(tmp_path / "base", [rec("badnets", "otbr"), rec("sig", "otbr")])
    baseline = make_baseline(load_records(tmp_path / "base"), tmp_path / "b.json")
    write_all(tmp_path / "cur", [rec("badnets", "otbr")])
    rows = compare(read_baseline(baseline), load_records(tmp_path / "cur"), parse_tolerance(None))
    assert {r.key[2]: r.status for r in rows} == {"badnets": "ok", "sig": "missing"}


def test_tolerance_parsing():
    assert parse_tolerance("acc=0.05")["acc"] == 0.05
    with pytest.raises(ValueError, match="unknown metric"):
        parse_tolerance("speed=1")
    with pytest.raises(ValueError, match="fraction"):
        parse_tolerance("acc=5")
