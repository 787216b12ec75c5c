"""Ray Train around :func:`tntsearch.train.fit`: the worker loop, the ``TorchTrainer`` a
trial or a user runs, and ``python -m tntsearch.train`` (see docs/train.md, docs/design.md).

- :func:`train_loop_per_worker` turns the plain ``config`` dict into typed configs, loads
  ``ray.train.get_checkpoint()`` and calls ``fit`` with a reporter that hands
  ``ray.train.report`` the metrics and a checkpoint.
- :func:`make_trainer` builds the ``TorchTrainer`` from a spec (workers, resources,
  failure handling) through :func:`torch_trainer`, which ``tntsearch.supernet`` shares with
  :func:`ray_report` and :func:`ray_start_state` for its own loop.
- :func:`main` trains one architecture from the command line, printing every epoch as it
  finishes (:class:`ForwardReports`).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ray.train import UserCallback

from tntsearch.model import TNTConfig, get_config, parse_overrides
from tntsearch.spec import DataSpec, SearchSpec, TrainSpec
from tntsearch.tracking import TELEMETRY_ENV  # MLflow telemetry off in every process Ray starts
from tntsearch.train import CHECKPOINT_FILE, TRAIN_METRICS, fit, load_state

__all__ = ["ForwardReports", "ray_report", "ray_start_state", "train_loop_per_worker", "torch_trainer", "make_trainer",
           "resolve_arch", "main"]

REPORT_POLL_INTERVAL_S = "0.2"  # how often Ray Train collects the workers' reports (see torch_trainer)


def ray_report(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
    """``ray.train.report`` on every rank; rank 0 attaches the checkpoint."""
    import ray.train

    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp) / CHECKPOINT_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def ray_start_state() -> dict[str, Any] | None:
    """The state saved in ``ray.train.get_checkpoint()`` (a resumed or retried run), else None."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return load_state(d)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train loop: ``config`` holds ``arch``, ``data``, ``train`` (plain dicts),
    ``extra_metrics``, ``stop_epoch`` and ``initial_weights`` (an object ref, or None);
    resumes from ``ray.train.get_checkpoint()``. Every report also carries ``node_id``, the
    Ray node this worker runs on."""
    import ray
    import ray.train
    import ray.train.torch

    # NOTE: the Ray node that trains (rank 0's reaches Tune's results): every node of a
    # one-machine cluster has the same ``node_ip``; the node id tells them apart.
    extra = {**(config.get("extra_metrics") or {}), "node_id": ray.get_runtime_context().get_node_id()}
    fit(
        TNTConfig.from_dict(config["arch"]),
        DataSpec.model_validate(config["data"]),
        TrainSpec.model_validate(config["train"]),
        device=ray.train.torch.get_device(),
        report=ray_report,
        start_state=ray_start_state(),
        extra_metrics=extra,
        stop_epoch=config.get("stop_epoch"),
        prepare_model=ray.train.torch.prepare_model,
        initial_weights=ray.get(config["initial_weights"]) if config.get("initial_weights") is not None else None,
    )


def make_trainer(
    arch: TNTConfig | Mapping[str, Any] | str,
    spec: SearchSpec,
    *,
    name: str,
    storage_path: str | os.PathLike | None = None,
    extra_metrics: Mapping[str, Any] | None = None,
    callbacks: Sequence[Any] | None = None,
    stop_epoch: int | None = None,
    num_to_keep: int | None = 2,
    initial_weights: Mapping[str, Any] | None = None,
):
    """A ``TorchTrainer`` that trains ``arch`` with the spec's data, recipe and resources,
    from a random initialisation or from ``initial_weights`` (``tntsearch.train.fit``).

    Running a trainer with the same ``name`` and ``storage_path`` again continues from the
    run's latest checkpoint (Ray Train V2 keeps a snapshot of the run's checkpoints there);
    a worker failure is retried ``spec.resources.max_failures`` times, each retry resuming
    from the latest checkpoint. Pass ``callbacks=[TuneReportCallback()]`` inside a Tune trial.
    """
    import ray

    arch = get_config(arch)
    config = {
        "arch": arch.to_dict(),
        "data": spec.data.model_dump(mode="json"),
        "train": spec.train.model_dump(mode="json"),
        "extra_metrics": dict(extra_metrics or {}),
        "stop_epoch": stop_epoch,
        # NOTE: through the object store, not as tensors in the config: Ray Train keeps a
        # JSON rendering of the config for its state API.
        "initial_weights": None if initial_weights is None else ray.put(dict(initial_weights)),
    }
    clash = sorted(set(config["extra_metrics"]) & set(TRAIN_METRICS))
    if clash:
        raise ValueError(f"extra_metrics may not use the training metric names {clash}")
    return torch_trainer(train_loop_per_worker, config, spec, name=name, storage_path=storage_path,
                         callbacks=callbacks, num_to_keep=num_to_keep)


def torch_trainer(
    loop: Callable[[dict[str, Any]], None],
    config: dict[str, Any],
    spec: SearchSpec,
    *,
    name: str,
    storage_path: str | os.PathLike | None = None,
    callbacks: Sequence[Any] | None = None,
    num_to_keep: int | None = 2,
):
    """The ``TorchTrainer`` running ``loop(config)`` on the spec's workers and resources, named
    ``name`` under ``storage_path`` (default ``spec.storage``), retried ``max_failures`` times."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    r = spec.resources
    resources = {"CPU": r.cpus_per_worker}
    if r.use_gpu:
        resources["GPU"] = r.gpus_per_worker
    # NOTE: Ray Train's controller collects reports when it polls its workers, every
    # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), and a worker blocks on its second
    # unpolled report: epochs shorter than the interval waited for it (the demo's 0.9 s epochs
    # took 2.1 s). ``fit`` hands this process's value to the controller; a user's value wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", REPORT_POLL_INTERVAL_S)
    return TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path if storage_path is not None else spec.storage),
            failure_config=FailureConfig(max_failures=r.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
            callbacks=list(callbacks or []),
            worker_runtime_env={"env_vars": dict(TELEMETRY_ENV)},
        ),
    )


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

