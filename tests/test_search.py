"""The demo search end to end through the real CLI: a real local Ray, Optuna, Ray Train,
FFCV and MLflow; interrupted with SIGINT and resumed. And trials stopped early by Tune."""
from __future__ import annotations

import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import ray
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.util.placement_group import placement_group_table
from search_utils import demo_spec, mlflow_runs, run_cli

from tntsearch.pareto import pareto_mask, to_minimisation
from tntsearch.search import make_tuner
from tntsearch.spec import load_spec

NUM_SAMPLES = 5
EPOCHS = 2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def searched(tmp_path_factory, digits):
    """Run until the first trial finishes, interrupt, then resume to the end. tiny_tnt
    (4.1 M MACs) is over this spec's limit: a baseline that must never train."""
    cwd = tmp_path_factory.mktemp("search")
    spec = demo_spec(cwd, digits, "e2e", num_samples=NUM_SAMPLES, epochs=EPOCHS,
                     constraints={"max_macs": 3.0e6, "min_throughput": 250})
    rc1, out1 = run_cli(spec, cwd, interrupt_after=": completed")
    rc2, out2 = run_cli(spec, cwd, "--resume")
    return {"cwd": cwd, "spec": spec, "first": (rc1, out1), "resumed": (rc2, out2)}


def _store(cwd: Path) -> str:
    return f"sqlite:///{cwd / 'mlflow.db'}"


def _children(cwd: Path):
    return mlflow_runs(_store(cwd), "e2e")


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
    client = mlflow.MlflowClient(_store(searched["cwd"]))
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


class StopAfterFirstEpoch(FIFOScheduler):
    """ASHA's decision for a trial below its rung, taken for every trial after epoch 1."""

    def on_trial_result(self, tune_controller, trial, result):
        return TrialScheduler.STOP if result.get("epoch", 0) >= 1 else TrialScheduler.CONTINUE


@pytest.mark.timeout(420)  # a worker that is never handed back shows as a hang
def test_stopped_trials_hand_back_their_workers(tmp_path, digits):
    """Tune stops a trial by ending its driver in the middle of the Ray Train run. The run's
    worker must give its CPU back (Ray Train's placement-group cleaner), or on 2 CPUs the
    third trial would wait forever -- the way early stopping (ASHA) hung a small search."""
    spec = load_spec(demo_spec(tmp_path, digits, "stops", num_samples=4, epochs=3, constraints={"max_macs": 1e9}))
    spec = spec.model_copy(update={"storage": str(tmp_path / "ray_results")})
    ray.init(num_cpus=2)
    try:
        results = make_tuner(spec, scheduler=StopAfterFirstEpoch()).fit()
        assert not results.errors
        epochs = sorted(r.metrics["epoch"] for r in results)
        assert epochs == [1, 1, 1, 1], epochs  # every trial trained, each stopped after epoch 1
        deadline = time.monotonic() + 30
        while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ray.available_resources().get("CPU", 0) == 2
        assert {pg["state"] for pg in placement_group_table().values()} <= {"REMOVED"}
    finally:
        ray.shutdown()
