"""Supernet mode against train-each mode on the same wall-clock budget (issue 15, "Evidence").

For each seed, side by side in one run, on the digits demo space:

1. ``--mode supernet``: ``search_spaces/demo_supernet.yaml`` through the CLI, to its end; its
   wall time (supernet training + every candidate) is the budget ``B``.
2. ``--mode train_each``: ``search_spaces/demo.yaml`` (the same space, objectives, constraints,
   baselines and ``train:`` recipe) through the CLI with as many samples as it can start,
   stopped with Ctrl-C (SIGINT) once ``B`` has passed, as a user with that budget would; the
   trials that finished the whole recipe are its candidates.
3. Both judged the same way: each point of the supernet search's front (chosen on inherited
   weights) is trained alone with the ``train:`` recipe and seed that train-each trials use
   (``supernet_ranking.standalone``), and the hypervolume of (val_top1 max, macs min) against
   the spec's reference point is computed for each mode's fully trained points.

Printed per seed: candidates evaluated by each mode and the distinct architectures among
them (a repeat proposal is a lookup, so ratios count distinct ones), each HV, their ratio,
the wall times; then the median seed's ratio, the spread over seeds, and the targets:
HV(supernet) >= HV(train_each) on the median seed, with >= 10x more architectures
evaluated. With ``--mode`` naming one mode only, that mode runs (with ``--budget-s`` for
train_each). Each finished search's facts are kept in ``--workdir`` (``<name>.json``): the
same command there continues a stopped run, one seed per command if need be.

The throughput constraint is dropped unless ``--keep-throughput``: on a shared 2-core
machine the measured rate moves with other jobs' load (as in ``sampler_quality.py``).

    python benchmarks/search_quality.py [--seeds 0 1 2] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import yaml

from common import ROOT, demo_data

sys.path.insert(0, str(ROOT))

from tntsearch.tracking import TELEMETRY_ENV  # noqa: E402  (first: MLflow telemetry off)

__all__ = ["run_mode", "judge", "main"]

MODES = ("supernet", "train_each")
SPECS = {"supernet": "demo_supernet.yaml", "train_each": "demo.yaml"}
TRAIN_EACH_SAMPLES = 10_000  # "as many as fit": the budget stops it
HV_TARGET, CANDIDATES_TARGET = 1.0, 10.0


def _spec(work: Path, data: tuple[Path, Path], mode: str, seed: int, args: argparse.Namespace) -> Path:
    raw = yaml.safe_load((ROOT / "search_spaces" / SPECS[mode]).read_text())
    raw["name"] = f"quality-{mode}-s{seed}"
    raw["data"].update(train=str(data[0]), val=str(data[1]))
    raw["train"]["seed"] = seed
    raw["search"]["seed"] = seed
    if mode == "train_each":
        raw["search"]["num_samples"] = TRAIN_EACH_SAMPLES
    else:
        raw["search"]["num_samples"] = args.samples or raw["search"]["num_samples"]
        raw["supernet"]["epochs"] = args.supernet_epochs or raw["supernet"]["epochs"]
    if not args.keep_throughput:
        raw["constraints"]["min_throughput"] = None
    raw["mlflow"]["experiment"] = raw["name"]
    raw["storage"] = str(work / "ray_results")
    path = work / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _cli(spec: Path, work: Path, budget_s: float | None, log: Path) -> tuple[int, str, float]:
    """The search CLI to its end, or Ctrl-C once ``budget_s`` has passed; exit code, output, wall seconds."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the store: <work>/mlflow.db
    tic = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "tntsearch.run", str(spec), "--progress-interval", "30"],
                            cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, env={**env, **TELEMETRY_ENV, "PYTHONUNBUFFERED": "1"})
    if budget_s is not None:
        timer = threading.Timer(budget_s, lambda: proc.poll() is None and proc.send_signal(signal.SIGINT))
        timer.daemon = True
        timer.start()
    out = []
    with log.open("w") as f:
        for line in proc.stdout:
            out.append(line)
            f.write(line)
    rc = proc.wait()
    return rc, "".join(out), time.monotonic() - tic


def run_mode(mode: str, seed: int, work: Path, data: tuple[Path, Path], args: argparse.Namespace, *,
             budget_s: float | None = None) -> dict[str, Any]:
    """One search of ``mode``: its wall time, the candidates it evaluated and the points it
    offers (supernet: its front's architectures; train_each: every fully trained trial)."""
    from tntsearch.report import load_search

    from tntsearch.model import TNTConfig
    from tntsearch.report import load_search

    path = _spec(work, data, mode, seed, args)
    saved = work / f"{path.stem}.json"  # a finished search's facts: a rerun with --workdir reads them back
    facts = json.loads(saved.read_text()) if saved.is_file() else None
    if facts is None:
        rc, out, wall = _cli(path, work, budget_s, work / f"{path.stem}.log")
        expected = (0,) if mode == "supernet" else (0, 130)
        if rc not in expected:
            raise RuntimeError(f"{path.name}: the CLI exited {rc}; see {work / (path.stem + '.log')}")
        facts = {"wall_s": wall}
        if mode == "supernet":
            line = " ".join(out.split())
            facts["evaluated"] = int(re.search(r"(\d+) candidates evaluated", line).group(1))
            facts["distinct"] = int(re.search(r"(\d+) distinct architectures", line).group(1))
    found = load_search(f"sqlite:///{work / 'mlflow.db'}", experiment=path.stem)
    if mode == "supernet":
        points = [r for r in found.rows if r["pareto"]]
    else:
        finished = [r for r in found.rows if r["status"] in ("completed", "infeasible")]
        facts["evaluated"] = len(finished)
        facts["distinct"] = len({TNTConfig.from_dict(r["arch"]).network_key() for r in finished})
        points = [r for r in found.candidates if r["status"] == "completed"]
    saved.write_text(json.dumps(facts))
    return {**facts, "points": points, "objectives": found.objectives, "saved": saved}


