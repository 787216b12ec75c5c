"""Ray Train around :func:`tntsearch.supernet.train.fit_supernet`: one ``TorchTrainer`` run
trains the supernet over the spec's workers; the driver prints every epoch and logs it to
an MLflow run (docs/supernet.md).

The run is named, and stored under the spec's ``storage``: running it again with the same
name continues from its latest checkpoint at the next epoch (Ray Train V2 restores the
run's checkpoints), and a crashed worker is retried ``resources.max_failures`` times from
the latest checkpoint, as ``tntsearch.trainer.make_trainer`` does for one architecture.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tntsearch.spec import SearchSpec
from tntsearch.trainer import ForwardReports, ray_report, ray_start_state, torch_trainer

__all__ = ["TAG_SUPERNET", "train_loop_per_worker", "make_supernet_trainer", "format_epoch", "run_supernet"]

TAG_SUPERNET = "tntsearch.supernet_run"  # the Ray Train run name, on the MLflow run that logs it


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train loop: ``config`` holds the spec (``model_dump(mode="json")``) and
    ``stop_epoch``; resumes from ``ray.train.get_checkpoint()``, first reporting again the
    epoch it resumes after (without a checkpoint): a driver killed between Ray Train
    registering that epoch and logging it never logged it (:func:`run_supernet` logs each
    epoch once)."""
    import ray.train.torch

    from tntsearch.supernet.train import fit_supernet

    start = ray_start_state()
    if start is not None:
        ray_report(dict(start["metrics"]), None)
    fit_supernet(SearchSpec.model_validate(config["spec"]), device=ray.train.torch.get_device(),
                 report=ray_report, start_state=start, stop_epoch=config.get("stop_epoch"))


def make_supernet_trainer(
    spec: SearchSpec,
    *,
    name: str,
    storage_path: str | os.PathLike | None = None,
    callbacks: Sequence[Any] | None = None,
    stop_epoch: int | None = None,
    num_to_keep: int | None = 2,
):
    """The ``TorchTrainer`` that trains ``spec``'s supernet with its data, recipe and resources
    (``tntsearch.trainer.torch_trainer``: workers, retries, checkpoint retention)."""
    if spec.supernet is None:
        raise ValueError("the spec has no supernet section (epochs, sampling, k, distill)")
    return torch_trainer(train_loop_per_worker, {"spec": spec.model_dump(mode="json"), "stop_epoch": stop_epoch},
                         spec, name=name, storage_path=storage_path, callbacks=callbacks, num_to_keep=num_to_keep)


def format_epoch(metrics: Mapping[str, Any]) -> str:
    """One terminal line per epoch: loss, lr, images/s and every validated sub-network's top-1."""
    tops = "  ".join(f"{k[len('val_top1_'):]} {v:6.2f}%" for k, v in metrics.items() if k.startswith("val_top1_"))
    return (f"epoch {metrics['epoch']:>3}  train_loss {metrics['train_loss']:.4f}  lr {metrics['lr']:.3g}  "
            f"{metrics['images_per_s']:.1f} img/s  val_top1: {tops}")


def _mlflow_run(spec: SearchSpec, name: str, parent_run_id: str | None = None):
    """The MLflow run of this supernet training: the one tagged with ``name`` (a resumed
    run logs on), else a new one with the supernet section and the space as params; nested
    in ``parent_run_id`` when given (a supernet mode search's parent)."""
    import mlflow

    from tntsearch.tracking import prepare_store, resolve_tracking_uri

    mlflow.set_tracking_uri(prepare_store(resolve_tracking_uri(spec.mlflow.tracking_uri, Path.cwd())))
    experiment = mlflow.set_experiment(spec.experiment)
    found = mlflow.search_runs([experiment.experiment_id], filter_string=f"tags.`{TAG_SUPERNET}` = '{name}'",
                               output_format="list", max_results=1)
    if found:
        return mlflow.start_run(run_id=found[0].info.run_id)
    tags = {TAG_SUPERNET: name, "tntsearch.role": "supernet"}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    # NOTE: nested in a search, ``name`` is a path (the search's supernet folder): the run is named for the spec.
    run = mlflow.start_run(run_name=f"supernet-{spec.name if parent_run_id else name}", tags=tags)
    dumped = spec.model_dump(mode="json")
    mlflow.log_params({f"supernet.{k}": v for k, v in dumped["supernet"].items()})
    mlflow.log_params({"supernet.workers": spec.resources.num_workers, "supernet.batch_size": spec.data.batch_size})
    mlflow.log_dict(dumped["space"], "space.json")
    return run


def run_supernet(
    spec: SearchSpec,
    *,
    name: str,
    stop_epoch: int | None = None,
    echo: Callable[[str], None] = print,
    storage_path: str | os.PathLike | None = None,
    parent_run_id: str | None = None,
    run_key: str | None = None,
):
    """Train ``spec``'s supernet (or continue the run ``name``); echo and log every epoch.

    ``storage_path`` (default ``spec.storage``) holds the Ray Train run; ``parent_run_id``
    nests its MLflow run in a search's parent run; ``run_key`` (default ``name``) is the
    ``tntsearch.supernet_run`` tag that finds that MLflow run again when the training resumes.

    Returns the Ray Train ``Result`` (its ``checkpoint`` holds the supernet) and the MLflow
    run id. Needs Ray started (``ray.init``); raises ``ray.train.TrainingFailedError``.
    """
    import mlflow
    from ray.util.queue import Empty, Queue

    queue = Queue()
    trainer = make_supernet_trainer(spec, name=name, stop_epoch=stop_epoch, callbacks=[ForwardReports(queue)],
                                    storage_path=storage_path)
    outcome: dict[str, Any] = {}

    def _fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except Exception as e:  # handed to the caller below, after the reports already made
            outcome["error"] = e

    with _mlflow_run(spec, run_key or name, parent_run_id) as run:
        # NOTE: a resumed run reports the epoch it resumes after again: logged once.
        logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_loss")}
        runner = threading.Thread(target=_fit, daemon=True)
        runner.start()
        while runner.is_alive() or not queue.empty():
            try:
                metrics = queue.get(timeout=0.5)
            except Empty:
                continue
            if int(metrics["epoch"]) in logged:
                continue
            logged.add(int(metrics["epoch"]))
            echo(format_epoch(metrics))
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if k != "epoch"}, step=int(metrics["epoch"]))
        if "error" in outcome:
            raise outcome["error"]
        result = outcome["result"]
        if result.checkpoint is not None:
            mlflow.set_tag("checkpoint", result.checkpoint.path)
    return result, run.info.run_id
