"""Helpers for tests that run the real search CLI (``python -m tntsearch.run``) as a user
would: a small spec made from the demo, the CLI as a subprocess whose output a test can
react to line by line, and readers for what a search leaves behind (Tune's result files,
MLflow runs, the Ray node ids of a local cluster). ``DemoSearch`` reads what the session's
tiny search (tests/conftest.py ``demo_search``) left; ``replay`` reports its results again
in a Tune run of a test's own, ``log_replayed`` hands them to a tracker's Tune hooks.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlflow
import psutil
import pytest
import yaml

__all__ = [
    "ROOT",
    "demo_spec",
    "run_cli",
    "refused_by_cli",
    "tune_results",
    "mlflow_runs",
    "raylet_node_id",
    "stop_cluster",
    "DEMO_SEARCH",
    "DEMO_SUPERNET_SEARCH",
    "supernet_spec",
    "DemoSearch",
    "replay",
    "log_replayed",
    "non_dominated",
]

ROOT = Path(__file__).resolve().parents[1]


def demo_spec(workdir: Path, digits: Path, name: str, *, num_samples: int, epochs: int, max_concurrent: int = 2,
              tracking_uri: str | None = None, constraints: dict[str, Any] | None = None, **search: Any) -> Path:
    """The demo spec over the session's digits files, shrunk: ``num_samples`` trials of
    ``epochs`` epochs, no early stopping, no throughput constraint (a loaded 2-core machine
    measures anything) unless ``constraints`` says otherwise, MLflow experiment ``name``.
    ``search`` updates the search section."""
    raw = yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())
    raw["name"] = name
    raw["data"].update(train=str(digits / "train.beton"), val=str(digits / "val.beton"))
    raw["train"].update(epochs=epochs, warmup_epochs=min(1, epochs - 1))
    raw["search"].update(num_samples=num_samples, max_concurrent=max_concurrent, scheduler={"type": "none"}, **search)
    return _write_spec(raw, workdir, name, tracking_uri=tracking_uri, constraints=constraints)


def _write_spec(raw: dict[str, Any], workdir: Path, name: str, *, tracking_uri: str | None,
                constraints: dict[str, Any] | None) -> Path:
    """``raw`` as ``<workdir>/<name>.yaml``, its MLflow experiment ``name``, no throughput
    constraint (load, not the code, would decide it on a shared machine) unless given."""
    raw["constraints"]["min_throughput"] = None
    raw["constraints"].update(constraints or {})
    raw["mlflow"]["experiment"] = name
    if tracking_uri:
        raw["mlflow"]["tracking_uri"] = tracking_uri
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def supernet_spec(workdir: Path, digits: Path, name: str, *, num_samples: int, supernet_epochs: int,
                  tracking_uri: str | None = None, constraints: dict[str, Any] | None = None, **search: Any) -> Path:
    """search_spaces/demo_supernet.yaml over the session's digits files, shrunk like
    :func:`demo_spec`: ``num_samples`` candidates, ``supernet_epochs`` epochs of supernet
    training, no throughput constraint unless ``constraints`` says otherwise."""
    raw = yaml.safe_load((ROOT / "search_spaces" / "demo_supernet.yaml").read_text())
    raw["name"] = name
    raw["data"].update(train=str(digits / "train.beton"), val=str(digits / "val.beton"))
    raw["supernet"]["epochs"] = supernet_epochs
    raw["train"]["warmup_epochs"] = min(1, supernet_epochs - 1)
    raw["search"].update(num_samples=num_samples, **search)
    return _write_spec(raw, workdir, name, tracking_uri=tracking_uri, constraints=constraints)


def run_cli(spec: Path, cwd: Path, *args: str, env: dict[str, str] | None = None,
            on_line: Callable[[str], None] | None = None, interrupt_after: str | None = None,
            interrupt_when: Callable[[], bool] | None = None,
            send: int | Callable[[subprocess.Popen], None] = signal.SIGINT,
            timeout: float = 600) -> tuple[int, str]:
    """Run the search CLI to its end; ``on_line`` sees every output line as it comes. The
    first line containing ``interrupt_after``, or ``interrupt_when()`` turning true (asked
    every 0.2 s), sends the CLI the signal ``send`` once (default SIGINT, Ctrl-C), or calls
    ``send(process)`` when it is a function (a fault of another kind: its Ray killed, say).
    Returns the exit code (``-9`` for SIGKILL) and the whole output (stdout and stderr together)."""
    env = dict(env or os.environ)
    # NOTE: mlflow.set_tracking_uri (in this process, other tests) exports MLFLOW_TRACKING_URI,
    # which the CLI honours; a search must log where its spec says.
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tntsearch.run", str(spec), "--progress-interval", "5", *args],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        env={**env, "PYTHONUNBUFFERED": "1"},
    )
    fault = (lambda: send(proc)) if callable(send) else (lambda: proc.send_signal(send))
    if interrupt_when is not None:
        def watch() -> None:
            while proc.poll() is None and not interrupt_when():
                time.sleep(0.2)
            if proc.poll() is None:
                fault()
        threading.Thread(target=watch, daemon=True).start()
    out = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        out.append(line)
        if on_line is not None:
            on_line(line)
        if interrupt_after is not None and interrupt_after in line:
            fault()
            interrupt_after = None
        if time.monotonic() > deadline:
            proc.kill()
            out.append(f"[killed after {timeout:.0f} s]\n")
            break
    return proc.wait(timeout=120), "".join(out)


def refused_by_cli(spec: Path, cwd: Path, *args: str) -> tuple[int, str]:
    """The search CLI's ``main`` run in this process from ``cwd``, for a command it refuses
    before Ray starts (a subprocess would cost more than the refusal; tests/test_cli.py
    checks that the module and its ``main`` answer alike). Returns the exit code and stderr."""
    from tntsearch import run

    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        mp.chdir(cwd)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # as run_cli: the spec says where to log
        rc = run.main([str(spec), *args])
    return rc, err.getvalue()


def tune_results(experiment_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Every result Tune received, per trial id, in order (the trials' ``result.json``)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(Path(experiment_dir).glob("run_trial_*/result.json")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


def mlflow_runs(tracking_uri: str, experiment: str) -> tuple[list[Any], list[Any]]:
    """(parent runs, child runs) of an experiment."""
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {tracking_uri}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def raylet_node_id(node) -> str:
    """The Ray node id of a ``cluster_utils`` node: its raylet's ``--node_id`` argument."""
    node._remember_descendants()
    for proc in node.descendants:
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            continue
        if cmd and cmd[0].endswith("/raylet"):
            return next(a.split("=", 1)[1] for a in cmd if a.startswith("--node_id="))
    raise RuntimeError(f"no raylet among the processes of the node logged in {node.log}")


