"""Multi-objective asynchronous successive halving (MO-ASHA) as a Ray Tune scheduler.

ASHA (Li et al., 2020) stops a trial at a rung unless its one metric is in the top
``1/reduction_factor`` of the trials recorded at that rung; judged on ``val_top1`` alone it
stops cheap, slightly less accurate architectures that belong on the accuracy-cost front.
MO-ASHA (Schmucker et al., 2021, arXiv 2106.12639) ranks the rung by non-dominated sorting
over all objectives instead. Here only accuracy is a learning curve: the cost objectives
(MACs, params, measured throughput) are known before a trial trains and ride along in
every epoch's report (``search.run_trial``), so a rung compares (accuracy at that rung,
static costs).

Ray's ``AsyncHyperBandScheduler`` and ``_Bracket`` keep the bookkeeping (rungs at
``grace_period * reduction_factor**k`` epochs, brackets, one decision per trial and rung,
``stop_last_trials``); only what a rung records (a minimisation vector instead of a scalar)
and the decision at a rung change. The rule and its tie-break: docs/early_stopping.md.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import moocore
import numpy as np
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler
from ray.tune.schedulers.async_hyperband import _Bracket

from tntsearch.pareto import as_objectives, to_minimisation

__all__ = ["rung_order", "promoted", "MOASHAScheduler"]


def rung_order(points: np.ndarray, ref: Sequence[float]) -> np.ndarray:
    """Indices of the minimisation ``points`` of one rung, best first: by non-dominated
    front, then, within a front, by hypervolume contribution (larger first) against the
    spec's fixed reference point; a duplicate, or a point outside the reference box,
    contributes nothing. Exact ties keep their order in ``points``."""
    points = np.asarray(points, dtype=float)
    ranks = moocore.pareto_rank(points)
    contribution = np.zeros(len(points))
    # NOTE: with one objective a front is one value, so there is nothing to break.
    for r in np.unique(ranks) if points.shape[1] > 1 else ():
        members = np.flatnonzero(ranks == r)
        contribution[members] = moocore.hv_contributions(points[members], ref=np.asarray(ref, dtype=float))
    return np.lexsort((-contribution, ranks))  # stable; the last key is the primary one


def promoted(point: Sequence[float], recorded: Iterable[Sequence[float]], ref: Sequence[float],
             reduction_factor: float) -> bool:
    """Whether a trial reaching a rung with minimisation vector ``point`` continues: it must
    be among the best ``ceil(n / reduction_factor)`` of the ``n`` trials at the rung, itself
    included, in :func:`rung_order`. It is listed first, so exact ties go to it, as in
    ASHA, where a reward equal to the cut-off continues. The first trial at a rung always
    continues (ASHA: no cut-off yet)."""
    points = np.vstack([np.asarray(point, dtype=float), *[np.asarray(p, dtype=float) for p in recorded]])
    position = int(np.flatnonzero(rung_order(points, ref) == 0)[0])
    return position < math.ceil(len(points) / reduction_factor)


class _MOBracket(_Bracket):
    """Ray's bracket whose rungs record minimisation vectors and decide by :func:`promoted`."""

    def __init__(self, *args: Any, ref: np.ndarray, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ref = ref

    def on_result(self, trial, cur_iter: int, cur_rew: np.ndarray) -> str:
        # The loop is Ray's ``_Bracket.on_result`` with the cut-off comparison replaced.
        for milestone, recorded in self._rungs:
            if cur_iter >= milestone and trial.trial_id in recorded and not self._stop_last_trials:
                break  # already judged at this rung, and rungs run highest first
            if cur_iter < milestone or trial.trial_id in recorded:
                continue
            keep = promoted(cur_rew, recorded.values(), self._ref, self.rf)
            recorded[trial.trial_id] = cur_rew
            return TrialScheduler.CONTINUE if keep else TrialScheduler.STOP
        return TrialScheduler.CONTINUE


class MOASHAScheduler(AsyncHyperBandScheduler):
    """ASHA on ``time_attr`` whose rungs rank trials over all ``objectives``
    (``(metric, mode, ref)`` items, e.g. the spec's) instead of one metric.

    A result takes part only when it is feasible (``feasible`` absent or 1) and carries a
    finite value of every objective: infeasible trials report epoch 0 with
    ``feasible: 0`` and never reach a rung.
    """

    def __init__(self, objectives: Iterable[Any], *, time_attr: str = "epoch", max_t: int = 100,
                 grace_period: int = 1, reduction_factor: float = 2, brackets: int = 1,
                 stop_last_trials: bool = False) -> None:
        self._objectives = as_objectives(objectives)
        modes = [o.mode for o in self._objectives]
        ref = to_minimisation(np.array([o.ref for o in self._objectives]), modes)
        # NOTE: metric/mode name the first objective only so that Tune's checks of the
        # scheduler's metric (present in every result) hold; the decisions use them all.
        super().__init__(time_attr=time_attr, metric=self._objectives[0].metric, mode=modes[0], max_t=max_t,
                         grace_period=grace_period, reduction_factor=reduction_factor, brackets=brackets,
                         stop_last_trials=stop_last_trials)
        self._brackets = [
            _MOBracket(grace_period, max_t, reduction_factor, s, stop_last_trials=stop_last_trials, ref=ref)
            for s in range(brackets)
        ]

    def _point(self, result: Mapping[str, Any]) -> np.ndarray | None:
        """The result's minimisation vector, or None when it must not reach a rung."""
        if self._time_attr not in result or float(result.get("feasible", 1)) != 1.0:
            return None
        try:
            values = np.array([float(result[o.metric]) for o in self._objectives])
        except (KeyError, TypeError, ValueError):
            return None
        if not np.all(np.isfinite(values)):
            return None
        return to_minimisation(values, [o.mode for o in self._objectives])

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        point = self._point(result)
        if point is None:
            return TrialScheduler.CONTINUE
        if result[self._time_attr] >= self._max_t and self._stop_last_trials:
            action = TrialScheduler.STOP
        else:
            action = self._trial_info[trial.trial_id].on_result(trial, result[self._time_attr], point)
        if action == TrialScheduler.STOP:
            self._num_stopped += 1
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        point = self._point(result or {})
        if point is not None:
            self._trial_info[trial.trial_id].on_result(trial, result[self._time_attr], point)
        self._trial_info.pop(trial.trial_id, None)

    def debug_string(self) -> str:
        rungs = ", ".join(f"epoch {m:g}: {len(r)}" for b in self._brackets for m, r in reversed(b._rungs))
        return f"Using MO-ASHA: num_stopped={self._num_stopped}; trials recorded per rung: {rungs}"
