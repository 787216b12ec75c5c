"""Helpers for tests that run the real search CLI (``python -m tntsearch.run``) as a user
would: a small spec made from the demo, the CLI as a subprocess whose output a test can
react to line by line, and readers for what a search leaves behind (Tune's result files,
MLflow runs, the Ray node ids of a local cluster).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import mlflow
import psutil
import yaml

__all__ = [
    "ROOT",
    "demo_spec",
    "run_cli",
    "tune_results",
    "mlflow_runs",
    "raylet_node_id",
    "stop_cluster",
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
    raw["constraints"]["min_throughput"] = None
    raw["constraints"].update(constraints or {})
    raw["mlflow"]["experiment"] = name
    if tracking_uri:
        raw["mlflow"]["tracking_uri"] = tracking_uri
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_cli(spec: Path, cwd: Path, *args: str, env: dict[str, str] | None = None,
            on_line: Callable[[str], None] | None = None, interrupt_after: str | None = None,
            interrupt_when: Callable[[], bool] | None = None, send: int = signal.SIGINT,
            timeout: float = 600) -> tuple[int, str]:
    """Run the search CLI to its end; ``on_line`` sees every output line as it comes. The
    first line containing ``interrupt_after``, or ``interrupt_when()`` turning true (asked
    every 0.2 s), sends the CLI the signal ``send`` once (default SIGINT, Ctrl-C).
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
    if interrupt_when is not None:
        def watch() -> None:
            while proc.poll() is None and not interrupt_when():
                time.sleep(0.2)
            if proc.poll() is None:
                proc.send_signal(send)
        threading.Thread(target=watch, daemon=True).start()
    out = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        out.append(line)
        if on_line is not None:
            on_line(line)
        if interrupt_after is not None and interrupt_after in line:
            proc.send_signal(send)
            interrupt_after = None
        if time.monotonic() > deadline:
            proc.kill()
            out.append(f"[killed after {timeout:.0f} s]\n")
            break
    return proc.wait(timeout=120), "".join(out)


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