def judge(found: dict[str, Any], spec_path: Path, seed: int, jobs: int) -> list[dict[str, Any]]:
    """The supernet front's architectures trained alone (the train_each recipe and seed):
    rows with their stand-alone ``val_top1``, their ``macs`` and their inherited ``search_top1``."""
    from supernet_ranking import standalone

    from tntsearch.model import TNTConfig
    from tntsearch.spec import load_spec

    spec = load_spec(spec_path)
    archs = [TNTConfig.from_dict(r["arch"]) for r in found["points"]]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(standalone, spec, arch, seed, 1) for arch in archs]
        alone = [f.result()[0] for f in futures]
    return [{"arch": r["arch"], "metrics": {"val_top1": top1, "macs": r["metrics"]["macs"],
                                            "search_top1": r["metrics"].get("search_top1", float("nan"))}}
            for r, top1 in zip(found["points"], alone)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES),
                    help="the modes to run (default both, side by side; the first sets the budget)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget-s", type=float, help="train_each's wall-clock budget when supernet mode does not run")
    ap.add_argument("--samples", type=int, help="supernet mode's candidates (default: the spec's 240)")
    ap.add_argument("--supernet-epochs", type=int, help="supernet mode's supernet epochs (default: the spec's 12)")
    ap.add_argument("--jobs", type=int, default=2, help="stand-alone trainings at a time (default 2)")
    ap.add_argument("--workdir", help="where searches, data and mlflow.db go (default: a new temp dir)")
    ap.add_argument("--keep-throughput", action="store_true", help="keep the demo's min_throughput constraint")
    args = ap.parse_args(argv)
    for flag in ("samples", "supernet_epochs", "budget_s", "jobs"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            print(f"error: --{flag.replace('_', '-')} must be > 0", file=sys.stderr)
            return 2
    if "supernet" not in args.mode and not args.budget_s:
        print("error: --mode train_each alone needs --budget-s (supernet mode's wall time sets it otherwise)",
              file=sys.stderr)
        return 2
    from tntsearch.pareto import front_hypervolume

    work = Path(args.workdir or tempfile.mkdtemp(prefix="tntsearch-modes-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = demo_data(work)
    tic = time.perf_counter()
    print(f"search_quality: digits demo space, modes {args.mode}, seeds {args.seeds}; hypervolume of "
          f"(val_top1 max, macs min) over fully trained points; work in {work}", flush=True)
    rows = []
    for seed in args.seeds:
        row: dict[str, Any] = {"seed": seed}
        budget = args.budget_s
        if "supernet" in args.mode:
            sn = run_mode("supernet", seed, work, data, args)
            budget = sn["wall_s"]
            if "judged" not in sn:
                sn["judged"] = judge(sn, _spec(work, data, "train_each", seed, args), seed, args.jobs)
                sn["saved"].write_text(json.dumps({k: sn[k] for k in ("wall_s", "evaluated", "distinct", "judged")}))
            sn["hv"] = front_hypervolume(sn["judged"], sn["objectives"])
            row["supernet"] = sn
            for r in sn["judged"]:
                m = r["metrics"]
                print(f"  seed {seed} supernet front: {m['macs'] / 1e6:.2f} M MACs, inherited {m['search_top1']:.2f}%,"
                      f" alone {m['val_top1']:.2f}%", flush=True)
        if "train_each" in args.mode:
            te = run_mode("train_each", seed, work, data, args, budget_s=budget)
            te["hv"] = front_hypervolume(te["points"], te["objectives"])
            row["train_each"] = te
        for mode in MODES:
            if mode in row:
                r = row[mode]
                print(f"seed {seed} {mode}: {r['evaluated']} candidates evaluated ({r['distinct']} distinct "
                      f"architectures) in {r['wall_s']:.0f} s; {len(r.get('judged', r['points']))} fully trained "
                      f"points; HV {r['hv']:.4g}", flush=True)
        rows.append(row)
    if all(m in row for m in MODES for row in rows):
        print(f"\n{'seed':>4}  {'HV supernet':>11}  {'HV train_each':>13}  {'ratio':>6}  {'distinct s/t':>12}  "
              f"{'x':>5}  wall s/t (s)")
        for r in rows:
            s, t = r["supernet"], r["train_each"]
            r["ratio"] = s["hv"] / t["hv"] if t["hv"] > 0 else float("inf")
            r["more"] = s["distinct"] / max(t["distinct"], 1)  # repeats are lookups: not counted
            print(f"{r['seed']:>4}  {s['hv']:11.4g}  {t['hv']:13.4g}  {r['ratio']:6.3f}  "
                  f"{s['distinct']:>5}/{t['distinct']:<6}  {r['more']:5.1f}  {s['wall_s']:.0f}/{t['wall_s']:.0f}")
        ratios = sorted(r["ratio"] for r in rows)
        median = statistics.median(ratios)
        more = statistics.median(r["more"] for r in rows)
        spread = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
        print(f"\nHV(supernet) / HV(train_each): median {median:.3f} (mean {statistics.mean(ratios):.3f} +- "
              f"{spread:.3f} std over {len(ratios)} seeds, range {ratios[0]:.3f} .. {ratios[-1]:.3f}); "
              f"distinct architectures evaluated: {more:.1f}x (median)")
        print(f"target HV ratio >= {HV_TARGET} on the median seed: {'met' if median >= HV_TARGET else 'missed'}; "
              f"target >= {CANDIDATES_TARGET:.0f}x candidates: {'met' if more >= CANDIDATES_TARGET else 'missed'}")
    print(f"total {time.perf_counter() - tic:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
