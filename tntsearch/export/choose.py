"""Which point of a search's Pareto front to export: the pick rules and the knee score
(docs/export.md, "Pick rules")."""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from tntsearch import pareto

__all__ = ["PICK_RULES", "ACCURACY_METRIC", "COST_METRIC", "knee_scores", "pick", "limits_text"]

PICK_RULES = ("best-accuracy", "knee", "min-macs")
ACCURACY_METRIC = "val_top1"  # percent, as the training loop reports it
COST_METRIC = "macs"


def value(row: Mapping[str, Any], metric: str) -> float:
    """The row's metric, NaN when missing or not finite."""
    v = pareto.metric_value(row, metric)
    return v if math.isfinite(v) else math.nan


def knee_scores(rows: Sequence[Mapping[str, Any]], objectives: Any) -> np.ndarray:
    """Signed distance of each front point below the hyperplane through the front's extremes,
    in objective space normalised to [0, 1] over the front (larger: more of a knee).

    Every objective is turned into a minimisation and min-max normalised over ``rows``, so
    the ideal point is the origin. With two objectives the extremes (best accuracy, best
    cost) land on (0, 1) and (1, 0) and the score is the distance to the line joining them,
    ``(1 - z1 - z2) / sqrt(2)``, positive on the ideal side: the knee is the point where
    giving up a little of one objective stops buying much of the other (Das, "On
    characterizing the 'knee' of the Pareto curve", 1999; Branke et al., PPSN 2004). With
    k > 2 objectives the hyperplane passes through the k points that are best in one
    objective each; if they do not span one, the plane ``sum(z) = 1`` is used (the
    two-objective line). A constant objective normalises to 0.
    """
    objs = pareto.as_objectives(objectives)
    points, _ = pareto.objective_matrix(rows, objs)
    if len(rows) == 0:
        return np.zeros(0)
    if not np.all(np.isfinite(points)):
        raise ValueError("knee_scores needs every objective value of every row; drop rows with missing metrics first")
    lo, hi = points.min(axis=0), points.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    z = (points - lo) / span
    k = z.shape[1]
    extremes = np.stack([z[np.lexsort((z.sum(axis=1), z[:, j]))[0]] for j in range(k)])
    normal = np.ones(k)
    if k > 1 and np.linalg.matrix_rank(extremes) == k:
        solved = np.linalg.solve(extremes, np.ones(k))
        if np.all(np.isfinite(solved)) and np.all(solved > 0):
            normal = solved
    return (1.0 - z @ normal) / np.linalg.norm(normal)


def limits_text(min_accuracy: float | None, max_macs: float | None) -> str:
    """The limits as the error messages and the model card state them."""
    parts = []
    if min_accuracy is not None:
        parts.append(f"{ACCURACY_METRIC} >= {min_accuracy:g}")
    if max_macs is not None:
        parts.append(f"{COST_METRIC} <= {max_macs:g}")
    return " and ".join(parts) or "no limits"


def _span(rows: Sequence[Mapping[str, Any]], metric: str) -> str:
    vals = [v for v in (value(r, metric) for r in rows) if not math.isnan(v)]
    return f"{metric} {min(vals):g}..{max(vals):g}" if vals else f"{metric} missing"


def pick(
    rows: Sequence[Mapping[str, Any]],
    objectives: Any,
    rule: str = "best-accuracy",
    *,
    min_accuracy: float | None = None,
    max_macs: float | None = None,
) -> dict[str, Any]:
    """The front point chosen by ``rule`` among the trials ``rows`` (trial_row dicts).

    The front is the non-dominated set of ``rows`` under the search's ``objectives``; only
    its points that meet the limits (``val_top1 >= min_accuracy``, ``macs <= max_macs``)
    may be picked.

    - ``best-accuracy``: the highest ``val_top1``; ties go to fewer MACs.
    - ``knee``: the largest :func:`knee_scores` (computed over the whole front, then
      restricted to the points within the limits); ties go to higher ``val_top1``.
    - ``min-macs``: the fewest MACs (the cheapest model above the accuracy floor); ties go
      to higher ``val_top1``.

    Raises:
        ValueError: an unknown rule, no row to pick from, or no front point within the limits.
    """
    if rule not in PICK_RULES:
        raise ValueError(f"`pick` must be one of {', '.join(PICK_RULES)}; got {rule!r}")
    if not rows:
        raise ValueError("`rows` is empty: there is no finished trial to pick from")
    objs = pareto.as_objectives(objectives)
    mask = pareto.front_mask(rows, objs)
    front = [dict(r) for r, m in zip(rows, mask) if m]
    if not front:
        raise ValueError(
            f"no trial has every objective value ({', '.join(o.metric for o in objs)}): the front is empty")
    acc = np.array([value(r, ACCURACY_METRIC) for r in front])
    macs = np.array([value(r, COST_METRIC) for r in front])
    ok = np.ones(len(front), dtype=bool)
    if min_accuracy is not None:
        ok &= acc >= min_accuracy  # NaN compares False: a row without the metric fails the limit
    if max_macs is not None:
        ok &= macs <= max_macs
    if not ok.any():
        raise ValueError(
            f"--pick {rule}: none of the {len(front)} front point(s) satisfies {limits_text(min_accuracy, max_macs)} "
            f"(the front spans {_span(front, ACCURACY_METRIC)}, {_span(front, COST_METRIC)})")
    # NaN sorts last: -inf for "higher is better" keys, +inf for "lower is better" ones.
    neg_acc = np.where(np.isnan(acc), np.inf, -acc)
    cheap = np.where(np.isnan(macs), np.inf, macs)
    if rule == "best-accuracy":
        keys = (cheap, neg_acc)
    elif rule == "min-macs":
        if np.isnan(macs[ok]).all():
            raise ValueError(f"--pick min-macs: no front point has a `{COST_METRIC}` metric")
        keys = (neg_acc, cheap)
    else:
        keys = (neg_acc, -knee_scores(front, objs))
    order = [i for i in np.lexsort(keys) if ok[i]]  # np.lexsort sorts by the last key first
    return front[order[0]]
