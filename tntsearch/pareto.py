"""Pareto fronts and hypervolume of accuracy-versus-cost trade-offs (the pictures are in
:mod:`tntsearch.plots`).

Everything works on *minimisation* problems; maximised objectives (``val_top1``,
``throughput``) are negated once, at the boundary (:func:`to_minimisation`), the way
Optuna's multi-objective code does it. The algorithms are moocore's (C core, maintained;
docs/design.md, dependencies); this module fixes the conventions the search relies on:

- ``a`` dominates ``b`` when ``a <= b`` in every objective and ``a < b`` in at least one, so
  ties and exact duplicates never dominate each other: every copy of a non-dominated point
  stays on the front (moocore's ``keep_weakly=True``; its default keeps only the first).
- The hypervolume is the Lebesgue measure of the region dominated by the points and bounded
  by the reference point ``ref`` (Zitzler & Thiele, 1998). ``ref`` comes from the spec, never
  from the data, so two searches with the same spec are comparable. A point that is not
  strictly better than ``ref`` in every objective contributes nothing (it is not an error,
  unlike ``optuna._hypervolume``, which refuses it): an early, poor trial must not make the
  search's progress metric fail.

``benchmarks/pareto_speed.py`` checks moocore against the hand-written sort and slicing
hypervolume this module used before, and times both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import moocore
import numpy as np

__all__ = [
    "Objective",
    "as_objectives",
    "to_minimisation",
    "dominates",
    "pareto_mask",
    "hypervolume",
    "metric_value",
    "objective_matrix",
    "front_mask",
    "front_hypervolume",
]

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


def pareto_mask(points: np.ndarray, modes: Sequence[str] | None = None) -> np.ndarray:
    """Boolean mask of the non-dominated points; duplicates all stay. ``modes`` gives each
    column's direction ('min'/'max'); all are minimised by default."""
    points = _check_points(points, modes)
    if points.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    return moocore.is_nondominated(points, keep_weakly=True)


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
    inside = points[np.all(points < ref, axis=1)]
    return float(moocore.hypervolume(inside, ref=ref)) if inside.shape[0] else 0.0


# ---------------------------------------------------------------------------------------
# Trials (dicts with a ``metrics`` mapping) -> objective matrices and fronts.


def metric_value(row: Mapping[str, Any], name: str) -> float:
    """``row["metrics"][name]`` as a float; NaN when missing or not a number."""
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
    values = np.array([[metric_value(r, o.metric) for o in objs] for r in rows], dtype=float).reshape(len(rows), len(objs))
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
