"""Shared fixtures: the digits data set, written once per session."""
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
