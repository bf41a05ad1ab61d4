"""``otbr-bench table --by-defense``: the per-defense summary, checked against hand computations on a few synthetic
records (means, ACC drop, ranks among all and data-free defenses, seconds), and its rules: the backdoored model is
never ranked, seeds are averaged per checkpoint first, ranks only compare defenses over the same checkpoints, the
clean-accuracy bound, intervals only with per-sample outcomes, and the CSV reads back."""

import csv
import io
import re

import numpy as np
import pandas as pd
import pytest

from otbr_plugin.aggregate.bootstrap import percentile_interval, record_replicates
from otbr_plugin.aggregate.records import RunRecord, record_filename, write_record
from otbr_plugin.aggregate.report import render_report
from otbr_plugin.aggregate.summary import SUMMARY_COLUMNS, defense_summary, format_summary
from otbr_plugin.aggregate.tables import comparison_table
from otbr_plugin.cli import main
from test_bootstrap import AFTER_A, AFTER_B, BEFORE, N_BD, N_CLEAN, _samples, _vec, rec_from

ORDER = {"attacks": ["badnets", "blended"], "defenses": ["none", "otbr", "clp", "fp"]}
BEFORE_METRICS = {"badnets": (0.92, 0.99, 0.01), "blended": (0.90, 0.95, 0.04), "sig": (0.91, 0.97, 0.02)}
CLEAN = "clean subset of 3000"


def der(before, after):
    """DER from its definition, in percent (independent of otbr_plugin.metrics)."""
    return (max(0.0, before[1] - after[1]) - max(0.0, before[0] - after[0]) + 1) / 2 * 100


def rec(attack, defense, after, seed=0, dseed=None, data="none", seconds=(1.0, 10.0), sha=None, name=None):
    """A record of ``defense`` on ``attack`` with after-defense (acc, asr, ra); the backdoored model's metrics are
    the attack's; ``seconds``: (defense_total, cell_total)."""
    before = BEFORE_METRICS[attack]
    return RunRecord(dataset="fashion_mnist", model={"name": "preactresnet18"}, attack={"name": attack},
                     defense=defense, defense_config={}, seed=seed, defense_seed=dseed,
                     checkpoint_sha256=sha or f"{attack}-{seed}".encode().hex().ljust(64, "0"),
                     metrics_before=dict(zip(("acc", "asr", "ra"), before)),
                     metrics_after=dict(zip(("acc", "asr", "ra"), after)), der=der(before, after) / 100,
                     data_used=data, seconds={"defense_total": seconds[0], "cell_total": seconds[1]},
                     grid_order=ORDER, defense_name=name)


AFTER = {  # (attack, defense) -> after-defense (acc, asr, ra)
    ("badnets", "none"): BEFORE_METRICS["badnets"], ("blended", "none"): BEFORE_METRICS["blended"],
    ("badnets", "otbr"): (0.90, 0.50, 0.45), ("blended", "otbr"): (0.89, 0.90, 0.08),
    ("badnets", "clp"): (0.91, 0.95, 0.04), ("blended", "clp"): (0.90, 0.20, 0.70),
    ("badnets", "fp"): (0.91, 0.10, 0.80), ("blended", "fp"): (0.88, 0.30, 0.60),
}
SECONDS = {"none": [(0.01, 8.0), (0.03, 9.0)], "otbr": [(40.0, 60.0), (20.0, 50.0)], "clp": [(0.1, 9.0), (0.2, 11.0)],
           "fp": [(100.0, 150.0), (60.0, 90.0)]}


def base_records():
    return [rec(a, d, AFTER[(a, d)], data=CLEAN if d == "fp" else "none", seconds=SECONDS[d][i])
            for d in ORDER["defenses"] for i, a in enumerate(ORDER["attacks"])]


def hand(defense, attacks=("badnets", "blended")):
    """Mean ACC drop / ASR / RA / DER over ``attacks``, in points / percent, by hand."""
    rows = [(BEFORE_METRICS[a], AFTER[(a, defense)]) for a in attacks]
    return {"acc_drop": np.mean([(b[0] - x[0]) * 100 for b, x in rows]), "asr": np.mean([x[1] * 100 for _, x in rows]),
            "ra": np.mean([x[2] * 100 for _, x in rows]), "der": np.mean([der(b, x) for b, x in rows])}


