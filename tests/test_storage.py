"""A search whose Ray Tune storage is S3 (``storage: s3://...``), against a real
S3-compatible server (moto) started on 127.0.0.1 by the test: searched, ended by SIGTERM
(as ``ray job stop``, Kubernetes or a spot preemption would), refused a rerun under the
same name, resumed to the end; every trial's checkpoint is recorded on its MLflow run as an
s3:// URI that Ray reads back (docs/faults.md, "The driver killed, stopped or resumed")."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ray.train import Checkpoint
from ray.tune import Tuner
from search_utils import demo_spec, mlflow_runs, run_cli

from tntsearch.train import CHECKPOINT_FILE

NAME = "s3search"
STORAGE = "s3://tntsearch/results"
EPOCHS = 1

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on a free local port with the bucket made; the environment that
    points pyarrow (Ray's storage layer) and boto3 at it."""
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                boto3.client("s3").create_bucket(Bucket=STORAGE.split("/")[2])
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.3)
        yield dict(os.environ)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def searched(tmp_path_factory, digits, s3_env):
    """The two baselines at once: tiny_tnt is over this spec's max_macs and ends within
    seconds, when SIGTERM comes; tiny_vit is then training (one epoch). Run again without
    --resume, then resumed."""
    import yaml

    cwd = tmp_path_factory.mktemp("s3")
    spec = demo_spec(cwd, digits, NAME, num_samples=2, epochs=EPOCHS, constraints={"max_macs": 3.0e6})
    raw = yaml.safe_load(spec.read_text())
    raw["storage"] = STORAGE
    spec.write_text(yaml.safe_dump(raw))
    first = run_cli(spec, cwd, interrupt_after=": infeasible", send=signal.SIGTERM, env=s3_env)
    saved = Tuner.can_restore(f"{STORAGE}/{NAME}")
    store = f"sqlite:///{cwd / 'mlflow.db'}"
    parent_after_sigterm = mlflow_runs(store, NAME)[0][0].info.status
    again = run_cli(spec, cwd, env=s3_env)
    resumed = run_cli(spec, cwd, "--resume", env=s3_env)
    return {"cwd": cwd, "store": store, "first": first, "again": again, "resumed": resumed, "saved": saved,
            "parent_after_sigterm": parent_after_sigterm}


def test_sigterm_saves_the_search_on_s3_and_resume_finishes(searched):
    rc, out = searched["first"]
    assert rc == 143, out[-3000:]
    assert "--resume" in out and "SIGTERM received" not in out  # not Ray's native abort (exit 134)
    assert searched["parent_after_sigterm"] == "KILLED"
    assert searched["saved"], "Tune's state is not on S3"
    rc, out = searched["again"]
    assert rc == 2 and "--resume" in out, out[-3000:]
    rc, out = searched["resumed"]
    assert rc == 0, out[-3000:]
    assert "[2/2 done]" in out
    assert not (Path(searched["cwd"]) / "ray_results").exists(), "something was written to local storage"


def test_each_trial_once_with_its_s3_checkpoint(searched):
    parents, children = mlflow_runs(searched["store"], NAME)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len({c.data.tags["ray.trial_id"] for c in children}) == len(children) == 2
    assert sorted(c.data.tags["status"] for c in children) == ["completed", "infeasible"]
    for c in children:
        assert c.info.status == "FINISHED"
        if c.data.tags["status"] == "infeasible":
            assert "tntsearch.checkpoint_uri" not in c.data.tags
            continue
        assert c.data.metrics["epochs_done"] == EPOCHS
        uri = c.data.tags["tntsearch.checkpoint_uri"]
        assert uri.startswith(f"{STORAGE}/{NAME}/train/train-{c.data.tags['ray.trial_id']}/"), uri
        with Checkpoint(uri).as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        assert state["epoch"] == EPOCHS
