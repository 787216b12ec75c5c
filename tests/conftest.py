"""Shared fixtures: the digits data set and one real tiny search (``demo_search``), made
once per session, and a local Ray.

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


@pytest.fixture(scope="session")
def demo_search(digits, tmp_path_factory):
    """One real tiny search through the CLI, run once per session, whose MLflow store, Tune
    results and Ray Train checkpoints the tests of the tracker, the dashboard and export
    read: they see the result format ``search.run_trial`` reports, not a copy of it.

    Five trials of 2 epochs on digits, FIFO, seed 0: the baselines tiny_vit (2.57 M MACs,
    trains) and tiny_tnt (4.12 M, over the 3 M limit: infeasible, trains zero steps), then
    three NSGA-II proposals (docs/design.md, "Flow of one search")."""
    from search_utils import DEMO_SEARCH, DemoSearch, demo_spec, run_cli

    cwd = tmp_path_factory.mktemp("demo_search")
    spec = demo_spec(cwd, digits, DEMO_SEARCH, num_samples=5, epochs=2, constraints={"max_macs": 3.0e6},
                     tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    rc, out = run_cli(spec, cwd)
    assert rc == 0, out[-3000:]
    return DemoSearch.read(spec, out)


@pytest.fixture(scope="session")
def demo_supernet_search(digits, tmp_path_factory):
    """One real tiny supernet mode search through the CLI (search_spaces/demo_supernet.yaml,
    shrunk), run once per session: its supernet checkpoint, MLflow store (parent with
    ``candidates.json``, the nested supernet run, child runs for the front and the
    baselines) and Tune results are what tests/test_supernet_search.py and the supernet
    export tests read. A ``DemoSearch``, like ``demo_search``.

    The supernet trains 2 epochs; 30 candidates (NSGA-II, seed 0, 2 at a time, generations of
    16, so that it proposes some networks again), scored on the 20% of the training images
    held out; max_macs 3 M makes the baseline tiny_tnt (4.12 M) infeasible, as in ``demo_search``."""
    from search_utils import DEMO_SUPERNET_SEARCH, DemoSearch, run_cli, supernet_spec

    cwd = tmp_path_factory.mktemp("demo_supernet_search")
    spec = supernet_spec(cwd, digits, DEMO_SUPERNET_SEARCH, num_samples=30, population_size=16, supernet_epochs=2,
                         constraints={"max_macs": 3.0e6}, tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    rc, out = run_cli(spec, cwd)
    assert rc == 0, out[-3000:]
    return DemoSearch.read(spec, out)
