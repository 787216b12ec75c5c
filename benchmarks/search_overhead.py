"""What the search framework costs per trial, next to the training it runs.

Runs the digits demo search (search_spaces/demo.yaml: 15 epochs, tiny_tnt made infeasible)
in this process with a local Ray, one trial at a time so trials do not compete for the 2
cores, then trains each trained architecture again outside the framework:
``tntsearch.train.fit`` in a fresh Python process on one thread (what a Train worker gets),
timed from process start to exit (interpreter, imports, model, FFCV loaders and JIT
included). It prints, per trained trial, its wall time in Tune (from the trial function's
start to its last result), the epochs' own time, the cost/constraint check (analytic
MACs/params and the measured throughput), ``fit()`` alone and what the search added; for the
whole search, its wall time against the sum of the ``fit()`` runs; the driver's own work
(Optuna's suggestions, MLflow logging: timed methods);
and the time to reject an infeasible candidate: analytically (no model built) and in a
whole Tune trial. Last, Ray Train's own share: the first trained architecture for 2 epochs
through ``make_trainer(...).fit()`` and through ``fit()`` in a fresh process, alternating
(``--train-runs`` rounds), and the Ray processes one such run puts to work.
Usage: python benchmarks/search_overhead.py [--trials 10] [--epochs 15] [--train-runs 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tntsearch.cost import count_macs, count_params  # noqa: E402
from tntsearch.search import ConstrainedOptunaSearch, constraint_values  # noqa: E402
from tntsearch.space import arch_from_params, baseline_points  # noqa: E402
from tntsearch.spec import load_spec  # noqa: E402
from tntsearch.tracking import TELEMETRY_ENV, MlflowTracker  # noqa: E402


TOTALS: dict[str, float] = {}


def _timed(cls, methods):
    """A subclass of ``cls`` that adds the wall time of ``methods`` to ``TOTALS[cls name]``."""
    def wrap(orig):
        def timed(self, *args, **kwargs):
            tic = time.perf_counter()
            try:
                return orig(self, *args, **kwargs)
            finally:
                TOTALS[cls.__name__] = TOTALS.get(cls.__name__, 0.0) + time.perf_counter() - tic
        return timed

    return type(cls.__name__, (cls,), {name: wrap(getattr(cls, name)) for name in methods})


def _rejection_times(spec) -> tuple[float, float]:
    """Median seconds to cost and reject an infeasible point without building a model."""
    name, point = baseline_points(spec)[1]
    samples = []
    for _ in range(200):
        tic = time.perf_counter()
        arch = arch_from_params(point, spec.space)
        values = constraint_values(spec, params=count_params(arch), macs=count_macs(arch))
        samples.append(time.perf_counter() - tic)
    assert any(v > 0 for v in values.values()), f"{name} should be infeasible in this benchmark"
    return statistics.median(samples), max(samples)


def _standalone_fit(spec_path: Path, arch: dict, work: Path) -> float:
    """Seconds from starting a Python process to its exit, for ``fit`` of ``arch`` with the
    spec's data and recipe on one thread (a Train worker's ``cpus_per_worker``)."""
    (work / "arch.json").write_text(json.dumps(arch))
    code = (
        "import json, sys; from tntsearch.model import TNTConfig; from tntsearch.spec import load_spec; "
        "from tntsearch.train import fit; spec = load_spec(sys.argv[1]); "
        "fit(TNTConfig.from_dict(json.load(open(sys.argv[2]))), spec.data, spec.train)"
    )
    tic = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(spec_path), str(work / "arch.json")], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - tic


def _ray_processes(since: float, stop: threading.Event, seen: dict[int, tuple[float, str]]) -> None:
    """Ray worker processes that take on a role after ``since``: pid -> (seconds after
    ``since`` when first seen in it, the role: actor class or task, marked when the process
    was already running, idle, before ``since``)."""
    import psutil

    def roles():
        for proc in psutil.process_iter(["pid", "create_time", "cmdline"]):
            title = " ".join(proc.info["cmdline"] or [])
            if title.startswith("ray::") and not title.startswith("ray::IDLE"):
                yield proc.info["pid"], proc.info["create_time"], title[5:].split(".")[0].split()[0]

    busy_before = {pid for pid, _, _ in roles()}
    while not stop.is_set():
        for pid, created, role in roles():
            if pid not in busy_before and pid not in seen:
                # NOTE: creation times are rounded to clock ticks (10 ms).
                seen[pid] = (time.time() - since, role if created >= since - 0.01 else f"{role} (idle before)")
        stop.wait(0.05)


def _ray_train_runs(spec_path: Path, arch: dict, work: Path, rounds: int) -> tuple[list[float], list[float], dict]:
    """Seconds for ``make_trainer(arch, spec).fit()`` in this (Ray) process and for
    ``_standalone_fit``, alternating; and the processes the last Ray Train run put to work."""
    from tntsearch.model import TNTConfig
    from tntsearch.trainer import make_trainer

    spec = load_spec(spec_path)
    ray_s, alone_s = [], []
    for i in range(rounds):
        seen: dict[int, tuple[float, str]] = {}
        stop = threading.Event()
        since = time.time()
        watcher = threading.Thread(target=_ray_processes, args=(since, stop, seen))
        watcher.start()
        tic = time.perf_counter()
        make_trainer(TNTConfig.from_dict(arch), spec, name=f"train-run-{i}", storage_path=str(work / "train-runs")).fit()
        ray_s.append(time.perf_counter() - tic)
        stop.set()
        watcher.join()
        alone_s.append(_standalone_fit(spec_path, arch, work))
    return ray_s, alone_s, seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=15, help="the demo's 15 by default")
    ap.add_argument("--train-runs", type=int, default=3, help="rounds of Ray Train vs fit() alone (0: skip)")
    args = ap.parse_args()

    import ray

    import tntsearch.run as run
    import tntsearch.search as search
    import tntsearch.tracking as tracking

    work = Path(tempfile.mkdtemp(prefix="tntsearch-overhead-"))
    raw = yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())
    data = ROOT / "data"
    if not (data / "digits_train.beton").exists():
        sys.exit("run `make demo` (or the two `tntsearch.data convert digits` commands) first")
    raw["data"].update(train=str(data / "digits_train.beton"), val=str(data / "digits_val.beton"))
    raw["train"]["epochs"] = args.epochs
    raw["search"].update(num_samples=args.trials, max_concurrent=1, scheduler={"type": "none"})
    raw["constraints"]["max_macs"] = 3.0e6  # makes the tiny_tnt baseline infeasible
    spec_path = work / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    spec = load_spec(spec_path, base_dir=work)

    analytic, analytic_max = _rejection_times(spec)

    # Time the driver-side work by timing the callbacks' and searcher's methods.
    search.ConstrainedOptunaSearch = _timed(ConstrainedOptunaSearch, ["suggest", "on_trial_complete", "save"])
    tracking.MlflowTracker = _timed(MlflowTracker, ["setup", "on_trial_result", "on_trial_complete", "on_trial_error",
                                                    "on_step_end", "on_experiment_end"])

    ray.init(num_cpus=2, log_to_driver=False, runtime_env={"env_vars": dict(TELEMETRY_ENV)})
    os.chdir(work)
    tic = time.perf_counter()
    outcome = run.search(spec, spec_path, progress_interval=1e9)
    search_wall = time.perf_counter() - tic

    import mlflow

    client = mlflow.MlflowClient(outcome.tracking_uri)
    trained, infeasible = [], []
    for row in outcome.rows:
        m = client.get_run(row["run_id"]).data.metrics
        if row["status"] == "infeasible":
            infeasible.append(m["time_total_s"])
            continue
        if row["status"] not in ("completed", "stopped_early"):
            continue
        epochs = client.get_metric_history(row["run_id"], "epoch_time_s")
        training = sum(e.value for e in epochs)
        trained.append((row["trial_id"], m["time_total_s"], training, m.get("cost_time_s", 0.0), len(epochs), row["arch"]))

    # The same trainings outside the framework, one fresh process each, after the search.
    standalone = [_standalone_fit(spec_path, arch=t[5], work=work) for t in trained]
    if args.train_runs:
        short = dict(raw, train={**raw["train"], "epochs": 2})
        (work / "spec-2-epochs.yaml").write_text(yaml.safe_dump(short))
        ray_s, alone_s, started = _ray_train_runs(work / "spec-2-epochs.yaml", trained[0][5], work, args.train_runs)
    ray.shutdown()

    print(f"\nsearch_overhead: {args.trials} trials x {args.epochs} epochs on digits (demo space), 2 CPUs, one trial at a time")
    print(f"{'trial':<10}{'wall s':>8}{'epochs s':>10}{'cost s':>8}{'fit() alone s':>15}{'added s':>9}{'added':>8}")
    for (tid, wall, training, cost, *_), alone in zip(trained, standalone):
        print(f"{tid:<10}{wall:8.1f}{training:10.1f}{cost:8.2f}{alone:15.1f}{wall - alone:9.1f}{(wall - alone) / wall:8.1%}")
    wall = sum(t[1] for t in trained)
    alone = sum(standalone)
    driver = sum(TOTALS.values())
    print(f"\nper trained trial: the search adds {(wall - alone) / len(trained):.1f} s to what fit() alone takes"
          f" = {(wall - alone) / wall:.1%} of the trial's wall time (Tune's clock: from the trial function's start)")
    print(f"whole search: {search_wall:.0f} s for {len(outcome.rows)} trials; the same {len(trained)} trainings alone:"
          f" {alone:.0f} s; framework share of the search's wall time: {(search_wall - alone) / search_wall:.1%}")
    print(f"driver work (Optuna + MLflow callbacks): {driver:.1f} s = {driver / search_wall:.1%} of the search"
          f" [{', '.join(f'{k} {v:.1f} s' for k, v in TOTALS.items())}]")
    print(f"reject an infeasible candidate, analytic (no model built): median {analytic * 1e3:.3f} ms, max {analytic_max * 1e3:.3f} ms")
    if infeasible:
        print(f"reject an infeasible candidate, whole Tune trial: {statistics.median(infeasible):.2f} s (median of {len(infeasible)})")
    if args.train_runs:
        r, a = statistics.median(ray_s), statistics.median(alone_s)
        print(f"\nRay Train's own cost, trial {trained[0][0]}'s architecture for 2 epochs, {args.train_runs} rounds alternating:"
              f" make_trainer(...).fit() median {r:.1f} s [{', '.join(f'{x:.1f}' for x in ray_s)}],"
              f" fit() in a fresh process {a:.1f} s [{', '.join(f'{x:.1f}' for x in alone_s)}]: Ray Train adds {r - a:.1f} s per run")
        print("Ray processes the last run put to work (s after fit() was called; 'idle before': started earlier by Ray): "
              + ", ".join(f"{name} {offset:.1f}" for offset, name in sorted(started.values())))


if __name__ == "__main__":
    main()
