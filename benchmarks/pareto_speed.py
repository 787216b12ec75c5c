"""moocore (what tntsearch.pareto calls) against the hand-written algorithms it replaced.

The reference is the project's former code, kept here only to be compared: the dense
domination-matrix filter (O(k n^2) time, n^2 booleans) and the exact hypervolume by slicing
along the last objective (a 2-D sweep at the bottom; O(n^(k-1) log n)). On random fronts
(2-4 objectives, 10-2000 points, uniform in the unit cube or on a sphere so that most points
are non-dominated, with some duplicates and some points outside the reference box) it checks
that both give the same non-dominated mask and the same hypervolume (to 1e-12 relative), and
prints the median time of each and the ratio (reference / moocore: > 1 means moocore is faster).
Where the reference hypervolume would take longer than --hv-budget seconds (extrapolated from
the previous size) it is skipped and its estimated time printed.

    .venv/bin/python benchmarks/pareto_speed.py [--sizes 10 100 500 2000] [--objectives 2 3 4] [--repeat 5] [--hv-budget 30]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from tntsearch.pareto import hypervolume, pareto_mask

# --------------------------------------------------------------------------------------
# The reference: tntsearch.pareto's former hand-written code (minimisation, finite input).


def old_pareto_mask(points: np.ndarray) -> np.ndarray:
    le = np.all(points[:, None, :] <= points[None, :, :], axis=-1)
    lt = np.any(points[:, None, :] < points[None, :, :], axis=-1)
    return ~(le & lt).any(axis=0)


def _old_hv2d(points: np.ndarray, ref: np.ndarray) -> float:
    order = np.lexsort((points[:, 1], points[:, 0]))
    pts = points[order]
    best_y = np.minimum.accumulate(pts[:, 1])
    keep = np.concatenate([[True], pts[1:, 1] < best_y[:-1]])
    pts = pts[keep]
    widths = np.diff(np.concatenate([pts[:, 0], ref[:1]]))
    heights = ref[1] - pts[:, 1]
    return float(np.dot(widths, heights))


def _old_hv(points: np.ndarray, ref: np.ndarray) -> float:
    if points.shape[0] == 0:
        return 0.0
    k = points.shape[1]
    if k == 1:
        return float(ref[0] - points[:, 0].min())
    if k == 2:
        return _old_hv2d(points, ref)
    points = points[old_pareto_mask(points)]
    order = np.argsort(points[:, -1], kind="stable")
    pts = points[order]
    zs = np.concatenate([pts[:, -1], ref[-1:]])
    total = 0.0
    for i in range(pts.shape[0]):
        depth = zs[i + 1] - zs[i]
        if depth > 0:
            total += depth * _old_hv(pts[: i + 1, :-1], ref[:-1])
    return total


def old_hypervolume(points: np.ndarray, ref: np.ndarray) -> float:
    if points.shape[0] == 0:
        return 0.0
    inside = np.all(points < ref, axis=1)
    return _old_hv(np.unique(points[inside], axis=0), ref)


# --------------------------------------------------------------------------------------


def random_points(rng: np.random.Generator, n: int, k: int, shape: str) -> np.ndarray:
    """``n`` points in ``k`` objectives: uniform in the unit cube, or on the unit sphere's
    positive orthant (mostly non-dominated: the hard case); about 5% are copies of others
    and about 5% lie beyond the reference point 1.0 in some objective."""
    if shape == "cube":
        pts = rng.random((n, k))
    else:
        pts = np.abs(rng.standard_normal((n, k)))
        pts = 1.0 - pts / np.linalg.norm(pts, axis=1, keepdims=True) * 0.999
    copies = rng.choice(n, size=n // 20, replace=False)
    pts[copies[: len(copies) // 2]] = pts[copies[len(copies) // 2:][: len(copies) // 2]]
    outside = rng.choice(n, size=n // 20, replace=False)
    pts[outside, rng.integers(0, k, size=len(outside))] = 1.0 + rng.random(len(outside))
    return pts


def _median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def compare(sizes: list[int], objectives: list[int], repeat: int, seed: int = 0,
            hv_budget_s: float = 30.0) -> list[dict]:
    """One row per (k, n, shape): agreement and median times of both implementations. The
    reference hypervolume (O(n^(k-1) log n) on a front of n points) is skipped where its time,
    extrapolated from the previous size, would exceed ``hv_budget_s``."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in objectives:
        for shape in ("cube", "sphere"):
            last = None  # (front size, reference hv time) of the previous size
            for n in sorted(sizes):
                pts = random_points(rng, n, k, shape)
                ref = np.ones(k)
                mask_old, mask_new = old_pareto_mask(pts), pareto_mask(pts)
                if not np.array_equal(mask_old, mask_new):
                    raise AssertionError(f"masks differ for k={k}, n={n}, {shape}")
                front = int(mask_new.sum())
                row = {"k": k, "n": n, "shape": shape, "front": front,
                       "mask_old_s": _median_time(lambda: old_pareto_mask(pts), repeat),
                       "mask_new_s": _median_time(lambda: pareto_mask(pts), repeat),
                       "hv": hypervolume(pts, ref), "hv_new_s": _median_time(lambda: hypervolume(pts, ref), repeat)}
                estimate = last[1] * (front / last[0]) ** (k - 1) if last else 0.0
                if estimate > hv_budget_s:
                    row["hv_old_s"], row["hv_old_estimate_s"] = None, estimate
                else:
                    hv_old = old_hypervolume(pts, ref)
                    if abs(hv_old - row["hv"]) > 1e-12 * max(abs(hv_old), 1e-300):
                        raise AssertionError(f"hypervolumes differ for k={k}, n={n}, {shape}: {hv_old!r} vs {row['hv']!r}")
                    row["hv_old_s"] = _median_time(lambda: old_hypervolume(pts, ref), repeat if estimate < 1 else 1)
                    last = (max(front, 1), row["hv_old_s"])
                rows.append(row)
                print(_line(row), flush=True)
    return rows


def _line(r: dict) -> str:
    if r["hv_old_s"] is None:
        hv = f"hv old skipped (~{r['hv_old_estimate_s']:.0f} s) moocore {r['hv_new_s'] * 1e3:8.3f} ms"
    else:
        hv = (f"hv old {r['hv_old_s'] * 1e3:10.3f} ms moocore {r['hv_new_s'] * 1e3:8.3f} ms  "
              f"x{r['hv_old_s'] / r['hv_new_s']:9.1f}")
    return (f"k={r['k']} n={r['n']:5d} {r['shape']:6s} front {r['front']:5d} | mask old {r['mask_old_s'] * 1e3:9.3f} ms "
            f"moocore {r['mask_new_s'] * 1e3:8.3f} ms  x{r['mask_old_s'] / r['mask_new_s']:8.1f} | {hv}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 500, 2000])
    p.add_argument("--objectives", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--hv-budget", type=float, default=30.0, help="seconds the reference hypervolume may take per case")
    args = p.parse_args(argv)
    print("masks and hypervolumes agree (1e-12 relative) on every case below that ran both; "
          "times are medians, xN = reference time / moocore time")
    compare(args.sizes, args.objectives, args.repeat, hv_budget_s=args.hv_budget)


if __name__ == "__main__":
    main()
