"""Shared fixtures: the digits data set, written once per session, and a local Ray.

Helpers that tests import by name live beside this file: ``cluster_utils`` (a multi-node
Ray on one machine, and ``free_port``), ``mlflow_utils`` (a real ``mlflow server``) and
``search_utils`` (the search CLI as a subprocess, and readers for what it leaves).
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """scikit-learn's digits as train/val .beton files (32 x 32 RGB), written once."""
    from tntsearch.data import convert

    out = tmp_path_factory.mktemp("digits")
    convert("digits", out / "train.beton", split="train", num_workers=1)
    convert("digits", out / "val.beton", split="val", num_workers=1)
    return out


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray with 2 CPUs (this machine's) for one test module; one already running is
    used as it is. Per module, not per session: modules that start searches as subprocesses
    (each with its own Ray) should not share the CPUs with an idle one."""
    import ray

    from tntsearch.tracking import TELEMETRY_ENV

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": dict(TELEMETRY_ENV)})
    yield
    if started:
        ray.shutdown()