def test_numbers_equal_a_hand_computation():
    s = defense_summary(base_records())
    f = s.frame.set_index("defense")
    assert list(f.index) == ["none", "otbr", "clp", "fp"]  # the grid's order
    for d in ("none", "otbr", "clp", "fp"):
        for col, want in hand(d).items():
            assert f.at[d, col] == pytest.approx(want), (d, col)
    # by hand: DER otbr (73.5 + 52) / 2 = 62.75, clp (51.5 + 87.5) / 2 = 69.5, fp (94 + 81.5) / 2 = 87.75
    assert f.at["fp", "der"] == pytest.approx(87.75) and f.at["clp", "der"] == pytest.approx(69.5)
    assert f.at["otbr", "der"] == pytest.approx(62.75)
    assert f.at["otbr", "acc_drop"] == pytest.approx(1.5)  # (2 + 1) / 2 points
    assert list(f["rank_all"].astype(object).fillna(-1)) == [-1, 3, 2, 1]  # none listed, never ranked
    assert list(f["rank_data_free"].astype(object).fillna(-1)) == [-1, 2, 1, -1]  # fp uses data
    assert f.at["fp", "data_used"] == CLEAN and f.at["otbr", "data_used"] == "none"
    assert list(f["data_free"]) == [True, True, True, False] and list(f["backdoored"]) == [True, False, False, False]
    assert (f["attacks"] == 2).all() and f["ranked"].tolist() == [False, True, True, True]
    assert f.at["otbr", "seconds_defense_median"] == pytest.approx(30.0)
    assert f.at["otbr", "seconds_cell_median"] == pytest.approx(55.0)
    assert f.at["fp", "seconds_cell_total"] == pytest.approx(240.0) and f.at["fp", "cells"] == 2
    # with one defense seed per cell, the means are the comparison table's average row
    mean, _ = comparison_table(base_records())
    assert f.at["clp", "der"] == pytest.approx(mean.at["average", ("clp", "der")])
    md = format_summary(s, "md")
    row = dict(zip(md.splitlines()[0].split(" | "), next(line for line in md.splitlines()
                                                         if line.startswith("| fp ")).split(" | ")))
    assert row["DER"] == "**87.75**" and row["rank (all)"] == "1" and row["rank (data-free)"] == "-"
    assert "| none (backdoored) | none | 2 | 0.00 |" in md


def test_the_backdoored_model_is_never_ranked_even_under_another_label():
    records = [r for r in base_records() if r.defense != "none"]
    records += [rec(a, "nodef", BEFORE_METRICS[a], name="none") for a in ORDER["attacks"]]
    f = defense_summary(records).frame.set_index("defense")
    assert pd.isna(f.at["nodef", "rank_all"]) and f.at["nodef", "backdoored"] and not f.at["nodef", "ranked"]
    assert f.at["fp", "rank_all"] == 1


def test_seeds_are_averaged_per_checkpoint_first():
    # badnets: training seed 0 with defense seeds 0, 1, 2 and training seed 1 with defense seed 0 only
    records = [rec("badnets", "otbr", (0.90, 0.10, 0.80), seed=0, dseed=0),
               rec("badnets", "otbr", (0.90, 0.40, 0.50), seed=0, dseed=1),
               rec("badnets", "otbr", (0.90, 0.70, 0.20), seed=0, dseed=2),
               rec("badnets", "otbr", (0.92, 0.90, 0.05), seed=1, dseed=0)]
    f = defense_summary(records).frame.set_index("defense")
    per_checkpoint = np.mean([np.mean([10, 40, 70]), 90])  # 65
    flat = np.mean([10, 40, 70, 90])  # 52.5: what a plain mean over the records would say
    assert f.at["otbr", "asr"] == pytest.approx(per_checkpoint) and f.at["otbr", "asr"] != pytest.approx(flat)
    ders = [der(BEFORE_METRICS["badnets"], a) for a in [(0.90, 0.10, 0.8), (0.90, 0.40, 0.5), (0.90, 0.70, 0.2)]]
    want = np.mean([np.mean(ders), der(BEFORE_METRICS["badnets"], (0.92, 0.90, 0.05))])
    assert f.at["otbr", "der"] == pytest.approx(want)


