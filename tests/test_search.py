"""The demo search end to end through the real CLI: a real local Ray, Optuna, Ray Train,
FFCV and MLflow; interrupted with SIGINT and resumed. And trials stopped early by MO-ASHA."""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import ray
import yaml
from ray.tune.schedulers import TrialScheduler
from ray.util.placement_group import placement_group_table
from search_utils import demo_spec, mlflow_runs, run_cli, tune_results

from tntsearch.moasha import MOASHAScheduler
from tntsearch.pareto import pareto_mask, to_minimisation
from tntsearch.run import prepare, search
from tntsearch.search import make_scheduler

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


def _moasha_spec(tmp_path: Path, digits: Path) -> Path:
    """The two baselines, one at a time: tiny_vit (2.57 M MACs) inside the MACs reference
    of 3 M, tiny_tnt (4.12 M) outside it. At epoch 1 tiny_tnt meets tiny_vit at the rung
    and, whatever their accuracies, ranks behind it (dominated, or on its front adding no
    hypervolume); only the best ceil(2/2) = 1 continues. NOTE: random search because
    Optuna 5.1's NSGA-II sampler holds a thread lock that Ray's Tuner cannot pickle."""
    path = demo_spec(tmp_path, digits, "moasha", num_samples=2, epochs=2, max_concurrent=1, algorithm="random",
                     tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", constraints={"max_macs": 1e9})
    raw = yaml.safe_load(path.read_text())
    raw["search"]["scheduler"] = {"type": "moasha", "grace_period": 1, "reduction_factor": 2}
    raw["objectives"] = [{"metric": "val_top1", "mode": "max", "ref": 0.0}, {"metric": "macs", "mode": "min", "ref": 3.0e6}]
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.timeout(420)  # a worker that is never handed back shows as a hang
def test_moasha_stops_trials_and_hands_back_their_workers(tmp_path, digits, monkeypatch):
    """make_scheduler's MO-ASHA in a real search (this process, with the MLflow tracker).
    Tune stops a trial by ending its driver in the middle of the Ray Train run; the run's
    worker must give its CPU back (Ray Train's placement-group cleaner), or the search would
    wait forever -- the way early stopping once hung a small search."""
    monkeypatch.chdir(tmp_path)  # Ray Tune's storage: ./ray_results
    path = _moasha_spec(tmp_path, digits)
    spec = prepare(path)
    assert isinstance(make_scheduler(spec), MOASHAScheduler)
    ray.init(num_cpus=2)
    try:
        outcome = search(spec, path, progress_interval=1e9)
        deadline = time.monotonic() + 30
        while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ray.available_resources().get("CPU", 0) == 2
        assert {pg["state"] for pg in placement_group_table().values()} <= {"REMOVED"}
    finally:
        ray.shutdown()
    assert not outcome.interrupted and outcome.summary["failed"] == 0, outcome.summary
    # One trial at a time: the order of their first results is the order they reached the rungs.
    results = dict(sorted(tune_results(Path(outcome.experiment_path)).items(), key=lambda kv: kv[1][0]["timestamp"]))
    assert [rows[0]["baseline"] for rows in results.values()] == ["tiny_vit", "tiny_tnt"]
    assert [rows[-1]["epoch"] for rows in results.values()] == [2, 1]  # tiny_tnt stopped at its rung
    # Tune acted on exactly the scheduler's decisions: replayed, they stop the same trials.
    replay = make_scheduler(spec)
    for trial_id, rows in results.items():
        trial = SimpleNamespace(trial_id=trial_id)
        replay.on_trial_add(None, trial)
        actions = [replay.on_trial_result(None, trial, r) for r in rows]
        replay.on_trial_complete(None, trial, rows[-1])
        assert actions[-1] == (TrialScheduler.STOP if rows[-1]["epoch"] < 2 else TrialScheduler.CONTINUE), trial_id
        assert TrialScheduler.STOP not in actions[:-1]
    # MLflow: stopped trials are `stopped_early` with the metrics of the epoch they reached,
    # and count in the front with that accuracy.
    _, children = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "moasha")
    runs = {c.data.tags["ray.trial_id"]: c for c in children}
    assert set(runs) == set(results)
    for trial_id, rows in results.items():
        run = runs[trial_id]
        assert run.data.tags["status"] == ("completed" if rows[-1]["epoch"] == 2 else "stopped_early")
        assert run.data.metrics["val_top1"] == pytest.approx(rows[-1]["val_top1"])
    last = [rows[-1] for rows in results.values()]
    on_front = pareto_mask(to_minimisation(np.array([[r["val_top1"], r["macs"]] for r in last]), ["max", "min"]))
    assert [runs[t].data.tags["pareto"] == "true" for t in results] == list(on_front)
