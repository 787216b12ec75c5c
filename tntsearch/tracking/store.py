"""The MLflow tracking store: which URI, its SQLite schema, and the process environment.

Importing this module sets ``MLFLOW_DISABLE_TELEMETRY=true`` (unless the variable is
already set) *before* MLflow is imported: telemetry tries to reach the internet
(docs/design.md, dependencies). Processes started by a local ``ray.init`` inherit the
driver's environment; on an existing cluster pass ``runtime_env={"env_vars": TELEMETRY_ENV}``
(or ``ray job submit --runtime-env-json``) so that workers get it too.
"""
from __future__ import annotations

import os

# The one environment every tntsearch process and Ray worker gets.
TELEMETRY_ENV: dict[str, str] = {"MLFLOW_DISABLE_TELEMETRY": "true"}
for _k, _v in TELEMETRY_ENV.items():
    os.environ.setdefault(_k, _v)

import contextlib  # noqa: E402
import logging  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterator  # noqa: E402

__all__ = [
    "TELEMETRY_ENV",
    "resolve_tracking_uri",
    "sqlite_path",
    "default_artifact_location",
    "prepare_store",
    "env_defaults",
    "fail_fast_http",
]


def resolve_tracking_uri(uri: str | None, workdir: str | os.PathLike[str]) -> str:
    """The tracking URI to use, always absolute for SQLite.

    ``None``/empty gives the embedded store ``sqlite:///<abs workdir>/mlflow.db``. A relative
    ``sqlite:///x.db`` or a bare ``*.db`` path is made absolute against ``workdir``: a relative
    SQLite URI follows each process's working directory, and Ray Tune changes trial working
    directories, so a second, silent database would appear. Server and database URIs
    (``http(s)://``, ``postgresql://``, ``databricks`` ...) pass through unchanged. Plain
    directories and ``file:`` URIs are refused: MLflow 3 deprecates the file store.
    """
    base = Path(workdir).expanduser().resolve()
    if not uri:
        return f"sqlite:///{base / 'mlflow.db'}"
    uri = str(uri).strip()
    if uri.startswith("sqlite:"):
        if not uri.startswith("sqlite:///"):
            raise ValueError(f"`tracking_uri` {uri!r}: a SQLite URI must look like sqlite:///path/to/mlflow.db")
        path = uri[len("sqlite:///"):]
        if path in ("", ":memory:"):
            raise ValueError(f"`tracking_uri` {uri!r}: an in-memory SQLite store cannot be shared with the UI; name a file")
        return f"sqlite:///{(base / path).resolve()}"
    if "://" not in uri and uri != "databricks" and not uri.startswith("databricks"):
        if uri.endswith(".db"):
            return f"sqlite:///{(base / uri).resolve()}"
        raise ValueError(
            f"`tracking_uri` {uri!r} is neither a tracking server URI (http://host:port), a database URI "
            "(sqlite:///abs/mlflow.db, postgresql://...) nor a .db file; MLflow's file store is deprecated"
        )
    if uri.startswith("file:"):
        raise ValueError(f"`tracking_uri` {uri!r}: MLflow's file store is deprecated; use sqlite:///abs/path/mlflow.db")
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, ``None`` for other stores."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def default_artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite file (``mlartifacts/``,
    whichever directory the driver runs in); the server's choice otherwise."""
    db = sqlite_path(uri)
    return (db.parent / "mlartifacts").as_uri() if db is not None else None


def prepare_store(uri: str, setting: str = "mlflow.tracking_uri") -> str:
    """Open the store once, in this (driver) process, before anything logs; returns ``uri``.

    A SQLite store gets its folder and schema here: several processes opening a brand-new
    SQLite file at once corrupt it (half-applied alembic migrations, docs/design.md);
    after this call concurrent opens are safe. Any other store must answer one request
    within 10 s. A store that cannot be used raises a one-line ``ValueError`` that names
    ``setting`` and what is wrong, so a search can refuse to start (docs/faults.md).
    """
    from mlflow.tracking import MlflowClient  # here: this module is imported by Ray workers that never log

    path = sqlite_path(uri)
    if path is not None and not path.is_absolute():
        raise ValueError(f"`{setting}` {uri!r} must be absolute; use resolve_tracking_uri() first")
    try:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        with fail_fast_http(10), _quiet_schema_creation():
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - whatever MLflow, SQLAlchemy or the OS raise: say it in one line
        while e.__cause__ or e.__context__:  # the root cause, e.g. ConnectionRefusedError under MLflow's wrapping
            e = e.__cause__ or e.__context__
        what = " ".join(str(e).split())[:300] if str(e) else ""
        raise ValueError(f"`{setting}` {uri}: the tracking store cannot be used ({type(e).__name__}: {what})") from None
    return uri


@contextlib.contextmanager
def _quiet_schema_creation() -> Iterator[None]:
    """MLflow logs each step of creating a SQLite schema at INFO ("Creating initial MLflow
    database tables..."): set-up chatter printed before the search screen could route it."""
    loggers = [logging.getLogger(name) for name in ("mlflow.store.db.utils", "alembic")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def env_defaults(**values: str) -> Iterator[None]:
    """Set environment variables for a block; ones the user set are kept."""
    changed = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(changed)
    try:
        yield
    finally:
        for k in changed:
            os.environ.pop(k, None)


def fail_fast_http(timeout_s: int) -> contextlib.AbstractContextManager[None]:
    """Make MLflow's HTTP client fail within ``timeout_s`` instead of retrying for minutes
    (its defaults: 7 retries, backoff factor 2, 120 s timeout): the tracker has its own
    retry loop and must not stall the Tune driver. Variables the user set are kept."""
    return env_defaults(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(int(timeout_s)))
