"""Faults during a real search (the CLI on a local Ray cluster, tests/cluster_utils.py):
no finished trial may be lost, and the search must still end with a correct front.

One search of the demo's two baselines (3 epochs each), with two faults injected while it
runs, both as soon as Tune has tiny_tnt's first epoch (and so Ray Train has registered its
checkpoint):

- tiny_tnt's Train worker process (``ray::RayTrainWorker``, found by its working directory,
  ``<session>/artifacts/train-<trial id>``) is SIGKILLed. Ray Train (FailureConfig from
  ``resources.max_failures``) must start a new worker that resumes from the last
  checkpoint: Tune and MLflow see epochs 1..3 once each, the later ones trained after the kill.
- the MLflow tracking server (a real ``mlflow server``, tests/mlflow_utils.py) is stopped.
  It is started again, on the same port and database, once Tune has had a result (or a
  trial finished) while it was down. Trials go on meanwhile; the tracker keeps the records
  (and a fallback file) and delivers them when the server is back: MLflow gets everything.

The third fault, the driver interrupted (SIGINT) and the search resumed with ``--resume``,
is tests/test_search.py's ``searched`` fixture.
"""
from __future__ import annotations

import json
import signal
import threading
import time
from datetime import datetime
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest

from cluster_utils import start_cluster
from mlflow_utils import MlflowServer
from search_utils import demo_spec, mlflow_runs, run_cli, stop_cluster
from tntsearch.pareto import pareto_mask, to_minimisation
from tntsearch.report import load_search
from tntsearch.train import load_state

pytestmark = pytest.mark.slow

NAME = "faults"
EPOCHS = 3  # a kill seen after epoch 1 still lands before the last epoch
VICTIM = "tiny_tnt"  # the slower baseline (~5 s an epoch here): time to kill it mid-trial


def _results(exp_dir: Path, pattern: str = "run_trial_*/result.json") -> dict[str, list[dict]]:
    """Tune's results so far, per trial; tolerates a line being written right now."""
    out = {}
    for path in exp_dir.glob(pattern):
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


def _train_worker(cluster, trial_id: str) -> psutil.Process | None:
    """The trial's Ray Train worker: Ray Train V2 runs each worker in the run's own working
    directory, named after the run (``train-<trial id>``, tntsearch.search.run_trial)."""
    for node in cluster.nodes:
        node._remember_descendants()
        for proc in node.descendants:
            try:
                if " ".join(proc.cmdline()).startswith("ray::RayTrainWorker") and Path(proc.cwd()).name == f"train-{trial_id}":
                    return proc
            except psutil.Error:
                continue
    return None


class _Injector:
    """Watches the search from the test process and injects the faults."""

    def __init__(self, cwd: Path, cluster, server: MlflowServer):
        self.cwd, self.cluster, self.server = cwd, cluster, server
        self.kill: dict | None = None  # trial_id, pid, time, epochs Tune had
        self.down_at: float | None = None
        self.back_at: tuple[float, float] | None = None  # restart began, /health answered
        self.fallback_seen = False
        self.errors: list[str] = []
        self._results_when_down = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._restarter: threading.Thread | None = None

    def __enter__(self):
        self._watcher.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._watcher.join(timeout=30)
        if self._restarter is not None:
            self._restarter.join(timeout=180)

    def _live_results(self) -> dict[str, list[dict]]:
        # NOTE: Tune writes results in the driver's session dir as they come and copies them
        # to ``storage`` (ray_results/) only now and then.
        return _results(self.cluster.temp_dir, f"session_*/artifacts/*/{NAME}/driver_artifacts/run_trial_*/result.json")

    def _watch(self) -> None:
        try:
            while not self._stop.is_set():
                results = self._live_results()
                if self.kill is None:
                    self._maybe_kill(results)
                elif self.down_at is not None and sum(map(len, results.values())) > self._results_when_down:
                    self._bring_back()  # the search went on without MLflow: a result came in
                if self.down_at is not None and self.back_at is None and list(self.cwd.rglob("mlflow-pending*.jsonl")):
                    self.fallback_seen = True
                time.sleep(0.2)
        except Exception as e:  # noqa: BLE001 - reported by the tests
            self.errors.append(repr(e))

    def _maybe_kill(self, results: dict[str, list[dict]]) -> None:
        for tid, rows in results.items():
            epochs = [r["epoch"] for r in rows if r.get("epoch", 0) >= 1]
            if rows[0].get("baseline") != VICTIM or not epochs:
                continue
            worker = _train_worker(self.cluster, tid)
            if worker is None:
                self.errors.append(f"no RayTrainWorker process for trial {tid} after its epochs {epochs}")
                self.kill = {}
                return
            worker.send_signal(signal.SIGKILL)
            self.kill = {"trial_id": tid, "pid": worker.pid, "time": time.time(), "epochs_before": epochs}
            worker.wait(timeout=10)
            self.server.stop()
            self._results_when_down = sum(map(len, self._live_results().values()))
            self.down_at = time.time()
            return

    def on_line(self, line: str) -> None:
        """A trial finished while the server is down: bring it back."""
        if self.down_at is not None and line.startswith("trial ") and ": completed" in line:
            self._bring_back()

    def _bring_back(self) -> None:
        """Restart the server (same port and store), once, beside the search."""
        with self._lock:
            if self._restarter is None:
                self._restarter = threading.Thread(target=self._restart, daemon=True)
                self._restarter.start()

    def _restart(self) -> None:
        began = time.time()
        try:
            self.server.start()
        except Exception as e:  # noqa: BLE001
            self.errors.append(f"restarting the MLflow server: {e}")
            return
        self.back_at = (began, time.time())


