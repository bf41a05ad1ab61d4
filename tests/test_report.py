"""``otbr-bench report`` and ``leaderboard build --html``: a self-contained HTML page from run records.

The page is parsed with html.parser (every attack and defense of the records is in the table; no external
resource), and rendered in headless Chromium where it is installed (a screenshot that is not blank, the table in
the DOM); without Chromium that test is skipped with the reason.
"""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from otbr_plugin.metrics import BackdoorMetrics, defense_effectiveness_rating
from otbr_plugin.aggregate.records import RunRecord, record_filename, write_record
from otbr_plugin.aggregate.report import TABLE_CHUNK, ORACLE_TITLE, markdown_html, render_report, write_report
from otbr_plugin.aggregate.tables import load_records
from otbr_plugin.cli import main

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "results" / "fashion_mnist"
ATTACKS = ["badnets", "blended"]
DEFENSES = ["none", "otbr", "clp", "fp", "anp"]


def _record(attack: str, defense: str, seed: int, acc: float, asr: float, ra: float) -> RunRecord:
    before = BackdoorMetrics(0.91, 0.99, 0.01)
    after = before if defense == "none" else BackdoorMetrics(acc, asr, ra)
    return RunRecord(dataset="fashion_mnist", model={"name": "preactresnet18", "width": 0.25, "num_classes": 10,
                                                     "in_channels": 1, "image_size": 28},
                     attack={"name": attack, "label": attack, "target_class": 0}, defense=defense,
                     defense_config={"gamma": 0.05} if defense == "otbr" else {}, seed=seed,
                     checkpoint_sha256=f"{ATTACKS.index(attack) * 16 + seed:064x}",
                     metrics_before={"acc": before.acc, "asr": before.asr, "ra": before.ra},
                     metrics_after={"acc": after.acc, "asr": after.asr, "ra": after.ra},
                     der=defense_effectiveness_rating(before, after), data_used="none",
                     seconds={"cell_total": 12.5 + seed, "defense_total": 3.0, "evaluation": 9.5})


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    """Two attacks x five defenses x two seeds, a failed cell, an oracle sweep and a diagnose folder."""
    rng = np.random.default_rng(0)
    out = tmp_path / "run"
    for attack in ATTACKS:
        for d_i, defense in enumerate(DEFENSES):
            for seed in (0, 1):
                r = _record(attack, defense, seed, acc=0.85 + 0.01 * d_i + 0.002 * seed,
                            asr=0.9 - 0.2 * d_i + rng.uniform(0, 0.01), ra=0.05 * d_i)
                write_record(r, out / "records" / record_filename("fashion_mnist", "preactresnet18", attack, defense,
                                                                  seed))
    failed = RunRecord(dataset="fashion_mnist", model={"name": "preactresnet18"}, attack={"name": "blended",
                       "label": "blended"}, defense="otbr", defense_config={}, seed=2, checkpoint_sha256="",
                       metrics_before={}, metrics_after=None, der=None, data_used="", status="failed",
                       error="RuntimeError: boom")
    write_record(failed, out / "records" / "fashion_mnist__preactresnet18__blended__otbr__seed2.json")
    sweep = out / "oracle" / "badnets__otbr__seed0"
    sweep.mkdir(parents=True)
    pd.DataFrame({"attack": "badnets", "defense": "otbr", "seed": 0, "gamma": [0.01, 0.05, 0.1],
                  "acc": [0.9, 0.88, 0.8], "asr": [0.99, 0.9, 0.5], "ra": [0.0, 0.05, 0.3], "der": [0.5, 0.53, 0.7],
                  "num_pruned": [9, 48, 97], "defense_seconds": [1.0, 0.1, 0.1],
                  "diagnostic": "oracle diagnostic (test set)"}).to_csv(sweep / "oracle_sweep_gamma.csv", index=False)
    diag = out / "diagnose" / "badnets"
    diag.mkdir(parents=True)
    (diag / "summary.md").write_text("# NWC diagnosis\n\nTop layer `layer4.1.conv2` holds **most** pruned neurons.\n\n"
                                     "| layer | pruned |\n|---|---|\n| layer4.1.conv2 | 26 |\n\n- a <script>x</script>\n")
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 30)).save(diag / "nwc_hist.png")
    return out


