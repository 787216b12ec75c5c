"""MLflow tracking of a search: one parent run per search, one nested child run per trial.

Everything is logged from the Ray Tune driver by one ``tune.Callback``
(:class:`MlflowTracker`): results from every node reach the driver anyway, a single writer
cannot race itself, and trial processes never open the tracking store. That makes the
embedded SQLite store safe (its schema is created once, in the driver, by
:func:`prepare_store`, before anything logs) and keeps worker images free of MLflow state.

Why not ``ray.air.integrations.mlflow.MLflowLoggerCallback`` (Ray 2.60)? It creates flat runs
(no parent), logs ``trial.config`` and every result key as-is, drives MLflow through the
process-global ``mlflow`` module, records no failure reason, and loses records when the
server is unreachable. Here every write is a small JSON-able *record* appended to an
in-order log; records are delivered with an explicit ``MlflowClient``; on a transient
failure (server down, HTTP 5xx/429, SQLite busy) delivery stops, backs off, and is retried
from the same record, so order is kept and nothing is dropped. Records still undelivered
are also kept in a JSONL *fallback file* whenever delivery fails (rewritten atomically,
removed once everything got through); ``python -m tntsearch.report --import FILE`` replays
it later. A record the store rejects for good (HTTP 4xx, e.g. a param changing value) is
dropped with a warning and kept in :attr:`MlflowTracker.dropped`.

Telemetry: importing this module sets ``MLFLOW_DISABLE_TELEMETRY=true`` (unless the
variable is already set) *before* MLflow is imported. Processes started by a local
``ray.init`` inherit the driver's environment, so import this module before ``ray.init``;
on an existing cluster pass ``runtime_env={"env_vars": TELEMETRY_ENV}`` to ``ray.init``
(or ``ray job submit --runtime-env-json``) so that workers get it too.
"""
from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import contextlib  # noqa: E402
from collections import deque  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Iterable, Iterator, Mapping  # noqa: E402

from mlflow.entities import Metric, Param, RunStatus, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from ray.tune import Callback  # noqa: E402

from tntsearch import pareto  # noqa: E402

__all__ = [
    "trial_outcome",
    "trial_error",
    "TELEMETRY_ENV",
    "EPOCH_METRICS",
    "COST_METRICS",
    "STATUSES",
    "TAG_STATUS",
    "TAG_REASON",
    "TAG_PARETO",
    "TAG_ROLE",
    "TAG_ARCH",
    "TAG_TRIAL_ID",
    "TAG_BASELINE",
    "TAG_INFEASIBLE",
    "CONSTRAINT_PREFIX",
    "PARAM_OBJECTIVES",
    "PARAM_EPOCHS",
    "FALLBACK_FORMAT",
    "disable_telemetry",
    "resolve_tracking_uri",
    "prepare_store",
    "default_artifact_location",
    "arch_params",
    "trial_row",
    "front_rows",
    "publish_front",
    "RecordReplayer",
    "search_children",
    "fail_fast_http",
    "env_defaults",
    "read_fallback",
    "MlflowTracker",
]

logger = logging.getLogger(__name__)

TELEMETRY_ENV: dict[str, str] = {"MLFLOW_DISABLE_TELEMETRY": "true"}

# What a feasible trial reports once per epoch (step = epoch) and what every result carries.
EPOCH_METRICS = ("train_loss", "val_loss", "val_top1", "val_top5", "lr", "images_per_s", "epoch_time_s")
COST_METRICS = ("params", "macs", "throughput", "feasible", "violation", "cost_time_s")
STATUSES = ("running", "completed", "stopped_early", "infeasible", "failed")
_ON_FRONT_STATUSES = ("completed", "stopped_early")

TAG_STATUS = "status"  # one of STATUSES
TAG_REASON = "failure_reason"  # why a trial failed (first line of the exception)
TAG_PARETO = "pareto"  # "true" on the children that are on the front, "false" otherwise
TAG_ROLE = "tntsearch.role"  # "search" on the parent, "trial" on children
TAG_ARCH = "tntsearch.arch"  # the TNTConfig dict as JSON: exact round trip for export
TAG_TRIAL_ID = "ray.trial_id"
TAG_BASELINE = "baseline"  # preset name of a baseline trial, "" otherwise
TAG_INFEASIBLE = "infeasible_reason"  # which constraints an infeasible trial broke, and by how much
CONSTRAINT_PREFIX = "constraint_"  # relative constraint values the search reports (> 0: violated)
PARAM_OBJECTIVES = "tntsearch.objectives"  # JSON [[metric, mode, ref], ...] on the parent
PARAM_EPOCHS = "tntsearch.epochs"
FALLBACK_FORMAT = "tntsearch-mlflow-fallback"

