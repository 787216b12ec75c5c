"""A real ``mlflow server`` for tests: started, stopped and restarted on the same port and
database, as a tracking server that goes away and comes back would be.

The server runs in its own session (process group), so stopping it ends exactly the
processes it spawned (uvicorn and friends) and nothing else on the machine. Settings
checked on this machine (docs/design.md): ``--workers 1``, an absolute SQLite URI, and
``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` (no GenAI job workers: ~3x faster start).
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from cluster_utils import free_port

__all__ = ["MlflowServer", "PortTaken", "query_store"]


class PortTaken(RuntimeError):
    """The server could not bind its port: another process holds it."""


@dataclass
class MlflowServer:
    """One tracking server on 127.0.0.1 with a SQLite store and an artifact folder."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db_uri(self) -> str:
        return f"sqlite:///{(self.workdir / 'server.db').resolve()}"

    @property
    def log(self) -> Path:
        return self.workdir / "server.log"

    def start(self, timeout: float = 120.0, *, keep_port: bool = False) -> None:
        """Start (or restart) the server and wait until ``/health`` answers.

        A first start whose port was taken between ``free_port`` and the server's bind (Ray
        processes starting beside it pick ports too) tries again on a new port, unless
        ``keep_port`` (a client already holds the address); a restart keeps its port, as a
        real server's address does."""
        first = self.proc is None and not keep_port
        for _ in range(3):
            try:
                return self._start(timeout)
            except PortTaken:
                if not first:
                    raise
                self.port = free_port()
        raise PortTaken(f"no free port for the mlflow server after 3 tries; see {self.log}")

    def _start(self, timeout: float) -> None:
        assert self.proc is None or self.proc.poll() is not None, "the server is already running"
        self.workdir.mkdir(parents=True, exist_ok=True)
        logged = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", "1", "--backend-store-uri", self.db_uri,
                 "--artifacts-destination", str((self.workdir / "artifacts").resolve())],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                text = self.log.read_text()[logged:]
                error = PortTaken if "address already in use" in text else RuntimeError
                raise error(f"mlflow server exited with {self.proc.returncode}:\n{text[-3000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not answer /health within {timeout:.0f} s")
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL what is left of it."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def query_store(db: Path, query: str, params: tuple = ()) -> tuple | None:
    """The first row of ``query`` on a search's SQLite store, read-only while the search
    writes it; None before the store exists or while it is busy."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as c:
            return c.execute(query, params).fetchone()
    except sqlite3.Error:
        return None