class _Page(HTMLParser):
    """Collects the table rows, data-* attributes, images, links, scripts and section headings of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.attacks: list[str] = []
        self.defenses: set[str] = set()
        self.best: list[tuple[str, str, str]] = []
        self.images: list[str] = []
        self.external: list[str] = []
        self.tags: set[str] = set()
        self.h2: list[str] = []
        self._row: str | None = None
        self._in_h2 = False
        self._in_comparison = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "table":
            self._in_comparison = "comparison" in (a.get("class") or "")
        if tag == "tr" and self._in_comparison and "data-attack" in a:
            self._row = a["data-attack"]
            self.attacks.append(a["data-attack"])
        if tag == "td" and self._in_comparison and "data-defense" in a:
            self.defenses.add(a["data-defense"])
            if "best" in (a.get("class") or "").split():
                self.best.append((self._row, a["data-defense"], a["data-metric"]))
        if tag == "img":
            self.images.append(a.get("src", ""))
        for key in ("src", "href"):
            v = a.get(key) or ""
            if v and not (v.startswith("data:") or v.startswith("#")):
                self.external.append(v)
        if tag == "h2":
            self._in_h2 = True
            self.h2.append("")

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_h2 = False
        if tag == "table":
            self._in_comparison = False

    def handle_data(self, data):
        if self._in_h2:
            self.h2[-1] += data


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    return page


def test_report_has_every_attack_and_defense_and_nothing_external(run_dir: Path) -> None:
    text = render_report(run_dir)
    page = _parse(text)
    # the comparison table wraps (TABLE_CHUNK defenses a table, none repeated): each table lists every attack
    tables = -(-len([d for d in DEFENSES if d != "none"]) // TABLE_CHUNK)
    assert page.attacks == [*ATTACKS, "average"] * tables
    assert page.defenses == set(DEFENSES)
    assert "script" not in page.tags and "link" not in page.tags
    assert page.external == [], page.external
    assert len(page.images) >= 4 and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert "±" in text  # two seeds: mean ± std
    assert ORACLE_TITLE in page.h2
    assert "Provenance" in page.h2 and "OTBR diagnostics" in page.h2
    assert f"{16 + 1:064x}" in text  # a checkpoint hash (blended, seed 1)
    assert "RuntimeError: boom" in text  # the failed cell is listed, not tabulated
    assert "layer4.1.conv2" in text and "&lt;script&gt;" in text  # diagnose summary embedded, escaped


def test_best_marks_follow_the_metric_direction(run_dir: Path) -> None:
    page = _parse(render_report(run_dir))
    best = {(a, m): d for a, d, m in page.best}
    # anp is built with the highest ACC, lowest ASR and highest RA; "none" is never marked
    for attack in [*ATTACKS, "average"]:
        assert best[(attack, "acc")] == "anp" and best[(attack, "asr")] == "anp" and best[(attack, "ra")] == "anp"
    assert all(d != "none" for _, d, _ in page.best)


def test_oracle_is_its_own_labelled_section(run_dir: Path) -> None:
    text = render_report(run_dir)
    table_part, _, oracle_part = text.partition(ORACLE_TITLE)
    assert "comparison" in table_part and 'class="comparison"' not in oracle_part
    assert "reported gamma = 0.05" in oracle_part


def test_cli_report_writes_atomically(run_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.html").is_file()
    out = tmp_path / "sub" / "r.html"
    assert main(["report", str(run_dir), "--out", str(out), "--title", "My title"]) == 0
    assert "<title>My title</title>" in out.read_text()
    assert not [p for p in out.parent.iterdir() if p.name != "r.html"]  # no temporary file left behind
    assert "wrote" in capsys.readouterr().out


def test_failed_render_leaves_the_old_report(run_dir: Path, monkeypatch) -> None:
    target = write_report(run_dir)
    before = target.read_text()
    import otbr_plugin.aggregate.report as rep

    monkeypatch.setattr(rep, "scatter_html", lambda recs: (_ for _ in ()).throw(RuntimeError("plot failed")))
    with pytest.raises(RuntimeError):
        write_report(run_dir)
    assert target.read_text() == before
    assert sorted(p.name for p in run_dir.iterdir() if p.is_file()) == ["report.html"]


def test_report_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 1
    assert main(["report", str(tmp_path / "missing")]) == 1


def test_markdown_subset_is_escaped() -> None:
    html = markdown_html("## T\n\n| a | b |\n|---|---|\n| <i> | `c` |\n\n```\n<x>\n```\n")
    assert "<h4>T</h4>" in html and "<td>&lt;i&gt;</td>" in html and "<code>c</code>" in html
    assert "<pre>&lt;x&gt;</pre>" in html


def test_leaderboard_build_html(run_dir: Path, tmp_path: Path) -> None:
    sub = tmp_path / "sub.json"
    assert main(["leaderboard", "export", str(run_dir / "records"), "--submitter", "Jane", "--method", "OTBR-x",
                 "--out", str(sub)]) == 0
    page_file = tmp_path / "board.html"
    assert main(["leaderboard", "build", str(sub), "--html", str(page_file), "--out", str(tmp_path / "b.md")]) == 0
    page = _parse(page_file.read_text())
    assert "Leaderboard" in page.h2 and "Comparison table" in page.h2
    assert set(page.attacks) >= set(ATTACKS)
    assert "none" in page.defenses and "OTBR-x: otbr" in page.defenses
    assert page.external == []


def test_committed_report_is_small_and_complete() -> None:
    path = COMMITTED / "report.html"
    assert path.is_file(), "results/fashion_mnist/report.html: run `otbr-bench report results/fashion_mnist`"
    # 8 attacks x 11 defenses: three plots (~260 KB) and the paired differences (55 pairs per attack) dominate
    assert path.stat().st_size < 800_000
    records = [r for r in load_records(COMMITTED / "records") if r.status == "ok"]
    page = _parse(path.read_text())
    assert set(page.attacks) == {r.attack_name for r in records} | {"average"}
    assert page.defenses == {r.defense for r in records}
    assert page.external == []


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="Chromium not installed (Debian: apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    report = write_report(run_dir, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'prof'}"]
    url = report.resolve().as_uri()
    subprocess.run([_chromium(), *flags, f"--screenshot={shot}", "--window-size=1280,2000", url],
                   check=True, timeout=240, capture_output=True)
    im = Image.open(shot).convert("RGB")
    assert im.size == (1280, 2000)
    small = np.asarray(im.resize((320, 500)))
    colors = {tuple(c) for c in small.reshape(-1, 3) // 16}
    assert len(colors) > 20, "the screenshot is (almost) blank"
    assert (small < 250).any(axis=2).mean() > 0.05, "the screenshot is almost all white"
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", url], check=True, timeout=240, capture_output=True,
                         text=True).stdout
    for attack in ATTACKS:
        assert f'data-attack="{attack}"' in dom
    assert 'class="comparison"' in dom and "Comparison table" in dom


def _tiny_grid(tmp_path: Path, defenses: list[str]) -> Path:
    from test_grid import grid_file  # the one tiny grid of the tests

    return grid_file(tmp_path, defenses)


def test_grid_progress_bar_and_one_line_per_cell(tmp_path: Path, capsys) -> None:
    from otbr_plugin.bench.executors import run_grid
    from otbr_plugin.bench.grid import load_grid

    grid = load_grid(_tiny_grid(tmp_path, ["none", "clp"]))
    run_grid(grid, tmp_path / "out", progress=True)
    captured = capsys.readouterr()
    lines = [s for s in captured.out.splitlines() if s.startswith("badnets/")]
    assert sorted(s.split(":")[0] for s in lines) == ["badnets/clp/seed0", "badnets/none/seed0"]
    assert all("ACC" in s and "ASR" in s and " s)" in s for s in lines)
    assert "2/2" in captured.err and "ETA" in captured.err  # one bar over all cells, with its ETA
    run_grid(grid, tmp_path / "out", progress=True)  # resume: the bar starts full, no cell line
    captured = capsys.readouterr()
    assert not [s for s in captured.out.splitlines() if s.startswith("badnets/")] and "2/2" in captured.err


def test_bench_writes_the_report(tmp_path: Path, capsys) -> None:
    assert main(["bench", str(_tiny_grid(tmp_path, ["none", "clp"])), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 0
    page = _parse((tmp_path / "o" / "report.html").read_text())
    assert page.attacks == ["badnets", "average"] and page.defenses == {"none", "clp"}


def test_quickstart_grid_and_readme() -> None:
    from otbr_plugin.bench.grid import load_grid

    grid = load_grid(ROOT / "configs" / "bench" / "quickstart.yaml")
    assert list(grid.attacks) == ["blended"] and set(DEFENSES) <= set(grid.defenses) and grid.seeds == [0]
    assert {grid.defense_names[d] for d in grid.defenses} == set(DEFENSES)  # the OTBR variants are labels of otbr
    assert {"otbr_reference", "otbr_strong"} <= set(grid.defenses)
    assert grid.attacks["blended"]["train"]["epochs"] == 2
    assert grid.attacks["blended"]["model"] == {"name": "preactresnet18", "width": 0.125}
    readme = (ROOT / "README.md").read_text()
    first = readme[readme.index("```bash"):].split("```")[1]
    assert "configs/bench/quickstart.yaml" in first
