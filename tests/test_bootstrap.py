"""Per-sample outcomes in run records, bootstrap intervals and paired comparisons: checked against independent
computations of the documented procedure, and against invariants."""

import hashlib
import json

import numpy as np
import pytest
import torch

from otbr_plugin.aggregate import bootstrap as bs
from otbr_plugin.aggregate.compare import paired_comparisons
from otbr_plugin.aggregate.records import RunRecord, read_record, record_filename, write_record
from otbr_plugin.aggregate.tables import (best_mask, comparison_table, format_table, interval_table, load_records)
from otbr_plugin.cli import main
from otbr_plugin.metrics import BackdoorMetrics, SampleCorrectness, defense_effectiveness_rating

SHA = "cd" * 32
N_CLEAN, N_BD = 400, 300


def _vec(rate: float, n: int, seed: int) -> np.ndarray:
    """A bool vector with exactly round(rate * n) ones, in a seeded order."""
    v = np.zeros(n, dtype=bool)
    v[: int(round(rate * n))] = True
    return np.random.default_rng(seed).permutation(v)


def _samples(clean, target, true) -> SampleCorrectness:
    return SampleCorrectness(*(torch.from_numpy(np.asarray(x, dtype=bool)) for x in (clean, target, true)))


BEFORE = _samples(_vec(0.9, N_CLEAN, 1), _vec(0.95, N_BD, 2), _vec(0.04, N_BD, 3))


def rec_from(after: SampleCorrectness, defense="otbr", attack="badnets", seed=0, before=BEFORE, sha=SHA, **kw):
    """A record whose metrics are the means of the given outcomes and which keeps them."""
    def m(s):
        return BackdoorMetrics(float(s.clean.float().mean()), float(s.target.float().mean()),
                               float(s.true.float().mean()))

    b, a = m(before), m(after)
    return RunRecord(dataset="fashion_mnist", model={"name": "preactresnet18"}, attack={"name": attack},
                     defense=defense, defense_config={}, seed=seed, checkpoint_sha256=sha, metrics_before=b.to_dict(),
                     metrics_after=a.to_dict(), der=defense_effectiveness_rating(b, a), data_used="none",
                     per_sample=bs.per_sample_payload(before, after), **kw)


AFTER_A = _samples(_vec(0.85, N_CLEAN, 4), _vec(0.10, N_BD, 5), _vec(0.80, N_BD, 6))
AFTER_B = _samples(_vec(0.60, N_CLEAN, 7), _vec(0.08, N_BD, 8), _vec(0.50, N_BD, 9))


