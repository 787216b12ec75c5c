"""A search driver killed with SIGKILL and resumed, end to end through the real CLI
(docs/faults.md, "The driver killed, stopped or resumed"): one small search (4 trials x 2
epochs, one baseline infeasible) is killed right after a trial finished and again in the
middle of a trial's training, then its whole local Ray dies under it (the raylet killed
mid-trial), and it is resumed with ``--resume`` after each. At the end Ray Tune and MLflow
must both hold exactly the search's trials, each once, with its true status and final
metrics; MLflow runs of trials that Tune forgot are marked orphaned. (SIGTERM:
tests/test_storage.py.)"""
from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import psutil
import pytest
from ray.tune import ExperimentAnalysis
from mlflow_utils import query_store
from search_utils import demo_spec, mlflow_runs, refused_by_cli, run_cli

NUM_SAMPLES = 4
EPOCHS = 2
NAME = "faults"
RAY_DEATH_NOTICED_S = 120  # how long the CLI may take to end once its raylet is dead

pytestmark = pytest.mark.slow


def _epoch_one_logged_since(db: Path, since_ms: int) -> bool:
    """A running trial's first epoch reached MLflow after ``since_ms``: it is mid-training."""
    query = ("SELECT 1 FROM metrics m JOIN tags t ON t.run_uuid = m.run_uuid WHERE m.key = 'val_top1' AND m.step = 1 "
             "AND m.timestamp > ? AND t.key = 'status' AND t.value = 'running' LIMIT 1")
    return query_store(db, query, (since_ms,)) is not None


def _kill_raylet_once_a_trial_trains(cli: subprocess.Popen) -> None:
    """SIGKILL the raylet of the CLI's own local Ray (a child of the CLI, found by its command
    line) as soon as a Ray Train worker runs under it: the whole local Ray dies mid-trial."""
    def commands() -> dict[psutil.Process, str]:
        out = {}
        for proc in psutil.Process(cli.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                out[proc] = " ".join(proc.cmdline())
        return out

    while cli.poll() is None:
        procs = commands()
        if any(cmd.startswith("ray::RayTrainWorker") for cmd in procs.values()):
            next(p for p, cmd in procs.items() if cmd.split(" ")[0].endswith("/raylet")).kill()
            break
        time.sleep(0.2)
    try:
        cli.wait(timeout=RAY_DEATH_NOTICED_S)
    except subprocess.TimeoutExpired:  # the driver did not notice: a hang, shown as -9
        with contextlib.suppress(psutil.Error):
            procs = [psutil.Process(cli.pid), *psutil.Process(cli.pid).children(recursive=True)]
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()


@pytest.fixture(scope="module")
def faulted(tmp_path_factory, digits):
    """The one search, killed twice, its Ray killed once, and finished; what each run returned."""
    cwd = tmp_path_factory.mktemp("resume")
    spec = demo_spec(cwd, digits, NAME, num_samples=NUM_SAMPLES, epochs=EPOCHS, constraints={"max_macs": 3.0e6})
    store = f"sqlite:///{cwd / 'mlflow.db'}"
    runs = {}
    # tiny_tnt (over max_macs) finishes within seconds of the start: kill right after it.
    runs["kill_between"] = run_cli(spec, cwd, interrupt_after=": infeasible", send=signal.SIGKILL)
    runs["grow"] = refused_by_cli(spec, cwd, "--resume", "--num-samples", str(NUM_SAMPLES + 3))
    start_ms = int(time.time() * 1000)
    runs["kill_mid_trial"] = run_cli(spec, cwd, "--resume", send=signal.SIGKILL,
                                     interrupt_when=lambda: _epoch_one_logged_since(cwd / "mlflow.db", start_ms))
    # The killer waits for a Train worker itself (in run_cli's watcher thread).
    runs["ray_killed"] = run_cli(spec, cwd, "--resume", send=_kill_raylet_once_a_trial_trains, interrupt_when=lambda: True)
    runs["finish"] = run_cli(spec, cwd, "--resume")
    for name, (rc, out) in runs.items():  # for a post-mortem
        (cwd / f"{name}.out").write_text(f"exit code {rc}\n{out}")
    return {"cwd": cwd, "store": store, "runs": runs}


def _tune_trials(cwd: Path) -> dict:
    return {t.trial_id: t for t in ExperimentAnalysis(str(cwd / "ray_results" / NAME)).trials}


def test_each_interruption_exits_as_documented(faulted):
    runs = faulted["runs"]
    for name in ("kill_between", "kill_mid_trial"):
        assert runs[name][0] == -signal.SIGKILL, (name, runs[name][1][-3000:])
    rc, out = runs["ray_killed"]
    assert rc not in (0, -signal.SIGKILL), ("the CLI went on, or hung, with its Ray dead", out[-3000:])
    assert "error: the local Ray stopped under the search" in out and "--resume" in out, out[-3000:]
    rc, out = runs["grow"]
    assert rc == 2, out[-3000:]
    assert f"--num-samples {NUM_SAMPLES + 3}" in out and f"started with {NUM_SAMPLES} samples" in out
    rc, out = runs["finish"]
    assert rc == 0, out[-3000:]
    assert f"[{NUM_SAMPLES}/{NUM_SAMPLES} done]" in out


def test_tune_holds_every_trial_once_finished(faulted):
    trials = _tune_trials(faulted["cwd"])
    assert len(trials) == NUM_SAMPLES
    for t in trials.values():
        assert t.status == "TERMINATED", (t.trial_id, t.status)
        r = t.last_result
        assert r["feasible"] == 0 or r["epoch"] == EPOCHS, (t.trial_id, r.get("epoch"))


def test_mlflow_matches_tune_trial_for_trial(faulted):
    trials = _tune_trials(faulted["cwd"])
    parents, children = mlflow_runs(faulted["store"], NAME)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    live = [c for c in children if c.data.tags.get("tntsearch.orphaned") != "true"]
    ids = [c.data.tags["ray.trial_id"] for c in live]
    assert sorted(ids) == sorted(trials), "each Tune trial has exactly one MLflow run"
    client = mlflow.MlflowClient(faulted["store"])
    for c in live:
        result = trials[c.data.tags["ray.trial_id"]].last_result
        assert c.info.status == "FINISHED"
        if result["feasible"] == 0:
            assert c.data.tags["status"] == "infeasible"
            continue
        assert c.data.tags["status"] == "completed", c.data.tags
        assert c.data.metrics["epochs_done"] == EPOCHS
        assert c.data.metrics["val_top1"] == pytest.approx(result["val_top1"])
        # NOTE: an epoch whose report was on its way to the driver when it was killed is in
        # its checkpoint but reached neither Tune nor MLflow: a curve may miss it.
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "val_top1")]
        assert len(steps) == len(set(steps)) and max(steps) == EPOCHS, ("no epoch logged twice", steps)


