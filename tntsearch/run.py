"""``python -m tntsearch.run SPEC.yaml``: validate, connect to Ray, search, summarise.

Everything that can be checked before Ray starts is checked first (spec, space, data
paths, an existing experiment), so a bad spec costs nothing and exits with code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SearchOutcome", "prepare", "search", "main"]

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


@dataclass
class SearchOutcome:
    """What a finished (or interrupted) search leaves behind."""

    rows: list[dict[str, Any]]  # one per trial, as MlflowTracker.rows() gives them
    front: list[dict[str, Any]]
    summary: dict[str, Any]  # counts by status, front size, hypervolume
    experiment_path: str
    tracking_uri: str
    parent_run_id: str | None
    interrupted: bool


def prepare(spec_path: str | Path, *, resume: bool = False, num_samples: int | None = None):
    """Load and check everything that needs no Ray; raise SpecError/FileNotFoundError."""
    from tntsearch.search import experiment_path
    from tntsearch.data import check_files
    from tntsearch.space import check_space
    from tntsearch.spec import SpecError, load_spec

    spec = load_spec(spec_path)
    if num_samples is not None:
        spec = spec.model_copy(update={"search": spec.search.model_copy(update={"num_samples": num_samples})})
    check_space(spec)
    check_files(spec.data)
    exists = Path(experiment_path(spec), "tuner.pkl").exists()
    if exists and not resume:
        raise SpecError(
            f"{experiment_path(spec)} already holds a search named {spec.name!r}: pass --resume to continue it, "
            "or change `name` (or `storage`) to start a new one"
        )
    if resume and not exists:
        raise SpecError(f"--resume: no search to resume at {experiment_path(spec)}")
    return spec


def _connect(address: str | None, verbose: bool) -> None:
    """A given address; else ``RAY_ADDRESS`` or the cluster ``ray start`` made on this
    node; else a new local Ray (plain ``ray.init`` tries them in that order). Worker logs
    stay in Ray's log files unless ``verbose``: the progress view says what matters."""
    import ray

    from tntsearch.tracking import TELEMETRY_ENV  # importing it sets it here; workers get it below

    ray.init(address=address, log_to_driver=verbose, runtime_env={"env_vars": dict(TELEMETRY_ENV)})


def search(spec, spec_path: str | Path, *, resume: bool = False, progress_interval: float = 30.0) -> SearchOutcome:
    """Run (or resume) the search described by ``spec``; Ray must be initialised."""
    from tntsearch.progress import ProgressView
    from tntsearch.search import experiment_path, make_tuner
    from tntsearch.tracking import MlflowTracker, prepare_store, resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(spec.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"), Path.cwd())
    prepare_store(tracking_uri)
    tracker = MlflowTracker(
        tracking_uri=tracking_uri,
        experiment=spec.experiment,
        spec_dict=spec.model_dump(mode="json"),
        spec_path=str(spec_path),
        objectives=spec.objectives,
        epochs=spec.train.epochs,
    )
    view = ProgressView(tracker, spec.search.num_samples, interval=progress_interval)
    tuner = make_tuner(spec, callbacks=[tracker, view], resume=resume)
    # NOTE: a restored Tuner runs the callbacks pickled with it (Tune restores their state),
    # not the ones built above; Ray's Tuner has no public accessor for them.
    tracker = next(c for c in tuner._local_tuner.get_run_config().callbacks if isinstance(c, MlflowTracker))
    try:
        tuner.fit()
    except BaseException:
        tracker.close(status="FAILED")  # flush what was logged, or write the fallback file
        raise
    summary = tracker.summary()
    finished = sum(summary[s] for s in ("completed", "stopped_early", "infeasible", "failed"))
    return SearchOutcome(
        rows=tracker.rows(),
        front=tracker.front(),
        summary=summary,
        experiment_path=experiment_path(spec),
        tracking_uri=tracking_uri,
        parent_run_id=tracker.parent_run_id,
        # NOTE: on SIGINT Tune saves its state and returns normally; unfinished trials tell.
        interrupted=finished < spec.search.num_samples,
    )


def _summary(spec, outcome: SearchOutcome) -> str:
    from tntsearch.progress import counts_line
    from tntsearch.report import front_table

    lines = [f"search {spec.name!r}: " + counts_line(outcome.summary, spec.search.num_samples)]
    if outcome.front:
        lines += ["", "Pareto front:", front_table(outcome.front, spec.objectives), ""]
        front_ids = {r["trial_id"] for r in outcome.front}
        for b in (r for r in outcome.rows if r["baseline"]):
            where = "on the front" if b["trial_id"] in front_ids else "dominated by the front"
            if b["status"] in ("infeasible", "failed", "running"):
                where = b["status"]
            lines.append(f"baseline {b['baseline']}: {where}")
    else:
        lines.append("no feasible trial finished: the front is empty")
    lines += ["", f"Ray Tune results: {outcome.experiment_path}", f"MLflow: {outcome.tracking_uri} (parent run {outcome.parent_run_id})"]
    if outcome.tracking_uri.startswith("sqlite:"):
        lines.append(f"dashboard: mlflow server --backend-store-uri {outcome.tracking_uri} --host 127.0.0.1 --port 5000")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tntsearch.run", description=__doc__.splitlines()[0])
    p.add_argument("spec", help="the search spec (YAML)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search of the same name")
    p.add_argument("--address", help="Ray cluster address (default: a running cluster if any, else local)")
    p.add_argument("--num-samples", type=int, help="override search.num_samples")
    p.add_argument("--progress-interval", type=float, default=30.0, help="seconds between front printouts")
    p.add_argument("--verbose", action="store_true", help="stream the Ray workers' logs to this terminal")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        spec = prepare(args.spec, resume=args.resume, num_samples=args.num_samples)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    _connect(args.address, args.verbose)
    outcome = search(spec, args.spec, resume=args.resume, progress_interval=args.progress_interval)
    print(_summary(spec, outcome), flush=True)
    if outcome.interrupted:
        print(f"interrupted: continue with `python -m tntsearch.run {args.spec} --resume`", file=sys.stderr)
        return EXIT_INTERRUPTED
    if outcome.summary["failed"] and not outcome.summary["completed"] + outcome.summary["stopped_early"]:
        print("every trained trial failed: see the reasons above and in MLflow", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
