"""Non-dominated filtering and hypervolume (moocore underneath) against hand-computed fronts,
the definition of dominance, a brute-force grid reference, and Optuna's own (private) WFG
implementation; plus the report's front table."""
from __future__ import annotations

import itertools
import numpy as np
import pytest

from tntsearch import pareto
from tntsearch.pareto import (
    Objective,
    as_objectives,
    front_hypervolume,
    front_mask,
    hypervolume,
    pareto_mask,
    to_minimisation,
)


def _grid_hypervolume(points: np.ndarray, ref: np.ndarray) -> float:
    """Independent reference: cut the box into the grid of all point coordinates and add up
    the cells whose lower corner some point weakly dominates (exact, exponential in k)."""
    pts = points[np.all(points < ref, axis=1)]
    if len(pts) == 0:
        return 0.0
    axes = [np.unique(np.concatenate([pts[:, j], [ref[j]]])) for j in range(len(ref))]
    total = 0.0
    for cell in itertools.product(*(range(len(a) - 1) for a in axes)):
        lower = np.array([axes[j][c] for j, c in enumerate(cell)])
        if np.any(np.all(pts <= lower, axis=1)):
            total += float(np.prod([axes[j][c + 1] - axes[j][c] for j, c in enumerate(cell)]))
    return total


def _peeled_fronts(points: np.ndarray) -> list[set[int]]:
    """Fronts by repeated filtering: front r is the non-dominated set of what fronts 0..r-1
    leave (Deb et al.'s NSGA-II sort)."""
    left, fronts = np.arange(len(points)), []
    while left.size:
        mask = pareto_mask(points[left])
        fronts.append(set(left[mask].tolist()))
        left = left[~mask]
    return fronts


# -- non-dominated filtering ------------------------------------------------------------


def test_mask_hand_case_with_duplicates_and_ties():
    pts = np.array([(1, 5), (2, 2), (5, 1), (3, 3), (4, 4), (2, 2), (6, 6), (1, 6)], dtype=float)
    # (2,2) appears twice: duplicates never dominate each other, both stay on front 0.
    # (1,6) ties (1,5) on the first objective and is worse on the second: dominated.
    assert pareto_mask(pts).tolist() == [True, True, True, False, False, True, False, False]
    assert _peeled_fronts(pts) == [{0, 1, 2, 5}, {3, 7}, {4}, {6}]


def test_mask_three_objectives_hand_case():
    pts = np.array([(1, 2, 3), (2, 1, 3), (3, 3, 1), (2, 2, 3), (3, 3, 3), (1, 2, 3)], dtype=float)
    # (2,2,3) is dominated by (1,2,3) and (2,1,3); (3,3,3) by everything above it.
    assert _peeled_fronts(pts) == [{0, 1, 2, 5}, {3}, {4}]


def test_mask_matches_the_definition_on_random_points():
    rng = np.random.default_rng(0)
    for k in (2, 3, 4):
        pts = rng.integers(0, 5, size=(40, k)).astype(float)  # small ints: many ties/duplicates
        fronts = _peeled_fronts(pts)
        assert sorted(itertools.chain.from_iterable(fronts)) == list(range(40))
        for r, front in enumerate(fronts):
            for i, j in itertools.product(front, front):
                assert not pareto.dominates(pts[i], pts[j])
            if r:
                for j in front:
                    assert any(pareto.dominates(pts[i], pts[j]) for i in fronts[r - 1])
        # Front 0 is exactly the set of points no other point dominates.
        expected = [not any(pareto.dominates(pts[i], pts[j]) for i in range(40)) for j in range(40)]
        assert pareto_mask(pts).tolist() == expected