def test_runs_of_forgotten_trials_are_orphaned_and_out_of_the_front(faulted):
    trials = _tune_trials(faulted["cwd"])
    _, children = mlflow_runs(faulted["store"], NAME)
    for c in children:
        if c.data.tags.get("tntsearch.orphaned") == "true":
            assert c.data.tags["ray.trial_id"] not in trials
            assert c.info.status == "KILLED" and c.data.tags.get("pareto") != "true"


def test_replayed_starts_find_their_runs_and_reconcile_orphans_forgotten_trials(tmp_path):
    """The two store-side rules, on a real SQLite store without Ray: a tracker restored from
    an older snapshot replays a ``start`` it had delivered (same run, not a second one) and a
    metric (one copy); ``reconcile`` ends the run of a trial Tune forgot as an orphan and
    reports the last epoch MLflow holds for the others."""
    from tntsearch.tracking import prepare_store, search_children
    from tntsearch.tracking.outbox import PARENT, Outbox

    uri = prepare_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    first = Outbox(uri, tmp_path / "pending.jsonl")
    first.add({"op": "experiment", "name": "x"})
    first.add({"op": "start", "key": PARENT, "parent": None, "name": "search", "tags": {}})
    snapshot = first.get_state()  # Tune's snapshot: the trials' starts not delivered yet
    for tid in ("a", "b"):
        first.add({"op": "start", "key": f"trial:{tid}", "parent": PARENT, "name": tid, "tags": {"ray.trial_id": tid}})
    first.add({"op": "log", "key": "trial:a", "metrics": [["val_top1", 50.0, 1, 1000]]})
    assert first.flush()

    restored = Outbox(uri, tmp_path / "pending2.jsonl")
    restored.uid = first.uid  # pickled with the tracker
    restored.set_state(snapshot)
    restored.add({"op": "start", "key": "trial:a", "parent": PARENT, "name": "a", "tags": {"ray.trial_id": "a"}})
    restored.add({"op": "log", "key": "trial:a", "metrics": [["val_top1", 50.0, 1, 1000]]})
    restored.add({"op": "reconcile", "trials": ["a"]})  # Tune restored trial a only
    assert restored.flush()

    client = restored.client
    assert restored.run_ids["trial:a"] == first.run_ids["trial:a"]
    assert restored.reconciled == {"a": 1}
    assert [m.step for m in client.get_metric_history(first.run_ids["trial:a"], "val_top1")] == [1]
    orphan = client.get_run(first.run_ids["trial:b"])
    assert orphan.info.status == "KILLED" and orphan.data.tags["tntsearch.orphaned"] == "true"
    assert orphan.data.tags["status"] == "orphaned"
    kids = search_children(client, restored.experiment_id, restored.run_ids[PARENT])
    assert [r.data.tags["ray.trial_id"] for r in kids] == ["a"]
    assert len(client.search_runs([restored.experiment_id])) == 3  # parent, a, b: nothing doubled
