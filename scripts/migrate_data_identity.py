"""Add the identity of the data to committed run records made before records carried it (issue 26, defect 10).

Grid-cell fingerprints now include the size and sha256 of the dataset's train and test tensors
(:func:`otbr_plugin.data.data_identity`), and every record carries a ``data`` block. The committed records under
``results/`` were all made on the full Fashion-MNIST of Debian's ``dataset-fashion-mnist`` package. This script
recomputes the identity from the dataset files found on this machine (``--data-root``, else the default search),
and for each record:

* checks what can be checked against it: the dataset's name, and for clean-data defenses that the recorded clean
  subset size ("clean subset of N") equals ``clean_ratio`` x the train set's size (a record made on a subset
  fails this);
* writes ``data`` = {root, train, test, migrated_by};
* for a record with a fingerprint: verifies that the fingerprint is the one the grid config (``configs/bench/``)
  gives without data (its old formula, as ``stale_reason`` computes it) and replaces it with the fingerprint of the
  same cell including the data; a record whose fingerprint matches no grid is left as it is and reported.

Run from the repository root: ``.venv/bin/python scripts/migrate_data_identity.py results/fashion_mnist ...``.
With ``--check`` nothing is written (exit 1 when a record would change).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from otbr_plugin.bench import grid as grid_module
from otbr_plugin.bench.grid import load_grid
from otbr_plugin.aggregate.records import RunRecord
from otbr_plugin.data import data_identity, find_dataset
from otbr_plugin.data.identity import identity_changes
from otbr_plugin.io import write_json

REPO = Path(__file__).resolve().parents[1]


def _grids() -> list:
    return [load_grid(p) for p in sorted((REPO / "configs" / "bench").glob("*.yaml"))]


def _new_fingerprint(record: RunRecord, grids: list, data: dict) -> str | None:
    """The cell's fingerprint including ``data``, from the grid whose old (data-free) fingerprint the record has."""
    label, attack = record.defense, record.attack_name
    for grid in grids:
        if label not in grid.defenses or attack not in grid.attacks or grid.dataset != record.dataset:
            continue
        cfg = grid_module.attack_fingerprint_config(grid, attack, record.seed)
        sha = record.checkpoint_sha256
        for since in (None, record):
            if record.fingerprint == grid_module.cell_fingerprint(grid, cfg, label, sha, since=since):
                return grid_module.cell_fingerprint(grid, cfg, label, sha, since=since, data=data)
            if record.fingerprint == grid_module.cell_fingerprint(grid, cfg, label, sha, since=since, data=data):
                return record.fingerprint  # already migrated
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", help="results folders holding records/")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 when a record would change")
    args = ap.parse_args(argv)
    grids = _grids()
    changed = problems = stale = 0
    for folder in args.folders:
        for path in sorted(Path(folder, "records").glob("*.json")):
            raw = json.loads(path.read_text())
            record = RunRecord.from_dict(raw)
            root = find_dataset(record.dataset, args.data_root)
            if root is None:
                print(f"{path}: {record.dataset} not found", file=sys.stderr)
                return 2
            data = data_identity(record.dataset, args.data_root)
            m = re.fullmatch(r"clean subset of (\d+)", record.data_used)
            grid_ratio = next((g.clean_ratio for g in grids if g.dataset == record.dataset), 0.05)
            if m and int(m.group(1)) != round(grid_ratio * data["train"]["num_samples"]):
                print(f"{path}: clean subset of {m.group(1)} does not fit a train set of "
                      f"{data['train']['num_samples']}: not migrated", file=sys.stderr)
                problems += 1
                continue
            new = dict(raw)
            new["data"] = {"root": str(root), "train": data["train"], "test": data["test"],
                           "migrated_by": "scripts/migrate_data_identity.py (identity recomputed from the dataset "
                                          "files; the record predates data identities)"}
            if record.fingerprint is not None:
                fp = _new_fingerprint(record, grids, data)
                if fp is None and isinstance(raw.get("data"), dict) and not identity_changes(raw["data"], data):
                    # migrated (or written) with this data; a config changed since: the grid reruns the cell
                    print(f"{path}: already carries this data's identity; stale against today's grid config "
                          "(the next run of its grid reruns it)", file=sys.stderr)
                    stale += 1
                    continue
                if fp is None:
                    print(f"{path}: its fingerprint matches no grid config: not migrated", file=sys.stderr)
                    problems += 1
                    continue
                new["fingerprint"] = fp
            if isinstance(raw.get("data"), dict) and "migrated_by" not in raw["data"]:
                continue  # written with its data identity: nothing to do
            if new != raw:
                changed += 1
                if not args.check:
                    write_json(path, new)
    print(f"{changed} record(s) {'to change' if args.check else 'changed'}, {problems} problem(s)"
          + (f", {stale} stale against today's configs (not data)" if stale else ""))
    return 1 if problems or (args.check and changed) else 0


if __name__ == "__main__":
    raise SystemExit(main())
