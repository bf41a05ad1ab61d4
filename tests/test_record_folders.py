"""Tables and paired comparisons over several record folders (``load_record_folders``; ``table``/``compare`` with
more than one folder): a cell found twice is counted once only when it is one measurement."""

import json
import shutil
from pathlib import Path

import pytest

from otbr_plugin.aggregate.tables import comparison_table, load_record_folders, load_records
from otbr_plugin.cli import main

SEEDS = Path(__file__).resolve().parents[1] / "results" / "fashion_mnist_defense_seeds" / "records"


def _folder(root: Path, name: str, defenses: tuple[str, ...]) -> Path:
    """A folder holding the committed BadNets records (defense seeds 0-2) of ``defenses``."""
    out = root / name / "records"
    out.mkdir(parents=True)
    for d in defenses:
        for f in SEEDS.glob(f"fashion_mnist__preactresnet18__badnets__{d}__seed0__dseed*.json"):
            shutil.copy(f, out / f.name)
    return out.parent


def test_disjoint_folders_are_their_union(tmp_path):
    a, b = _folder(tmp_path, "a", ("none", "otbr")), _folder(tmp_path, "b", ("fp",))
    both = load_record_folders([a, b])
    assert sorted(r.full_key() for r in both) == sorted(r.full_key() for r in load_records(a) + load_records(b))
    assert load_record_folders([a]) == load_records(a)


def test_one_measurement_in_two_folders_is_counted_once(tmp_path, capsys):
    a, b = _folder(tmp_path, "a", ("none", "otbr")), _folder(tmp_path, "b", ("none", "fp"))
    repeated: list = []
    both = load_record_folders([a, b], repeated=repeated)
    assert [r.defense for r in both].count("none") == 1 and len(both) == 1 + 3 + 3
    assert [(p.parent.parent.name, q.parent.parent.name) for p, q in repeated] == [("a", "b")]
    assert main(["table", str(a), str(b)]) == 0
    out = capsys.readouterr()
    assert "1 cell(s) found in more than one folder" in out.err
    header = out.out.splitlines()[0]
    assert all(d in header for d in ("otbr", "fp")), header
    mean, _ = comparison_table(both)
    assert mean.loc["badnets", ("none", "acc")] == pytest.approx(both[0].metrics_before["acc"] * 100)


@pytest.mark.parametrize("field, value, why", [
    ("checkpoint_sha256", "cd" * 32, "checkpoints"),
    ("fingerprint", "0" * 64, "fingerprints differ"),
])
def test_two_measurements_of_one_cell_are_an_error_naming_both(tmp_path, field, value, why):
    a, b = _folder(tmp_path, "a", ("otbr",)), _folder(tmp_path, "b", ("otbr",))
    path = next((b / "records").glob("*dseed1.json"))
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="different measurements") as err:
        load_record_folders([a, b])
    assert why in str(err.value) and path.name in str(err.value) and str(a) in str(err.value)


def test_compare_pairs_defenses_kept_in_different_folders(tmp_path, capsys):
    a, b = _folder(tmp_path, "a", ("otbr",)), _folder(tmp_path, "b", ("fp",))
    assert main(["compare", str(a), "--boot", "50"]) != 0
    assert "no two defenses" in capsys.readouterr().err
    assert main(["compare", str(a), str(b), "--boot", "50", "--metrics", "asr"]) == 0
    out = capsys.readouterr().out
    assert "otbr" in out and "fp" in out and "asr" in out.lower()


def test_a_missing_folder_is_named(tmp_path):
    a = _folder(tmp_path, "a", ("otbr",))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_record_folders([a, tmp_path / "nowhere"])


def test_attacks_option_keeps_the_named_attacks_and_names_unknown_ones(tmp_path, capsys):
    a = _folder(tmp_path, "a", ("none", "otbr"))
    for f in SEEDS.glob("fashion_mnist__preactresnet18__sig__*.json"):
        shutil.copy(f, a / "records" / f.name)
    assert main(["table", str(a), "--attacks", "sig"]) == 0
    rows = [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert "sig" in rows and "badnets" not in rows
    assert main(["compare", str(a), "--attacks", "badnets", "--include-none", "--boot", "50"]) == 0
    out = capsys.readouterr().out
    assert "badnets" in out and "sig" not in out
    assert main(["table", str(a), "--attacks", "sig,wanet"]) != 0
    err = capsys.readouterr().err
    assert "no records of wanet" in err and "badnets, sig" in err


def test_attacks_option_filters_the_oracle_sweep_diagnostic_too(tmp_path, capsys):
    a = _folder(tmp_path, "a", ("none", "otbr"))
    oracle = Path(__file__).resolve().parents[1] / "results" / "fashion_mnist" / "oracle"
    for attack in ("badnets", "sig"):
        src = oracle / f"{attack}__otbr__seed0"
        shutil.copytree(src, a / "oracle" / src.name)
    assert main(["table", str(a)]) == 0
    rows = capsys.readouterr().out.split("ORACLE DIAGNOSTIC")[1]
    assert "| badnets |" in rows and "| sig |" in rows
    assert main(["table", str(a), "--attacks", "badnets"]) == 0
    rows = capsys.readouterr().out.split("ORACLE DIAGNOSTIC")[1]
    assert "| badnets |" in rows and "| sig |" not in rows
