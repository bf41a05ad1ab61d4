"""The report's statistics and layout: intervals under each value, the "which differences are real" section, the
comparison table wrapping at many defenses, columns in the grid's order, training cost in provenance, the
clean-accuracy bound of the best marks and legends inside the embedded plots."""

import base64
import io
import re

import numpy as np

from otbr_plugin.aggregate.records import record_filename, write_record
from otbr_plugin.aggregate.report import TABLE_CHUNK, bars_html, render_report, scatter_html
from test_bootstrap import AFTER_A, AFTER_B, BEFORE, N_BD, N_CLEAN, _samples, _vec, rec_from


def _write(folder, records):
    for r in records:
        name = record_filename(r.dataset, "preactresnet18", r.attack_name, r.defense, r.seed, r.defense_seed)
        write_record(r, folder / "records" / name)


def _tables(text: str) -> list[str]:
    return re.findall(r'<table class="comparison">.*?</table>', text, flags=re.S)


def test_intervals_differences_bound_and_training_cost(tmp_path):
    order = {"attacks": ["badnets"], "defenses": ["none", "otbr", "fp"]}
    drops = _samples(_vec(0.78, N_CLEAN, 1), _vec(0.0, N_BD, 1), _vec(0.2, N_BD, 1))  # ACC 78 (-12), ASR 0
    training = {"minutes": 6.9, "cpu_minutes": 6.7, "device": "cpu", "epochs": 2, "torch_threads": 1}
    _write(tmp_path, [rec_from(BEFORE, "none", grid_order=order, training=training),
                      rec_from(AFTER_A, "otbr", grid_order=order, training=training),
                      rec_from(drops, "fp", grid_order=order, training=training)])
    text = render_report(tmp_path)
    (table,) = _tables(text)
    assert re.search(r'data-defense="otbr" data-metric="acc"[^>]*>85\.00<span class="ci">\[\d+\.\d\d, \d+\.\d\d\]', table)
    # fp "wins" ASR and DER (91.5 vs 90.0) by dropping ACC 12 points: beyond the bound, marked, never best
    assert re.search(r'class="beyond" data-defense="fp" data-metric="der"[^>]*>[\d.]+†', table)
    assert 'class="best" data-defense="otbr" data-metric="der"' in table
    assert "at most 10 points below" in text
    assert "fp has a higher DER" in text and "beyond the bound" in text
    section = text[text.index("Which differences are real"):]
    assert re.search(r'<tr class="real"><td>badnets</td><td>0</td><td>otbr</td><td>fp</td>', section)
    assert "6.9 min (6.7 CPU-min), cpu, 2 epochs, 1 thread(s)" in text
    assert "Training in all: 6.9 min wall, 6.7 CPU-min for 1 of 1 checkpoint(s)." in text


def test_table_wraps_at_many_defenses_and_follows_the_grid_order(tmp_path):
    labels = [f"v{i}" for i in range(9, 0, -1)]  # grid order: v9 ... v1 (not alphabetical)
    order = {"attacks": ["badnets"], "defenses": ["none", *labels]}
    _write(tmp_path, [rec_from(BEFORE, "none", grid_order=order)]
           + [rec_from(AFTER_A if i % 2 else AFTER_B, d, grid_order=order) for i, d in enumerate(labels)])
    tables = _tables(render_report(tmp_path))
    assert len(tables) == -(-len(labels) // TABLE_CHUNK)  # 9 defenses, 4 a table: 3 tables
    shown = [re.findall(r'<th class="defense[^"]*" colspan="4">([^<]+)</th>', t) for t in tables]
    assert all(s[0] == "none (backdoored)" for s in shown)  # the reference column in each
    assert [d for s in shown for d in s[1:]] == labels


def _png_size(img_html: str) -> tuple[int, int]:
    from PIL import Image

    data = base64.b64decode(re.search(r"base64,([^\"]+)", img_html).group(1))
    return Image.open(io.BytesIO(data)).size


def test_plot_legends_are_inside_the_image_and_off_the_axes(monkeypatch):
    """Many attacks make a legend of several rows: it sits below every axes (tick labels included) and the saved
    image is the tight box around everything drawn, legend included (so no row of it is cut off)."""
    import matplotlib.figure

    attacks = [f"attack{i}" for i in range(14)]
    records = [rec_from(s, d, attack=a) for a in attacks for d, s in (("none", BEFORE), ("otbr", AFTER_A))]
    seen = []
    real = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        real(fig, *args, **kwargs)
        renderer = fig.canvas.get_renderer()
        axes_bottom = min(ax.get_tightbbox(renderer).y0 for ax in fig.axes if ax.get_visible())
        legends = [leg.get_window_extent(renderer) for leg in fig.legends]
        seen.append((axes_bottom, legends, fig.get_tightbbox(renderer).height, kwargs.get("dpi")))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    sizes = [_png_size(scatter_html(records)), _png_size(bars_html(records))]
    assert len(seen) == 2
    for (axes_bottom, legends, tight_height_in, dpi), (_, png_h) in zip(seen, sizes):
        assert legends and all(box.y1 <= axes_bottom + 1 for box in legends)  # below the axes, not over them
        # the image holds the whole drawing (0.1 in pads; text extents differ a little between dpi settings)
        assert abs(png_h - (tight_height_in + 0.2) * dpi) <= 0.03 * png_h


def test_orders_of_several_runs_merge_longest_first():
    from otbr_plugin.aggregate.tables import grid_order

    big = {"attacks": ["b", "a"], "defenses": ["none", "otbr", "clp"]}
    part = {"attacks": ["b"], "defenses": ["anp"]}
    records = [rec_from(AFTER_A, "anp", grid_order=part), rec_from(AFTER_A, "otbr", grid_order=big)]
    assert grid_order(records, "defenses")[:4] == ["none", "otbr", "clp", "anp"]
    assert grid_order(records, "attacks") == ["b", "a"]