def _independent_rows(stream: str, n: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """The resampled index rows as the module docstring defines them, computed here from scratch."""
    words = np.frombuffer(hashlib.sha256(stream.encode()).digest()[:16], dtype=np.uint32).tolist()
    rng = np.random.default_rng(np.random.SeedSequence([seed, *words]))
    return rng.integers(0, n, size=(n_boot, n))


def test_bits_round_trip_and_bad_bits_are_refused():
    v = _vec(0.3, 1003, 0)
    assert (bs.decode_bits(bs.encode_bits(v), 1003) == v).all()
    with pytest.raises(ValueError, match="bytes"):
        bs.decode_bits(bs.encode_bits(v), 2000)
    padded = bs.encode_bits(np.ones(1008, dtype=bool))  # 1003 samples + 5 set padding bits
    with pytest.raises(ValueError, match="padding"):
        bs.decode_bits(padded, 1003)
    with pytest.raises(ValueError, match="base64"):
        bs.decode_bits("not base64!", 8)


def test_chunked_rows_equal_one_draw():
    rows = np.concatenate(list(bs.resample_indices(257, 250, 3, "clean:257", chunk=64)))
    assert (rows == _independent_rows("clean:257", 257, 250, seed=3)).all()


def test_record_round_trip_keeps_the_bits(tmp_path):
    r = rec_from(AFTER_A)
    back = read_record(write_record(r, tmp_path / "r.json"))
    assert back == r and back.schema_version == 2
    decoded = bs.check_per_sample(back.per_sample, back.metrics_before, back.metrics_after)
    assert (decoded["clean_after_correct"] == AFTER_A.clean.numpy()).all()
    assert (decoded["poisoned_before_true"] == BEFORE.true.numpy()).all()


def test_bits_that_do_not_give_the_recorded_metrics_are_refused(tmp_path):
    d = rec_from(AFTER_A).to_dict()
    d["per_sample"]["clean"]["after_correct"] = bs.encode_bits(~AFTER_A.clean.numpy())
    (tmp_path / "r.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="clean_after_correct bits give ACC"):
        read_record(tmp_path / "r.json")


def test_old_records_without_the_field_still_load_and_show_no_interval(tmp_path):
    old = rec_from(AFTER_A).to_dict()
    for k in ("per_sample", "defense_seed", "training", "grid_order"):
        del old[k]
    old["schema_version"] = 1
    (tmp_path / record_filename("fashion_mnist", "preactresnet18", "badnets", "otbr", 0)).write_text(json.dumps(old))
    records = load_records(tmp_path)
    assert records[0].per_sample is None
    mean, std = comparison_table(records)
    lo, hi = interval_table(records, mean)
    assert lo.isna().all().all() and hi.isna().all().all()
    assert "[" not in format_table(mean, std, "md", lo, hi).split("\n\n")[0]


def test_interval_equals_an_independent_computation():
    n_boot = 300
    r = rec_from(AFTER_A)
    mean, _ = comparison_table([r])
    lo, hi = interval_table([r], mean, n_boot=n_boot, seed=0)
    clean = _independent_rows(f"clean:{N_CLEAN}", N_CLEAN, n_boot)
    bd = _independent_rows(f"poisoned:{SHA}:{N_BD}", N_BD, n_boot)
    acc_b, acc_a = BEFORE.clean.numpy()[clean].mean(1), AFTER_A.clean.numpy()[clean].mean(1)
    asr_b, asr_a = BEFORE.target.numpy()[bd].mean(1), AFTER_A.target.numpy()[bd].mean(1)
    der = (np.maximum(0, asr_b - asr_a) - np.maximum(0, acc_b - acc_a) + 1) / 2
    for metric, reps in (("acc", acc_a), ("asr", asr_a), ("ra", AFTER_A.true.numpy()[bd].mean(1)), ("der", der)):
        want = np.percentile(reps, [2.5, 97.5]) * 100
        assert lo.at["badnets", ("otbr", metric)] == pytest.approx(want[0], abs=1e-9)
        assert hi.at["badnets", ("otbr", metric)] == pytest.approx(want[1], abs=1e-9)
    # the recorded value lies inside its interval, and another seed gives another (valid) interval
    assert lo.at["badnets", ("otbr", "acc")] <= 85.0 <= hi.at["badnets", ("otbr", "acc")]
    lo2, _ = interval_table([r], mean, n_boot=n_boot, seed=1)
    assert lo2.at["badnets", ("otbr", "acc")] != lo.at["badnets", ("otbr", "acc")]


def test_several_training_seeds_are_resampled_then_the_images():
    n_boot = 200
    r0, r1 = rec_from(AFTER_A, seed=0), rec_from(AFTER_B, seed=1)
    mean, _ = comparison_table([r0, r1])
    lo, hi = interval_table([r0, r1], mean, n_boot=n_boot)
    clean = _independent_rows(f"clean:{N_CLEAN}", N_CLEAN, n_boot)
    leaves = np.stack([AFTER_A.clean.numpy()[clean].mean(1), AFTER_B.clean.numpy()[clean].mean(1)])  # (seed, boot)
    drawn = _independent_rows("seeds:badnets:otbr", 2, n_boot)  # per replicate, 2 training seeds with replacement
    reps = leaves[drawn, np.arange(n_boot)[:, None]].mean(1)
    assert lo.at["badnets", ("otbr", "acc")] == pytest.approx(np.percentile(reps, 2.5) * 100, abs=1e-9)
    assert hi.at["badnets", ("otbr", "acc")] == pytest.approx(np.percentile(reps, 97.5) * 100, abs=1e-9)
    assert lo.attrs["levels"] == ("test images", "training seeds")
    assert "over test images and training seeds (two-level" in format_table(mean, _, "md", lo, hi)


def test_paired_interval_of_identical_defenses_is_exactly_zero():
    df = paired_comparisons([rec_from(AFTER_A, "otbr"), rec_from(AFTER_A, "clp")], n_boot=200)
    assert len(df) == 4
    assert (df["diff"] == 0).all() and (df["lo"] == 0).all() and (df["hi"] == 0).all()
    assert not df["significant"].any()


def test_paired_difference_uses_the_same_images():
    n_boot = 200
    df = paired_comparisons([rec_from(AFTER_A, "otbr"), rec_from(AFTER_B, "clp")], ["acc"], n_boot=n_boot)
    clean = _independent_rows(f"clean:{N_CLEAN}", N_CLEAN, n_boot)
    diff = AFTER_A.clean.numpy()[clean].mean(1) - AFTER_B.clean.numpy()[clean].mean(1)
    row = df.iloc[0]
    assert (row["defense_a"], row["defense_b"]) == ("otbr", "clp")
    assert row["diff"] == pytest.approx(25.0)
    assert row["lo"] == pytest.approx(np.percentile(diff, 2.5) * 100, abs=1e-9)
    assert row["significant"] and row["better"] == "otbr"  # 85 vs 60 ACC on 400 images: far beyond noise


def test_best_marks_respect_the_clean_accuracy_bound():
    none = rec_from(BEFORE, "none")
    keeps = rec_from(AFTER_A, "otbr")  # ACC 85 (5 points below 90), ASR 10
    drops = rec_from(_samples(_vec(0.25, N_CLEAN, 1), _vec(0.0, N_BD, 1), _vec(0.2, N_BD, 1)), "fp")  # ACC 25, ASR 0
    mean, std = comparison_table([none, keeps, drops])
    assert best_mask(mean, None).at["badnets", ("fp", "asr")]  # without the bound fp "wins" ASR
    best = best_mask(mean, 10.0)
    assert best.at["badnets", ("otbr", "asr")] and not best.at["badnets", ("fp", "asr")]
    assert not best.at["badnets", ("fp", "der")]
    text = format_table(mean, std, "md", acc_drop=10.0)
    assert "25.00†" in text and "at most 10 points below" in text


def test_cli_table_ci_and_compare(tmp_path, capsys):
    for r in (rec_from(BEFORE, "none"), rec_from(AFTER_A, "otbr"), rec_from(AFTER_B, "clp")):
        write_record(r, tmp_path / "records" / record_filename(r.dataset, "preactresnet18", "badnets", r.defense, 0))
    assert main(["table", str(tmp_path), "--ci", "--boot", "200"]) == 0
    out = capsys.readouterr().out
    assert "85.00 [" in out and "95% bootstrap interval" in out
    assert main(["compare", str(tmp_path), "--boot", "200", "--metrics", "acc"]) == 0
    out = capsys.readouterr().out
    assert "| otbr | clp | ACC | 85.00 | 60.00 | +25.00 |" in out and "| yes | otbr |" in out
    assert main(["compare", str(tmp_path), "--metrics", "bogus"]) != 0
    assert "unknown metric" in capsys.readouterr().err


def test_leaderboard_carries_the_bits_and_shows_intervals(tmp_path):
    from otbr_plugin.aggregate.leaderboard import (build_leaderboard, entries_digest, export_submission,
                                                   load_submission, validate_submission)

    path = export_submission([rec_from(AFTER_A, "otbr"), rec_from(AFTER_B, "clp")], tmp_path / "s.json", "J", "M")
    data = load_submission(path)
    board = build_leaderboard([data], n_boot=200)
    row = board[board["defense"] == "otbr"].iloc[0]
    lo, hi = (float(x) for x in row["acc_ci"].strip("[]").split(","))
    assert lo <= row["acc"] <= hi and hi - lo > 0
    data["entries"][0]["per_sample"]["clean"]["after_correct"] = bs.encode_bits(np.zeros(N_CLEAN, dtype=bool))
    data["entries_sha256"] = entries_digest(data["entries"])
    assert any("after_correct" in p and "bits give ACC" in p for p in validate_submission(data))
    old = json.loads(path.read_text())  # a submission without per-sample outcomes: a board without intervals
    for e in old["entries"]:
        del e["per_sample"]
    old["entries_sha256"] = entries_digest(old["entries"])
    assert validate_submission(old) == []
    assert set(build_leaderboard([old])["der_ci"]) == {"-"}