def stop_cluster(cluster) -> list[psutil.Process]:
    """Kill every node of a ``cluster_utils`` cluster by its own processes (the ``ray start``
    process and everything it started, workers' nodes first), then remove its temp dir;
    returns the processes still running afterwards (should be none).

    SIGKILL, not ``LocalCluster.stop``'s graceful SIGTERM: an orderly shutdown takes up to a
    minute on a loaded 2-core machine, and these throwaway clusters keep no state. All of a
    node's processes at once: killing only ``ray start`` leaves its raylet running until
    ``kill_node`` gives up waiting for it."""
    for node in reversed(cluster.nodes):
        node._remember_descendants()
        if node.alive:
            node.process.kill()
        for proc in node.descendants:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(node.descendants, timeout=10)
        node.process.wait(timeout=10)
    cluster.stop()
    return cluster.leftover_processes()


DEMO_SEARCH = "demo-search"  # name and MLflow experiment of the session's tiny search
DEMO_SUPERNET_SEARCH = "demo-supernet-search"  # the same for the session's tiny supernet mode search


@dataclass(frozen=True)
class DemoSearch:
    """What the session's tiny search left: its spec (paths made absolute), MLflow store and
    parent run, the CLI's output, and every result each trial reported to Tune, in order."""

    spec_path: Path
    spec: Any  # tntsearch.spec.SearchSpec
    tracking_uri: str
    parent_run_id: str
    output: str
    results: dict[str, list[dict[str, Any]]]  # trial id -> Tune's result.json rows

    @classmethod
    def read(cls, spec_path: Path, output: str) -> DemoSearch:
        from tntsearch.search import experiment_path
        from tntsearch.spec import load_spec

        spec = load_spec(spec_path, spec_path.parent)  # the CLI ran there
        parents, _ = mlflow_runs(spec.mlflow.tracking_uri, spec.experiment)
        assert len(parents) == 1, parents
        return cls(spec_path, spec, spec.mlflow.tracking_uri, parents[0].info.run_id, output,
                   tune_results(Path(experiment_path(spec))))

    @property
    def db(self) -> Path:
        return Path(self.tracking_uri.removeprefix("sqlite:///"))

    def reported(self, trial_id: str) -> list[dict[str, Any]]:
        """The trial's results as ``run_trial`` reported them: without the keys Tune adds."""
        from ray.tune.result import AUTO_RESULT_KEYS

        tune_keys = {*AUTO_RESULT_KEYS, "trial_id", "done", "experiment_tag"}
        return [{k: v for k, v in r.items() if k not in tune_keys} for r in self.results[trial_id]]

    def last(self, trial_id: str) -> dict[str, Any]:
        return self.results[trial_id][-1]

    def status(self, trial_id: str) -> str:
        """What the trial's results make it (FIFO: every feasible trial trains every epoch)."""
        return "completed" if self.last(trial_id)["feasible"] == 1 else "infeasible"

    def trained(self) -> list[str]:
        """Trial ids of the feasible trials (they trained every epoch: FIFO)."""
        return [t for t, rows in self.results.items() if rows[-1]["feasible"] == 1]

    def infeasible(self) -> list[str]:
        return [t for t, rows in self.results.items() if rows[-1]["feasible"] == 0]


