"""MO-ASHA's promotion rule on hand-built rungs, against Ray's own ASHA on the same results.

Objectives (val_top1 max, ref 0; macs min, ref 8e6), the demo's. Hypervolume contributions
below are computed by hand from the rectangles each point alone dominates."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from tntsearch.moasha import MOASHAScheduler, promoted, rung_order

OBJECTIVES = [("val_top1", "max", 0.0), ("macs", "min", 8e6)]
REF = np.array([-0.0, 8e6])  # minimisation: val_top1 negated
# Three trials already at the rung, all on one front: accurate-costly to cheap-less accurate.
A, B, C = (90.0, 5e6), (85.0, 4e6), (70.0, 1e6)


def _min(*points):
    return np.array([(-acc, macs) for acc, macs in points])


def _decisions(scheduler, results):
    """Feed ``(trial_id, val_top1, macs)`` results at epoch 1, in order; return the actions."""
    actions = {}
    for trial_id, acc, macs in results:
        trial = SimpleNamespace(trial_id=trial_id)
        scheduler.on_trial_add(None, trial)
        actions[trial_id] = scheduler.on_trial_result(None, trial, {"epoch": 1, "val_top1": acc, "macs": macs, "feasible": 1})
    return actions


def _moasha(**kw):
    return MOASHAScheduler(OBJECTIVES, max_t=4, grace_period=1, reduction_factor=2, **kw)


def _asha():
    return ASHAScheduler(time_attr="epoch", metric="val_top1", mode="max", max_t=4, grace_period=1,
                         reduction_factor=2, stop_last_trials=False)


def test_rung_order_front_then_contribution():
    # Exclusive rectangles: A 3e6 x 5 = 1.5e7, B 1e6 x 15 = 1.5e7, C 3e6 x 70 = 2.1e8;
    # D (80, 5e6) is dominated by A and alone on the second front.
    points = _min(A, B, C, (80.0, 5e6))
    assert list(rung_order(points, REF)) == [2, 0, 1, 3]  # A and B tie: input order


def test_cheap_less_accurate_trial_survives_where_asha_stops_it():
    results = [("a", *A), ("b", *B), ("c", *C)]
    assert _decisions(_asha(), results)["c"] == TrialScheduler.STOP  # 70 < median(90, 85)
    assert _decisions(_moasha(), results)["c"] == TrialScheduler.CONTINUE  # largest contribution


def test_dominated_trial_is_stopped_where_asha_keeps_it():
    # E is more accurate than the rung's median (ASHA keeps it) but A dominates it.
    results = [("a", *A), ("b", *B), ("c", *C), ("e", 88.0, 7e6)]
    assert _decisions(_asha(), results)["e"] == TrialScheduler.CONTINUE
    assert _decisions(_moasha(), results)["e"] == TrialScheduler.STOP


def test_quota_is_the_top_ceil_n_over_eta():
    # A newcomer H at 6e6 MACs joins the front A, B, C; it shrinks A's rectangle to 1e6 x 5
    # and adds 2e6 x (acc - 90) of its own. Quota: the best ceil(4/2) = 2 of the four.
    recorded = _min(A, B, C)  # C 2.1e8, B 1.5e7, A 5e6 once H is there
    assert promoted(_min((99.0, 6e6))[0], recorded, REF, 2)  # 1.8e7: 2nd
    assert not promoted(_min((96.0, 6e6))[0], recorded, REF, 2)  # 1.2e7: 3rd, behind B
    assert not promoted(_min((99.0, 6e6))[0], recorded, REF, 4)  # quota ceil(4/4) = 1


def test_ties_go_to_the_newcomer_as_in_asha():
    # A copy of a recorded trial contributes nothing, nor does the original: a tie. ASHA keeps
    # a reward equal to its cut-off; MO-ASHA lists the newcomer first, so it continues too.
    results = [("a", *A), ("a2", *A)]
    assert _decisions(_asha(), results)["a2"] == TrialScheduler.CONTINUE
    assert _decisions(_moasha(), results)["a2"] == TrialScheduler.CONTINUE
    # A point outside the reference box contributes nothing: behind A on the same front.
    assert _decisions(_moasha(), [("a", *A), ("big", 99.0, 9e6)])["big"] == TrialScheduler.STOP


def test_infeasible_and_incomplete_results_never_reach_a_rung():
    s = _moasha()
    trial = SimpleNamespace(trial_id="x")
    s.on_trial_add(None, trial)
    for result in ({"epoch": 1, "val_top1": 99.0, "macs": 9e6, "feasible": 0},
                   {"epoch": 1, "macs": 1e6},
                   {"epoch": 1, "val_top1": float("nan"), "macs": 1e6}):
        assert s.on_trial_result(None, trial, result) == TrialScheduler.CONTINUE
    assert all(not recorded for b in s._brackets for _, recorded in b._rungs)
    # The first feasible trial at a rung always continues and is recorded there.
    assert _decisions(s, [("y", 10.0, 7e6)])["y"] == TrialScheduler.CONTINUE
    assert [len(r) for _, r in s._brackets[0]._rungs] == [0, 0, 1]  # rungs at epochs 4, 2, 1


def test_one_objective_ranks_like_a_sort():
    s = MOASHAScheduler([("val_top1", "max", 0.0)], max_t=4, grace_period=1, reduction_factor=2)
    actions = _decisions(s, [(t, acc, 0.0) for t, acc in (("a", 50.0), ("b", 60.0), ("c", 40.0), ("d", 55.0))])
    # b: best of 2; c: last of 3 (quota 2); d: 2nd of 4 (quota 2)
    assert actions == {"a": "CONTINUE", "b": "CONTINUE", "c": "STOP", "d": "CONTINUE"}


@pytest.mark.parametrize("bad", [{"reduction_factor": 1}, {"grace_period": 8}])
def test_bad_rungs_are_refused(bad):
    with pytest.raises(AssertionError):  # Ray's own checks, in AsyncHyperBandScheduler
        MOASHAScheduler(OBJECTIVES, **{"max_t": 4, "grace_period": 1, "reduction_factor": 2, **bad})