@pytest.fixture(scope="module")
def faulted(tmp_path_factory, digits):
    cwd = tmp_path_factory.mktemp("faults")
    server = MlflowServer(cwd / "mlflow-server")
    starting = threading.Thread(target=server.start)  # both take seconds: side by side
    starting.start()
    cluster = None
    try:
        cluster = start_cluster(num_nodes=1, num_cpus=2)
        starting.join()
        assert server.running, server.log.read_text()[-3000:]
        spec = demo_spec(cwd, digits, NAME, num_samples=2, epochs=EPOCHS, max_concurrent=2, tracking_uri=server.url)
        with _Injector(cwd, cluster, server) as injector:
            rc, out = run_cli(spec, cwd, "--address", cluster.address, env=cluster.driver_env(), on_line=injector.on_line)
        (cwd / "cli.log").write_text(out)
        if not server.running:  # the search ended before the restart: bring it up to read it
            server.start()
        yield {"cwd": cwd, "rc": rc, "out": out, "injector": injector, "server": server,
               "results": _results(cwd / "ray_results" / NAME)}
    finally:
        starting.join()
        server.stop()
        if cluster is not None:
            stop_cluster(cluster)


def _children(faulted):
    return mlflow_runs(faulted["server"].url, NAME)


def test_search_finishes_and_keeps_every_trial(faulted):
    inj = faulted["injector"]
    assert not inj.errors, inj.errors
    assert faulted["rc"] == 0, faulted["out"][-3000:]
    assert "[2/2 done]" in faulted["out"]
    parents, children = _children(faulted)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.data.tags["ray.trial_id"] for c in children) == sorted(faulted["results"])
    for c in children:
        assert c.data.tags["status"] == "completed", c.data.tags
        assert c.info.status == "FINISHED"
        assert c.data.metrics["epochs_done"] == EPOCHS


def _written(checkpoint_path: str) -> float:
    """When a worker wrote a checkpoint: Ray Train names it ``checkpoint_<local time>``."""
    return datetime.strptime(Path(checkpoint_path).name[len("checkpoint_"):], "%Y-%m-%d_%H-%M-%S.%f").timestamp()


def test_killed_worker_resumes_from_its_checkpoint(faulted):
    kill = faulted["injector"].kill
    assert kill, "no Train worker was killed"
    assert not psutil.pid_exists(kill["pid"]) or psutil.Process(kill["pid"]).status() == psutil.STATUS_ZOMBIE
    assert kill["epochs_before"] and kill["epochs_before"][-1] < EPOCHS, kill  # after a checkpoint, before the end
    rows = faulted["results"][kill["trial_id"]]
    # Tune got every epoch once: a restart from scratch would have reported epoch 1 again.
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
    # The epochs Tune got split into those the killed worker trained (checkpoints written
    # before the kill) and those a new worker trained after it, resuming from the last
    # checkpoint of the first part.
    before = [r["epoch"] for r in rows if _written(r["checkpoint_path"]) < kill["time"]]
    after = [r["epoch"] for r in rows if _written(r["checkpoint_path"]) > kill["time"]]
    assert before and after and before + after == list(range(1, EPOCHS + 1)), (before, after, kill)
    assert load_state(rows[-1]["checkpoint_path"])["epoch"] == EPOCHS
    # MLflow: the curves hold epochs 1..N once each.
    child = next(c for c in _children(faulted)[1] if c.data.tags["ray.trial_id"] == kill["trial_id"])
    history = mlflow.MlflowClient(faulted["server"].url).get_metric_history(child.info.run_id, "val_top1")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))


def test_records_made_while_mlflow_was_down_arrive_when_it_is_back(faulted):
    inj = faulted["injector"]
    assert inj.down_at is not None and inj.back_at is not None, "the server was not stopped and restarted during the search"
    down, (restart, _) = inj.down_at, inj.back_at
    assert "unreachable" in faulted["out"]  # the tracker noticed the outage ...
    assert inj.fallback_seen  # ... kept the undelivered records on disk meanwhile ...
    assert not list(faulted["cwd"].rglob("mlflow-pending*.jsonl"))  # ... and delivered them all
    assert "reachable again; all records delivered" in faulted["out"]
    client = mlflow.MlflowClient(faulted["server"].url)
    made_while_down = []
    for c in _children(faulted)[1]:
        for key in ("val_top1", "epochs_done"):
            made_while_down += [m for m in client.get_metric_history(c.info.run_id, key) if down * 1000 < m.timestamp < restart * 1000]
    assert made_while_down


def test_front_is_correct(faulted):
    parents, children = _children(faulted)
    acc_macs = np.array([[c.data.metrics["val_top1"], c.data.metrics["macs"]] for c in children])
    on_front = pareto_mask(to_minimisation(acc_macs, ["max", "min"]))
    assert [c.data.tags["pareto"] == "true" for c in children] == list(on_front)
    # The staircase by hand: along the front by rising MACs, accuracy rises; each step adds
    # (its accuracy gain over the previous step) x (MACs left below the reference).
    search = load_search(faulted["server"].url, experiment=NAME)
    (acc_ref, macs_ref) = [o.ref for o in search.objectives]
    hv, best = 0.0, acc_ref
    for acc, macs in sorted(map(tuple, acc_macs[on_front]), key=lambda p: p[1]):
        hv += (acc - best) * (macs_ref - macs)
        best = acc
    assert search.hypervolume == pytest.approx(hv)
    assert parents[0].data.metrics["hypervolume"] == pytest.approx(hv)
