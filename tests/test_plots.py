"""The front's pictures: one PNG per accuracy/cost pair and the interactive page, with the
front, the baselines and each trial's architecture in the hover text."""
from __future__ import annotations

import json

from tntsearch.plots import plot_pairs, write_front_html, write_front_pngs


def _rows():
    rows = []
    for i, (acc, macs, params, thr, blocks) in enumerate(
        [(0.7, 1e6, 1e5, 900.0, []), (0.8, 2e6, 2e5, 500.0, [1, 2]), (0.75, 3e6, 3e5, 400.0, [2]), (0.2, 5e5, 5e4, float("nan"), [1])]
    ):
        rows.append({
            "name": f"trial_{i}", "status": "completed", "baseline": "tiny_vit" if i == 0 else "",
            "arch": {"outer_dim": 64, "depth": 2, "inner_dim": 8 * (i + 1), "words": 4, "se": "none", "tnt_blocks": blocks},
            "metrics": {"val_top1": acc, "macs": macs, "params": params, "throughput": thr, "feasible": 1.0},
        })
    return rows


def test_plot_pairs_put_accuracy_against_every_cost_and_objective():
    assert plot_pairs([("val_top1", "max", 0), ("macs", "min", 1)]) == [
        ("macs", "val_top1"), ("params", "val_top1"), ("throughput", "val_top1")]
    assert plot_pairs([("val_top5", "max", 0), ("val_loss", "min", 9)])[-1] == ("val_loss", "val_top5")


def test_pictures_and_interactive_page(tmp_path):
    objs = [("val_top1", "max", 0.0), ("macs", "min", 4e6)]
    pngs = write_front_pngs(_rows(), objs, tmp_path, title="t")
    assert [p.name for p in pngs] == ["val_top1_vs_macs.png", "val_top1_vs_params.png", "val_top1_vs_throughput.png"]
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    page = write_front_html(_rows(), objs, tmp_path / "front.html", title="demo", hypervolume_value=2.4e6).read_text()
    assert page.count("<script") >= 3 and "Plotly.newPlot" in page
    assert len(page) > 1_000_000  # plotly.js is inlined, so the page renders offline
    # Hover text carries the architecture and the baseline's name.
    assert "tnt_blocks: 1,2" in page and "baseline: tiny_vit" in page and "inner_dim: 16" in page
    assert "3 on the Pareto front" in page
    json.dumps(_rows())  # rows are plain JSON-able data
