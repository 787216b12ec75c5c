"""Ray Tune + Optuna: one trial per architecture, costed before it may train.

Flow of a trial (``run_trial``): sampled params -> architecture -> analytic MACs/params
-> measured throughput and latency on the trial's device -> constraints. An infeasible architecture
reports its costs and violations once (epoch 0) and trains zero steps; the sampler learns
of the violation through Optuna's ``Trial.set_constraint`` (``ConstrainedOptunaSearch``,
the one place that wiring lives). A feasible one trains as a Ray Train ``TorchTrainer``
whose per-epoch reports reach Tune, where ASHA may stop it early on ``val_top1``.
"""
from __future__ import annotations

import math
import os
import threading
import time
from typing import Any

import optuna
import ray
import torch
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from tntsearch.cost import count_macs, count_params, measure_speed
from tntsearch.model import TNTConfig
from tntsearch.moasha import MOASHAScheduler
from tntsearch.space import arch_from_params, baseline_points, define_by_run
from tntsearch.spec import SearchSpec
from tntsearch.tracking import CONSTRAINT_PREFIX

__all__ = [
    "ConstrainedOptunaSearch",
    "make_sampler",
    "make_searcher",
    "make_scheduler",
    "constraint_values",
    "cost_analytically",
    "run_trial",
    "make_tuner",
    "experiment_path",
    "saved_num_samples",
    "measure_settings",
]



class _NSGAIISampler(optuna.samplers.NSGAIISampler):
    """NOTE: Optuna 5.1's genetic samplers hold a ``threading.Lock`` (``_thread_lock``) and
    cannot be pickled, but Tune pickles the searcher into ``tuner.pkl`` and every experiment
    snapshot (a search would not even start). The lock is left out and made anew."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_thread_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


def make_sampler(spec: SearchSpec) -> optuna.samplers.BaseSampler:
    """The Optuna sampler named by ``search.algorithm``, seeded."""
    s = spec.search
    if s.algorithm == "nsga2":
        return _NSGAIISampler(population_size=s.population_size, seed=s.seed)
    if s.algorithm == "tpe":
        return optuna.samplers.TPESampler(seed=s.seed, multivariate=True)
    return optuna.samplers.RandomSampler(seed=s.seed)


class ConstrainedOptunaSearch(OptunaSearch):
    """OptunaSearch that hands each trial's constraint values to Optuna before ``tell``.

    NOTE: Optuna 5 deprecates samplers' ``constraints_func`` in favour of
    ``Trial.set_constraint``; Ray's OptunaSearch knows neither, so the reported
    ``constraint_<name>`` values (<= 0 means satisfied) are set here.
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if result and ot_trial is not None and trial_id not in self._completed_trials:
            for key, value in result.items():
                if key.startswith(CONSTRAINT_PREFIX) and isinstance(value, (int, float)) and math.isfinite(value):
                    ot_trial.set_constraint(key[len(CONSTRAINT_PREFIX):], float(value))
        super().on_trial_complete(trial_id, result=result, error=error)


def make_searcher(spec: SearchSpec) -> ConstrainedOptunaSearch:
    """Multi-objective OptunaSearch over the spec's space; baselines are enqueued first."""
    return ConstrainedOptunaSearch(
        space=define_by_run(spec.space),
        metric=[o.metric for o in spec.objectives],
        mode=[o.mode for o in spec.objectives],
        points_to_evaluate=[point for _, point in baseline_points(spec)] or None,
        sampler=make_sampler(spec),
    )


def make_scheduler(spec: SearchSpec):
    """Early stopping over epochs: ASHA on ``val_top1``, MO-ASHA over all the spec's
    objectives (:mod:`tntsearch.moasha`), or FIFO. Multi-objective Optuna studies cannot
    prune, so early stopping is Ray's job; infeasible trials report epoch 0, below every rung.

    NOTE: stopping a trial ends its driver mid-``fit``; the Train workers' placement group
    is then freed by Ray Train's cleaner actor, within seconds. A trial at its last epoch
    ends by itself, cleanly (``stop_last_trials=False``)."""
    s = spec.search.scheduler
    if s.type == "none":
        return tune.schedulers.FIFOScheduler()
    rungs = dict(time_attr="epoch", max_t=spec.train.epochs, grace_period=min(s.grace_period, spec.train.epochs),
                 reduction_factor=s.reduction_factor, brackets=s.brackets, stop_last_trials=False)
    if s.type == "moasha":
        return MOASHAScheduler(spec.objectives, **rungs)
    return tune.schedulers.ASHAScheduler(metric="val_top1", mode="max", **rungs)


