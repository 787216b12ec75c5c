"""How much a search's recorded throughput moves when other trials train meanwhile.

A short demo search runs (one trial at a time, each Train worker holding one of Ray's two
CPUs); while it trains, one architecture (the demo's ``tiny_tnt`` baseline) is measured
``--measurements`` times exactly as a trial measures it (``search._measure_on_trial_device``:
a Ray task holding a worker's CPU), with the demo's ``tiny_vit`` baseline as the reference
timed in between (A B A B). Its quiet figures are measured first, before the search starts.
Prints every measurement and the spread max/min - 1 of the raw and the corrected figures
(docs/model_and_cost.md, "Measuring"; target: corrected throughput within 10%).

    python benchmarks/measure_repeatability.py [--measurements 5] [--trials 3] [--epochs 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray
import yaml

from tntsearch.data import convert
from tntsearch.search import _measure_on_trial_device, make_tuner
from tntsearch.space import arch_from_params, baseline_points
from tntsearch.spec import SearchSpec
from tntsearch.tracking import TELEMETRY_ENV

ROOT = Path(__file__).resolve().parents[1]


def demo_spec(work: Path, trials: int, epochs: int, reference: dict | None) -> SearchSpec:
    """The demo, shrunk to ``trials`` trials of ``epochs`` epochs, one at a time, on the
    digits written into ``work``; no throughput floor (it would stop trials training)."""
    raw = yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())
    raw.update(name="repeatability", storage=str(work / "ray_results"))
    raw["data"].update(train=str(work / "train.beton"), val=str(work / "val.beton"))
    raw["train"].update(epochs=epochs)
    raw["search"].update(num_samples=trials, max_concurrent=1)
    raw["constraints"].update(min_throughput=None)
    if reference:
        raw["constraints"]["measure"]["reference"] = reference
    return SearchSpec.model_validate(raw)


def spread(values: list[float]) -> float:
    return max(values) / min(values) - 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measurements", type=int, default=5)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--pause", type=float, default=2.0, help="seconds between measurements")
    args = ap.parse_args(argv)
    os.environ.update(TELEMETRY_ENV)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for split in ("train", "val"):
            convert("digits", work / f"{split}.beton", split=split, num_workers=1)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": TELEMETRY_ENV})
        quiet = demo_spec(work, args.trials, args.epochs, None)
        points = dict(baseline_points(quiet))
        candidate, ref_arch = (arch_from_params(points[n], quiet.space) for n in ("tiny_tnt", "tiny_vit"))
        ref = _measure_on_trial_device(ref_arch, quiet)
        print(f"reference tiny_vit, quiet: {ref['throughput']:.0f} images/s, {ref['latency_ms']:.2f} ms "
              f"(load average {os.getloadavg()[0]:.2f})", flush=True)
        spec = demo_spec(work, args.trials, args.epochs,
                         {"baseline": "tiny_vit", "throughput": ref["throughput"], "latency_ms": ref["latency_ms"]})
        search = threading.Thread(target=lambda: make_tuner(spec).fit(), daemon=True)
        search.start()
        while ray.available_resources().get("CPU", 2) > 1 and search.is_alive():  # until a trial trains
            time.sleep(0.5)
        rows = []
        for i in range(args.measurements):
            training = ray.available_resources().get("CPU", 2) <= 1
            rows.append(_measure_on_trial_device(candidate, spec))
            r = rows[-1]
            print(f"{i + 1}: throughput raw {r['throughput_raw']:7.0f}  corrected {r['throughput']:7.0f} images/s; "
                  f"latency raw {r['latency_ms_raw']:6.2f}  corrected {r['latency_ms']:6.2f} ms; "
                  f"a trial training: {'yes' if training else 'no'}; load average {os.getloadavg()[0]:.2f}", flush=True)
            time.sleep(args.pause)
        for key in ("throughput", "latency_ms"):
            print(f"{key}: max/min - 1 raw {spread([r[key + '_raw'] for r in rows]):.1%}, "
                  f"corrected {spread([r[key] for r in rows]):.1%}")
        search.join()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
