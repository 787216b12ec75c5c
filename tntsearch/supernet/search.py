"""Supernet mode (``search.mode: supernet``): train the spec's supernet once, then search its
sub-networks with the same Ray Tune + Optuna machinery as train-each mode (docs/supernet.md,
"Searching over the supernet").

One Tune trial is one candidate (:func:`run_trial`): analytic params/MACs and the constraints
(``tntsearch.search.constraint_values``; an infeasible candidate is reported at once and
never scored), then throughput/latency of the extracted model measured in the trial's own
process, then top-1 with inherited weights on the selection data
(``tntsearch.supernet.selection``), reported once (epoch 1) under the metric names a trained
trial reports, so the screen, the tracker and the front work unchanged.

What keeps a candidate cheap: Tune reuses the trial processes (``reuse_actors``), each loads
the supernet and the selection images once (:data:`_LOADED`, keyed by checkpoint); one named
actor per search (:class:`CandidateCache`) keeps every architecture's measurement and score,
so a repeat proposal costs a lookup; MLflow gets no child run per candidate
(``MlflowTracker(candidates=True)``).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from tntsearch.model import TNTConfig
from tntsearch.search import (
    _measure_task, _report_infeasible, constraint_values, cost_analytically, experiment_path, make_searcher,
    measure_settings,
)
from tntsearch.space import baseline_points
from tntsearch.spec import SearchSpec
from tntsearch.tracking import CONSTRAINT_PREFIX, TAG_CHECKPOINT_URI, TAG_WEIGHTS

__all__ = ["CandidateCache", "run_trial", "make_candidate_tuner", "supernet_checkpoint", "rescore_on_val",
           "search_supernet"]

SUPERNET_RUN = "supernet"  # the Ray Train run's name under the search's folder
MARKER = "tntsearch-supernet.json"  # written beside it once the supernet finished: what a rerun reuses
_MATERIALISE_BYTES = 1 << 30  # selection images kept as tensors below this size, else read each time


# -- the candidate trial ------------------------------------------------------------------

@ray.remote(num_cpus=0)
class CandidateCache:
    """One per search (a named actor): architecture (JSON) -> its measurement and scores."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Any]] = {}

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.entries.setdefault(key, value)

    def size(self) -> int:
        return len(self.entries)


def cache_name(spec: SearchSpec) -> str:
    """The named actor's name: one per search folder, the same in every process."""
    return f"tntsearch-candidates-{hashlib.sha1(experiment_path(spec).encode()).hexdigest()[:12]}"


_LOADED: dict[tuple[str, str, str], tuple[Any, Any]] = {}  # (checkpoint, images, device) -> (supernet, batches)


def _device(spec: SearchSpec) -> torch.device:
    return torch.device("cuda" if spec.resources.use_gpu and torch.cuda.is_available() else "cpu")


def _loaded(spec: SearchSpec, checkpoint: str, which: str) -> tuple[Any, Any]:
    """The supernet of ``checkpoint`` (eval mode) and the images ``which`` (``search`` or
    ``val``) names, loaded once per process: the selection images as tensors when small."""
    device = _device(spec)
    key = (checkpoint, which, str(device))
    if key not in _LOADED:
        from tntsearch.data import clone_batch, make_eval_loader
        from tntsearch.export.weights import read_state  # a folder or a URI, as export reads it
        from tntsearch.supernet.model import load_supernet
        from tntsearch.supernet.selection import search_source

        net = next((n for (c, _, d), (n, _) in _LOADED.items() if c == checkpoint and d == str(device)), None)
        if net is None:
            net = load_supernet(read_state(checkpoint), spec).to(device)
        path, indices, _ = search_source(spec.data, spec.train.seed) if which == "search" else (spec.data.val, None, "")
        loader = make_eval_loader(spec.data, path, net.space.bounds.img_size, device=device, indices=indices)
        size = len(loader.indices) * 3 * net.space.bounds.img_size ** 2 * 4
        batches = [clone_batch(b) for b in loader] if size <= _MATERIALISE_BYTES else loader
        _LOADED[key] = (net, batches)
    return _LOADED[key]


