"""Does the default sampler (NSGA-II) find a better front than random search?

On the digits demo space (search_spaces/demo.yaml), for each seed, two searches of K
trials each, side by side in one run: ``search.algorithm: nsga2`` (the default) and
``random``, with the same seed, the same baselines enqueued first, the same epochs and the
same training seed. Printed per seed: the hypervolume of each front (the spec's reference
point, read back from MLflow with ``tntsearch.report.load_search``), their ratio, whether
the NSGA-II front dominates the random one (every random front point weakly dominated by
an NSGA-II front point), and which baselines a searched (non-baseline) architecture
dominates. Then the ratio's mean, spread and range over the seeds, and the training noise
that any difference must beat: how far apart the accuracies of one architecture trained in
both searches of a seed are (the baselines, and NSGA-II's first generation, which is random
search with the same seed).

Cheap settings by default (K=8, 2 epochs, 3 seeds); with NSGA-II's population of 4 that
is one generation of evolution after its random first one. The throughput constraint is
dropped unless ``--keep-throughput``: on a shared 2-core machine the measured rate moves
with other jobs' load, so feasibility, not the sampler, would decide the comparison.

    python benchmarks/sampler_quality.py [--trials 8] [--epochs 2] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import demo_data  # noqa: E402
from tntsearch.tracking import TELEMETRY_ENV  # noqa: E402  (first: MLflow telemetry off)

__all__ = ["compare", "main"]

ALGORITHMS = ("nsga2", "random")



def _spec(work: Path, data: tuple[Path, Path], algorithm: str, seed: int, trials: int, epochs: int,
          keep_throughput: bool) -> Path:
    raw = yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())
    raw["name"] = f"quality-{algorithm}-s{seed}"
    raw["data"].update(train=str(data[0]), val=str(data[1]))
    raw["train"].update(epochs=epochs, warmup_epochs=min(raw["train"].get("warmup_epochs", 1), epochs - 1), seed=seed)
    # NOTE: no early stopping: both samplers see every trial's full-length result.
    raw["search"].update(algorithm=algorithm, seed=seed, num_samples=trials, scheduler={"type": "none"})
    if not keep_throughput:
        raw["constraints"]["min_throughput"] = None
    raw["mlflow"]["experiment"] = "search-quality"
    raw["storage"] = str(work / "ray_results")
    path = work / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _points(rows: list[dict[str, Any]], objectives) -> np.ndarray:
    from tntsearch.pareto import to_minimisation

    values = np.array([[r["metrics"].get(o.metric, np.nan) for o in objectives] for r in rows], dtype=float).reshape(len(rows), len(objectives))
    return to_minimisation(values, [o.mode for o in objectives])


def _arch_key(arch: dict[str, Any]) -> str:
    return json.dumps(arch, sort_keys=True)


def _weakly_dominated(b: np.ndarray, front: np.ndarray) -> bool:
    """Some point of ``front`` is at least as good as ``b`` in every (minimised) objective."""
    return bool(front.size) and bool(np.any(np.all(front <= b, axis=1)))


def compare(trials: int = 8, epochs: int = 2, seeds: tuple[int, ...] = (0, 1, 2), *, work: Path | None = None,
            keep_throughput: bool = False, num_cpus: int | None = None) -> list[dict[str, Any]]:
    """Run both searches for every seed; one dict per seed with each algorithm's
    hypervolume, front and timing, the ratio and the dominance checks."""
    import ray

    from tntsearch.pareto import dominates
    from tntsearch.report import load_search
    from tntsearch.run import prepare, search

    work = Path(work or tempfile.mkdtemp(prefix="tntsearch-quality-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = demo_data(work)
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": dict(TELEMETRY_ENV)})
    os.chdir(work)  # the searches' MLflow store: <work>/mlflow.db
    out = []
    try:
        for seed in seeds:
            row: dict[str, Any] = {"seed": seed}
            for algorithm in ALGORITHMS:
                path = _spec(work, data, algorithm, seed, trials, epochs, keep_throughput)
                spec = prepare(path)
                tic = time.perf_counter()
                outcome = search(spec, path, progress_interval=1e9)
                found = load_search(outcome.tracking_uri, run_id=outcome.parent_run_id)
                front = _points(found.front, found.objectives)
                searched = [r for r in found.candidates if not r["baseline"]]
                baselines = {r["baseline"]: _points([r], found.objectives)[0] for r in found.rows if r["baseline"]}
                row[algorithm] = {
                    "accuracy": {_arch_key(r["arch"]): r["metrics"]["val_top1"] for r in found.candidates},
                    "hypervolume": found.hypervolume,
                    "front": front,
                    "front_size": len(found.front),
                    "counts": {k: outcome.summary[k] for k in ("completed", "stopped_early", "infeasible", "failed")},
                    # a baseline that never trained (infeasible) cannot be compared
                    "beats_baselines": {
                        name: any(dominates(p, b) for p in _points(searched, found.objectives)) if np.all(np.isfinite(b)) else None
                        for name, b in sorted(baselines.items())
                    },
                    "wall_s": time.perf_counter() - tic,
                }
            nsga, rand = row["nsga2"], row["random"]
            row["ratio"] = nsga["hypervolume"] / rand["hypervolume"] if rand["hypervolume"] > 0 else float("inf")
            # The same architecture trained in both searches (baselines, and NSGA-II's first
            # generation is random search with the same seed): how far apart its accuracies are.
            same = set(nsga["accuracy"]) & set(rand["accuracy"])
            row["retrain_gaps"] = [abs(nsga["accuracy"][k] - rand["accuracy"][k]) for k in sorted(same)]
            row["nsga2_dominates_random"] = all(_weakly_dominated(p, nsga["front"]) for p in rand["front"])
            row["random_dominates_nsga2"] = all(_weakly_dominated(p, rand["front"]) for p in nsga["front"])
            out.append(row)
    finally:
        ray.shutdown()
    return out


def _beats(b: dict[str, bool | None]) -> str:
    return ", ".join(f"{k}: {'yes' if v else 'n/a (infeasible)' if v is None else 'no'}" for k, v in b.items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8, help="K: trials per search (the baselines included)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workdir", help="where searches, data and mlflow.db go (default: a new temp dir)")
    ap.add_argument("--keep-throughput", action="store_true", help="keep the demo's min_throughput constraint")
    ap.add_argument("--num-cpus", type=int, help="CPUs for the local Ray (default: all)")
    args = ap.parse_args(argv)
    if args.trials < 1 or args.epochs < 1:
        print("error: --trials and --epochs must be >= 1", file=sys.stderr)
        return 2
    tic = time.perf_counter()
    rows = compare(args.trials, args.epochs, tuple(args.seeds), work=args.workdir and Path(args.workdir),
                   keep_throughput=args.keep_throughput, num_cpus=args.num_cpus)
    print(f"\nsampler_quality: digits demo space, K={args.trials} trials x {args.epochs} epochs per search, "
          f"seeds {args.seeds}; hypervolume of (val_top1 max, macs min), demo reference point")
    print(f"{'seed':>4}  {'HV nsga2':>10}  {'HV random':>10}  {'ratio':>6}  {'front n/r':>9}  {'n dom r':>7}  {'r dom n':>7}  wall n/r (s)")
    for r in rows:
        n, m = r["nsga2"], r["random"]
        print(f"{r['seed']:>4}  {n['hypervolume']:10.4g}  {m['hypervolume']:10.4g}  {r['ratio']:6.3f}  "
              f"{n['front_size']:>4}/{m['front_size']:<4}  {str(r['nsga2_dominates_random']):>7}  {str(r['random_dominates_nsga2']):>7}  "
              f"{n['wall_s']:.0f}/{m['wall_s']:.0f}")
    for r in rows:
        for alg in ALGORITHMS:
            print(f"seed {r['seed']} {alg}: {r[alg]['counts']}; a searched architecture dominates baseline {_beats(r[alg]['beats_baselines'])}")
    gaps = [g for r in rows for g in r["retrain_gaps"]]
    if gaps:
        print(f"training noise: the same architecture trained in both searches of a seed ({len(gaps)} pairs) differs by "
              f"{statistics.mean(gaps):.2f} points of val_top1 on average (max {max(gaps):.2f})")
    ratios = [r["ratio"] for r in rows]
    spread = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
    print(f"\nHV(nsga2) / HV(random): mean {statistics.mean(ratios):.3f} +- {spread:.3f} (std over {len(ratios)} seeds), "
          f"range {min(ratios):.3f} .. {max(ratios):.3f}; nsga2 front dominates random front in "
          f"{sum(r['nsga2_dominates_random'] for r in rows)}/{len(rows)} seeds, the reverse in "
          f"{sum(r['random_dominates_nsga2'] for r in rows)}/{len(rows)}; total {time.perf_counter() - tic:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
