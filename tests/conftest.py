"""Shared fixtures: one Ray per test session, the digits data set written once."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray for the whole session (starting one costs ~5 s); reuses a running one."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true"}})
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """scikit-learn's digits as train/val .beton files (32 x 32 RGB), written once."""
    from tntsearch.data import convert

    out = tmp_path_factory.mktemp("digits")
    convert("digits", out / "train.beton", split="train", num_workers=1)
    convert("digits", out / "val.beton", split="val", num_workers=1)
    return out
