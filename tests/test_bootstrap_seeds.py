"""The two-level bootstrap over seeds (bootstrap.seed_replicates) in the table, the by-defense summary and compare."""

from __future__ import annotations

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