# Architecture parameters that the data fixes: taken from the spec's space when it fixes them.
_DATA_BOUND = ("img_size", "patch_size", "num_classes")


def resolve_arch(preset: str, spec: SearchSpec, overrides: Sequence[str] = ()) -> TNTConfig:
    """The architecture ``python -m tntsearch.train`` trains: the preset, then the spec's fixed
    ``img_size``/``patch_size``/``num_classes`` (the data decides them), then ``key=value``
    overrides (values parsed as YAML: ``depth=4``, ``tnt_blocks=[1,2]``, ``se=outer``)."""
    fixed = {k: spec.space[k] for k in _DATA_BOUND if isinstance(spec.space.get(k), int)}
    return get_config(preset, **{**fixed, **parse_overrides(overrides)})


class ForwardReports(UserCallback):
    """Puts the metrics of every report (rank 0's) on a ``ray.util.queue.Queue``, so that the
    driver sees epochs as they finish (Ray Train callbacks run in its controller actor)."""

    def __init__(self, queue) -> None:
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint) -> None:
        self.queue.put(dict(metrics[0]))


def _format(metrics: Mapping[str, Any]) -> str:
    return (f"epoch {metrics['epoch']:>3}  train_loss {metrics['train_loss']:.4f}  val_loss {metrics['val_loss']:.4f}"
            f"  val_top1 {metrics['val_top1']:6.2f}%  val_top5 {metrics['val_top5']:6.2f}%"
            f"  lr {metrics['lr']:.3g}  {metrics['images_per_s']:.1f} img/s")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tntsearch.train",
        description="Train one architecture with a spec's data, recipe and resources (Ray Train).")
    p.add_argument("spec", help="search spec YAML (its data, train and resources sections are used)")
    p.add_argument("--arch", required=True, help="preset name (tnt_ti, tnt_s, tnt_b, tnt_s_1..4, deit_s)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override an architecture parameter (repeatable)")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--stop-after", type=int, help="stop after this epoch; run again to resume")
    p.add_argument("--name", help="run name under the spec's storage (default: train-ARCH); "
                                  "an existing run of that name is resumed")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.update(TELEMETRY_ENV)
    try:
        from tntsearch.data import check_files
        from tntsearch.spec import load_spec

        spec = load_spec(args.spec)
        if args.epochs is not None:
            if args.epochs < 1:
                raise ValueError(f"--epochs must be >= 1; got {args.epochs}")
            spec = spec.model_copy(update={"train": TrainSpec.model_validate(
                {**spec.train.model_dump(), "epochs": args.epochs})})
        arch = resolve_arch(args.arch, spec, args.sets)
        if args.stop_after is not None and args.stop_after < 1:
            raise ValueError(f"--stop-after must be >= 1; got {args.stop_after}")
        check_files(spec.data)
    except (ValueError, FileNotFoundError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2

    import ray
    from ray.train import TrainingFailedError
    from ray.util.queue import Empty, Queue

    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": dict(TELEMETRY_ENV)})
    queue = Queue()
    trainer = make_trainer(arch, spec, name=args.name or f"train-{args.arch}", stop_epoch=args.stop_after,
                           callbacks=[ForwardReports(queue)])
    print(f"training {args.arch} {arch.to_dict()}", flush=True)
    outcome: dict[str, Any] = {}

    def _run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except TrainingFailedError as e:
            outcome["error"] = e

    runner = threading.Thread(target=_run, daemon=True)
    runner.start()
    while runner.is_alive() or not queue.empty():
        try:
            print(_format(queue.get(timeout=0.5)), flush=True)
        except Empty:
            pass
    if "error" in outcome:
        print(f"training failed: {failure_reason(outcome['error'])}", file=sys.stderr)
        return 1
    result = outcome["result"]
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else None}")
    return 0


def failure_reason(error: BaseException) -> str:
    """One line: the workers' own exception (e.g. ``NonFiniteLossError: loss became nan ...``)."""
    failures = getattr(error, "worker_failures", None) or {}
    for exc in failures.values():
        cause = getattr(exc, "cause", None) or exc
        return f"{type(cause).__name__}: {cause}".splitlines()[0]
    return str(error).splitlines()[0] if str(error) else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