def test_modes_flip_maximised_columns_at_the_boundary():
    # (accuracy max, MACs min): (0.8, 4) and (0.5, 2) trade off; (0.5, 3) is dominated by (0.5, 2).
    pts = np.array([(0.8, 4.0), (0.5, 2.0), (0.5, 3.0)])
    assert pareto_mask(pts, ["max", "min"]).tolist() == [True, True, False]
    assert _peeled_fronts(to_minimisation(pts, ["max", "min"])) == [{0, 1}, {2}]
    assert pareto_mask(pts).tolist() == [False, True, False]  # all minimised: (0.5, 2) dominates
    assert hypervolume(pts, [0.0, 10.0], ["max", "min"]) == pytest.approx(5.8)  # see the hand case below
    with pytest.raises(ValueError, match="modes"):
        pareto_mask(pts, ["max", "maximise"])


def test_mask_rejects_missing_values():
    with pytest.raises(ValueError, match="finite"):
        pareto_mask(np.array([[1.0, np.nan], [0.0, 1.0]]))
    assert pareto_mask(np.zeros((0, 2))).tolist() == []


# -- hypervolume ----------------------------------------------------------------------


def test_hypervolume_2d_hand_cases():
    ref = np.array([4.0, 4.0])
    stairs = np.array([(1, 3), (2, 2), (3, 1)], dtype=float)
    # Columns x in [1,2): height 1; [2,3): 2; [3,4): 3 -> 6.
    assert hypervolume(stairs, ref) == pytest.approx(6.0)
    # Duplicates, a dominated point, and points outside the box (or on its edge) add nothing.
    extra = np.array([(2, 2), (3, 3), (5, 0), (4, 0), (0, 4)], dtype=float)
    assert hypervolume(np.concatenate([stairs, extra]), ref) == pytest.approx(6.0)
    assert hypervolume(np.array([(1.0, 1.0)]), ref) == pytest.approx(9.0)
    assert hypervolume(np.zeros((0, 2)), ref) == 0.0
    assert hypervolume(np.array([(5.0, 5.0)]), ref) == 0.0


def test_hypervolume_3d_hand_cases():
    assert hypervolume(np.array([(1.0, 1.0, 1.0)]), [2, 3, 4]) == pytest.approx(6.0)
    pts = np.array([(1, 2, 3), (2, 1, 3), (3, 3, 1)], dtype=float)
    # Inclusion-exclusion with ref (4,4,4): 6 + 6 + 3 - 4 - 1 - 1 + 1 = 10.
    assert hypervolume(pts, [4, 4, 4]) == pytest.approx(10.0)
    dup = np.concatenate([pts, pts[:2], [(3, 3, 3), (1, 1, 4)]])  # duplicates, dominated, on the edge
    assert hypervolume(dup, [4, 4, 4]) == pytest.approx(10.0)


def test_hypervolume_of_maximised_objectives_flips_once():
    # accuracy (max, ref 0) and MACs (min, ref 10): trials (0.8, 4) and (0.5, 2).
    objs = as_objectives([("val_top1", "max", 0.0), ("macs", "min", 10.0)])
    rows = [{"metrics": {"val_top1": 0.8, "macs": 4.0}}, {"metrics": {"val_top1": 0.5, "macs": 2.0}}]
    # MACs in [2,4) reach accuracy 0.5, [4,10) reach 0.8: 2*0.5 + 6*0.8 = 5.8.
    assert front_hypervolume(rows, objs) == pytest.approx(5.8)
    pts = to_minimisation(np.array([[0.8, 4.0], [0.5, 2.0]]), ["max", "min"])
    assert pts.tolist() == [[-0.8, 4.0], [-0.5, 2.0]]


