"""Pictures of a search's Pareto front: one PNG per accuracy/cost pair (matplotlib's Agg
canvas) and one self-contained interactive plotly page. The front itself comes from
:mod:`tntsearch.pareto`; the tracker publishes these on the parent run and ``report`` writes
them to a folder (docs/tracking.md). Plot libraries are imported on first use.
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping, Sequence

import numpy as np

from tntsearch.pareto import Objective, as_objectives, front_mask, metric_value, pareto_mask, to_minimisation

__all__ = ["DEFAULT_MODES", "plot_pairs", "write_front_pngs", "write_front_html"]

# Direction of the cost metrics when they appear on a plot axis but not in the objectives.
DEFAULT_MODES: dict[str, str] = {
    "val_top1": "max",
    "val_top5": "max",
    "val_loss": "min",
    "macs": "min",
    "params": "min",
    "throughput": "max",
    "latency_ms": "min",
}
_COSTS = ("macs", "params", "throughput")


def plot_pairs(objectives: Iterable[Any]) -> list[tuple[str, str]]:
    """(x, y) metric pairs to plot: accuracy against every cost (macs, params, throughput)
    and against every other objective. Accuracy is the first maximised objective that is
    not a cost (``val_top1`` if there is none)."""
    objs = as_objectives(objectives)
    acc = next((o.metric for o in objs if o.mode == "max" and o.metric not in _COSTS), "val_top1")
    xs = list(dict.fromkeys([*_COSTS, *(o.metric for o in objs if o.metric != acc)]))
    return [(x, acc) for x in xs]


def _mode(metric: str, objectives: Sequence[Objective]) -> str:
    for o in objectives:
        if o.metric == metric:
            return o.mode
    return DEFAULT_MODES.get(metric, "min")


def _xy(rows: Sequence[Mapping[str, Any]], x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    xs = np.array([metric_value(r, x) for r in rows], dtype=float)
    ys = np.array([metric_value(r, y) for r in rows], dtype=float)
    return xs, ys


def _staircase(xs: np.ndarray, ys: np.ndarray, xmode: str, ymode: str) -> tuple[np.ndarray, np.ndarray]:
    """The 2-D non-dominated points of one projection, sorted by x, for a step line."""
    ok = np.isfinite(xs) & np.isfinite(ys)
    if not ok.any():
        return np.zeros(0), np.zeros(0)
    pts = to_minimisation(np.stack([xs[ok], ys[ok]], axis=1), [xmode, ymode])
    m = pareto_mask(pts)
    fx, fy = xs[ok][m], ys[ok][m]
    order = np.argsort(fx)
    return fx[order], fy[order]


_LABELS = {
    "val_top1": "validation top-1 accuracy",
    "val_top5": "validation top-5 accuracy",
    "val_loss": "validation loss",
    "macs": "MACs per image",
    "params": "parameters",
    "throughput": "inference throughput (images/s)",
    "latency_ms": "inference latency, one image (ms)",
}


def _label(metric: str, objectives: Sequence[Objective]) -> str:
    arrow = {"max": "higher is better", "min": "lower is better"}[_mode(metric, objectives)]
    return f"{_LABELS.get(metric, metric)} ({arrow})"


def _use_log(values: np.ndarray) -> bool:
    v = values[np.isfinite(values)]
    return v.size > 1 and bool(np.all(v > 0)) and v.max() / v.min() > 20


def _on_front(rows: Sequence[Mapping[str, Any]], objs, front: Collection[str] | None) -> np.ndarray:
    """Which rows are drawn as the front: the trial ids ``front`` names (the front the search
    chose, e.g. supernet mode's, on data it does not plot), else the rows' own front."""
    if front is None:
        return front_mask(rows, objs)
    return np.array([r.get("trial_id") in front for r in rows], dtype=bool)


def _split(rows: Sequence[Mapping[str, Any]], on_front: np.ndarray) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {"trials": [], "front": [], "baselines": []}
    for i, r in enumerate(rows):
        if r.get("baseline"):
            groups["baselines"].append(i)
        elif on_front[i]:
            groups["front"].append(i)
        else:
            groups["trials"].append(i)
    return groups


def write_front_pngs(
    rows: Sequence[Mapping[str, Any]],
    objectives: Iterable[Any],
    out_dir: str | Path,
    title: str = "",
    front: Collection[str] | None = None,
) -> list[Path]:
    """One PNG per :func:`plot_pairs` pair: every trial that has both values (grey), the
    trials on the spec's Pareto front (red), the 2-D non-dominated staircase of that view
    (dashed), and the baselines (stars, labelled). Uses the Agg canvas directly, so it is
    safe in any thread and never opens a window."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    objs = as_objectives(objectives)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    on_front = _on_front(rows, objs, front)
    groups = _split(rows, on_front)
    paths = []
    for x, y in plot_pairs(objs):
        xs, ys = _xy(rows, x, y)
        fig = Figure(figsize=(6.4, 4.6), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for key, style in (
            ("trials", dict(c="0.6", s=22, marker="o", label="trial")),
            ("front", dict(c="tab:red", s=36, marker="o", label="Pareto front (spec objectives)")),
            ("baselines", dict(c="tab:blue", s=120, marker="*", label="baseline")),
        ):
            idx = [i for i in groups[key] if np.isfinite(xs[i]) and np.isfinite(ys[i])]
            if idx:
                if key == "baselines":  # a baseline on the front gets a red rim
                    style["edgecolors"] = ["tab:red" if on_front[i] else "none" for i in idx]
                ax.scatter(xs[idx], ys[idx], zorder=3, **style)
        for i in groups["baselines"]:
            if np.isfinite(xs[i]) and np.isfinite(ys[i]):
                ax.annotate(str(rows[i]["baseline"]), (xs[i], ys[i]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        sx, sy = _staircase(xs, ys, _mode(x, objs), _mode(y, objs))
        if sx.size:
            ax.step(sx, sy, where="post" if _mode(x, objs) == "min" else "pre", ls="--", c="tab:red", lw=1, alpha=0.6, zorder=2)
        if _use_log(xs):
            ax.set_xscale("log")
        ax.set_xlabel(_label(x, objs))
        ax.set_ylabel(_label(y, objs))
        n = int(np.sum(np.isfinite(xs) & np.isfinite(ys)))
        ax.set_title(f"{title + ': ' if title else ''}{y} vs {x} ({n} trials)", fontsize=10)
        ax.grid(True, alpha=0.3)
        if n:
            ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        path = out_dir / f"{y}_vs_{x}.png"
        fig.savefig(path)
        paths.append(path)
    return paths


_HOVER_ARCH = (
    "outer_dim", "depth", "outer_heads", "mlp_ratio", "inner_dim", "words", "inner_heads",
    "inner_mlp_ratio", "se", "se_ratio", "tnt_blocks", "patch_size", "img_size",
)


def _hover(row: Mapping[str, Any], metrics: Sequence[str]) -> str:
    name = html.escape(str(row.get("name") or row.get("trial_id") or row.get("run_id") or "trial"))
    lines = [f"<b>{name}</b>"]
    if row.get("baseline"):
        lines.append(f"baseline: {html.escape(str(row['baseline']))}")
    if row.get("status"):
        lines.append(f"status: {html.escape(str(row['status']))}")
    for m in metrics:
        v = metric_value(row, m)
        if math.isfinite(v):
            lines.append(f"{m}: {v:.4g}")
    arch = row.get("arch") or {}
    for k in _HOVER_ARCH:
        if k in arch:
            v = arch[k]
            if isinstance(v, (list, tuple)):
                v = ",".join(str(b) for b in v) or "(none)"
            lines.append(f"{k}: {html.escape(str(v))}")
    return "<br>".join(lines)


def write_front_html(
    rows: Sequence[Mapping[str, Any]],
    objectives: Iterable[Any],
    path: str | Path,
    title: str = "",
    hypervolume_value: float | None = None,
    front: Collection[str] | None = None,
) -> Path:
    """One self-contained HTML page with an interactive plotly chart per :func:`plot_pairs`
    pair; hovering a point shows the trial's metrics and architecture. plotly.js is
    embedded once (``include_plotlyjs=True``) so the page renders offline, e.g. inside the
    MLflow UI's artifact viewer."""
    import plotly.graph_objects as go

    objs = as_objectives(objectives)
    on_front = _on_front(rows, objs, front)
    groups = _split(rows, on_front)
    metrics = list(dict.fromkeys([*(o.metric for o in objs), "val_top1", "macs", "params", "throughput"]))
    hovers = [_hover(r, metrics) for r in rows]
    divs = []
    for n_plot, (x, y) in enumerate(plot_pairs(objs)):
        xs, ys = _xy(rows, x, y)
        fig = go.Figure()
        for key, name, marker in (
            ("trials", "trial", dict(color="#999999", size=8)),
            ("front", "Pareto front (spec objectives)", dict(color="#d62728", size=10)),
            ("baselines", "baseline", dict(color="#1f77b4", size=16, symbol="star")),
        ):
            idx = [i for i in groups[key] if np.isfinite(xs[i]) and np.isfinite(ys[i])]
            fig.add_trace(
                go.Scatter(
                    x=xs[idx].tolist(), y=ys[idx].tolist(), mode="markers+text" if key == "baselines" else "markers",
                    name=name, marker=marker, text=[str(rows[i]["baseline"]) for i in idx] if key == "baselines" else None,
                    textposition="top right", hovertext=[hovers[i] for i in idx], hoverinfo="text",
                )
            )
        sx, sy = _staircase(xs, ys, _mode(x, objs), _mode(y, objs))
        if sx.size:
            shape = "hv" if _mode(x, objs) == "min" else "vh"
            fig.add_trace(go.Scatter(x=sx.tolist(), y=sy.tolist(), mode="lines", name=f"front of this view",
                                     line=dict(color="#d62728", dash="dash", shape=shape), hoverinfo="skip"))
        fig.update_layout(
            title=f"{y} vs {x}", xaxis_title=_label(x, objs), yaxis_title=_label(y, objs),
            template="plotly_white", height=480, margin=dict(l=60, r=20, t=50, b=50),
        )
        if _use_log(xs):
            fig.update_xaxes(type="log")
        divs.append(fig.to_html(full_html=False, include_plotlyjs=(n_plot == 0)))
    n_front = int(on_front.sum())
    hv = "" if hypervolume_value is None else f", hypervolume {hypervolume_value:.6g}"
    objectives_txt = ", ".join(f"{o.metric} ({o.mode}, ref {o.ref:g})" for o in objs)
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title or 'Pareto front')}</title></head>"
        "<body style='font-family:sans-serif'>"
        f"<h2>{html.escape(title or 'Pareto front')}</h2>"
        f"<p>{len(rows)} trials with results, {n_front} on the Pareto front of {html.escape(objectives_txt)}{hv}.</p>"
        + "".join(divs)
        + "</body></html>"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
