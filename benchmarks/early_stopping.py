"""Early stopping: no stopping, ASHA on ``val_top1`` and MO-ASHA over all objectives.

On the digits demo space (search_spaces/demo.yaml), for each seed, three searches of the
same N trials side by side in one run: ``search.scheduler.type`` ``none``, ``asha`` and
``moasha``, the same grace period and reduction factor, the same seed, baselines, epochs
and training seed. Printed: each search's wall time, the hypervolume of its final front
(the spec's reference point; a stopped trial counts with the accuracy it reached,
docs/early_stopping.md) and, per scheduler, which architectures of ``none``'s front it
stopped early, and the epochs it trained (the cost that grows with the epoch's length, where
wall time also counts each trial's fixed start-up). Then per scheduler the mean and
seed-to-seed spread, and the
issue's targets: MO-ASHA's hypervolume within ``none``'s seed-to-seed spread in at most 60%
of its wall time, and no more ``none``-front architectures stopped than ASHA.

Random search by default, so that the three searches of a seed propose the same
architectures (a random sampler's proposals do not depend on the results) and differ only
in what they stop; ``--algorithm nsga2`` lets results steer proposals. The throughput
constraint is dropped, as in ``sampler_quality.py``: on a shared machine load, not the
scheduler, would decide which architectures are feasible.

    python benchmarks/early_stopping.py [--samples 24] [--epochs 15] [--seeds 0 1 2] [--grace-period 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import demo_data  # noqa: E402
from tntsearch.tracking import TELEMETRY_ENV  # noqa: E402  (first: MLflow telemetry off)

__all__ = ["compare", "main"]

SCHEDULERS = ("none", "asha", "moasha")
EXPERIMENT = "early-stopping"



def _spec(work: Path, data: tuple[Path, Path], scheduler: str, seed: int, args: argparse.Namespace) -> Path:
    raw = yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())
    raw["name"] = f"stopping-{scheduler}-s{seed}"
    raw["data"].update(train=str(data[0]), val=str(data[1]))
    raw["train"].update(epochs=args.epochs, warmup_epochs=min(raw["train"].get("warmup_epochs", 1), args.epochs - 1), seed=seed)
    raw["search"].update(algorithm=args.algorithm, seed=seed, num_samples=args.samples, scheduler={
        "type": scheduler, "grace_period": args.grace_period, "reduction_factor": args.reduction_factor})
    raw["constraints"]["min_throughput"] = None
    raw["mlflow"]["experiment"] = EXPERIMENT
    raw["storage"] = str(work / "ray_results")
    path = work / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _arch_key(arch: dict[str, Any]) -> str:
    return json.dumps(arch, sort_keys=True)


def _label(arch: dict[str, Any]) -> str:
    blocks = ",".join(str(b) for b in arch.get("tnt_blocks", [])) or "-"
    return f"c{arch.get('inner_dim')}/m{arch.get('words')}/h{arch.get('inner_heads')}/se:{arch.get('se')}/tnt:{blocks}"


def _finished(name: str) -> dict[str, Any] | None:
    """The finished search ``name`` as its MLflow parent and children hold it (the store in
    the working directory): wall time (the parent run's start to end), hypervolume, counts,
    the front's and the stopped trials' architectures. None if it has not finished."""
    from mlflow.tracking import MlflowClient

    from tntsearch.report import load_search
    from tntsearch.tracking import TAG_ROLE

    client = MlflowClient(tracking_uri="sqlite:///mlflow.db")
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`{TAG_ROLE}` = 'search' and attributes.run_name = '{name}' and attributes.status = 'FINISHED'"))
    if not runs:
        return None
    parent = runs[0]
    rows = load_search(client=client, run_id=parent.info.run_id).rows
    counts = {k: sum(r["status"] == k for r in rows) for k in ("completed", "stopped_early", "infeasible", "failed")}
    return {
        "wall_s": (parent.info.end_time - parent.info.start_time) / 1000,
        "hypervolume": parent.data.metrics["hypervolume"],
        "counts": counts,
        "epochs": int(sum(r["metrics"].get("epochs_done", 0) for r in rows)),
        "front": {_arch_key(r["arch"]): r["arch"] for r in rows if r["pareto"]},
        "stopped": {_arch_key(r["arch"]) for r in rows if r["status"] == "stopped_early"},
    }


def compare(args: argparse.Namespace, work: Path | None = None) -> list[dict[str, Any]]:
    """Run the three searches for every seed (a search already finished in ``work`` is read
    back, not run again: a long benchmark can be stopped and continued); one dict per seed
    and scheduler: wall time, hypervolume, counts, front and stopped architectures. Each
    seed's lines are printed as soon as its three searches are done."""
    import ray

    from tntsearch.run import prepare, search

    work = Path(work or tempfile.mkdtemp(prefix="tntsearch-stopping-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = demo_data(work)
    os.chdir(work)  # the searches' MLflow store: <work>/mlflow.db
    out = []
    for seed in args.seeds:
        for scheduler in SCHEDULERS:
            path = _spec(work, data, scheduler, seed, args)
            name = path.stem
            found = _finished(name)
            if found is None:
                # An unfinished search is run again from the start: a resumed one's wall time
                # would count the pause.
                shutil.rmtree(work / "ray_results" / name, ignore_errors=True)
                spec = prepare(path)
                # NOTE: a fresh Ray per search, as the CLI has. In one Ray session for all the
                # searches, the Train placement groups of trials ASHA stopped stayed reserved
                # (their cleaner actors alive, 0 CPUs free) and the next search waited forever.
                ray.init(num_cpus=args.num_cpus or os.cpu_count(), log_to_driver=False,
                         runtime_env={"env_vars": dict(TELEMETRY_ENV)})
                try:
                    outcome = search(spec, path, progress_interval=1e9)
                finally:
                    ray.shutdown()
                if outcome.interrupted:
                    raise RuntimeError(f"search {name} was interrupted: {outcome.summary}")
                found = _finished(name)
            if found["counts"]["failed"]:
                # A failed trial is no scheduler's doing: comparing would measure the failure.
                raise RuntimeError(f"search {name} has {found['counts']['failed']} failed trials (its log: "
                                   f"{work / 'ray_results' / name / 'tntsearch.log'}); delete its MLflow parent run "
                                   "and folder to run it again")
            out.append({"seed": seed, "scheduler": scheduler, **found})
        _print_rows(out[-len(SCHEDULERS):])
    return out


def _print_rows(rows: list[dict[str, Any]]) -> None:
    base = next(r for r in rows if r["scheduler"] == "none")
    for r in rows:
        print(f"{r['seed']:>4}  {r['scheduler']:<9}  {r['wall_s']:8.0f}  {r['hypervolume']:10.4g}  "
              f"{r['hypervolume'] / base['hypervolume'] if base['hypervolume'] else float('nan'):7.3f}  "
              f"{r['wall_s'] / base['wall_s']:9.3f}  {r['epochs']:>6}  {r['epochs'] / base['epochs']:10.3f}  "
              f"{r['counts']}", flush=True)


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=24, help="trials per search (the baselines included)")
    ap.add_argument("--epochs", type=int, default=15, help="epochs of a trial that is not stopped (the demo's 15)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--grace-period", type=int, default=2, help="first rung, in epochs (asha and moasha)")
    ap.add_argument("--reduction-factor", type=float, default=2.0)
    ap.add_argument("--algorithm", choices=("random", "nsga2", "tpe"), default="random",
                    help="sampler; random proposes the same architectures under every scheduler")
    ap.add_argument("--workdir", help="where searches, data and mlflow.db go (default: a new temp dir); searches "
                    "already finished there are read back, an unfinished one is run again")
    ap.add_argument("--num-cpus", type=int, help="CPUs for the local Ray (default: all)")
    args = ap.parse_args(argv)
    if args.samples < 1 or args.epochs < 1 or args.grace_period < 1:
        print("error: --samples, --epochs and --grace-period must be >= 1", file=sys.stderr)
        return 2
    tic = time.perf_counter()
    print(f"early_stopping: digits demo space, {args.samples} trials x {args.epochs} epochs, {args.algorithm} sampler, "
          f"grace period {args.grace_period}, reduction factor {args.reduction_factor:g}, seeds {args.seeds}; "
          "hypervolume of (val_top1 max, macs min), demo reference point")
    print(f"{'seed':>4}  {'scheduler':<9}  {'wall (s)':>8}  {'HV':>10}  {'HV/none':>7}  {'wall/none':>9}  {'epochs':>6}  {'epochs/none':>10}  counts", flush=True)
    rows = compare(args, work=args.workdir and Path(args.workdir))
    by = {(r["seed"], r["scheduler"]): r for r in rows}
    print("\narchitectures on none's front that a scheduler stopped early:")
    lost_seeds = {}
    for seed in args.seeds:
        front = by[(seed, "none")]["front"]
        print(f"seed {seed}: none's front has {len(front)}: {', '.join(_label(a) for a in front.values())}")
        for scheduler in SCHEDULERS[1:]:
            stopped = [_label(front[k]) for k in front if k in by[(seed, scheduler)]["stopped"]]
            lost_seeds[scheduler] = lost_seeds.get(scheduler, 0) + bool(stopped)
            print(f"  {scheduler:<7} stopped {len(stopped)}: {', '.join(stopped) or '-'}")
    print("\nper scheduler, over seeds (mean +- std):")
    hv = {s: [by[(seed, s)]["hypervolume"] for seed in args.seeds] for s in SCHEDULERS}
    wall = {s: [by[(seed, s)]["wall_s"] for seed in args.seeds] for s in SCHEDULERS}
    epochs = {s: [by[(seed, s)]["epochs"] for seed in args.seeds] for s in SCHEDULERS}
    for s in SCHEDULERS:
        print(f"  {s:<7} HV {statistics.mean(hv[s]):.4g} +- {_spread(hv[s]):.3g}   wall {statistics.mean(wall[s]):.0f} +- "
              f"{_spread(wall[s]):.0f} s ({statistics.mean(wall[s]) / statistics.mean(wall['none']):.2f} of none)   "
              f"epochs trained {statistics.mean(epochs[s]) / statistics.mean(epochs['none']):.2f} of none   "
              f"seeds where a none-front architecture was stopped: {lost_seeds.get(s, 0)}/{len(args.seeds)}")
    hv_ok = statistics.mean(hv["moasha"]) >= statistics.mean(hv["none"]) - _spread(hv["none"])
    wall_ok = statistics.mean(wall["moasha"]) <= 0.6 * statistics.mean(wall["none"])
    front_ok = lost_seeds["moasha"] <= lost_seeds["asha"]
    print(f"\ntargets: moasha HV within none's spread: {hv_ok}; moasha wall <= 60% of none: {wall_ok}; "
          f"moasha stops none-front architectures in no more seeds than asha: {front_ok}; total {time.perf_counter() - tic:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