@pytest.mark.parametrize("k", [2, 3, 4])
def test_hypervolume_matches_grid_reference_and_optuna(k):
    from optuna._hypervolume import compute_hypervolume  # private: used only as a reference

    rng = np.random.default_rng(k)
    ref = np.full(k, 1.0)
    for n in (1, 2, 7, 12):
        pts = rng.random((n, k)).round(2)
        pts = np.concatenate([pts, pts[: n // 2]])  # duplicates
        expected = _grid_hypervolume(pts, ref)
        assert hypervolume(pts, ref) == pytest.approx(expected, rel=1e-12, abs=1e-12)
        assert hypervolume(pts, ref) == pytest.approx(compute_hypervolume(pts, ref), rel=1e-12, abs=1e-12)
        assert hypervolume(rng.permutation(pts), ref) == pytest.approx(expected, rel=1e-12, abs=1e-12)
        # Points partly outside the box: Optuna refuses them; here they count for nothing.
        outside = np.concatenate([pts, rng.random((3, k)) + 0.9])
        assert hypervolume(outside, ref) == pytest.approx(_grid_hypervolume(outside, ref), rel=1e-12, abs=1e-12)


def test_hypervolume_never_decreases_when_a_point_is_added():
    rng = np.random.default_rng(7)
    pts = rng.random((30, 3))
    hvs = [hypervolume(pts[:i], [1.0, 1.0, 1.0]) for i in range(31)]
    assert all(b >= a - 1e-15 for a, b in zip(hvs, hvs[1:]))
    assert hvs[0] == 0.0 and hvs[-1] > 0


def test_bad_reference_point_and_objectives_are_refused():
    with pytest.raises(ValueError, match="ref"):
        hypervolume(np.ones((2, 2)), [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="ref"):
        hypervolume(np.ones((2, 2)), [1.0, np.inf])
    with pytest.raises(ValueError, match="mode"):
        Objective("val_top1", "maximise", 0.0)
    with pytest.raises(ValueError, match="ref"):
        Objective("macs", "min", float("nan"))
    with pytest.raises(ValueError, match="twice"):
        as_objectives([("macs", "min", 1), ("macs", "max", 1)])


def test_objectives_accept_tuples_dicts_and_attribute_objects():
    class SpecObjective:  # shaped like the spec's pydantic Objective
        metric, mode, ref = "throughput", "max", 10

    objs = as_objectives([("val_top1", "max", 0), {"metric": "macs", "mode": "min", "ref": 2e9}, SpecObjective()])
    assert [o.to_list() for o in objs] == [["val_top1", "max", 0.0], ["macs", "min", 2e9], ["throughput", "max", 10.0]]


def test_front_mask_leaves_rows_with_missing_values_off():
    objs = [("val_top1", "max", 0.0), ("throughput", "max", 0.0)]
    rows = [
        {"metrics": {"val_top1": 0.9, "throughput": float("nan")}},  # not measured
        {"metrics": {"val_top1": 0.7, "throughput": 100.0}},
        {"metrics": {"val_top1": 0.6, "throughput": 50.0}},
        {"metrics": {"val_top1": 0.5}},
    ]
    assert front_mask(rows, objs).tolist() == [False, True, False, False]
    assert front_hypervolume(rows, objs) == pytest.approx(0.7 * 100.0)


def test_front_table_reads_best_first_on_the_first_objective():
    from tntsearch.report import front_table

    rows = [
        {"trial_id": "b", "metrics": {"val_top1": 0.91, "macs": 3.0e6}, "arch": {"tnt_blocks": [1, 3]}},
        {"trial_id": "a", "metrics": {"val_top1": 0.87, "macs": 2.6e6}, "arch": {"tnt_blocks": []}},
        {"trial_id": "c", "metrics": {"val_top1": 0.93, "macs": 5.1e6}, "arch": {"tnt_blocks": [2]}},
        {"trial_id": "x", "metrics": {"macs": 1.0e6}, "arch": {}},  # never measured: last
    ]
    order = lambda objectives: [line.split()[1] for line in front_table(rows, objectives).splitlines()[2:]]
    assert order([("val_top1", "max", 0.0), ("macs", "min", 8e6)]) == ["c", "b", "a", "x"]
    assert order([("macs", "min", 8e6), ("val_top1", "max", 0.0)]) == ["x", "a", "b", "c"]
    assert "1,3" in front_table(rows, [("val_top1", "max", 0.0)]).splitlines()[3]