def score(spec: SearchSpec, checkpoint: str, arch: TNTConfig, which: str = "search") -> dict[str, float]:
    """``val_loss``, ``val_top1``, ``val_top5`` of ``arch`` with inherited weights on the
    selection images (``search``) or on ``data.val`` (``val``)."""
    from tntsearch.train import evaluate, resolve_precision

    net, batches = _loaded(spec, checkpoint, which)
    device = _device(spec)
    loss, top1, top5 = evaluate(net.extract(arch), batches, device, resolve_precision(spec.train.precision, device),
                                arch.num_classes)
    return {"val_loss": loss, "val_top1": top1, "val_top5": top5}


@functools.lru_cache(maxsize=4)
def _cache_actor(name: str):
    return ray.get_actor(name, namespace="tntsearch")


def run_trial(config: dict[str, Any], *, spec: SearchSpec, baselines: dict[str, dict[str, Any]], checkpoint: str,
              cache: str | None) -> None:
    """The Tune trainable of one candidate (named as ``tntsearch.search.run_trial``, so
    Tune's trial folders are ``run_trial_<id>`` in both modes): cost, constraints, measure,
    score with inherited weights, one report. ``work_time_s`` is the time spent here before
    the report: the search's summary subtracts it from the wall time per candidate."""
    tic = time.perf_counter()
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    costed = cost_analytically(config, spec=spec, baselines=baselines, started=tic)
    if costed is None:  # reported: its cost_time_s is all the work it took
        return
    arch, record = costed
    record["cached"] = 0
    key = arch.network_key()  # configs that build one network share its measurement and scores
    actor = _cache_actor(cache) if cache else None
    known = ray.get(actor.get.remote(key)) if actor is not None else None
    if known is not None:
        record.update(known, cached=1)
    else:
        t = time.perf_counter()
        _, kwargs = measure_settings(spec)
        record.update(_measure_task(arch, **kwargs))
        record["measure_time_s"] = time.perf_counter() - t
    constraints = constraint_values(spec, params=record["params"], macs=record["macs"],
                                    throughput=record["throughput"], latency_ms=record["latency_ms"])
    record["cost_time_s"] = time.perf_counter() - tic
    if any(v > 0 for v in constraints.values()):
        if actor is not None and known is None:
            actor.put.remote(key, {k: record[k] for k in ("throughput", "latency_ms", "measure_time_s") if k in record})
        record["work_time_s"] = time.perf_counter() - tic
        _report_infeasible(spec, record, constraints)
        return
    if "val_top1" not in record:
        t = time.perf_counter()
        record.update(score(spec, checkpoint, arch))
        record["eval_time_s"] = time.perf_counter() - t
        if actor is not None:
            actor.put.remote(key, {k: record[k] for k in ("throughput", "latency_ms", "throughput_raw", "latency_ms_raw",
                                                         "measure_time_s", "val_loss", "val_top1", "val_top5",
                                                         "eval_time_s") if k in record})
    record["work_time_s"] = time.perf_counter() - tic
    tune.report({**record, "search_top1": record["val_top1"], "feasible": 1, "violation": 0.0, "epoch": 1,
                 **{CONSTRAINT_PREFIX + k: v for k, v in constraints.items()}})


def make_candidate_tuner(spec: SearchSpec, *, checkpoint: str = "", callbacks: list | None = None,
                         resume: bool = False, cache: str | None = None) -> tune.Tuner:
    """The Tuner of a supernet mode search (or, with ``resume``, the interrupted one): trials
    hold one worker's CPUs (and GPU) and score in their own process; FIFO, reused processes."""
    trainable = tune.with_parameters(run_trial, spec=spec, baselines=dict(baseline_points(spec)),
                                     checkpoint=checkpoint, cache=cache)
    r = spec.resources
    trainable = tune.with_resources(trainable, {"cpu": r.cpus_per_worker, "gpu": r.gpus_per_worker if r.use_gpu else 0})
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # as tntsearch.search.make_tuner
    if resume:
        return tune.Tuner.restore(experiment_path(spec), trainable=trainable, resume_unfinished=True,
                                  restart_errored=False)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(spec),
            scheduler=tune.schedulers.FIFOScheduler(),  # one report per trial: nothing to stop early
            num_samples=spec.search.num_samples,
            max_concurrent_trials=spec.search.max_concurrent,
            reuse_actors=True,  # the supernet stays loaded in the trial processes
        ),
        run_config=tune.RunConfig(name=spec.name, storage_path=spec.storage, callbacks=callbacks, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )


# -- the supernet ---------------------------------------------------------------------------

