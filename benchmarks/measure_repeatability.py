"""How much a search's recorded throughput moves when other trials train meanwhile.

A short demo search runs (one trial at a time, each Train worker holding one of Ray's two
CPUs); while it trains, one architecture (the demo's ``tiny_tnt`` baseline) is measured
``--measurements`` times in a Ray task holding a worker's CPU, as a trial measures it
(``cost.measure_speed``'s pieces: ``speed_steps``, warm-up, ``timed_rounds``), with the
demo's ``tiny_vit`` baseline as the reference timed in between (A B A B). Each measurement
is taken twice, back to back in alternating order: *alone* (``exclusive.measuring``: the
trial's training steps wait meanwhile, as in a search) and *shared* (training goes on, as
before). From the same rounds it prints the candidate's figures four ways -- the median
round, the fastest round (the least disturbed: timeit's reasoning), the median paired ratio
to the reference times the reference's quiet figure, and the ratio of the two fastest
rounds times it -- and the spread max/min - 1 of each, over all ``--rounds`` and over the
first ``--first`` of them (docs/model_and_cost.md, "Measuring"; target: within 10%).

    python benchmarks/measure_repeatability.py [--measurements 5] [--trials 4] [--epochs 6] [--rounds 15] [--first 5]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray
import torch
import yaml

from tntsearch.cost import _MIN_UNIT_S, speed_steps, timed_rounds
from tntsearch.data import convert
from tntsearch.exclusive import measuring
from tntsearch.search import make_tuner
from tntsearch.space import arch_from_params, baseline_points
from tntsearch.spec import SearchSpec
from tntsearch.tracking import TELEMETRY_ENV

ROOT = Path(__file__).resolve().parents[1]
STATS = ("median", "fastest", "corrected", "corr-fastest")


def demo_spec(work: Path, trials: int, epochs: int) -> SearchSpec:
    """The demo, shrunk to ``trials`` trials of ``epochs`` epochs, one at a time, on the
    digits written into ``work``; no throughput floor (it would stop trials training)."""
    raw = yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())
    raw.update(name="repeatability", storage=str(work / "ray_results"))
    raw["data"].update(train=str(work / "train.beton"), val=str(work / "val.beton"))
    raw["train"].update(epochs=epochs)
    raw["search"].update(num_samples=trials, max_concurrent=1)
    raw["constraints"].update(min_throughput=None)
    return SearchSpec.model_validate(raw)


@ray.remote(num_cpus=1, scheduling_strategy="DEFAULT")
def timed(candidate, reference, batch_size: int, rounds: int, warmup: int, alone: bool) -> dict[str, list[float]]:
    """Seconds per call of candidate and reference, batch and one image, over the rounds
    (fp32: the demo's ``auto`` precision on CPU), on one thread as the trial's worker."""
    torch.set_num_threads(1)
    steps = speed_steps(candidate, "cpu", batch_size, reference=reference)
    for step in steps.values():
        for _ in range(warmup):
            step()
    with measuring("cpu") if alone else contextlib.nullcontext():
        return timed_rounds(steps, "cpu", 0, rounds, min_time_s=_MIN_UNIT_S)


def figures(times: dict[str, list[float]], batch_size: int, quiet: dict[str, float]) -> dict[str, tuple[float, float]]:
    """(images/s, ms) of the candidate by each of ``STATS``."""
    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))
    return {
        "median": (batch_size / statistics.median(times["candidate batch"]), 1e3 * statistics.median(times["candidate one"])),
        "fastest": (batch_size / min(times["candidate batch"]), 1e3 * min(times["candidate one"])),
        "corrected": (quiet["throughput"] * ratio("reference batch", "candidate batch"),
                      quiet["latency_ms"] * ratio("candidate one", "reference one")),
        "corr-fastest": (quiet["throughput"] * min(times["reference batch"]) / min(times["candidate batch"]),
                         quiet["latency_ms"] * min(times["candidate one"]) / min(times["reference one"])),
    }


def first(times: dict[str, list[float]], n: int) -> dict[str, list[float]]:
    return {k: v[:n] for k, v in times.items()}


def spread(values: list[float]) -> float:
    return max(values) / min(values) - 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measurements", type=int, default=5)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--first", type=int, default=5, help="also the figures of the first this many rounds")
    ap.add_argument("--pause", type=float, default=2.0, help="seconds between measurements")
    args = ap.parse_args(argv)
    os.environ.update(TELEMETRY_ENV)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for split in ("train", "val"):
            convert("digits", work / f"{split}.beton", split=split, num_workers=1)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": TELEMETRY_ENV})
        spec = demo_spec(work, args.trials, args.epochs)
        m = spec.constraints.measure
        points = dict(baseline_points(spec))
        candidate, reference = (arch_from_params(points[n], spec.space) for n in ("tiny_tnt", "tiny_vit"))
        print(f"tiny_tnt against tiny_vit, batch {m.batch_size}, {args.rounds} rounds, warm-up {m.warmup}", flush=True)

        def measure(alone: bool) -> dict[str, list[float]]:
            return ray.get(timed.remote(candidate, reference, m.batch_size, args.rounds, m.warmup, alone))

        q = measure(True)
        quiet = {"throughput": m.batch_size / statistics.median(q["reference batch"]),
                 "latency_ms": 1e3 * statistics.median(q["reference one"])}
        f = figures(q, m.batch_size, quiet)
        print(f"quiet: tiny_vit {quiet['throughput']:.0f} images/s {quiet['latency_ms']:.2f} ms; tiny_tnt "
              + "  ".join(f"{s} {f[s][0]:.0f} images/s {f[s][1]:.2f} ms" for s in STATS[:2])
              + f" (load average {os.getloadavg()[0]:.2f})", flush=True)
        search = threading.Thread(target=lambda: make_tuner(spec).fit(), daemon=True)
        search.start()
        while ray.available_resources().get("CPU", 2) > 1 and search.is_alive():  # until a trial trains
            time.sleep(0.5)
        rows: dict[str, list[dict[str, tuple[float, float]]]] = {k: [] for k in ("alone", "shared", "alone first",
                                                                                 "shared first")}
        print("images/s and ms of tiny_tnt by " + ", ".join(STATS), flush=True)
        for i in range(args.measurements):
            for kind in ("alone", "shared") if i % 2 == 0 else ("shared", "alone"):
                training = ray.available_resources().get("CPU", 2) <= 1
                times = measure(kind == "alone")
                f = figures(times, m.batch_size, quiet)
                rows[kind].append(f)
                rows[f"{kind} first"].append(figures(first(times, args.first), m.batch_size, quiet))
                print(f"{i + 1} {kind:6}: " + "  ".join(f"{s} {f[s][0]:5.0f} {f[s][1]:5.2f}" for s in STATS)
                      + f"; a trial training: {'yes' if training else 'no'}; load average {os.getloadavg()[0]:.2f}",
                      flush=True)
            time.sleep(args.pause)
        print("max/min - 1 over the measurements (throughput / latency):")
        for kind, fs in rows.items():
            print(f"  {kind:12}: " + "  ".join(
                f"{s} {spread([f[s][0] for f in fs]):6.1%} / {spread([f[s][1] for f in fs]):6.1%}" for s in STATS))
        search.join()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
