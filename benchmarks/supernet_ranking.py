"""Does the supernet rank architectures as training them alone does? (issue 15, "Evidence")

On a spec's space, a set of architectures spanning it (the baselines, the corners, seeded
random ones) is scored twice:

- inherited: the top-1 on ``data.val`` of each sub-network extracted from ONE supernet,
  trained Ray-free by ``tntsearch.supernet.train.fit_supernet`` with the spec's
  ``supernet:`` section (or ``--supernet-epochs`` with that section's defaults);
- stand-alone: the top-1 on ``data.val`` after training it alone with the spec's ``train:``
  recipe (``tntsearch.train.fit``, the train_each mode's recipe), with seeds 0, 1 (and more
  with ``--seeds``), averaged.

Both sides train on all of ``data.train`` (a ``data.search`` split is dropped) and are
judged on ``data.val``, so only the weights differ.

Prints Kendall tau and Spearman rho (scipy.stats) between inherited and stand-alone mean
accuracy, the same between the two stand-alone seeds (the noise ceiling: how well training
alone ranks itself), and whether tau(inherited, stand-alone mean) >= 0.8 x tau(seed 0,
seed 1), the target of docs/supernet.md. Every run is its own process (``--jobs`` at a
time, ``--threads`` torch threads each); the supernet trains beside the stand-alone runs.

The default spec is ``benchmarks/ranking_space.yaml``: the demo's space with ``outer_dim``
and ``depth`` searched too, because in the demo's own space (``--spec
search_spaces/demo_supernet.yaml``) the architectures differ by less than a seed moves them,
so the ceiling is near zero and the comparison says nothing (that file says why).

    python benchmarks/supernet_ranking.py                          # the spec's sizes, 2 seeds
    python benchmarks/supernet_ranking.py --archs 14 --seeds 3     # docs/supernet.md's run
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SPEC = ROOT / "benchmarks" / "ranking_space.yaml"
TARGET = 0.8  # tau(inherited, stand-alone mean) >= TARGET x tau(seed 0, seed 1)
SEEDS = 2  # stand-alone seeds per architecture (the ceiling is seed 0 vs seed 1)


def _spec(path: str, epochs: int | None, supernet_epochs: int | None, img_size: int | None):
    """The spec with the benchmark's sizes: ``train.epochs``, ``supernet.epochs``, ``space.img_size``."""
    from tntsearch.spec import SupernetSpec, load_spec

    spec = load_spec(path)
    supernet = spec.supernet or SupernetSpec()
    update: dict[str, Any] = {
        "supernet": supernet.model_copy(update={"epochs": supernet_epochs or supernet.epochs}),
        "train": spec.train.model_copy(update={"epochs": epochs or spec.train.epochs}),
        # Both sides train on all of data.train and are judged on data.val: no selection split.
        "data": spec.data.model_copy(update={"search": None, "search_fraction": None}),
    }
    if img_size is not None:
        update["space"] = {**spec.space, "img_size": img_size}
    return spec.model_copy(update=update)


def architectures(spec, n: int, seed: int = 0) -> dict[str, Any]:
    """The baselines, the corners (largest, smallest, each with the other's TNT blocks as far
    as its depth goes), then seeded random sub-networks until ``n`` distinct networks."""
    import torch

    from tntsearch.model import TNTConfig
    from tntsearch.space import arch_from_params, baseline_points
    from tntsearch.supernet import SubnetSpace

    space = SubnetSpace(spec.space)
    big, small = space.largest(), space.smallest()
    candidates = [(name, arch_from_params(params, spec.space)) for name, params in baseline_points(spec)]
    candidates += [("largest", big), ("smallest", small),
                   ("largest-no-tnt", TNTConfig(**{**big.to_dict(), "tnt_blocks": small.tnt_blocks})),
                   ("smallest-all-tnt", TNTConfig(**{**small.to_dict(),
                                                      "tnt_blocks": [i for i in big.tnt_blocks if i <= small.depth]}))]
    chosen: dict[str, Any] = {}
    seen: set[str] = set()
    g = torch.Generator().manual_seed(seed)
    draws = 0
    while len(chosen) < n and draws < 1000 * n:
        if candidates:
            name, arch = candidates.pop(0)
        else:
            name, arch = f"random-{draws}", space.sample(g)
            draws += 1
        if arch.network_key() not in seen:  # a DeiT sub-network is one network whatever its inner widths
            seen.add(arch.network_key())
            chosen[name] = arch
    return chosen


