"""Pareto fronts and hypervolume of accuracy-versus-cost trade-offs, and their plots.

The maths is pure numpy and works on *minimisation* problems only; maximised objectives
(``val_top1``, ``throughput``) are negated once, at the boundary (:func:`to_minimisation`),
the way Optuna's multi-objective code does it.

- Non-dominated sorting follows Deb et al., "A fast and elitist multiobjective genetic
  algorithm: NSGA-II" (2002): front 0 holds the points no other point dominates, front 1
  those dominated only by front 0, and so on. ``a`` dominates ``b`` when ``a <= b`` in every
  objective and ``a < b`` in at least one, so ties and exact duplicates never dominate each
  other and land on the same front.
- The hypervolume is the Lebesgue measure of the region dominated by the points and bounded
  by the reference point ``ref`` (Zitzler & Thiele, 1998). ``ref`` comes from the spec, never
  from the data, so two searches with the same spec are comparable. A point that is not
  strictly better than ``ref`` in every objective dominates no part of the box and
  contributes nothing (it is not an error, unlike ``optuna._hypervolume``, which refuses it):
  an early, poor trial must not make the search's progress metric fail.
  2 objectives: an exact sweep, O(n log n). 3+ objectives: exact slicing along the last
  objective (the "HSO" scheme of While et al., 2006) on the non-dominated set,
  O(n^(k-1) log n) -- plenty for the hundreds of trials a search runs.
  We do not call ``optuna._hypervolume.compute_hypervolume``: it is private (may change in
  any Optuna release) and it raises for points outside the reference box; the tests use it
  as an independent reference.

Plots (PNG with matplotlib's Agg canvas, and one self-contained interactive plotly page)
import their libraries lazily, so the maths stays numpy-only.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "Objective",
    "as_objectives",
    "to_minimisation",
    "dominates",
    "non_dominated_sort",
    "front_ranks",
    "pareto_mask",
    "hypervolume",
    "objective_matrix",
    "front_mask",
    "front_hypervolume",
    "DEFAULT_MODES",
    "plot_pairs",
    "write_front_pngs",
    "write_front_html",
]

# Direction of the cost metrics when they appear on a plot axis but not in the objectives.
DEFAULT_MODES: dict[str, str] = {
    "val_top1": "max",
    "val_top5": "max",
    "val_loss": "min",
    "macs": "min",
    "params": "min",
    "throughput": "max",
}
_COSTS = ("macs", "params", "throughput")


@dataclass(frozen=True)
class Objective:
    """One objective of the search: a metric, its direction, and its hypervolume reference
    value (fixed in the spec, so hypervolumes of different runs are comparable)."""

    metric: str
    mode: str
    ref: float

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"objective `metric` must be a non-empty string, got {self.metric!r}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"objective `mode` of {self.metric!r} must be 'min' or 'max', got {self.mode!r}")
        ref = float(self.ref)
        if not math.isfinite(ref):
            raise ValueError(f"objective `ref` of {self.metric!r} must be a finite number, got {self.ref!r}")
        object.__setattr__(self, "ref", ref)

    def to_list(self) -> list[Any]:
        return [self.metric, self.mode, self.ref]


def as_objectives(objectives: Iterable[Any]) -> tuple[Objective, ...]:
    """Normalise objectives given as ``(metric, mode, ref)`` tuples, dicts, or objects with
    ``metric``/``mode``/``ref`` attributes (e.g. the spec's pydantic ``Objective``)."""
    out = []
    for o in objectives:
        if isinstance(o, Objective):
            out.append(o)
        elif isinstance(o, Mapping):
            out.append(Objective(o["metric"], o["mode"], o["ref"]))
        elif isinstance(o, (tuple, list)):
            if len(o) != 3:
                raise ValueError(f"an objective must be (metric, mode, ref), got {o!r}")
            out.append(Objective(*o))
        else:
            out.append(Objective(o.metric, o.mode, o.ref))
    if not out:
        raise ValueError("`objectives` must name at least one objective")
    metrics = [o.metric for o in out]
    if len(set(metrics)) != len(metrics):
        raise ValueError(f"`objectives` name a metric twice: {metrics}")
    return tuple(out)


def to_minimisation(values: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """Negate the columns whose mode is ``max`` (works for a matrix or one reference row)."""
    values = np.asarray(values, dtype=float)
    if values.shape[-1] != len(modes):
        raise ValueError(f"`values` has {values.shape[-1]} objective columns but {len(modes)} modes were given")
    sign = np.array([-1.0 if m == "max" else 1.0 for m in modes])
    return values * sign


def _check_points(points: np.ndarray, modes: Sequence[str] | None = None, name: str = "points") -> np.ndarray:
    """A finite (n_points, n_objectives) minimisation matrix (``max`` columns negated)."""
    points = np.asarray(points, dtype=float)
    if points.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D array (n_points, n_objectives), got shape {points.shape}")
    if points.size and not np.all(np.isfinite(points)):
        raise ValueError(f"`{name}` must be finite; drop trials with missing objective values first")
    if modes is not None:
        bad = [m for m in modes if m not in ("min", "max")]
        if bad:
            raise ValueError(f"`modes` must be 'min' or 'max', got {bad}")
        points = to_minimisation(points, modes) if points.size else points.reshape(0, len(modes))
    return points


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` dominates ``b`` (minimisation): no worse everywhere, better somewhere."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return bool(np.all(a <= b) and np.any(a < b))


def _domination_matrix(points: np.ndarray) -> np.ndarray:
    """``D[i, j]`` is true when point i dominates point j."""
    le = np.all(points[:, None, :] <= points[None, :, :], axis=-1)
    lt = np.any(points[:, None, :] < points[None, :, :], axis=-1)
    return le & lt


def non_dominated_sort(points: np.ndarray, modes: Sequence[str] | None = None) -> list[np.ndarray]:
    """Split ``points`` into fronts; returns index arrays, best front first.

    ``modes`` gives each column's direction ('min'/'max'); all are minimised by default.
    Deb's fast non-dominated sort with a dense domination matrix: O(k n^2) time and n^2
    booleans of memory, fine for a search's few thousand trials at most.
    """
    points = _check_points(points, modes)
    n = points.shape[0]
    if n == 0:
        return []
    dom = _domination_matrix(points)
    n_dominators = dom.sum(axis=0)
    fronts = []
    current = np.flatnonzero(n_dominators == 0)
    while current.size:
        fronts.append(current)
        n_dominators = n_dominators - dom[current].sum(axis=0)
        n_dominators[current] = -1  # never selected again
        current = np.flatnonzero(n_dominators == 0)
    return fronts


def front_ranks(points: np.ndarray, modes: Sequence[str] | None = None) -> np.ndarray:
    """Front index of every point (0 = non-dominated); ``modes`` as in :func:`non_dominated_sort`."""
    points = _check_points(points, modes)
    ranks = np.full(points.shape[0], -1, dtype=int)
    for r, idx in enumerate(non_dominated_sort(points)):
        ranks[idx] = r
    return ranks


def pareto_mask(points: np.ndarray, modes: Sequence[str] | None = None) -> np.ndarray:
    """Boolean mask of the non-dominated points; duplicates all stay. ``modes`` gives each
    column's direction ('min'/'max'); all are minimised by default."""
    points = _check_points(points, modes)
    if points.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    return ~_domination_matrix(points).any(axis=0)


def _hv2d(points: np.ndarray, ref: np.ndarray) -> float:
    """Exact 2-D hypervolume of points already strictly inside the reference box."""
    order = np.lexsort((points[:, 1], points[:, 0]))
    pts = points[order]
    # Keep the staircase: along increasing x, only points that lower the best y so far.
    best_y = np.minimum.accumulate(pts[:, 1])
    keep = np.concatenate([[True], pts[1:, 1] < best_y[:-1]])
    pts = pts[keep]
    widths = np.diff(np.concatenate([pts[:, 0], ref[:1]]))
    heights = ref[1] - pts[:, 1]
    return float(np.dot(widths, heights))


def _hv(points: np.ndarray, ref: np.ndarray) -> float:
    if points.shape[0] == 0:
        return 0.0
    k = points.shape[1]
    if k == 1:
        return float(ref[0] - points[:, 0].min())
    if k == 2:
        return _hv2d(points, ref)
    points = points[pareto_mask(points)]
    # Slice along the last objective: between consecutive distinct values z_i < z_{i+1},
    # the dominated region is the (k-1)-D hypervolume of the points with z <= z_i.
    order = np.argsort(points[:, -1], kind="stable")
    pts = points[order]
    zs = np.concatenate([pts[:, -1], ref[-1:]])
    total = 0.0
    for i in range(pts.shape[0]):
        depth = zs[i + 1] - zs[i]
        if depth > 0:
            total += depth * _hv(pts[: i + 1, :-1], ref[:-1])
    return total


def hypervolume(points: np.ndarray, ref: Sequence[float], modes: Sequence[str] | None = None) -> float:
    """Hypervolume dominated by ``points`` inside the box bounded by ``ref``.

    ``modes`` gives each column's direction ('min'/'max', all 'min' by default); ``ref`` is
    in the same units as the points. Points not strictly better than ``ref`` in every
    objective contribute nothing; an empty set has hypervolume 0. Duplicates and dominated
    points do not change the result.
    """
    points = _check_points(points, modes)
    ref = np.asarray(ref, dtype=float)
    if ref.ndim != 1 or not np.all(np.isfinite(ref)):
        raise ValueError(f"`ref` must be a finite 1-D reference point, got {ref!r}")
    if modes is not None:
        ref = to_minimisation(ref, modes)
    if points.size and points.shape[1] != ref.shape[0]:
        raise ValueError(f"`ref` has {ref.shape[0]} objectives but points have {points.shape[1]}")
    if points.shape[0] == 0:
        return 0.0
    inside = np.all(points < ref, axis=1)
    pts = np.unique(points[inside], axis=0)
    return _hv(pts, ref)


# ---------------------------------------------------------------------------------------
# Trials (dicts with a ``metrics`` mapping) -> objective matrices and fronts.


def _metric(row: Mapping[str, Any], name: str) -> float:
    value = row.get("metrics", {}).get(name, float("nan"))
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def objective_matrix(rows: Sequence[Mapping[str, Any]], objectives: Iterable[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Minimisation matrix (n_rows, n_objectives) and reference point for trial rows.

    A row is a dict with a ``metrics`` mapping (what :mod:`tntsearch.tracking` and
    :mod:`tntsearch.report` produce). Missing or non-finite values come back as NaN; the
    caller decides what that means (:func:`front_mask` leaves such rows off the front).
    """
    objs = as_objectives(objectives)
    values = np.array([[_metric(r, o.metric) for o in objs] for r in rows], dtype=float).reshape(len(rows), len(objs))
    modes = [o.mode for o in objs]
    return to_minimisation(values, modes), to_minimisation(np.array([o.ref for o in objs]), modes)


def front_mask(rows: Sequence[Mapping[str, Any]], objectives: Iterable[Any]) -> np.ndarray:
    """Which rows are on the Pareto front of ``objectives``; rows with a missing (NaN)
    objective value are never on it."""
    points, _ = objective_matrix(rows, objectives)
    mask = np.zeros(len(rows), dtype=bool)
    ok = np.all(np.isfinite(points), axis=1)
    if ok.any():
        mask[np.flatnonzero(ok)] = pareto_mask(points[ok])
    return mask


def front_hypervolume(rows: Sequence[Mapping[str, Any]], objectives: Iterable[Any]) -> float:
    """Hypervolume of the rows (those with every objective value) against the spec's ``ref``."""
    points, ref = objective_matrix(rows, objectives)
    ok = np.all(np.isfinite(points), axis=1)
    return hypervolume(points[ok], ref)


# ---------------------------------------------------------------------------------------
# Plots.


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
    xs = np.array([_metric(r, x) for r in rows], dtype=float)
    ys = np.array([_metric(r, y) for r in rows], dtype=float)
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
}


def _label(metric: str, objectives: Sequence[Objective]) -> str:
    arrow = {"max": "higher is better", "min": "lower is better"}[_mode(metric, objectives)]
    return f"{_LABELS.get(metric, metric)} ({arrow})"


def _use_log(values: np.ndarray) -> bool:
    v = values[np.isfinite(values)]
    return v.size > 1 and bool(np.all(v > 0)) and v.max() / v.min() > 20


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
    on_front = front_mask(rows, objs)
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
        v = _metric(row, m)
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
) -> Path:
    """One self-contained HTML page with an interactive plotly chart per :func:`plot_pairs`
    pair; hovering a point shows the trial's metrics and architecture. plotly.js is
    embedded once (``include_plotlyjs=True``) so the page renders offline, e.g. inside the
    MLflow UI's artifact viewer."""
    import plotly.graph_objects as go

    objs = as_objectives(objectives)
    on_front = front_mask(rows, objs)
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
