"""The MLflow side of an export: the model logged under the search's parent run (pt2
flavor, signature, input example), registered, and the alias ``champion`` moved to it."""
from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

from tntsearch.export.card import ALIAS
from tntsearch.export.formats import EXAMPLE_BATCH, FILES, read_config
from tntsearch.tracking import arch_params

__all__ = ["check_model_name", "log_and_register", "promote"]


def check_model_name(name: str) -> None:
    """MLflow's own rule for registered model names, checked before any work is done."""
    if not name.strip() or "/" in name or ":" in name:
        raise ValueError(f"registered model name {name!r}: must be non-empty and contain neither '/' nor ':'")


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def _pip_requirements() -> list[str]:
    """The pt2 graph needs only torch to run (no tntsearch code): pinned, so MLflow does not
    infer requirements in a subprocess."""
    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]


def log_and_register(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str,
    name: str,
    row: Mapping[str, Any],
    description: str = "",
) -> dict[str, Any]:
    """Log ``model`` (pt2 flavor: a torch.export graph, loadable without pickle or tntsearch)
    under the search's parent run and register it as a new version of ``name``.
    ``config.json`` of ``folder`` travels with the model. The alias ``champion`` is not moved
    here: :func:`promote` does that once the export folder is published."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.tracking import MlflowClient
    from mlflow.types import Schema, TensorSpec

    config = read_config(folder)
    size, classes = config["architecture"]["img_size"], config["architecture"]["num_classes"]
    signature = ModelSignature(
        # NOTE: unnamed tensors: a named input makes the serving example a dict, which the
        # pytorch pyfunc refuses ("does not support List or Dict input types").
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, size, size))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes))]),
    )
    example = np.random.default_rng(0).standard_normal((EXAMPLE_BATCH, 3, size, size)).astype(np.float32)
    trial = str(row.get("trial_id") or row.get("run_id"))
    tags = {"tntsearch.trial_id": trial, "tntsearch.trial_run_id": str(row.get("run_id")),
            "tntsearch.pick": str(config["source"].get("pick"))}
    client = MlflowClient(tracking_uri=tracking_uri)
    with _tracking_uri(tracking_uri), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        logged = mlflow.initialize_logged_model(
            name=f"tnt-{trial}", source_run_id=parent_run_id, experiment_id=experiment_id,
            params=arch_params(config["architecture"]), tags=tags, model_type="tntsearch-tnt")
        info = mlflow.pytorch.log_model(
            model.eval(), name=f"tnt-{trial}", model_id=logged.model_id, run_id=parent_run_id,
            serialization_format="pt2", signature=signature, input_example=example,
            pip_requirements=_pip_requirements(), extra_files=[str(Path(folder) / FILES["config"])],
            metadata={"tntsearch": {"architecture": config["architecture"], "class_names": config["class_names"],
                                    "preprocessing": config["preprocessing"]}},
        )
        version = mlflow.register_model(info.model_uri, name, tags=tags)
    if description:
        client.update_model_version(name, version.version, description=description)
    return {"name": name, "version": str(version.version), "model_uri": f"models:/{name}@{ALIAS}",
            "logged_model_id": logged.model_id}


def promote(tracking_uri: str, registry: Mapping[str, Any]) -> None:
    """Point the alias ``champion`` of ``registry["name"]`` at ``registry["version"]`` (what
    :func:`log_and_register` returned): the last step of an export (docs/export.md)."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=tracking_uri).set_registered_model_alias(registry["name"], ALIAS, registry["version"])