def test_a_defense_on_fewer_attacks_is_listed_unranked_and_never_averaged_with_the_others():
    records = base_records() + [rec("badnets", "ep", (0.915, 0.05, 0.90))]  # ep: badnets only
    s = defense_summary(records)
    f = s.frame.set_index("defense")
    assert not f.at["ep", "ranked"] and pd.isna(f.at["ep", "rank_all"]) and f.at["ep", "attacks"] == 1
    want = der(BEFORE_METRICS["badnets"], (0.915, 0.05, 0.90))  # 96.75: its own attack only
    assert f.at["ep", "der"] == pytest.approx(want)
    # the ranked defenses keep their ranks and means over both attacks
    assert f.at["fp", "rank_all"] == 1 and f.at["fp", "der"] == pytest.approx(hand("fp")["der"])
    note = next(n for n in s.notes if n.startswith("ep:"))
    # on badnets alone: ep 96.75 > fp 94.0 > otbr 73.5 > clp 51.5; data-free: ep, otbr, clp
    assert "records on 1 of 2 attacks (none on blended), so unranked" in note
    assert "would rank 1 of 4 among all, 1 of 3 among data-free" in note
    md = format_summary(s, "md")
    assert re.search(r"\| ep \| none \| 1 of 2 \| [^|]+ \| [^|]+ \| [^|]+ \| [^|]+ \| unranked \| unranked \|", md)
    assert note in md


def test_when_no_defense_covers_every_checkpoint_all_are_compared_on_the_common_ones():
    sig = rec("sig", "clp", (0.9, 0.5, 0.4))
    otbr, fp = [rec("badnets", "otbr", AFTER[("badnets", "otbr")])], [
        rec(a, "fp", AFTER[(a, "fp")], data=CLEAN) for a in ("badnets", "blended")]
    s = defense_summary(otbr + fp + [sig])  # otbr {badnets}, clp {sig}, fp {badnets, blended}: nothing in common
    assert s.frame["rank_all"].isna().all() and "nothing is ranked" in " ".join(s.notes)
    s = defense_summary(otbr + fp + [sig, rec("badnets", "clp", AFTER[("badnets", "clp")])])  # clp {badnets, sig}
    f = s.frame.set_index("defense")
    assert "means and ranks over the 1 checkpoint(s) every defense has (badnets)" in " ".join(s.notes)
    for d in ("otbr", "clp", "fp"):
        assert f.at[d, "der"] == pytest.approx(hand(d, ["badnets"])["der"]) and f.at[d, "attacks"] == 1
    assert [f.at[d, "rank_all"] for d in ("fp", "otbr", "clp")] == [1, 2, 3]
    assert [f.at[d, "rank_data_free"] for d in ("otbr", "clp")] == [1, 2]


def test_a_record_on_another_checkpoint_is_left_out_and_named():
    records = base_records() + [rec("badnets", "ep", (0.9, 0.0, 0.9), sha="ee" * 32),
                                rec("blended", "ep", (0.9, 0.0, 0.9))]
    s = defense_summary(records)
    f = s.frame.set_index("defense")
    assert f.at["ep", "attacks"] == 1 and not f.at["ep", "ranked"]
    assert any("ep on badnets seed 0 (checkpoint eeeeeeee" in n for n in s.notes)


def test_the_clean_accuracy_bound_daggers_and_ranks_after():
    drop = {("badnets", "clp"): (0.70, 0.0, 0.9), ("blended", "clp"): (0.80, 0.0, 0.9)}  # ACC drop 16 points
    records = [rec(a, d, drop.get((a, d), AFTER[(a, d)]), data=CLEAN if d == "fp" else "none")
               for d in ORDER["defenses"] for a in ORDER["attacks"]]
    s = defense_summary(records, acc_drop=10.0)
    f = s.frame.set_index("defense")
    assert f.at["clp", "acc_drop"] == pytest.approx(16.0) and f.at["clp", "beyond_acc_bound"]
    # clp's DER (88.5 + 92.5) / 2 = 90.5 beats fp's 87.75, yet it is ranked after every defense within the bound
    assert f.at["clp", "der"] == pytest.approx(90.5)
    assert [f.at[d, "rank_all"] for d in ("fp", "otbr", "clp")] == [1, 2, 3]
    md = format_summary(s, "md")
    clp = next(line for line in md.splitlines() if line.startswith("| clp "))
    assert "16.00†" in clp and "| 3† | 2† |" in clp and "**" not in clp
    assert "above 10 points" in md
    f = defense_summary(records, acc_drop=100.0).frame.set_index("defense")  # a bound nothing reaches: DER alone
    assert f.at["clp", "rank_all"] == 1 and not f.at["clp", "beyond_acc_bound"]