def replay(config: dict[str, Any]) -> None:
    """A Tune trainable that reports again what a trial of the demo search reported
    (``config["reported"]``, from ``DemoSearch.reported``): the real tracker then sees the
    real result format in situations the real search does not make on purpose. With
    ``config["fail_after"] = n`` it raises ``ValueError("boom at epoch <n + 1>")`` after n
    reports."""
    from ray import tune

    for i, result in enumerate(config["reported"]):
        if i == config.get("fail_after"):
            raise ValueError(f"boom at epoch {i + 1}")
        tune.report(result)


def log_replayed(tracker: Any, spec: Any, trials: list[tuple[str, list[dict[str, Any]]]]) -> None:
    """Drive ``tracker`` (an ``MlflowTracker``, set up) through its Tune hooks as Tune does,
    with Tune's own ``Trial`` objects in the storage of ``spec`` (the demo search's): each
    trial's results (``DemoSearch.reported``; none for a trial that died before reporting),
    its completion, then the experiment's end. No Ray: for tests of what the tracker logs."""
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    for tid, results in trials:
        storage = StorageContext(storage_path=spec.storage, experiment_dir_name=spec.name,
                                 trial_dir_name=f"run_trial_{tid}")
        trial = Trial("run_trial", trial_id=tid, stub=True, storage=storage)
        tracker.on_trial_start(0, [], trial)
        for result in results:
            tracker.on_trial_result(0, [], trial, result)
        tracker.on_trial_complete(0, [], trial)
    tracker.on_experiment_end([])


def non_dominated(points: dict[str, tuple[float, float]]) -> set[str]:
    """The names of the (val_top1, macs) points no other point dominates (higher or equal
    accuracy at fewer or equal MACs, better in one): by brute force, a reference for the
    tracker's front."""
    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] >= b[0] and a[1] <= b[1] and a != b

    return {n for n, p in points.items() if not any(dominates(q, p) for q in points.values())}