_PARENT = "parent"
_MAX_PARAM_LEN = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
_MAX_TAG_LEN = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
_MAX_TEXT = 100_000
_SERVER_SCHEMES = ("http://", "https://")


def disable_telemetry() -> dict[str, str]:
    """Turn MLflow telemetry off in this process (also if MLflow was imported already) and
    return the variables to hand to Ray workers (``runtime_env={"env_vars": ...}``)."""
    os.environ.update(TELEMETRY_ENV)
    from mlflow.telemetry import set_telemetry_client

    set_telemetry_client()  # re-reads the variable: drops an existing client
    return dict(TELEMETRY_ENV)


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


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def default_artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite file (``mlartifacts/``,
    whichever directory the driver runs in); the server's choice otherwise."""
    db = _sqlite_path(uri)
    return (db.parent / "mlartifacts").as_uri() if db is not None else None


def prepare_store(uri: str) -> str:
    """Create the SQLite store's folder and schema once, in this (driver) process.

    Several processes opening a brand-new SQLite file at once corrupt it (half-applied
    alembic migrations, see DESIGN.md); after this call concurrent opens are safe. Other
    stores own their schema; this is a no-op for them. Returns ``uri``.
    """
    path = _sqlite_path(uri)
    if path is None:
        return uri
    if not path.is_absolute():
        raise ValueError(f"`tracking_uri` {uri!r} must be absolute; use resolve_tracking_uri() first")
    path.parent.mkdir(parents=True, exist_ok=True)
    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    return uri


def arch_params(arch: Mapping[str, Any]) -> dict[str, str]:
    """MLflow params for an architecture dict (``TNTConfig.to_dict()``): the DESIGN.md names,
    ``tnt_blocks`` as ``"1,4,8,12"`` (``""`` when no block is a TNT block)."""
    out = {}
    for k, v in arch.items():
        if isinstance(v, (list, tuple)):
            v = ",".join(str(x) for x in v)
        out[str(k)] = str(v)
    return out


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out[key[:250]] = text[:_MAX_PARAM_LEN]
    return out