def test_ci_interval_only_where_every_record_keeps_per_sample_outcomes():
    n_boot = 200
    order = {"attacks": ["badnets", "blended"], "defenses": ["none", "otbr", "fp"]}
    sha2 = "ef" * 32
    per_sample = [rec_from(BEFORE, "none", "badnets", grid_order=order),
                  rec_from(BEFORE, "none", "blended", sha=sha2, grid_order=order),
                  rec_from(AFTER_A, "otbr", "badnets", grid_order=order),
                  rec_from(AFTER_B, "otbr", "blended", sha=sha2, grid_order=order),
                  rec_from(AFTER_A, "fp", "badnets", grid_order=order)]
    old = rec_from(AFTER_B, "fp", "blended", sha=sha2, grid_order=order)
    old.per_sample = None  # a record written before schema 2
    records = per_sample + [old]
    s = defense_summary(records, ci=True, n_boot=n_boot)
    f = s.frame.set_index("defense")
    reps = record_replicates(per_sample[2:4], n_boot)
    want = percentile_interval((reps[0]["der"] + reps[1]["der"]) / 2 * 100)  # replicate-wise mean over attacks
    assert (f.at["otbr", "der_lo"], f.at["otbr", "der_hi"]) == (pytest.approx(want.lo), pytest.approx(want.hi))
    assert f.at["otbr", "der_lo"] <= f.at["otbr", "der"] <= f.at["otbr", "der_hi"]
    assert pd.isna(f.at["fp", "der_lo"]) and pd.isna(f.at["fp", "der_hi"])
    md = format_summary(s, "md", ci=True)
    assert re.search(r"\| otbr \|.*\| \d+\.\d\d \[\d+\.\d\d, \d+\.\d\d\] \|", md)
    assert not re.search(r"\| fp \|.*\[", md) and "bootstrap interval of the mean DER" in md
    assert defense_summary(records).frame["der_lo"].isna().all()  # without ci: none


def test_csv_round_trip():
    s = defense_summary(base_records() + [rec("badnets", "ep", (0.915, 0.05, 0.90))])
    back = list(csv.DictReader(io.StringIO(format_summary(s, "csv"))))
    assert list(back[0]) == SUMMARY_COLUMNS and [r["defense"] for r in back] == list(s.frame["defense"])
    for row, (_, want) in zip(back, s.frame.iterrows()):
        for col in ("acc_drop", "asr", "ra", "der", "seconds_defense_median", "seconds_cell_median",
                    "seconds_cell_total"):
            assert float(row[col]) == pytest.approx(want[col], abs=1e-6)
        for col in ("rank_all", "rank_data_free"):
            assert (row[col] == "") if pd.isna(want[col]) else int(row[col]) == want[col]
        for col in ("data_free", "ranked", "backdoored", "beyond_acc_bound"):
            assert row[col] == ("yes" if want[col] else "no")
        assert int(row["attacks"]) == want["attacks"] and row["data_used"] == want["data_used"]
        assert row["der_lo"] == ""


def _write(folder, records):
    for r in records:
        write_record(r, folder / "records" / record_filename(r.dataset, "preactresnet18", r.attack_name, r.defense,
                                                             r.seed, r.defense_seed))


def test_cli_by_defense_formats_and_notes(tmp_path, capsys):
    _write(tmp_path, base_records())
    assert main(["table", str(tmp_path), "--by-defense"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| defense | data used | attacks | ACC drop |") and "| fp | clean subset of 3000 | 2 |" in out
    assert main(["table", str(tmp_path), "--by-defense", "--format", "csv"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith(",".join(SUMMARY_COLUMNS)) and "note: ACC drop" in cap.err
    assert main(["table", str(tmp_path), "--by-defense", "--format", "latex"]) == 0
    assert "\\textbf{87.75}" in capsys.readouterr().out
    assert main(["table", str(tmp_path), "--by-defense", "--format", "html", "--ci"]) == 0
    cap = capsys.readouterr()
    assert '<table class="summary">' in cap.out and "<b>87.75</b>" in cap.out and "No DER interval" in cap.out


def test_report_has_the_summary_after_the_comparison_table(tmp_path):
    _write(tmp_path, base_records())
    text = render_report(tmp_path)
    assert 'id="summary"' in text and text.index('id="table"') < text.index('id="summary"') < text.index('id="scatter"')
    section = text[text.index('id="summary"'):text.index('id="scatter"')]
    assert "<td>fp</td><td>clean subset of 3000</td><td>2</td>" in section and "<b>87.75</b>" in section