def _marker(spec: SearchSpec) -> Path:
    return Path(experiment_path(spec), SUPERNET_RUN, MARKER)


def finished_supernet(spec: SearchSpec) -> dict[str, Any] | None:
    """What a finished supernet training of this search left (checkpoint URI, epochs, MLflow
    run), if it trained ``supernet.epochs`` epochs and its checkpoint is still there."""
    path = _marker(spec)
    if "://" in str(path) or not path.is_file():
        return None
    found = json.loads(path.read_text())
    if found.get("epochs") != spec.supernet.epochs or ("://" not in found["checkpoint"] and not Path(found["checkpoint"]).exists()):
        return None
    return found


def supernet_started(spec: SearchSpec) -> bool:
    """Whether this search's folder holds a supernet training (finished or not)."""
    return "://" not in spec.storage and Path(experiment_path(spec), SUPERNET_RUN).is_dir()


def supernet_checkpoint(spec: SearchSpec, *, parent_run_id: str | None, tracking_uri: str,
                        echo=print) -> str:
    """Train the spec's supernet under ``<storage>/<name>/supernet`` (continuing from its
    latest checkpoint if an earlier run was interrupted), its MLflow run nested in the
    search's parent, or reuse the finished one; return its checkpoint's URI."""
    from tntsearch.supernet.trainer import run_supernet

    found = finished_supernet(spec)
    if found is not None:
        echo(f"supernet: reusing the finished training at {found['checkpoint']}")
        return found["checkpoint"]
    mlflow_spec = spec.model_copy(update={"mlflow": spec.mlflow.model_copy(update={"tracking_uri": tracking_uri})})
    again = "continuing its interrupted training of" if supernet_started(spec) else "training"
    echo(f"supernet: {again} {spec.supernet.epochs} epochs ({spec.supernet.sampling}, k={spec.supernet.k}, "
         f"distill={spec.supernet.distill})")
    result, run_id = run_supernet(mlflow_spec, name=SUPERNET_RUN, storage_path=experiment_path(spec),
                                  parent_run_id=parent_run_id, run_key=str(Path(experiment_path(spec), SUPERNET_RUN)),
                                  echo=lambda line: echo(f"supernet: {line}"))
    ckpt = result.checkpoint
    kind = ckpt.filesystem.type_name
    uri = ckpt.path if kind == "local" else f"{ {'gcs': 'gs'}.get(kind, kind)}://{ckpt.path}"
    if "://" not in str(_marker(spec)):
        _marker(spec).parent.mkdir(parents=True, exist_ok=True)
        _marker(spec).write_text(json.dumps({"checkpoint": uri, "epochs": spec.supernet.epochs, "mlflow_run_id": run_id}))
    return uri


