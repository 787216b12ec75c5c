"""The demo search end to end through the real CLI: a real local Ray, Optuna, Ray Train,
FFCV and MLflow; interrupted with SIGINT and resumed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from tntsearch.pareto import pareto_mask, to_minimisation

ROOT = Path(__file__).resolve().parents[1]
NUM_SAMPLES = 5
EPOCHS = 2

pytestmark = pytest.mark.slow


def _spec(tmp_path: Path, digits: Path) -> Path:
    raw = yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())
    raw["name"] = "e2e"
    raw["data"].update(train=str(digits / "train.beton"), val=str(digits / "val.beton"))
    raw["train"].update(epochs=EPOCHS, warmup_epochs=1)
    raw["search"].update(num_samples=NUM_SAMPLES, max_concurrent=2, scheduler={"type": "none"})
    # tiny_tnt (4.1 M MACs) is over this limit: a baseline that must never train.
    raw["constraints"]["max_macs"] = 3.0e6
    raw["mlflow"]["experiment"] = "e2e"
    path = tmp_path / "e2e.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(spec: Path, cwd: Path, *extra: str, interrupt_after: str | None = None) -> tuple[int, str]:
    # NOTE: mlflow.set_tracking_uri (here and in other test modules) exports
    # MLFLOW_TRACKING_URI, which the CLI honours; this search must use its own store.
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tntsearch.run", str(spec), "--progress-interval", "5", *extra],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    out = []
    deadline = time.monotonic() + 600
    for line in proc.stdout:
        out.append(line)
        if interrupt_after and line.startswith("trial ") and interrupt_after in line:
            proc.send_signal(signal.SIGINT)
            interrupt_after = None
        if time.monotonic() > deadline:
            proc.kill()
            break
    return proc.wait(timeout=120), "".join(out)


@pytest.fixture(scope="module")
def searched(tmp_path_factory, digits):
    """Run until the first trial finishes, interrupt, then resume to the end."""
    cwd = tmp_path_factory.mktemp("search")
    spec = _spec(cwd, digits)
    rc1, out1 = _run(spec, cwd, interrupt_after=": completed")
    rc2, out2 = _run(spec, cwd, "--resume")
    return {"cwd": cwd, "spec": spec, "first": (rc1, out1), "resumed": (rc2, out2)}


def _children(cwd: Path):
    mlflow.set_tracking_uri(f"sqlite:///{cwd / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["e2e"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_interrupt_exits_130_and_resume_finishes(searched):
    rc1, out1 = searched["first"]
    rc2, out2 = searched["resumed"]
    assert rc1 == 130, out1[-3000:]
    assert "--resume" in out1
    assert rc2 == 0, out2[-3000:]
    assert f"[{NUM_SAMPLES}/{NUM_SAMPLES} done]" in out2
    assert "Pareto front" in out2


def test_every_trial_logged_once_in_one_parent(searched):
    parents, children = _children(searched["cwd"])
    assert len(parents) == 1
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    trial_ids = [c.data.tags["ray.trial_id"] for c in children]
    assert len(children) == NUM_SAMPLES and len(set(trial_ids)) == NUM_SAMPLES
    for c in children:
        status = c.data.tags["status"]
        assert status in ("completed", "stopped_early", "infeasible"), (status, c.data.tags)
        assert {"params", "macs"} <= set(c.data.metrics)
        if status != "infeasible":
            assert {"val_top1", "val_top5", "val_loss", "train_loss", "images_per_s", "throughput"} <= set(c.data.metrics)


def test_infeasible_trials_trained_zero_steps(searched):
    _, children = _children(searched["cwd"])
    infeasible = [c for c in children if c.data.tags["status"] == "infeasible"]
    assert any(c.data.tags.get("baseline") == "tiny_tnt" for c in infeasible)
    train_dir = Path(searched["cwd"]) / "ray_results" / "e2e" / "train"
    client = mlflow.MlflowClient()
    for c in infeasible:
        assert c.data.metrics["macs"] > 3.0e6 or c.data.metrics.get("constraint_min_throughput", 0) > 0
        assert "val_top1" not in c.data.metrics and "train_loss" not in c.data.metrics
        assert client.get_metric_history(c.info.run_id, "train_loss") == []
        trial_id = c.data.tags["ray.trial_id"]
        assert not list(train_dir.glob(f"train-{trial_id}*")), "an infeasible trial started training"


def test_front_is_non_dominated_and_feasible(searched):
    _, children = _children(searched["cwd"])
    trained = [c for c in children if c.data.tags["status"] in ("completed", "stopped_early")]
    front = [c for c in trained if c.data.tags.get("pareto") == "true"]
    assert front
    points = lambda runs: to_minimisation(np.array([[r.data.metrics["val_top1"], r.data.metrics["macs"]] for r in runs]), ["max", "min"])
    assert pareto_mask(points(front)).all()
    # every trained trial off the front is dominated by a front point
    expected = {r.info.run_id for r, keep in zip(trained, pareto_mask(points(trained))) if keep}
    assert expected == {r.info.run_id for r in front}
    assert all(c.data.metrics["macs"] <= 3.0e6 for c in front)