def _threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def standalone(spec, arch, seed: int, threads: int) -> tuple[float, float]:
    """Top-1 on ``data.val`` after ``spec.train`` from scratch with ``seed``, and seconds taken."""
    from tntsearch.train import fit

    _threads(threads)
    tic = time.perf_counter()
    history = fit(arch, spec.data, spec.train.model_copy(update={"seed": seed}))
    return history[-1]["val_top1"], time.perf_counter() - tic


def inherited(spec, archs: dict[str, Any], threads: int) -> tuple[dict[str, float], float]:
    """Top-1 on ``data.val`` of every architecture with weights inherited from one supernet
    trained by ``fit_supernet``, and the seconds the training took."""
    import torch

    from tntsearch.data import make_loaders
    from tntsearch.supernet.model import load_supernet
    from tntsearch.supernet.train import fit_supernet
    from tntsearch.train import evaluate

    _threads(threads)
    last: dict[str, Any] = {}

    def keep(metrics, state):
        if state is not None:
            last["state"] = {**state, "model": {k: v.detach().clone() for k, v in state["model"].items()}}

    tic = time.perf_counter()
    fit_supernet(spec, report=keep)
    seconds = time.perf_counter() - tic
    net = load_supernet(last["state"], spec)
    num_classes = net.space.bounds.num_classes
    _, val = make_loaders(spec.data, net.space.bounds.img_size, device="cpu", seed=0, num_classes=num_classes)
    cpu = torch.device("cpu")
    return {name: evaluate(net.extract(a), val, cpu, None, num_classes)[1] for name, a in archs.items()}, seconds


def run(spec, archs: dict[str, Any], seeds: int, jobs: int, threads: int, echo=print) -> dict[str, Any]:
    """Every architecture's inherited and per-seed stand-alone top-1 (seeds 0 .. ``seeds`` - 1),
    the supernet's training time (``supernet_s``) and the mean stand-alone training time
    (``standalone_s``)."""
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        supernet = pool.submit(inherited, spec, archs, threads)  # the longest: first
        alone = {(name, seed): pool.submit(standalone, spec, arch, seed, threads)
                 for seed in range(seeds) for name, arch in archs.items()}  # seeds 0 and 1 of all first
        rows: dict[str, dict[str, float]] = {name: {} for name in archs}
        seconds = []
        for (name, seed), future in alone.items():
            top1, took = future.result()
            rows[name][f"seed{seed}"] = top1
            seconds.append(took)
            echo(f"  stand-alone {name} seed {seed}: {top1:.2f}% ({took:.0f} s)")
        scores, supernet_s = supernet.result()
    for name, top1 in scores.items():
        rows[name]["inherited"] = top1
        rows[name]["standalone"] = sum(rows[name][f"seed{s}"] for s in range(seeds)) / seeds
    return {"rows": rows, "supernet_s": supernet_s, "standalone_s": sum(seconds) / len(seconds)}