def constraint_values(spec: SearchSpec, *, params: float, macs: float, throughput: float | None = None,
                      latency_ms: float | None = None) -> dict[str, float]:
    """Relative constraint values, Optuna's convention: <= 0 satisfied, > 0 violated by that
    fraction of the limit. Throughput and latency are left out until they have been measured."""
    c = spec.constraints
    values = {}
    if c.max_macs is not None:
        values["max_macs"] = (macs - c.max_macs) / c.max_macs
    if c.max_params is not None:
        values["max_params"] = (params - c.max_params) / c.max_params
    if c.min_throughput is not None and throughput is not None:
        values["min_throughput"] = (c.min_throughput - throughput) / c.min_throughput
    if c.max_latency_ms is not None and latency_ms is not None:
        values["max_latency_ms"] = (latency_ms - c.max_latency_ms) / c.max_latency_ms
    return values


_PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _measure_task(arch: TNTConfig, *, threads: int, device: str, precision: str, **kwargs: Any) -> dict[str, float]:
    """The body of the measuring Ray task: torch computes on exactly the CPUs the task holds,
    at the precision ``precision`` (``auto`` too) resolves to on this device."""
    from tntsearch.train import resolve_precision

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        name = _PRECISION_NAMES[resolve_precision(precision, torch.device(device))]
        return measure_speed(arch, device=device, precision=name, **kwargs)
    finally:
        torch.set_num_threads(before)


def measure_settings(spec: SearchSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Ray resources, ``_measure_task`` keyword arguments) of a measurement as
    ``constraints.measure`` says: what one training worker holds, on its device and thread
    count, and the reference baseline when one is named. Supernet mode measures in the
    trial's own process with the same arguments (``tntsearch.supernet.search``)."""
    m, r = spec.constraints.measure, spec.resources
    device = m.device or ("cuda" if r.use_gpu else "cpu")
    gpus = (r.gpus_per_worker if r.use_gpu else 1) if device == "cuda" else 0
    reference = {}
    if m.reference is not None:
        point = dict(baseline_points(spec))[m.reference.baseline]
        reference = {"reference": arch_from_params(point, spec.space),
                     "reference_speed": (m.reference.throughput, m.reference.latency_ms)}
    resources = {"num_cpus": r.cpus_per_worker, "num_gpus": gpus, "resources": {m.resource: 1} if m.resource else None}
    kwargs = dict(threads=max(1, int(r.cpus_per_worker)), device=device, precision=m.precision or spec.train.precision,
                  compile=spec.train.compile if m.compile is None else m.compile,
                  batch_size=m.batch_size, rounds=m.rounds, warmup=m.warmup, runtime=m.runtime, **reference)
    return resources, kwargs


def _measure_on_trial_device(arch: TNTConfig, spec: SearchSpec) -> dict[str, float]:
    """``throughput`` and ``latency_ms`` as ``constraints.measure`` says (docs/model_and_cost.md,
    "Measuring"), by a Ray task holding what one training worker holds -- its CPUs, its GPU --
    plus ``{resource: 1}`` when a deployment machine class is named, so the figures are taken
    on the hardware (and thread count) the model trains or will run on."""
    resources, kwargs = measure_settings(spec)
    # NOTE: "DEFAULT" keeps the task out of the trial's placement group (which holds only
    # the trial driver's sliver of CPU), like the Train workers.
    task = ray.remote(_measure_task).options(**resources, scheduling_strategy="DEFAULT")
    return ray.get(task.remote(arch, **kwargs))


def _report_infeasible(spec: SearchSpec, record: dict[str, Any], constraints: dict[str, float]) -> None:
    """One report, epoch 0, zero training steps. Objectives that were never measured take
    their reference value (the worst the hypervolume counts), so the sampler has numbers."""
    fill = {o.metric: o.ref for o in spec.objectives if not _is_number(record.get(o.metric))}
    tune.report({
        **fill,
        **record,
        "feasible": 0,
        "violation": sum(max(v, 0.0) for v in constraints.values()),
        "epoch": 0,
        **{CONSTRAINT_PREFIX + k: v for k, v in constraints.items()},
    })


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def cost_analytically(config: dict[str, Any], *, spec: SearchSpec, baselines: dict[str, dict[str, Any]],
                      started: float) -> tuple[TNTConfig, dict[str, Any]] | None:
    """A trial's first step in either mode: the sampled architecture, which baseline it is,
    its params and MACs, and the analytic constraints. An invalid or analytically infeasible
    one is reported here, once, and None returned; else the architecture and its record.
    ``cost_time_s`` counts from ``started`` (``time.perf_counter()``)."""
    params = dict(config)
    baseline = next((name for name, point in baselines.items() if point == params), "")
    record: dict[str, Any] = {"arch": params, "baseline": baseline, "throughput": float("nan"),
                              "latency_ms": float("nan")}
    try:
        arch = arch_from_params(params, spec.space)
    except ValueError as e:
        record["error"] = f"invalid architecture: {e}"
        _report_infeasible(spec, record, {"valid": 1.0})
        return None
    record.update(arch=arch.to_dict(), params=count_params(arch), macs=count_macs(arch))
    constraints = constraint_values(spec, params=record["params"], macs=record["macs"])
    if any(v > 0 for v in constraints.values()):
        record["cost_time_s"] = time.perf_counter() - started
        _report_infeasible(spec, record, constraints)
        return None
    return arch, record