def _supernet_parent(spec: SearchSpec, tracking_uri: str) -> str | None:
    """The search parent an interrupted supernet training of this search is nested in."""
    from mlflow.tracking import MlflowClient

    from tntsearch.supernet.trainer import TAG_SUPERNET

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(spec.experiment)
    if exp is None:
        return None
    key = str(Path(experiment_path(spec), SUPERNET_RUN))
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_SUPERNET}` = '{key}'", max_results=1)
    return runs[0].data.tags.get("mlflow.parentRunId") if runs else None


def rescore_on_val(rows: list[dict[str, Any]], *, spec: SearchSpec, checkpoint: str) -> dict[str, dict[str, float]]:
    """The front's points and the baselines on ``data.val`` (the tracker's ``rescore``)."""
    return {r["trial_id"]: score(spec, checkpoint, TNTConfig.from_dict(r["arch"]), "val") for r in rows}


# -- the search -------------------------------------------------------------------------------

def _network(result: dict[str, Any]) -> str:
    """The network a candidate's result stands for (an invalid one: its sampled params)."""
    try:
        return TNTConfig.from_dict(result["arch"]).network_key()
    except (ValueError, TypeError):
        return json.dumps(result["arch"], sort_keys=True, default=str)


def _summary_line(spec: SearchSpec, results: list[dict[str, Any]], wall_s: float, started: float) -> str:
    """``search '<name>': N candidates evaluated (D distinct architectures: S scored, I
    infeasible; R repeats of those)``, with this session's rate and framework
    overhead per candidate (wall per candidate and slot minus the work done in the trial).
    Distinct means distinct networks (:meth:`TNTConfig.network_key`): NSGA-II proposes an
    architecture again as its population converges, and a repeat costs a lookup
    (:class:`CandidateCache`) or, beyond ``max_macs``, an analytic count."""
    n = len(results)
    scored = {_network(r) for r in results if r.get("feasible") == 1}
    distinct = {_network(r) for r in results}
    line = (f"search {spec.name!r}: {n} candidates evaluated ({len(distinct)} distinct architectures: "
            f"{len(scored)} scored with inherited weights, {len(distinct - scored)} infeasible; "
            f"{n - len(distinct)} repeats of those)")
    session = [r for r in results if r.get("timestamp", 0) >= started]
    if session and wall_s > 0:
        per_slot = spec.search.max_concurrent * wall_s / len(session)
        work = [r.get("work_time_s", r.get("cost_time_s")) for r in session]
        work = [w for w in work if isinstance(w, (int, float))]
        overhead = per_slot - (sum(work) / len(work) if work else 0.0)
        line += (f"; this run {len(session)} in {wall_s:.0f} s: {60 * len(session) / wall_s:.1f} candidates/min, "
                 f"framework overhead {overhead:.2f} s per candidate")
    return line


def search_supernet(spec: SearchSpec, spec_path: str | Path, *, resume: bool = False, screen=None):
    """``tntsearch.run.search`` for ``search.mode: supernet``: the supernet (trained, continued
    or reused), then the candidates; returns a ``tntsearch.run.SearchOutcome``."""
    from tntsearch.run import SearchOutcome, adopt_callbacks, check_store, search_outcome
    from tntsearch.screen import SearchScreen
    from tntsearch.tracking import MlflowTracker

    tracking_uri = check_store(spec)
    exp_dir = experiment_path(spec)
    screen = screen or SearchScreen(spec.search.num_samples, 1)
    restoring = resume and tune.Tuner.can_restore(exp_dir)
    if restoring:
        found = finished_supernet(spec)
        if found is None:
            raise ValueError(f"--resume: the search at {exp_dir} has no finished supernet ({MARKER})")
        checkpoint = found["checkpoint"]
        tracker = None
    else:
        tracker = MlflowTracker(
            tracking_uri=tracking_uri, experiment=spec.experiment, spec_dict=spec.model_dump(mode="json"),
            spec_path=str(spec_path), objectives=spec.objectives, epochs=1,
            resume_parent_run_id=_supernet_parent(spec, tracking_uri),  # an interrupted supernet training's
            fallback_path=None if "://" in exp_dir else Path(exp_dir, "mlflow-pending.jsonl"),
            plot_every_s=30.0, candidates=True,
        )
        tracker.setup()  # the parent run first: the supernet's training nests in it
        try:
            checkpoint = supernet_checkpoint(spec, parent_run_id=tracker.parent_run_id, tracking_uri=tracking_uri,
                                             echo=screen.print)
        except KeyboardInterrupt:
            tracker.close(status="KILLED")
            return SearchOutcome(rows=[], front=[], summary=tracker.summary(), experiment_path=exp_dir,
                                 tracking_uri=tracking_uri, parent_run_id=tracker.parent_run_id, interrupted=True)
        tracker.rescore = functools.partial(rescore_on_val, spec=spec, checkpoint=checkpoint)
        tracker.table.child_tags.update({TAG_WEIGHTS: "supernet", TAG_CHECKPOINT_URI: checkpoint})
    name = cache_name(spec)
    # NOTE: a named actor still ends when its last handle goes: this one lives until the search returns.
    cache_actor = CandidateCache.options(name=name, namespace="tntsearch", get_if_exists=True).remote()
    tuner = make_candidate_tuner(spec, checkpoint=checkpoint, callbacks=[tracker, screen] if tracker else None,
                                 resume=restoring, cache=name)
    tracker = adopt_callbacks(tuner, screen)
    started, tic = time.time(), time.monotonic()
    try:
        grid = tuner.fit()
    except BaseException:
        tracker.close(status="FAILED")
        raise
    wall = time.monotonic() - tic
    del cache_actor
    # NOTE: a trial that never reported (in flight at a Ctrl-C) has Tune's placeholder metrics, no arch.
    results = [r.metrics for r in grid if r.metrics and "arch" in r.metrics]
    return search_outcome(tracker, spec, exp_dir, tracking_uri, summary_line=_summary_line(spec, results, wall, started))
