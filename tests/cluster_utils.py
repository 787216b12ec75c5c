"""A real multi-node Ray cluster on one machine, for multi-node and fault tests.

Every node is a ``ray start --block`` process, the command a cluster node runs
(jobs/cluster.yaml, KubeRay), so drivers connect by address exactly as on a cluster. Nodes
are stopped one by one, by the process ids this module started, never with ``ray stop``:
that kills every Ray process of the user on the machine (``ray/scripts/scripts.py``),
including other people's. ``--block`` makes each ``ray start`` own its node: on SIGTERM it
shuts down the node's processes (``ray._private.node.Node`` shutdown hooks), and its reaper
cleans up if it is killed.

Isolation from other Ray instances on the machine: every node gets its own ports and one temp
dir per cluster (short, under /tmp: Ray's socket paths must stay under 107 bytes), so the
cluster never writes /tmp/ray/ray_current_cluster. Connect with the explicit address
(``cluster.address`` / ``cluster.driver_env()``), never ``address="auto"``, which attaches
to any GCS process it finds with ``ps``.

    with local_cluster(num_nodes=2) as cluster:
        subprocess.run([sys.executable, "script.py"], env=cluster.driver_env(), check=True)
        cluster.kill_node(cluster.nodes[1])   # a worker node dies (fault tests)
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import psutil

__all__ = ["Node", "LocalCluster", "start_cluster", "local_cluster", "free_port"]

_STARTED = "Ray runtime started."
_NODE_IP = "127.0.0.1"


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind((_NODE_IP, 0))
        return s.getsockname()[1]


@dataclass
class Node:
    """One ``ray start --block`` process and the log it writes."""

    process: subprocess.Popen
    log: Path
    head: bool
    # Descendants seen while the node ran (raylet, GCS, workers ...), killed if they outlive it.
    descendants: list[psutil.Process] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def _remember_descendants(self) -> None:
        with contextlib.suppress(psutil.Error):
            known = {p.pid for p in self.descendants}
            self.descendants += [p for p in psutil.Process(self.process.pid).children(recursive=True) if p.pid not in known]


@dataclass
class LocalCluster:
    """A head node and worker nodes, all on 127.0.0.1, sharing one temp dir."""

    address: str
    temp_dir: Path
    env: dict[str, str]
    num_cpus: int
    object_store_memory: int
    nodes: list[Node] = field(default_factory=list)

    def add_node(self, num_cpus: int | None = None, timeout: float = 120.0) -> Node:
        """Start a worker node that joins the head; returns once it reports started."""
        args = ["--address", self.address]
        node = _start_node(args, self, num_cpus=num_cpus or self.num_cpus, head=False, timeout=timeout)
        self.nodes.append(node)
        return node

    def driver_env(self) -> dict[str, str]:
        """The environment for a driver subprocess: ``ray.init()`` connects to this cluster."""
        return {**self.env, "RAY_ADDRESS": self.address}

    def kill_node(self, node: Node, graceful: bool = False) -> None:
        """Stop one node: SIGTERM (``graceful``) or SIGKILL, then kill what it left behind."""
        node._remember_descendants()
        if node.alive:
            node.process.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                node.process.wait(timeout=60 if graceful else 10)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(timeout=10)
        _, alive = psutil.wait_procs(node.descendants, timeout=30 if graceful else 5)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=10)

    def leftover_processes(self) -> list[psutil.Process]:
        """Processes started by this cluster's nodes that are still running."""
        left = []
        for node in self.nodes:
            for proc in [psutil.Process(node.process.pid)] if node.alive else []:
                left.append(proc)
            left += [p for p in node.descendants if _running(p)]
        return left

    def stop(self) -> None:
        """Stop every node (workers first, the head last) and remove the temp dir."""
        try:
            for node in reversed(self.nodes):
                self.kill_node(node, graceful=True)
        finally:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _start_node(extra: list[str], cluster: LocalCluster, *, num_cpus: int, head: bool, timeout: float) -> Node:
    index = len(cluster.nodes)
    log = cluster.temp_dir / f"node{index}.log"
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--block", *extra,
        "--node-ip-address", _NODE_IP,
        "--num-cpus", str(num_cpus), "--num-gpus", "0",
        "--object-store-memory", str(cluster.object_store_memory),
        "--temp-dir", str(cluster.temp_dir),
        # NOTE: the agent's HTTP port defaults to 52365 on every node: two nodes on one machine
        # (or another Ray of someone else's) would collide.
        "--dashboard-agent-listen-port", str(free_port()),
        "--disable-usage-stats",
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=cluster.env)
    node = Node(process=process, log=log, head=head)
    deadline = time.monotonic() + timeout
    while _STARTED not in log.read_text(errors="replace"):
        if not node.alive or time.monotonic() > deadline:
            cluster.kill_node(node)
            why = "exited" if process.returncode not in (None, -signal.SIGKILL) else f"did not start in {timeout:.0f} s"
            raise RuntimeError(f"ray node {index} {why}; its log:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)
    node._remember_descendants()
    return node


def start_cluster(
    num_nodes: int = 2,
    *,
    num_cpus: int = 1,
    object_store_memory: int = 128 * 1024**2,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> LocalCluster:
    """Start a head and ``num_nodes - 1`` worker nodes with ``num_cpus`` CPUs each.

    ``env`` adds variables for the nodes (and so for every Ray worker on them); Ray usage
    stats and MLflow telemetry are off, since nothing outside the machine can be reached.
    Stop the cluster with :meth:`LocalCluster.stop` (or use :func:`local_cluster`).
    """
    if num_nodes < 1:
        raise ValueError(f"`num_nodes` must be at least 1, got {num_nodes}")
    node_env = {
        **os.environ,
        # NOTE: Ray 2.60 turns token auth on for `ray start --head` when ~/.ray/auth_token exists
        # (any local ray.init() writes one) but not for `ray start --address`, whose join then
        # fails with InvalidAuthToken; one explicit mode for every node and driver avoids that.
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        **(env or {}),
    }
    node_env.pop("RAY_ADDRESS", None)
    port = free_port()
    cluster = LocalCluster(
        address=f"{_NODE_IP}:{port}",
        temp_dir=Path(tempfile.mkdtemp(prefix="tnt-ray-", dir="/tmp")),
        env=node_env,
        num_cpus=num_cpus,
        object_store_memory=object_store_memory,
    )
    try:
        head_args = ["--head", "--port", str(port), "--include-dashboard", "false"]
        if importlib.util.find_spec("grpc") is not None:
            # NOTE: with ray[client] installed the client server takes port 10001 unless told
            # otherwise; without it, naming a port is an error.
            head_args += ["--ray-client-server-port", str(free_port())]
        head = _start_node(head_args, cluster, num_cpus=num_cpus, head=True, timeout=timeout)
        cluster.nodes.append(head)
        for _ in range(num_nodes - 1):
            cluster.add_node(timeout=timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@contextlib.contextmanager
def local_cluster(num_nodes: int = 2, **kwargs) -> Iterator[LocalCluster]:
    """:func:`start_cluster` that always stops its nodes on the way out."""
    cluster = start_cluster(num_nodes, **kwargs)
    try:
        yield cluster
    finally:
        cluster.stop()