def run_trial(config: dict[str, Any], *, spec: SearchSpec, baselines: dict[str, dict[str, Any]]) -> None:
    """The Tune trainable: cost the sampled architecture, then train it if it is feasible."""
    from ray.train._internal.session import get_session
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

    from tntsearch.trainer import make_trainer

    tic = time.perf_counter()
    costed = cost_analytically(config, spec=spec, baselines=baselines, started=tic)
    if costed is None:
        return
    arch, record = costed
    record.update(_measure_on_trial_device(arch, spec))
    constraints = constraint_values(spec, params=record["params"], macs=record["macs"],
                                    throughput=record["throughput"], latency_ms=record["latency_ms"])
    record["cost_time_s"] = time.perf_counter() - tic  # costing + constraint checks, per trial
    if any(v > 0 for v in constraints.values()):
        _report_infeasible(spec, record, constraints)
        return
    extra = {**record, "feasible": 1, "violation": 0.0, **{CONSTRAINT_PREFIX + k: v for k, v in constraints.items()}}
    trainer = make_trainer(
        arch,
        spec,
        name=f"train-{tune.get_context().get_trial_id()}",
        storage_path=os.path.join(experiment_path(spec), "train"),  # Path() would turn s3:// into s3:/
        extra_metrics=extra,
        callbacks=[TuneReportCallback()],
    )
    # NOTE: a trial that Tune restores after its driver died reruns, and its Train run goes on
    # from its latest checkpoint. When that checkpoint is the last epoch's, nothing trains and
    # nothing is reported: Tune (and MLflow) would keep the result of Tune's last snapshot.
    # The final epoch is then reported again, as its checkpoint recorded it. Tune's function
    # session counts the reports it forwarded (the same session TuneReportCallback feeds).
    session = get_session()
    reported_before = session.iteration
    result = trainer.fit()
    if session.iteration == reported_before and result.metrics:
        path = {CHECKPOINT_PATH_KEY: result.checkpoint.path} if result.checkpoint else {}
        tune.report({**result.metrics, **path})


def saved_num_samples(spec: SearchSpec) -> int:
    """The sample count the search saved at ``experiment_path(spec)`` was started with:
    Tune's restore keeps it whatever the spec says now (no Ray needed)."""
    return make_tuner(spec, resume=True)._local_tuner._tune_config.num_samples


def experiment_path(spec: SearchSpec) -> str:
    """Where Ray Tune keeps this search's state, results and checkpoints."""
    return os.path.join(spec.storage, spec.name)


def make_tuner(spec: SearchSpec, *, callbacks: list | None = None, resume: bool = False,
               scheduler: tune.schedulers.TrialScheduler | None = None) -> tune.Tuner:
    """A new Tuner for the spec, or, with ``resume``, the interrupted one restored from
    storage: finished trials keep their results, unfinished ones continue from their
    checkpoints and the searcher keeps its history. ``scheduler`` replaces the spec's.
    ``search.mode: supernet``: ``tntsearch.supernet.search.make_candidate_tuner``."""
    if spec.search.mode == "supernet":
        from tntsearch.supernet.search import make_candidate_tuner

        return make_candidate_tuner(spec, callbacks=callbacks, resume=resume)
    trainable = tune.with_parameters(run_trial, spec=spec, baselines=dict(baseline_points(spec)))
    # NOTE: a trial's driver only waits on its Train workers, which hold the resources. Even
    # a sliver of CPU per driver leaves a 2-CPU machine 1.98 CPUs: one 1-CPU worker at a
    # time. Ray refuses an empty request, so the driver asks for one byte of memory.
    trainable = tune.with_resources(trainable, {"cpu": 0, "memory": 1})
    # NOTE: what a killed driver leaves to resume from is Tune's last experiment snapshot,
    # taken at most every 10 s by default ("auto"); a small state snapshotted every 2 s
    # leaves fewer trials to run again (and MLflow runs to reconcile, docs/faults.md).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    if resume:
        return tune.Tuner.restore(
            experiment_path(spec), trainable=trainable, resume_unfinished=True, restart_errored=False
        )
    scheduler = scheduler or make_scheduler(spec)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(spec),
            scheduler=scheduler,
            num_samples=spec.search.num_samples,
            max_concurrent_trials=spec.search.max_concurrent,
            # A finished trial's driver process (torch and tntsearch imported) runs the next
            # trial instead of a fresh one starting and importing them again. NOTE: not with
            # a scheduler that stops trials: a stopped driver is still inside ``fit`` and
            # Tune's reset of it fails the next trial.
            reuse_actors=type(scheduler) is tune.schedulers.FIFOScheduler,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=spec.storage,
            callbacks=callbacks,
            verbose=0,
            # NOTE: Train already retries failed workers (resources.max_failures) from the last
            # checkpoint; Tune restarts a trial only once more, should its driver die.
            failure_config=tune.FailureConfig(max_failures=1),
        ),
    )