def correlations(rows: dict[str, dict[str, float]], seeds: int) -> dict[str, tuple[float, float]]:
    """(Kendall tau, Spearman rho) of inherited vs stand-alone mean, of seed 0 vs seed 1 (the
    ceiling), and with more seeds their mean over every pair of seeds (for information)."""
    from itertools import combinations

    from scipy.stats import kendalltau, spearmanr

    names = sorted(rows)
    col = lambda key: [rows[n][key] for n in names]  # noqa: E731
    pair = lambda a, b: (float(kendalltau(col(a), col(b)).statistic), float(spearmanr(col(a), col(b)).statistic))  # noqa: E731
    stats = {"inherited vs stand-alone mean": pair("inherited", "standalone"), "seed 0 vs seed 1": pair("seed0", "seed1")}
    if seeds > 2:
        pairs = [pair(f"seed{a}", f"seed{b}") for a, b in combinations(range(seeds), 2)]
        stats[f"mean over {len(pairs)} seed pairs"] = tuple(sum(p[i] for p in pairs) / len(pairs) for i in (0, 1))
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(DEFAULT_SPEC),
                        help="the spec (space, data, train and supernet sections); default: benchmarks/ranking_space.yaml")
    parser.add_argument("--archs", type=int, default=12, help="architectures to rank (>= 3)")
    parser.add_argument("--epochs", type=int, help="stand-alone training epochs (default: the spec's train.epochs)")
    parser.add_argument("--supernet-epochs", type=int, help="supernet epochs (default: the spec's supernet.epochs)")
    parser.add_argument("--img-size", type=int, help="override space.img_size (the loaders resize)")
    parser.add_argument("--jobs", type=int, default=2, help="training processes at a time (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--seeds", type=int, default=SEEDS,
                        help=f"stand-alone seeds per architecture, averaged (>= 2; default {SEEDS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random architectures")
    args = parser.parse_args(argv)
    least = {"archs": 3, "seeds": 2}
    for flag in ("archs", "seeds", "epochs", "supernet_epochs", "img_size", "jobs", "threads"):
        value = getattr(args, flag)
        if value is not None and value < least.get(flag, 1):
            print(f"error: --{flag.replace('_', '-')} must be >= {least.get(flag, 1)}; got {value}", file=sys.stderr)
            return 2
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        from tntsearch.data import check_files

        spec = _spec(args.spec, args.epochs, args.supernet_epochs, args.img_size)
        check_files(spec.data)
        archs = architectures(spec, args.archs, args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    from tntsearch.cost import count_macs

    sn = spec.supernet
    print(f"spec {args.spec}: {len(archs)} architectures at {spec.space['img_size']}x{spec.space['img_size']}; "
          f"stand-alone {spec.train.epochs} epochs x seeds {list(range(args.seeds))}; supernet {sn.epochs} epochs "
          f"({sn.sampling}, k={sn.k}, distill={sn.distill}); {args.jobs} processes x {args.threads} threads",
          flush=True)
    tic = time.perf_counter()
    result = run(spec, archs, args.seeds, args.jobs, args.threads, echo=lambda line: print(line, flush=True))
    rows = result["rows"]
    print(f"\n{'architecture':<18} {'MACs':>10} {'inherited':>10}"
          + "".join(f" {f'seed {s}':>8}" for s in range(args.seeds)) + f" {'mean':>8}")
    for name in sorted(rows, key=lambda n: -rows[n]["standalone"]):
        r = rows[name]
        print(f"{name:<18} {count_macs(archs[name]):>10,} {r['inherited']:>9.2f}%"
              + "".join(f" {r[f'seed{s}']:>7.2f}%" for s in range(args.seeds)) + f" {r['standalone']:>7.2f}%")
    stats = correlations(rows, args.seeds)
    print()
    for pair, (tau, rho) in stats.items():
        print(f"{pair:<32} Kendall tau {tau:+.3f}  Spearman rho {rho:+.3f}")
    tau, ceiling = stats["inherited vs stand-alone mean"][0], stats["seed 0 vs seed 1"][0]
    print(f"target tau(inherited, stand-alone mean) >= {TARGET} x tau(seed 0, seed 1): "
          f"{tau:+.3f} vs {TARGET * ceiling:+.3f} -> {'met' if tau >= TARGET * ceiling else 'missed'}")
    print(f"time: supernet training {result['supernet_s']:.0f} s, stand-alone training "
          f"{result['standalone_s']:.0f} s per run (mean), {time.perf_counter() - tic:.0f} s wall in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