def _now_ms() -> int:
    return int(time.time() * 1000)


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _git_commit(where: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _is_transient(e: BaseException) -> bool:
    """Worth retrying later: unreachable server, HTTP 5xx or 429, a busy/locked database."""
    if isinstance(e, MlflowException):
        code = e.get_http_status_code()
        return code >= 500 or code == 429
    if isinstance(e, (OSError, TimeoutError)):  # requests' errors are OSErrors
        return True
    return type(e).__name__ in ("OperationalError", "DBAPIError")


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


# ---------------------------------------------------------------------------------------
# Reading runs back (shared with tntsearch.report).


def trial_row(run: Any) -> dict[str, Any]:
    """A child run as a plain dict: ``run_id``, ``trial_id``, ``name``, ``status``,
    ``reason``, ``baseline``, ``pareto`` (bool), ``arch`` (dict, as the trial reported it)
    and ``metrics`` (latest value of each metric, i.e. the last epoch's)."""
    tags = run.data.tags
    arch = json.loads(tags[TAG_ARCH]) if TAG_ARCH in tags else {}
    return {
        "run_id": run.info.run_id,
        "trial_id": tags.get(TAG_TRIAL_ID, ""),
        "name": run.info.run_name,
        "status": tags.get(TAG_STATUS, "running"),
        "reason": tags.get(TAG_REASON, ""),
        "baseline": tags.get(TAG_BASELINE, ""),
        "pareto": tags.get(TAG_PARETO) == "true",
        "arch": arch,
        "metrics": dict(run.data.metrics),
    }


def front_rows(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The trials that may be on the front: feasible and either completed or stopped early
    by the scheduler (with their last reported values, i.e. the model as it stands). Failed,
    infeasible and still-running trials never are."""
    return [r for r in rows if r.get("status") in _ON_FRONT_STATUSES and _finite(r.get("metrics", {}).get("feasible", 1)) == 1.0]


def publish_front(
    client: MlflowClient,
    parent_run_id: str,
    rows: list[Mapping[str, Any]],
    objectives: Iterable[Any],
    title: str = "",
) -> None:
    """Log the front's pictures (one PNG per accuracy/cost pair), its interactive page
    (``pareto/front.html``) and table (``pareto/front.json``) on the parent run."""
    objs = pareto.as_objectives(objectives)
    rows = front_rows(rows)
    hv = pareto.front_hypervolume(rows, objs)
    mask = pareto.front_mask(rows, objs)
    with tempfile.TemporaryDirectory(prefix="tntsearch-front-") as tmp:
        pareto.write_front_pngs(rows, objs, tmp, title=title)
        pareto.write_front_html(rows, objs, Path(tmp) / "front.html", title=title, hypervolume_value=hv)
        table = {
            "objectives": [o.to_list() for o in objs],
            "hypervolume": hv,
            "front": [dict(r) for r, m in zip(rows, mask) if m],
        }
        (Path(tmp) / "front.json").write_text(json.dumps(table, indent=1, default=str))
        client.log_artifacts(parent_run_id, tmp, artifact_path="pareto")


# ---------------------------------------------------------------------------------------
# Records: what the tracker logs, replayable against any store.


class RecordReplayer:
    """Applies tracker records to one store, in order.

    Runs are named by the tracker's keys (``"parent"``, ``"trial:<id>"``); ``run_ids`` maps
    each key to the MLflow run created for it. Kinds of record (all JSON-able):
    ``experiment`` (get or create), ``start`` (create a run, or reopen a known one),
    ``resume`` (adopt an existing parent and its children), ``log`` (metrics, params, tags),
    ``text`` (a text artifact), ``end`` (terminate a run).
    """

    def __init__(self, client: MlflowClient, run_ids: Mapping[str, str] | None = None, experiment_id: str | None = None):
        self.client = client
        self.run_ids: dict[str, str] = dict(run_ids or {})
        self.experiment_id = experiment_id
        self.adopted: list[Any] = []  # child runs found by a ``resume`` record

    def apply(self, rec: Mapping[str, Any]) -> None:
        getattr(self, "_" + rec["op"])(rec)

    def _experiment(self, rec: Mapping[str, Any]) -> None:
        exp = self.client.get_experiment_by_name(rec["name"])
        if exp is None:
            # The experiment kind makes MLflow 3's UI open on its model-training views.
            self.experiment_id = self.client.create_experiment(
                rec["name"], artifact_location=rec.get("artifact_location"),
                tags={"mlflow.experimentKind": "custom_model_development"},
            )
        else:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            self.experiment_id = exp.experiment_id

    def _start(self, rec: Mapping[str, Any]) -> None:
        tags = dict(rec.get("tags", {}))
        key = rec["key"]
        if key in self.run_ids:  # a trial restarted after a driver restore: same run
            self.client.update_run(self.run_ids[key], status="RUNNING")
            for k, v in tags.items():
                self.client.set_tag(self.run_ids[key], k, v)
            return
        if rec.get("parent"):
            tags["mlflow.parentRunId"] = self.run_ids[rec["parent"]]
        run = self.client.create_run(self.experiment_id, start_time=rec.get("time"), tags=tags, run_name=rec.get("name"))
        self.run_ids[key] = run.info.run_id

    def _resume(self, rec: Mapping[str, Any]) -> None:
        parent = self.client.get_run(rec["run_id"])
        self.experiment_id = parent.info.experiment_id
        self.run_ids[_PARENT] = parent.info.run_id
        self.client.update_run(parent.info.run_id, status="RUNNING")
        children = search_children(self.client, parent.info.experiment_id, parent.info.run_id)
        for run in children:
            tid = run.data.tags.get(TAG_TRIAL_ID)
            if tid:
                self.run_ids.setdefault(f"trial:{tid}", run.info.run_id)
        self.adopted = children

    def _log(self, rec: Mapping[str, Any]) -> None:
        run_id = self.run_ids[rec["key"]]
        metrics = [Metric(k, float(v), int(ts), int(step)) for k, v, step, ts in rec.get("metrics", [])]
        params = [Param(k, str(v)) for k, v in rec.get("params", {}).items()]
        tags = [RunTag(k, str(v)[:_MAX_TAG_LEN]) for k, v in rec.get("tags", {}).items()]
        self.client.log_batch(run_id, metrics=metrics, params=params, tags=tags, synchronous=True)

    def _text(self, rec: Mapping[str, Any]) -> None:
        self.client.log_text(self.run_ids[rec["key"]], rec["text"], rec["artifact_file"])

    def _end(self, rec: Mapping[str, Any]) -> None:
        self.client.set_terminated(self.run_ids[rec["key"]], status=rec["status"], end_time=rec.get("time"))


def search_children(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=1000, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def read_fallback(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Header and records of a fallback file written by :class:`MlflowTracker`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fallback file not found: {path}")
    lines = [ln for ln in path.read_bytes().decode("utf-8", errors="replace").splitlines() if ln.strip()]
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    if header.get("format") != FALLBACK_FORMAT:
        raise ValueError(f"{path}: not a tntsearch tracking fallback file (first line must have format={FALLBACK_FORMAT!r})")
    return header, [json.loads(ln) for ln in lines[1:]]


# ---------------------------------------------------------------------------------------
# The Tune callback.


class MlflowTracker(Callback):
    """Logs a Ray Tune search to MLflow from the driver (see the module docstring).

    Args:
        tracking_uri: an absolute URI (:func:`resolve_tracking_uri`); for SQLite call
            :func:`prepare_store` first.
        experiment: MLflow experiment name (created if missing).
        spec_dict: the validated spec as a dict; logged as flattened params (``train.lr``,
            ``search.num_samples`` ...) and as ``spec/spec.json``.
        spec_path: the YAML file; logged verbatim under ``spec/``; its folder's git commit
            becomes the ``mlflow.source.git.commit`` tag.
        objectives: ``(metric, mode, ref)`` triples (or the spec's objective objects).
        epochs: the spec's epoch count; a feasible trial that ends having reported fewer
            (1-based) epochs was stopped early by the scheduler.
        resume_parent_run_id: log into this existing parent run (a resumed search): its
            children are adopted, so the front and hypervolume cover the earlier trials.
        run_name: parent run name (default: the spec's ``name``, else the experiment).
        extra_params: more parent params (e.g. settings the search derived).
        plot_every_s: the front's pictures are refreshed when a trial finishes, at most
            this often, and always at the end.
        fallback_path: where undelivered records go (default: ``mlflow-pending-<time>.jsonl``
            beside the SQLite file, or in the current directory for a server).
        final_retry_s: how long :meth:`close` keeps retrying before writing the fallback.
        http_timeout_s: per-request timeout towards a tracking server.
        max_backoff_s: the longest pause between delivery attempts during an outage.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        spec_dict: Mapping[str, Any] | None,
        spec_path: str | os.PathLike[str] | None,
        objectives: Iterable[Any],
        epochs: int,
        resume_parent_run_id: str | None = None,
        *,
        run_name: str | None = None,
        extra_params: Mapping[str, Any] | None = None,
        plot_every_s: float = 60.0,
        fallback_path: str | os.PathLike[str] | None = None,
        final_retry_s: float = 30.0,
        http_timeout_s: int = 10,
        max_backoff_s: float = 60.0,
    ):
        if not tracking_uri:
            raise ValueError("`tracking_uri` is required; use resolve_tracking_uri(None, workdir) for the embedded store")
        db = _sqlite_path(tracking_uri)
        if db is not None and not db.is_absolute():
            raise ValueError(f"`tracking_uri` {tracking_uri!r} must be absolute; use resolve_tracking_uri()")
        if not experiment:
            raise ValueError("`experiment` must be a non-empty name")
        if int(epochs) < 1:
            raise ValueError(f"`epochs` must be >= 1, got {epochs}")
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.spec_dict = dict(spec_dict or {})
        self.spec_path = Path(spec_path).resolve() if spec_path else None
        self.objectives = pareto.as_objectives(objectives)
        self.epochs = int(epochs)
        self.resume_parent_run_id = resume_parent_run_id
        self.run_name = run_name or self.spec_dict.get("name") or experiment
        self.extra_params = dict(extra_params or {})
        self.plot_every_s = float(plot_every_s)
        self.final_retry_s = float(final_retry_s)
        self.http_timeout_s = int(http_timeout_s)
        self.max_backoff_s = float(max_backoff_s)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        default_dir = db.parent if db is not None else Path.cwd()
        self.fallback_path = Path(fallback_path or default_dir / f"mlflow-pending-{stamp}.jsonl").resolve()
        self.dropped: list[dict[str, Any]] = []
        self._records: deque[dict[str, Any]] = deque()  # not yet delivered, in order
        self._delivered = 0  # how many were delivered (records are then forgotten)
        self._seq = 0
        self._trials: dict[str, dict[str, Any]] = {}
        self._n_finished = 0
        self._started = False
        self._closed = False
        self._replayer: RecordReplayer | None = None
        self._run_ids: dict[str, str] = {}
        self._experiment_id: str | None = None
        self._backoff = 0.0
        self._next_attempt = 0.0
        self._record_failures = 0
        self._outage_logged = False
        self._front_dirty = False
        self._last_publish = -math.inf
        self._fallback_written = False

    # -- pickling / Tune experiment checkpoints ---------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_replayer"] = None  # holds a client with a DB engine or HTTP session
        return state

    def get_state(self) -> dict[str, Any] | None:
        self._sync_replayer_state()
        return {
            "records": list(self._records),
            "delivered": self._delivered,
            "seq": self._seq,
            "run_ids": self._run_ids,
            "experiment_id": self._experiment_id,
            "trials": self._trials,
            "n_finished": self._n_finished,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._records = deque(state["records"])
        self._delivered = int(state["delivered"])
        self._seq = int(state.get("seq", self._delivered + len(self._records)))
        self._run_ids = dict(state["run_ids"])
        self._experiment_id = state.get("experiment_id")
        self._trials = dict(state["trials"])
        self._n_finished = int(state["n_finished"])
        self._replayer = None
        self._started = True
        self._closed = False

    # -- public read side --------------------------------------------------------------

    @property
    def parent_run_id(self) -> str | None:
        """The parent run's id, once the store has it (``None`` while it is unreachable)."""
        self._sync_replayer_state()
        return self._run_ids.get(_PARENT)

    @property
    def pending(self) -> int:
        """Records not yet delivered to the store."""
        return len(self._records)

    def rows(self) -> list[dict[str, Any]]:
        """Every trial seen so far, as :func:`trial_row` dicts (``run_id`` may be ``None``
        while the store is unreachable)."""
        self._sync_replayer_state()
        out = []
        for tid, st in self._trials.items():
            out.append({
                "run_id": self._run_ids.get(st["key"]),
                "trial_id": tid,
                "name": st["name"],
                "status": st["status"],
                "reason": st.get("reason") or st.get("infeasible_reason", ""),
                "baseline": st.get("baseline", ""),
                "pareto": bool(st.get("pareto")),
                "arch": st.get("arch") or {},
                "metrics": dict(st["metrics"]),
            })
        return out

    def front(self) -> list[dict[str, Any]]:
        """The current Pareto front (same dicts as :meth:`rows`)."""
        rows = front_rows(self.rows())
        mask = pareto.front_mask(rows, self.objectives)
        return [r for r, m in zip(rows, mask) if m]

    def summary(self) -> dict[str, Any]:
        """Counts by status, front size and hypervolume: for a progress display."""
        rows = self.rows()
        counts = {s: 0 for s in STATUSES}
        for r in rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        fr = front_rows(rows)
        return {
            **counts,
            "front": int(pareto.front_mask(fr, self.objectives).sum()),
            "hypervolume": pareto.front_hypervolume(fr, self.objectives),
            "pending_records": self.pending,
        }

    # -- Tune hooks ----------------------------------------------------------------------

    def setup(self, *args: Any, **info: Any) -> None:
        """Queue the parent run (once, even if called again) and try to deliver it."""
        if self._started:
            return
        self._started = True
        self._add({"op": "experiment", "name": self.experiment,
                   "artifact_location": default_artifact_location(self.tracking_uri)})
        tags = {TAG_ROLE: "search"}
        commit = _git_commit(self.spec_path.parent if self.spec_path else Path.cwd())
        if commit:
            tags["mlflow.source.git.commit"] = commit
        if self.spec_path:
            tags["tntsearch.spec_path"] = str(self.spec_path)
        if self.resume_parent_run_id:
            self._add({"op": "resume", "run_id": self.resume_parent_run_id})
            self._add({"op": "log", "key": _PARENT, "tags": {**tags, "tntsearch.resumed_at": str(_now_ms())}})
        else:
            self._add({"op": "start", "key": _PARENT, "parent": None, "name": self.run_name, "tags": tags, "time": _now_ms()})
            params = _flatten(self.spec_dict)
            params.update({k: str(v)[:_MAX_PARAM_LEN] for k, v in _flatten(self.extra_params).items()})
            params[PARAM_OBJECTIVES] = json.dumps([o.to_list() for o in self.objectives])
            params[PARAM_EPOCHS] = str(self.epochs)
            self._add({"op": "log", "key": _PARENT, "params": params})
            if self.spec_dict:
                self._add({"op": "text", "key": _PARENT, "artifact_file": "spec/spec.json",
                           "text": json.dumps(self.spec_dict, indent=2, default=str)})
            if self.spec_path and self.spec_path.is_file():
                self._add({"op": "text", "key": _PARENT, "artifact_file": f"spec/{self.spec_path.name}",
                           "text": self.spec_path.read_text(encoding="utf-8", errors="replace")[:_MAX_TEXT]})
        self._flush()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ensure_trial(trial, restart=True)
        self._flush()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        st = self._ensure_trial(trial)
        now = _now_ms()
        log: dict[str, Any] = {"op": "log", "key": st["key"], "metrics": [], "params": {}, "tags": {}}
        arch = result.get("arch")
        if isinstance(arch, Mapping) and not st.get("arch"):
            st["arch"] = dict(arch)
            log["params"].update(arch_params(arch))
            log["tags"][TAG_ARCH] = json.dumps(arch, default=str)
        baseline = str(result.get("baseline") or "")
        if baseline != st.get("baseline", ""):
            st["baseline"] = baseline
            log["tags"][TAG_BASELINE] = baseline
        epoch = int(result.get("epoch", 0) or 0)
        costs = [*COST_METRICS, *(k for k in result if k.startswith(CONSTRAINT_PREFIX))]
        for name in costs:
            value = _finite(result.get(name))
            if value is not None and st["metrics"].get(name) != value:
                st["metrics"][name] = value
                log["metrics"].append([name, value, 0, now])
        if _finite(result.get("feasible")) == 0.0:
            # NOTE: the search fills objectives an infeasible trial never measured with their
            # reference values (so the sampler has numbers); they are not measurements.
            reason = str(result.get("error") or "") or _violated(result)
            if reason and st.get("infeasible_reason") != reason:
                st["infeasible_reason"] = reason
                log["tags"][TAG_INFEASIBLE] = reason[:_MAX_TAG_LEN]
            training: tuple[str, ...] = ()
        else:
            training = (*EPOCH_METRICS, *(o.metric for o in self.objectives if o.metric not in COST_METRICS + EPOCH_METRICS))
        for name in training:
            value = _finite(result.get(name))
            if value is not None:
                st["metrics"][name] = value
                log["metrics"].append([name, value, epoch, now])
        st["epoch"] = max(st.get("epoch", 0), epoch)
        st["n_results"] = st.get("n_results", 0) + 1
        if "val_top1" in st["metrics"]:
            best = max(st["metrics"].get("best_val_top1", -math.inf), st["metrics"]["val_top1"])
            st["metrics"]["best_val_top1"] = best
        if "time_total_s" in result and _finite(result["time_total_s"]) is not None:
            st["time_total_s"] = float(result["time_total_s"])
        if log["metrics"] or log["params"] or log["tags"]:
            self._add(log)
        self._flush()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        st = self._ensure_trial(trial)
        last = {"feasible": st["metrics"].get("feasible", 1.0), "epoch": st.get("epoch", 0)} if st.get("n_results") else None
        status = trial_outcome(last, self.epochs)
        self._finish(st, status, reason="the trial ended before reporting any result" if status == "failed" else "")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        st = self._ensure_trial(trial)
        reason, text = trial_error(trial)
        if text:
            self._add({"op": "text", "key": st["key"], "artifact_file": "error.txt", "text": text[-_MAX_TEXT:]})
        self._finish(st, "failed", reason=reason)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        st = self._ensure_trial(trial)
        reason, _ = trial_error(trial)
        self._add({"op": "log", "key": st["key"], "tags": {"last_error": reason[:_MAX_TAG_LEN],
                                                           "num_failures": str(getattr(trial, "num_failures", ""))}})
        self._flush()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._flush()
        self._maybe_publish()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.close()

    def close(self, status: str = "FINISHED") -> Path | None:
        """End the parent run, publish the final front, deliver everything (retrying for up
        to ``final_retry_s``); return the fallback file if records are still undelivered."""
        if self._closed:
            return self.fallback_path if self.pending else None
        self._closed = True
        if not self._started:
            self.setup()
        self._publish_if_possible(force=True)
        self._add({"op": "end", "key": _PARENT, "status": RunStatus.to_string(RunStatus.from_string(status)), "time": _now_ms()})
        deadline = time.monotonic() + self.final_retry_s
        while not self._flush(force=True):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(max(self._backoff, 0.5), left))
        if self._front_dirty:  # the store came back during the final retries
            self._publish_if_possible(force=True)
            self._flush(force=True)
        if self.pending:
            self._write_fallback()
            logger.warning(
                "MLflow store %s stayed unreachable: %d records written to %s; load them later with "
                "`python -m tntsearch.report --import %s`", self.tracking_uri, self.pending, self.fallback_path, self.fallback_path,
            )
            return self.fallback_path
        return None

    # -- internals -----------------------------------------------------------------------

    def _add(self, rec: dict[str, Any]) -> None:
        rec["seq"] = self._seq
        self._seq += 1
        self._records.append(rec)

    def _ensure_trial(self, trial: Any, restart: bool = False) -> dict[str, Any]:
        tid = str(trial.trial_id)
        st = self._trials.get(tid)
        if st is None:
            st = {"key": f"trial:{tid}", "name": str(trial), "status": "running", "metrics": {}, "pareto": False}
            self._trials[tid] = st
        elif not (restart and st["status"] != "running"):
            return st
        else:  # a finished trial that Tune runs again (restored experiment): same child run
            self._n_finished -= 1
        st["status"] = "running"
        self._add({
            "op": "start", "key": st["key"], "parent": _PARENT, "name": st["name"], "time": _now_ms(),
            "tags": {TAG_ROLE: "trial", TAG_TRIAL_ID: tid, TAG_STATUS: "running", TAG_PARETO: "false"},
        })
        return st

    def _finish(self, st: dict[str, Any], status: str, reason: str = "") -> None:
        st["status"] = status
        tags = {TAG_STATUS: status}
        if reason:
            st["reason"] = reason
            tags[TAG_REASON] = reason[:_MAX_TAG_LEN]
        step = int(st.get("epoch", 0))
        now = _now_ms()
        metrics = [["epochs_done", float(step), step, now]]
        if "best_val_top1" in st["metrics"]:
            metrics.append(["best_val_top1", st["metrics"]["best_val_top1"], step, now])
        if "time_total_s" in st:
            metrics.append(["time_total_s", st["time_total_s"], step, now])
        st["metrics"]["epochs_done"] = float(step)
        self._add({"op": "log", "key": st["key"], "metrics": metrics, "tags": tags})
        self._add({"op": "end", "key": st["key"], "status": "FAILED" if status == "failed" else "FINISHED", "time": now})
        self._n_finished += 1
        self._update_front()
        self._flush()
        self._maybe_publish()

    def _update_front(self) -> None:
        """Retag children whose front membership changed; log hypervolume and counts on the
        parent with step = number of finished trials (any outcome)."""
        rows = self.rows()
        fr = front_rows(rows)
        mask = pareto.front_mask(fr, self.objectives)
        on = {r["trial_id"] for r, m in zip(fr, mask) if m}
        for tid, st in self._trials.items():
            want = tid in on
            if want != bool(st.get("pareto")):
                st["pareto"] = want
                self._add({"op": "log", "key": st["key"], "tags": {TAG_PARETO: "true" if want else "false"}})
        s = self.summary()
        now, step = _now_ms(), self._n_finished
        metrics = [["hypervolume", s["hypervolume"], step, now], ["front_size", float(s["front"]), step, now]]
        metrics += [[f"trials_{k}", float(s[k]), step, now] for k in STATUSES]
        self._add({"op": "log", "key": _PARENT, "metrics": metrics})
        self._front_dirty = True

    def _sync_replayer_state(self) -> None:
        if self._replayer is not None:
            self._run_ids = self._replayer.run_ids
            self._experiment_id = self._replayer.experiment_id

    def _get_replayer(self) -> RecordReplayer:
        if self._replayer is None:
            self._replayer = RecordReplayer(MlflowClient(tracking_uri=self.tracking_uri), self._run_ids, self._experiment_id)
        return self._replayer

    def _flush(self, force: bool = False) -> bool:
        """Deliver pending records in order; True when none is left."""
        if not self.pending:
            return True
        if not force and time.monotonic() < self._next_attempt:
            return False
        with fail_fast_http(self.http_timeout_s):
            try:
                rep = self._get_replayer()
            except Exception as e:  # noqa: BLE001 - the store could not even be opened
                return self._delivery_failed(e, None)
            while self._records:
                rec = self._records[0]
                try:
                    rep.apply(rec)
                except Exception as e:  # noqa: BLE001 - classified below
                    if _is_transient(e) and not self._give_up_on(rec, e):
                        return self._delivery_failed(e, rec)
                    if rec["op"] == "resume":
                        raise ValueError(
                            f"`resume_parent_run_id` {rec['run_id']!r} cannot be resumed in {self.tracking_uri}: {e}"
                        ) from None
                    logger.warning("MLflow rejected a %s record for %s, dropped: %s", rec["op"], rec.get("key"), e)
                    self.dropped.append({"record": rec, "error": str(e)})
                self._records.popleft()
                self._delivered += 1
                self._record_failures = 0
                if rec["op"] == "resume":
                    self._adopt(rep.adopted)
        self._sync_replayer_state()
        if self._outage_logged:
            logger.warning("MLflow store %s reachable again; all records delivered", self.tracking_uri)
        self._backoff, self._next_attempt, self._outage_logged = 0.0, 0.0, False
        if self._fallback_written:
            self.fallback_path.unlink(missing_ok=True)
            self._fallback_written = False
        return True

    def _give_up_on(self, rec: dict[str, Any], e: BaseException) -> bool:
        """A record that keeps failing while the store answers is bad, not unlucky."""
        self._record_failures += 1
        if self._record_failures < 5:
            return False
        try:
            self._get_replayer().client.search_experiments(max_results=1)
        except Exception:  # noqa: BLE001 - store down: keep the record
            return False
        return True

    def _delivery_failed(self, e: BaseException, rec: dict[str, Any] | None) -> bool:
        self._sync_replayer_state()
        self._backoff = min(max(2 * self._backoff, 1.0), self.max_backoff_s)
        self._next_attempt = time.monotonic() + self._backoff
        if not self._outage_logged:
            logger.warning("MLflow store %s unreachable (%s); buffering records and retrying", self.tracking_uri,
                           str(e).splitlines()[0][:300] if str(e) else type(e).__name__)
            self._outage_logged = True
        self._write_fallback()
        return False

    def _adopt(self, runs: list[Any]) -> None:
        """Bring the children of a resumed parent into the in-memory front."""
        for run in runs:
            row = trial_row(run)
            tid = row["trial_id"]
            if not tid or tid in self._trials:
                continue
            self._trials[tid] = {
                "key": f"trial:{tid}", "name": row["name"], "status": row["status"], "metrics": row["metrics"],
                "pareto": row["pareto"], "arch": row["arch"], "baseline": row["baseline"], "reason": row["reason"],
                "epoch": int(row["metrics"].get("epochs_done", 0)), "n_results": 1,
            }
            if row["status"] != "running":
                self._n_finished += 1
        if runs:
            self._update_front()

    def _write_fallback(self) -> None:
        """The undelivered records, and the runs they refer to that the store already has
        (``run_ids``): with none, the file can be replayed into any store; otherwise into the
        store the search used (see ``tntsearch.report.import_fallback``)."""
        self._sync_replayer_state()
        header = {
            "format": FALLBACK_FORMAT, "version": 1, "tracking_uri": self.tracking_uri, "experiment": self.experiment,
            "objectives": [o.to_list() for o in self.objectives], "run_ids": self._run_ids, "delivered": self._delivered,
            "written_at": datetime.now(timezone.utc).isoformat(),
        }
        self.fallback_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.fallback_path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(header) + "\n")
            for rec in self._records:
                f.write(json.dumps(rec, default=str) + "\n")
        os.replace(tmp, self.fallback_path)
        self._fallback_written = True

    def _maybe_publish(self) -> None:
        if self._front_dirty and time.monotonic() - self._last_publish >= self.plot_every_s:
            self._publish_if_possible()

    def _publish_if_possible(self, force: bool = False) -> None:
        """Pictures are derived data, not records: they are only drawn when the store is
        reachable (and rebuilt by ``tntsearch.report`` after a fallback import)."""
        if not (self._front_dirty or force) or not self._flush(force=force):
            return
        parent = self._run_ids.get(_PARENT)
        if parent is None:
            return
        try:
            with fail_fast_http(self.http_timeout_s):
                publish_front(self._get_replayer().client, parent, self.rows(), self.objectives, title=self.run_name)
        except Exception as e:  # noqa: BLE001
            if not _is_transient(e):
                raise
            logger.warning("could not upload the Pareto plots yet: %s", str(e).splitlines()[0][:300])
            return
        self._front_dirty = False
        self._last_publish = time.monotonic()


def _violated(result: Mapping[str, Any]) -> str:
    """``"max_macs +25%, min_throughput +3%"`` from the search's ``constraint_*`` values."""
    parts = []
    for k, v in result.items():
        f = _finite(v)
        if k.startswith(CONSTRAINT_PREFIX) and f is not None and f > 0:
            parts.append(f"{k[len(CONSTRAINT_PREFIX):]} +{100 * f:.3g}%")
    return ", ".join(parts)


def trial_outcome(last: Mapping[str, Any] | None, epochs: int, errored: bool = False) -> str:
    """completed | stopped_early | infeasible | failed, from a finished trial's last result:
    a feasible trial that ended before ``epochs`` was stopped by the scheduler."""
    if errored or not last:
        return "failed"
    if float(last.get("feasible", 1.0)) != 1.0:
        return "infeasible"
    return "completed" if last.get("epoch", 0) >= epochs else "stopped_early"


def trial_error(trial: Any) -> tuple[str, str]:
    """(one-line reason, full text) of a failed trial's last error.

    Read from the trial's local error files (written by ``Trial.handle_error`` just before
    the callback runs); ``Trial.get_error()`` reads the synced storage copy, which may not
    exist yet at this point.
    """
    import cloudpickle

    exc, text = None, ""
    with contextlib.suppress(Exception):
        if trial.pickled_error_file and os.path.exists(trial.pickled_error_file):
            with open(trial.pickled_error_file, "rb") as f:
                exc = cloudpickle.load(f)
    with contextlib.suppress(Exception):
        if trial.error_file and os.path.exists(trial.error_file):
            text = Path(trial.error_file).read_text(errors="replace")
    cause = getattr(exc, "cause", None) or exc
    if cause is not None and not type(cause).__name__.startswith("RayTaskError"):
        reason = f"{type(cause).__name__}: {cause}".splitlines()[0]
    else:
        lines = [ln.strip() for ln in str(text or exc or "").splitlines() if ln.strip()]
        reason = lines[-1] if lines else "unknown error"
    return reason[:1000], text
