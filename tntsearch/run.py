"""``python -m tntsearch.run SPEC.yaml``: validate, connect to Ray, search, summarise.

Everything that can be checked before Ray starts is checked first (spec, space, data
paths, an existing experiment, a resumed search's sample count), so a bad spec costs
nothing and exits with code 2. An interrupted search exits 130 (Ctrl-C) or 143 (SIGTERM)
with Tune's state saved; ``--resume`` continues it (docs/faults.md).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SearchOutcome", "prepare", "search", "adopt_callbacks", "search_outcome", "main"]

EXIT_BAD_INPUT = 2
EXIT_TRACKING = 3  # the search ran, but records MLflow did not take are in a fallback file (docs/tracking.md)
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


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
    tracking_fallback: Path | None = None  # records MLflow did not take, to import (or resume)
    summary_line: str | None = None  # supernet mode: how many candidates, how fast (the last line printed)


def prepare(spec_path: str | Path, *, resume: bool = False, num_samples: int | None = None):
    """Load and check everything that needs no Ray; raise SpecError/FileNotFoundError.

    A resumed search keeps the sample count it was started with (Tune's restore keeps it):
    ``num_samples`` must then be that count or None."""
    from ray.tune import Tuner

    from tntsearch.search import experiment_path, saved_num_samples
    from tntsearch.data import check_files
    from tntsearch.space import check_space
    from tntsearch.spec import SpecError, load_spec

    spec = load_spec(spec_path)
    if num_samples is not None:
        spec = spec.model_copy(update={"search": spec.search.model_copy(update={"num_samples": num_samples})})
    check_space(spec)
    check_files(spec.data)
    check_store(spec)
    # Tune's own test, through pyarrow: works for s3:// and other remote storage too.
    exists = Tuner.can_restore(experiment_path(spec))
    if exists and not resume:
        raise SpecError(
            f"{experiment_path(spec)} already holds a search named {spec.name!r}: pass --resume to continue it, "
            "or change `name` (or `storage`) to start a new one"
        )
    started = exists
    if spec.search.mode == "supernet":
        from tntsearch.supernet.search import supernet_started

        # NOTE: a supernet training without a search yet is continued (or reused) with or without --resume.
        exists = exists or supernet_started(spec)
    if resume and not exists:
        raise SpecError(f"--resume: no search to resume at {experiment_path(spec)}")
    if resume and started:
        saved = saved_num_samples(spec)
        if num_samples is not None and num_samples != saved:
            raise SpecError(
                f"--resume --num-samples {num_samples}: the search at {experiment_path(spec)} was started with "
                f"{saved} samples and Ray Tune resumes it with {saved}; resume without --num-samples, or start "
                f"a new search (another `name`) for {num_samples}"
            )
        spec = spec.model_copy(update={"search": spec.search.model_copy(update={"num_samples": saved})})
    return spec


def check_store(spec) -> str:
    """The tracking store the search will log to, opened once (a SQLite schema is created):
    a ValueError naming ``mlflow.tracking_uri`` when it cannot be, before Ray starts."""
    from tntsearch.tracking import prepare_store, resolve_tracking_uri

    setting = "mlflow.tracking_uri" if spec.mlflow.tracking_uri else "$MLFLOW_TRACKING_URI"
    uri = resolve_tracking_uri(spec.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"), Path.cwd())
    return prepare_store(uri, setting=setting)


def _connect(address: str | None) -> str:
    """A given address; else ``RAY_ADDRESS`` or the cluster ``ray start`` made on this
    node; else a new local Ray (plain ``ray.init`` tries them in that order). The workers'
    output comes to this process, where the screen sends it to its log file (docs/design.md,
    "What a user sees"). Returns a line saying which Ray this is."""
    import ray

    from tntsearch.tracking import TELEMETRY_ENV  # importing it sets it here; workers get it below

    ctx = ray.init(address=address, runtime_env={"env_vars": dict(TELEMETRY_ENV)})
    res = ray.cluster_resources()
    size = f"{res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs"
    # NOTE: Ray has no public "did ray.init start this cluster"; the driver's node is the
    # head node only when it did.
    if ray._private.worker._global_node.is_head():
        return f"Ray: started a local Ray instance ({size})"
    return f"Connecting to existing Ray cluster at {ctx.address_info.get('gcs_address') or address}: {size}"


def _sigterm_like_ctrl_c() -> threading.Event:
    """SIGTERM (``ray job stop``, Kubernetes, spot preemption) ends the search as Ctrl-C
    does: Tune saves its state and returns. Installed after ``ray.init``, whose core worker
    otherwise turns SIGTERM into an abort with a native stack dump (exit 134). The event
    tells that it came."""
    got = threading.Event()

    def handler(signum, frame):
        got.set()
        signal.raise_signal(signal.SIGINT)  # Tune's handler during fit, KeyboardInterrupt outside

    signal.signal(signal.SIGTERM, handler)
    return got


def _watch_local_ray(screen, spec_path: str | Path) -> threading.Event:
    """Say so when the local Ray this process started dies under it (its raylet killed, say):
    Ray's core worker then ends this process with exit 1 some seconds later, before any
    handler of ours runs, so the line is printed while it can be (docs/faults.md). Set the
    returned event before ``ray.shutdown()``."""
    import ray
    from ray._private import ray_constants

    done = threading.Event()
    node = ray._private.worker._global_node
    raylets = node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET) if node is not None and node.is_head() else None
    if not raylets:  # a cluster this process joined: its raylet is not ours to watch
        return done
    raylet = raylets[0].process

    def watch() -> None:
        while not done.wait(1.0):
            if raylet.poll() is not None:
                screen.print(f"error: the local Ray stopped under the search (its raylet exited with {raylet.returncode}); "
                             f"Ray ends this process next. Finished trials are kept: continue with "
                             f"`python -m tntsearch.run {spec_path} --resume`")
                return

    threading.Thread(target=watch, name="tntsearch-ray-watch", daemon=True).start()
    return done


def search(spec, spec_path: str | Path, *, resume: bool = False, progress_interval: float = 30.0,
           screen=None) -> SearchOutcome:
    """Run (or resume) the search described by ``spec``; Ray must be initialised. ``screen``
    (a ``SearchScreen``) shows it; by default one that prints plain lines."""
    from tntsearch.screen import SearchScreen
    from tntsearch.search import experiment_path, make_tuner
    from tntsearch.tracking import MlflowTracker

    if spec.search.mode == "supernet":
        from tntsearch.supernet.search import search_supernet

        return search_supernet(spec, spec_path, resume=resume, screen=screen)
    tracking_uri = check_store(spec)
    exp_dir = experiment_path(spec)
    tracker = MlflowTracker(
        tracking_uri=tracking_uri,
        experiment=spec.experiment,
        spec_dict=spec.model_dump(mode="json"),
        spec_path=str(spec_path),
        objectives=spec.objectives,
        epochs=spec.train.epochs,
        # In the search's folder (a remote one: the default, local): a resumed tracker takes it.
        fallback_path=None if "://" in exp_dir else Path(exp_dir, "mlflow-pending.jsonl"),
    )
    screen = screen or SearchScreen(spec.search.num_samples, spec.train.epochs, interval=progress_interval)
    tuner = make_tuner(spec, callbacks=[tracker, screen], resume=resume)
    tracker = adopt_callbacks(tuner, screen)
    try:
        tuner.fit()
    except BaseException:
        tracker.close(status="FAILED")  # flush what was logged, or write the fallback file
        raise
    return search_outcome(tracker, spec, exp_dir, tracking_uri)


def adopt_callbacks(tuner, screen):
    """The tracker the tuner will run, with ``screen`` shown in place of the pickled one.

    NOTE: a restored Tuner runs the callbacks pickled with it (Tune restores their state),
    not the ones it was built with; Ray's Tuner has no public accessor for them. The
    tracker's state matters; the screen shown is this process's."""
    from tntsearch.screen import SearchScreen
    from tntsearch.tracking import MlflowTracker

    callbacks = tuner._local_tuner.get_run_config().callbacks
    tracker = next(c for c in callbacks if isinstance(c, MlflowTracker))
    callbacks[:] = [screen if isinstance(c, SearchScreen) else c for c in callbacks]
    screen.tracker = tracker
    return tracker


def search_outcome(tracker, spec, exp_dir: str, tracking_uri: str, **extra: Any) -> SearchOutcome:
    """What the tracker holds once ``tuner.fit()`` returned, its run closed."""
    summary = tracker.summary()
    finished = sum(summary[s] for s in ("completed", "stopped_early", "infeasible", "failed"))
    return SearchOutcome(
        rows=tracker.rows(),
        front=tracker.front(),
        summary=summary,
        experiment_path=exp_dir,
        tracking_uri=tracking_uri,
        parent_run_id=tracker.parent_run_id,
        # NOTE: on SIGINT Tune saves its state and returns normally; unfinished trials tell.
        interrupted=finished < spec.search.num_samples,
        tracking_fallback=tracker.close(),  # already closed by Tune: what is left, if anything
        **extra,
    )


def _summary(spec, outcome: SearchOutcome, screen) -> list[Any]:
    """What stays on the screen after the search: the status and front (unless the live
    view left them there), the baselines' places, where everything is, and how to look."""
    from tntsearch.screen import dashboard_command, front_table, report_command

    out: list[Any] = []
    if not screen.live:
        out += [f"search {spec.name!r}: " + "  ".join(screen.status_lines())]
        if outcome.front:
            out += ["", f"Pareto front ({len(outcome.front)}):", front_table(outcome.front, spec.objectives, verbose=screen.verbose)]
        out += screen.failure_lines()
    if not outcome.front:
        out.append("no feasible trial finished: the front is empty")
    front_ids = {r["trial_id"] for r in outcome.front}
    for b in (r for r in outcome.rows if r["baseline"]):
        where = "on the front" if b["trial_id"] in front_ids else "dominated by the front"
        if b["status"] in ("infeasible", "failed", "running"):
            where = b["status"]
        out.append(f"baseline {b['baseline']}: {where}")
    out += ["", f"Ray Tune results: {Path(outcome.experiment_path).resolve()}",
            f"MLflow: {outcome.tracking_uri} (parent run {outcome.parent_run_id})",
            f"report: {report_command(outcome.tracking_uri, outcome.parent_run_id)}",
            f"dashboard: {dashboard_command(outcome.tracking_uri)}"]
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tntsearch.run", description=__doc__.splitlines()[0])
    p.add_argument("spec", help="the search spec (YAML)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search of the same name")
    p.add_argument("--address", help="Ray cluster address (default: a running cluster if any, else local)")
    p.add_argument("--num-samples", type=int, help="override search.num_samples")
    p.add_argument("--progress-interval", type=float, default=30.0,
                   help="seconds between status lines when the output is not a terminal")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's, Optuna's and MLflow's messages (always in <storage>/<name>/tntsearch.log), "
                        "and full trial and MLflow run ids")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        spec = prepare(args.spec, resume=args.resume, num_samples=args.num_samples)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from tntsearch.screen import SearchScreen, log_path
    from tntsearch.search import make_tuner  # noqa: F401 - its libraries set up their loggers before the screen moves them
    from tntsearch.tracking import MlflowTracker  # noqa: F401 - likewise

    epochs = 1 if spec.search.mode == "supernet" else spec.train.epochs  # a candidate reports once
    screen = SearchScreen(spec.search.num_samples, epochs, interval=args.progress_interval)
    with screen.showing(log_path(spec), verbose=args.verbose):
        screen.print(_connect(args.address))
        screen.reroute()  # ray.init configures Ray's loggers again
        terminated = _sigterm_like_ctrl_c()
        ray_stopping = _watch_local_ray(screen, args.spec)
        outcome = search(spec, args.spec, resume=args.resume, screen=screen)
        screen.stop_live()
        for part in _summary(spec, outcome, screen):
            screen.print(part)
        if outcome.summary_line:
            screen.print(outcome.summary_line)
        import ray

        ray_stopping.set()
        ray.shutdown()  # before the screen lets go of stdout: late worker lines go to the log too
    if outcome.tracking_fallback:
        print(f"tracking: records MLflow ({outcome.tracking_uri}) did not take are in {outcome.tracking_fallback}; "
              f"load them with `python -m tntsearch.report --import {outcome.tracking_fallback}`", file=sys.stderr)
    if outcome.interrupted:
        print(f"interrupted: continue with `python -m tntsearch.run {args.spec} --resume`", file=sys.stderr)
        return EXIT_TERMINATED if terminated.is_set() else EXIT_INTERRUPTED
    if outcome.summary["failed"] and not outcome.summary["completed"] + outcome.summary["stopped_early"]:
        print("every trained trial failed: see the reasons above and in MLflow", file=sys.stderr)
        return 1
    if outcome.tracking_fallback:
        return EXIT_TRACKING
    return 0


if __name__ == "__main__":
    sys.exit(main())
