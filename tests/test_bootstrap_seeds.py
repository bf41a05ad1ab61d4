"""The two-level bootstrap over seeds (bootstrap.seed_replicates) in the table, the by-defense summary, compare, the
leaderboard and regress --ci-factor."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from otbr_plugin.aggregate import bootstrap as bs
from otbr_plugin.aggregate.compare import format_comparisons, paired_comparisons
from otbr_plugin.aggregate.summary import defense_summary, format_summary
from otbr_plugin.aggregate.tables import comparison_table, format_table, interval_table

from test_bootstrap import AFTER_A, AFTER_B, BEFORE, N_BD, N_CLEAN, SHA, _samples, _vec, rec_from


def _old_interval(reps: list[np.ndarray]) -> bs.Interval:
    """The interval before seeds were resampled: replicates averaged replicate by replicate."""
    return bs.percentile_interval(np.mean(reps, axis=0))


def _at(asr: float, dseed: int, defense: str = "fp", order: int = 0):
    """A record of ``defense`` at defense seed ``dseed`` with ASR ``asr`` (ACC 85, RA 10) on the shared images."""
    return rec_from(_samples(_vec(0.85, N_CLEAN, 40 + order), _vec(asr, N_BD, 50 + order), _vec(0.10, N_BD, 60)),
                    defense, defense_seed=dseed)


def test_a_single_record_keeps_exactly_its_test_image_interval():
    r = rec_from(AFTER_A)
    reps = bs.record_replicates([r], 300, 0)[0]
    mean, _ = comparison_table([r])
    lo, hi = interval_table([r], mean, n_boot=300)
    for m in ("acc", "asr", "ra", "der"):
        np.testing.assert_array_equal(bs.seed_replicates([[reps[m]]], 0, "x"), reps[m])
        old = _old_interval([reps[m]])
        assert (lo.at["badnets", ("otbr", m)], hi.at["badnets", ("otbr", m)]) == (old.lo * 100, old.hi * 100)
    assert lo.attrs["levels"] == ("test images",)
    assert "95% bootstrap interval over test images (otbr_plugin" in format_table(mean, _, "md", lo, hi)
    summary = defense_summary([rec_from(BEFORE, "none"), r], ci=True, n_boot=300)
    row = summary.frame.set_index("defense").loc["otbr"]
    old = _old_interval([reps["der"] * 100])
    assert (row["der_lo"], row["der_hi"]) == (old.lo, old.hi) and summary.levels == ("test images",)


def test_seeds_that_disagree_widen_the_interval_to_their_spread():
    recs = [_at(0.70, 0), _at(0.85, 1, order=1), _at(0.90, 2, order=2)]
    n_boot = 1000
    reps = [x["asr"] for x in bs.record_replicates(recs, n_boot, 0)]
    old = _old_interval(reps)
    mean, _ = comparison_table(recs)
    lo, hi = interval_table(recs, mean, n_boot=n_boot)
    new = (lo.at["badnets", ("fp", "asr")], hi.at["badnets", ("fp", "asr")])
    assert mean.at["badnets", ("fp", "asr")] == pytest.approx(81.6667, abs=1e-3)
    # test images alone: about +-2.5 points around 81.7 (300 poisoned images), far from 70 and 90
    assert old.hi * 100 - old.lo * 100 < 8 and old.lo * 100 > 75
    # over seeds as well: a draw of three times seed 0 (or of seed 2) lies in the tails, so the interval reaches
    # well below the lowest pair-mean of the old one and covers most of the seeds' spread
    assert new[1] - new[0] > 2 * (old.hi - old.lo) * 100
    assert new[0] < 77.5 < 85.0 < new[1]
    assert lo.attrs["levels"] == ("test images", "defense seeds")
    text = format_table(mean, _, "md", lo, hi)
    assert "over test images and defense seeds (two-level bootstrap" in text
    # deterministic given the bootstrap seed; another seed draws other seeds
    again, _ = interval_table(recs, mean, n_boot=n_boot)
    assert again.at["badnets", ("fp", "asr")] == new[0]
    other, _ = interval_table(recs, mean, n_boot=n_boot, seed=1)
    assert other.at["badnets", ("fp", "asr")] != new[0]


def test_summary_resamples_defense_seeds():
    recs = [rec_from(BEFORE, "none"), _at(0.70, 0), _at(0.85, 1, order=1), _at(0.90, 2, order=2)]
    summary = defense_summary(recs, ci=True, n_boot=500)
    row = summary.frame.set_index("defense").loc["fp"]
    old = _old_interval([x["der"] * 100 for x in bs.record_replicates(recs[1:], 500, 0)])
    assert row["der_hi"] - row["der_lo"] > 2 * (old.hi - old.lo)
    assert summary.levels == ("test images", "defense seeds")
    assert "mean DER over test images and defense seeds" in format_summary(summary, "md", ci=True)


def test_paired_interval_over_seeds_includes_zero_when_seeds_disagree_in_sign():
    # on every defense seed the two defenses differ by 15-20 ASR points, but not always in the same direction
    recs = [_at(0.20, 0, "fp"), _at(0.60, 1, "fp", order=1), _at(0.25, 2, "fp", order=2),
            _at(0.40, 0, "otbr", order=3), _at(0.40, 1, "otbr", order=4), _at(0.45, 2, "otbr", order=5)]
    df = paired_comparisons(recs, ["asr"], n_boot=1000)
    row = df.iloc[0]
    assert (row["defense_a"], row["defense_b"]) == ("otbr", "fp")
    assert row["diff"] == pytest.approx(6.6667, abs=1e-3)
    assert row["lo"] < 0 < row["hi"] and not row["significant"]
    # the test-image-only interval of the same means calls the difference real
    reps = bs.record_replicates(recs, 1000, 0)
    only_images = bs.percentile_interval(np.mean([r["asr"] for r in reps[3:]], 0)
                                         - np.mean([r["asr"] for r in reps[:3]], 0))
    assert only_images.excludes_zero()
    assert df.attrs["levels"] == ("test images", "defense seeds")
    assert "over test images and defense seeds" in format_comparisons(df)


def test_paired_single_seed_comparison_is_unchanged():
    recs = [rec_from(AFTER_A, "otbr"), rec_from(AFTER_B, "clp")]
    df = paired_comparisons(recs, ["acc", "der"], n_boot=200)
    reps = bs.record_replicates(recs, 200, 0)
    for _, row in df.iterrows():
        old = bs.percentile_interval(reps[0][row["metric"]] - reps[1][row["metric"]])
        assert (row["lo"], row["hi"]) == (old.lo * 100, old.hi * 100)
    assert "over the same resampled test images (otbr_plugin" in format_comparisons(df)


def test_seed_tree_orders_and_bad_trees_are_refused():
    recs = [_at(0.3, 2), _at(0.4, 0, order=1), rec_from(AFTER_A, seed=1)]
    tree = bs.seed_tree((r, r.defense_seed if r.defense_seed is not None else -1) for r in recs)
    assert tree == [[0, 2], [-1]]
    assert bs.resampled_levels([[[1], [2]]]) == ("test images", "training seeds")
    assert bs.levels_text(("test images", "training seeds", "defense seeds")) == (
        "test images, training seeds and defense seeds")
    with pytest.raises(ValueError, match="same number of replicates"):
        bs.seed_replicates([[np.zeros(3), np.zeros(4)]], 0, "x")
    with pytest.raises(ValueError, match="at least one"):
        bs.seed_replicates([[]], 0, "x")


# ------------------------------------------------------------------------------ leaderboard and regress (issue 30)
def _board_ci(board, defense: str, metric: str) -> str:
    return board.set_index("defense").at[defense, f"{metric}_ci"]


def _text(ci: bs.Interval) -> str:
    return f"[{ci.lo * 100:.2f}, {ci.hi * 100:.2f}]"


def _rec(asr: float, attack: str, seed: int, dseed: int | None, order: int, defense: str = "fp"):
    """A record of ``defense`` on checkpoint (``attack``, training seed ``seed``; its own poisoned set's sha256)."""
    sha = hashlib.sha256(f"{attack}-{seed}".encode()).hexdigest()
    return rec_from(_samples(_vec(0.85, N_CLEAN, 70 + order), _vec(asr, N_BD, 80 + order), _vec(0.10, N_BD, 60)),
                    defense, attack=attack, seed=seed, sha=sha, defense_seed=dseed)


def _board(recs, tmp_path, n_boot=1000):
    from otbr_plugin.aggregate.leaderboard import build_leaderboard, export_submission, load_submission

    return build_leaderboard([load_submission(export_submission(recs, tmp_path / "s.json", "J", "M"))], n_boot=n_boot)


def test_leaderboard_entry_over_defense_seeds_gets_the_two_level_interval(tmp_path):
    recs = [_at(0.70, 0), _at(0.85, 1, order=1), _at(0.90, 2, order=2)]
    board = _board(recs, tmp_path)
    reps = bs.record_replicates(recs, 1000, 0)
    for m in ("acc", "asr", "ra", "der"):
        # assembled here: one training seed holding defense seeds 0, 1, 2; the stream the table uses for the cell
        expected = bs.percentile_interval(bs.seed_replicates([[reps[0][m], reps[1][m], reps[2][m]]], 0, "badnets:fp"))
        assert _board_ci(board, "fp", m) == _text(expected)
    old = _old_interval([r["asr"] for r in reps])  # test images only, as the board gave before
    lo, hi = (float(x) for x in _board_ci(board, "fp", "asr").strip("[]").split(","))
    assert hi - lo > 2 * (old.hi - old.lo) * 100 and lo < 77.5 < 85.0 < hi
    # the same interval as the comparison table's cell
    mean, _ = comparison_table(recs)
    tlo, thi = interval_table(recs, mean, n_boot=1000)
    assert _board_ci(board, "fp", "asr") == _text(bs.Interval(tlo.at["badnets", ("fp", "asr")] / 100,
                                                             thi.at["badnets", ("fp", "asr")] / 100))
    assert board.attrs["levels"] == ("test images", "defense seeds")
    from otbr_plugin.aggregate.leaderboard import leaderboard_note

    assert "over test images and defense seeds" in leaderboard_note(board.attrs["levels"])
    from otbr_plugin.cli import main

    assert main(["leaderboard", "build", str(tmp_path / "s.json"), "--out", str(tmp_path / "b.md")]) == 0
    assert "*_ci: 95% bootstrap interval over test images and defense seeds" in (tmp_path / "b.md").read_text()


def test_leaderboard_row_over_attacks_and_training_seeds(tmp_path):
    # badnets: training seeds 0 and 1 (two checkpoints), each with defense seeds 0 and 1; blended: one record
    recs = [_rec(0.20, "badnets", 0, 0, 0), _rec(0.50, "badnets", 0, 1, 1), _rec(0.05, "badnets", 1, 0, 2),
            _rec(0.10, "badnets", 1, 1, 3), _rec(0.40, "blended", 0, None, 4)]
    board = _board(recs, tmp_path)
    reps = [r["asr"] for r in bs.record_replicates(recs, 1000, 0)]
    badnets = bs.seed_replicates([[reps[0], reps[1]], [reps[2], reps[3]]], 0, "badnets:fp")
    blended = reps[4]
    expected = bs.percentile_interval((badnets + blended) / 2)
    assert _board_ci(board, "fp", "asr") == _text(expected)
    images_only = bs.percentile_interval((np.mean(reps[:4], axis=0) + blended) / 2)
    assert expected.hi - expected.lo > 2 * (images_only.hi - images_only.lo)
    assert board.attrs["levels"] == ("test images", "training seeds", "defense seeds")


def test_leaderboard_with_one_record_per_attack_is_unchanged(tmp_path, capsys):
    from otbr_plugin.cli import main

    recs = [_rec(0.20, "badnets", 0, None, 0), _rec(0.40, "blended", 0, None, 1), _rec(0.30, "sig", 0, 0, 2)]
    board = _board(recs, tmp_path, n_boot=300)
    reps = bs.record_replicates(recs, 300, 0)
    for m in ("acc", "asr", "ra", "der"):
        assert _board_ci(board, "fp", m) == _text(_old_interval([r[m] for r in reps]))
    assert board.attrs["levels"] == ("test images",)
    assert main(["leaderboard", "build", str(tmp_path / "s.json")]) == 0
    assert "bootstrap interval" not in capsys.readouterr().out  # no note: the board reads as before


def _half(ci: bs.Interval) -> float:
    return (ci.hi - ci.lo) / 2


def test_regress_cell_over_defense_seeds_uses_the_two_level_interval(tmp_path):
    from otbr_plugin.aggregate.regress import compare, load_baseline, make_baseline

    recs = [_at(0.70, 0), _at(0.85, 1, order=1), _at(0.90, 2, order=2)]
    baseline = load_baseline(make_baseline(recs, tmp_path / "b.json"))
    reps = bs.record_replicates(recs, 1000, 0)
    expected = {m: _half(bs.percentile_interval(bs.seed_replicates([[r[m] for r in reps]], 0, "badnets:fp")))
                for m in ("acc", "asr", "ra", "der")}
    (cell,) = baseline.cells
    assert cell["ci_half"] == expected and cell["ci_levels"] == ["test images", "defense seeds"]
    old = _half(_old_interval([r["asr"] for r in reps]))
    assert expected["asr"] > 2 * old
    # a current run 5 ASR points worse: beyond test-image noise (and the 2-point tolerance), within seed noise
    worse = [_at(0.75, 0), _at(0.90, 1, order=1), _at(0.95, 2, order=2)]
    assert old < 0.05 < expected["asr"]
    assert compare(baseline, worse)[0].status == "regressed"
    row = compare(baseline, worse, ci_factor=1.0)[0]
    assert row.status == "ok" and row.checks["asr"].ci_half == expected["asr"]
    # a baseline without ci_half: the current records' interval, seed-aware the same way
    for c in baseline.cells:
        del c["ci_half"], c["ci_levels"]
    cur = bs.record_replicates(worse, 1000, 0)
    assert compare(baseline, worse, ci_factor=1.0)[0].checks["asr"].ci_half == _half(
        bs.percentile_interval(bs.seed_replicates([[r["asr"] for r in cur]], 0, "badnets:fp")))


def test_regress_cell_over_training_seeds_records_the_group_interval(tmp_path):
    from otbr_plugin.aggregate.regress import compare, load_baseline, make_baseline

    recs = [_rec(0.20, "badnets", 0, 0, 0), _rec(0.50, "badnets", 0, 1, 1), _rec(0.05, "badnets", 1, 0, 2),
            _rec(0.10, "badnets", 1, 1, 3)]
    baseline = load_baseline(make_baseline(recs, tmp_path / "b.json"))
    reps = [r["der"] for r in bs.record_replicates(recs, 1000, 0)]
    expected = _half(bs.percentile_interval(bs.seed_replicates([[reps[0], reps[1]], [reps[2], reps[3]]], 0,
                                                               "badnets:fp")))
    assert [c["seed"] for c in baseline.cells] == [0, 1]
    assert all(c["ci_half"]["der"] == expected for c in baseline.cells)  # the group's, in each of its cells
    assert all(c["ci_levels"] == ["test images", "training seeds", "defense seeds"] for c in baseline.cells)
    row = compare(baseline, recs, ci_factor=1.0)[0]
    assert row.status == "ok" and row.checks["der"].ci_half == expected
    assert expected > 2 * np.mean([_half(_old_interval(reps[:2])), _half(_old_interval(reps[2:]))])
    # an older baseline (no ci_levels: each training seed's test-image half width) over several seeds: the current
    # records' seed-aware interval instead; with one record the older file's own
    for c in baseline.cells:
        c["ci_half"] = {m: 0.001 for m in ("acc", "asr", "ra", "der")}
        del c["ci_levels"]
    assert compare(baseline, recs, ci_factor=1.0)[0].checks["der"].ci_half == expected
    single = load_baseline(make_baseline([recs[0]], tmp_path / "one.json"))
    single.cells[0]["ci_half"] = {m: 0.001 for m in ("acc", "asr", "ra", "der")}
    del single.cells[0]["ci_levels"]
    assert compare(single, [recs[0]], ci_factor=1.0)[0].checks["der"].ci_half == 0.001


def test_regress_single_record_half_width_is_unchanged(tmp_path):
    from otbr_plugin.aggregate.regress import load_baseline, make_baseline

    r = rec_from(AFTER_A)
    (cell,) = load_baseline(make_baseline([r], tmp_path / "b.json")).cells
    reps = bs.record_replicates([r], 1000, 0)[0]
    assert cell["ci_half"] == {m: _half(_old_interval([reps[m]])) for m in ("acc", "asr", "ra", "der")}
    assert cell["ci_levels"] == ["test images"]
