"""Delivering the tracker's records to MLflow: in order, retried, never dropped silently.

Every write the tracker makes is a small JSON-able *record* (see :class:`RecordReplayer`)
appended to an in-order log. :class:`Outbox` delivers them with an explicit
``MlflowClient``; on a transient failure (server down, HTTP 5xx/429, SQLite busy) delivery
stops, backs off, and is retried from the same record, so order is kept. While delivery
fails, the records are also kept in a JSONL *fallback file* (rewritten atomically, then
appended to; removed once everything got through). A record the store rejects for good
(HTTP 4xx, e.g. a param changing value, or one that keeps failing while the store
answers) is *undeliverable*: it and every later record of the same run (and of its
children) stay in the fallback file for good, and the caller is told (docs/tracking.md).

Delivery is idempotent: each record carries its tracker's ``session`` and ``seq``, and a
run remembers the last ``seq`` of each session applied to it (tag ``tntsearch.seq.<session>``,
written in the same request as the record where MLflow allows). Replaying a fallback file
twice, or records a restored search still held, skips what the store has already; runs
are found again by their key (tag ``tntsearch.run_key``). No Ray here: the Tune callback
(``callback.py``) feeds this.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tntsearch.tracking.schema import MAX_TAG_LEN, TAG_ORPHANED, TAG_ROLE, TAG_RUN_KEY, TAG_STATUS, TAG_TRIAL_ID
from tntsearch.tracking.store import fail_fast_http

__all__ = ["FALLBACK_FORMAT", "PARENT", "RecordReplayer", "Outbox", "search_children", "read_fallback", "is_transient"]

logger = logging.getLogger(__name__)

FALLBACK_FORMAT = "tntsearch-mlflow-fallback"
PARENT = "parent"  # the parent run's key; trials are "trial:<id>"
_TAG_SEQ = "tntsearch.seq."  # + session: the last seq of that session applied to the run
_GIVE_UP_AFTER = 5  # failures of one record while the store answers other requests


def is_transient(e: BaseException) -> bool:
    """Worth retrying later: unreachable server, HTTP 5xx or 429, a busy/locked database."""
    if isinstance(e, MlflowException):
        code = e.get_http_status_code()
        return code >= 500 or code == 429
    if isinstance(e, (OSError, TimeoutError)):  # requests' errors are OSErrors
        return True
    return type(e).__name__ in ("OperationalError", "DBAPIError")


class RecordReplayer:
    """Applies tracker records to one store, in order, each at most once.

    Runs are named by the tracker's keys (``"parent"``, ``"trial:<id>"``); ``run_ids`` maps
    each key to the MLflow run created for it. Kinds of record (all JSON-able):
    ``experiment`` (get or create), ``start`` (create a run, or reopen a known one),
    ``resume`` (adopt an existing parent and its children), ``reconcile`` (make the
    parent's children agree with the trials Tune restored), ``log`` (metrics, params, tags),
    ``text`` (a text artifact), ``end`` (terminate a run). Replaying a record twice is
    harmless: a ``start`` finds the run its ``tntsearch.run_key`` tag names, and a record
    with ``session`` and ``seq`` that its run already holds is skipped (:attr:`skipped`
    counts them).
    """

    def __init__(self, client: MlflowClient, run_ids: Mapping[str, str] | None = None, experiment_id: str | None = None,
                 uid: str | None = None):
        self.client = client
        self.run_ids: dict[str, str] = dict(run_ids or {})
        self.experiment_id = experiment_id
        self.uid = uid
        self.adopted: list[Any] = []  # child runs found by a ``resume`` record
        self.reconciled: dict[str, int] = {}  # trial id -> last epoch MLflow holds, from ``reconcile``
        self.skipped = 0
        self._applied: dict[tuple[str, str], int] = {}  # (key, session) -> last seq the store holds
        self._seq_tags: dict[str, str] = {}  # what the record being applied writes on its run

    def apply(self, rec: Mapping[str, Any]) -> None:
        key, session = rec.get("key"), rec.get("session")
        self._seq_tags = {}
        if key is not None and session is not None:  # others (experiment, resume, reconcile) are idempotent themselves
            if self._last_applied(key, session) >= rec["seq"]:
                self.skipped += 1
                return
            self._seq_tags = {_TAG_SEQ + session: str(rec["seq"])}
        getattr(self, "_" + rec["op"])(rec)
        if self._seq_tags:
            self._applied[key, session] = rec["seq"]

    def _last_applied(self, key: str, session: str) -> int:
        if (key, session) not in self._applied:
            run_id = self._run_id(key)
            seq = self.client.get_run(run_id).data.tags.get(_TAG_SEQ + session) if run_id else None
            self._applied[key, session] = int(seq) if seq else -1
        return self._applied[key, session]

    def _run_id(self, key: str) -> str | None:
        """The run of ``key``: known, or found by its ``tntsearch.run_key`` tag (delivered
        before, replayed from an older snapshot or a fallback file)."""
        if key not in self.run_ids and self.uid and self.experiment_id:
            found = self.client.search_runs([self.experiment_id], f"tags.`{TAG_RUN_KEY}` = '{self.uid}/{key}'", max_results=1)
            if found:
                self.run_ids[key] = found[0].info.run_id
        return self.run_ids.get(key)

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
        tags = {**rec.get("tags", {}), **self._seq_tags}
        key = rec["key"]
        run_id = self._run_id(key)
        if run_id is not None:  # a trial restarted after a driver restore: same run
            self.client.update_run(run_id, status="RUNNING")
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)
            return
        if rec.get("parent"):
            tags["mlflow.parentRunId"] = self.run_ids[rec["parent"]]
        run = self.client.create_run(self.experiment_id, start_time=rec.get("time"), tags=tags, run_name=rec.get("name"))
        self.run_ids[key] = run.info.run_id

    def _resume(self, rec: Mapping[str, Any]) -> None:
        parent = self.client.get_run(rec["run_id"])
        self.experiment_id = parent.info.experiment_id
        self.run_ids[PARENT] = parent.info.run_id
        self.client.update_run(parent.info.run_id, status="RUNNING")
        children = search_children(self.client, parent.info.experiment_id, parent.info.run_id)
        for run in children:
            tid = run.data.tags.get(TAG_TRIAL_ID)
            if tid:
                self.run_ids.setdefault(f"trial:{tid}", run.info.run_id)
        self.adopted = children

    def _reconcile(self, rec: Mapping[str, Any]) -> None:
        """After Tune restored a search from its last snapshot: a child whose trial Tune
        forgot (it began after the snapshot) is tagged orphaned and ended KILLED; the others
        run again (RUNNING), and the last epoch each already logged is kept in ``reconciled``."""
        parent = self.run_ids[PARENT]
        self.client.update_run(parent, status="RUNNING")
        keep = set(rec["trials"])
        for run in search_children(self.client, self.experiment_id, parent):
            tid = run.data.tags.get(TAG_TRIAL_ID, "")
            if tid not in keep:
                self.client.log_batch(run.info.run_id, tags=[RunTag(TAG_ORPHANED, "true"), RunTag(TAG_STATUS, "orphaned")])
                self.client.set_terminated(run.info.run_id, status="KILLED")
                continue
            self.run_ids.setdefault(f"trial:{tid}", run.info.run_id)
            if run.info.status == "KILLED":  # interrupted by Ctrl-C/SIGTERM, resumed now
                self.client.update_run(run.info.run_id, status="RUNNING")
            history = self.client.get_metric_history(run.info.run_id, "val_top1")
            self.reconciled[tid] = max((int(m.step) for m in history), default=0)

    def _log(self, rec: Mapping[str, Any]) -> None:
        run_id = self.run_ids[rec["key"]]
        metrics = [Metric(k, float(v), int(ts), int(step)) for k, v, step, ts in rec.get("metrics", [])]
        params = [Param(k, str(v)) for k, v in rec.get("params", {}).items()]
        tags = [RunTag(k, str(v)[:MAX_TAG_LEN]) for k, v in {**rec.get("tags", {}), **self._seq_tags}.items()]
        self.client.log_batch(run_id, metrics=metrics, params=params, tags=tags, synchronous=True)

    def _text(self, rec: Mapping[str, Any]) -> None:
        run_id = self.run_ids[rec["key"]]
        self.client.log_text(run_id, rec["text"], rec["artifact_file"])
        for k, v in self._seq_tags.items():  # after: a failure in between repeats a harmless write
            self.client.set_tag(run_id, k, v)

    def _end(self, rec: Mapping[str, Any]) -> None:
        run_id = self.run_ids[rec["key"]]
        self.client.set_terminated(run_id, status=rec["status"], end_time=rec.get("time"))
        for k, v in self._seq_tags.items():  # after: a failure in between repeats a harmless write
            self.client.set_tag(run_id, k, v)


def search_children(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[Any]:
    """Every child run of a parent (all pages), but orphans (``tntsearch.orphaned``): runs
    of trials Tune forgot are no part of the search; nor is a supernet mode search's nested
    supernet training run (``tntsearch.role`` = ``supernet``)."""
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=1000, page_token=token
        )
        runs.extend(r for r in page if r.data.tags.get(TAG_ORPHANED) != "true" and r.data.tags.get(TAG_ROLE) != "supernet")
        token = page.token
        if not token:
            return runs


def read_fallback(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Header and records of a fallback file written by :class:`Outbox`."""
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


class Outbox:
    """The in-order log of records not yet delivered to ``tracking_uri``.

    Args:
        tracking_uri: the store (absolute).
        fallback_path: where undelivered records are kept while delivery fails, and
            undeliverable ones for good.
        meta: more fields for the fallback file's header (experiment, objectives).
        http_timeout_s: per-request timeout towards a tracking server.
        max_backoff_s: the longest pause between delivery attempts during an outage.
    """

    def __init__(self, tracking_uri: str, fallback_path: str | os.PathLike[str], *, meta: Mapping[str, Any] | None = None,
                 http_timeout_s: int = 10, max_backoff_s: float = 60.0):
        self.tracking_uri = tracking_uri
        self.fallback_path = Path(fallback_path)
        self.meta = dict(meta or {})
        self.http_timeout_s = int(http_timeout_s)
        self.max_backoff_s = float(max_backoff_s)
        self.uid = uuid.uuid4().hex  # names this search's runs (TAG_RUN_KEY); pickled with the tracker
        self.session = uuid.uuid4().hex[:8]  # new after a restore: its seqs may repeat the lost ones
        self.records: deque[dict[str, Any]] = deque()  # not yet delivered, in order
        self.undeliverable: list[dict[str, Any]] = []  # rejected for good, and the rest of their runs
        self.rejected: dict[str, str] = {}  # run key ("*": all) -> why its records are undeliverable
        self.delivered = 0  # how many were delivered (records are then forgotten)
        self.seq = 0
        self.run_ids: dict[str, str] = {}
        self.experiment_id: str | None = None
        self.adopted: list[Any] = []  # children of a resumed parent, for the caller to take
        self.reconciled: dict[str, int] = {}  # trial id -> last epoch MLflow holds, for the caller to take
        self._replayer: RecordReplayer | None = None
        self._backoff = 0.0
        self._next_attempt = 0.0
        self._record_failures = 0
        self._outage = False  # delivery is failing: new records are appended to the file too
        self._fallback_written = False

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_replayer"] = None  # holds a client with a DB engine or HTTP session
        return state

    def get_state(self) -> dict[str, Any]:
        """What a restored search needs to go on (Tune experiment checkpoints)."""
        self._sync()
        return {"records": list(self.records), "undeliverable": list(self.undeliverable), "rejected": dict(self.rejected),
                "delivered": self.delivered, "seq": self.seq, "uid": self.uid, "run_ids": dict(self.run_ids),
                "experiment_id": self.experiment_id}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Go on from ``get_state``; then take the fallback file's records, which may be newer."""
        self.records = deque(state["records"])
        self.undeliverable = list(state.get("undeliverable", []))
        self.rejected = dict(state.get("rejected", {}))
        self.delivered = int(state["delivered"])
        self.seq = int(state.get("seq", self.delivered + len(self.records)))
        self.uid = state.get("uid", self.uid)
        self.session = uuid.uuid4().hex[:8]
        self.run_ids = dict(state["run_ids"])
        self.experiment_id = state.get("experiment_id")
        self._replayer = None
        if self.fallback_path.is_file():  # this search's own file: it goes once delivered
            self.absorb(self.fallback_path)
            self._fallback_written = True

    def absorb(self, path: str | os.PathLike[str]) -> int:
        """Queue a fallback file's records ahead of those pending here (duplicates once):
        records written by an earlier driver of this search, or a file to import. Records
        the store has already are skipped on delivery. Returns how many were queued."""
        header, records = read_fallback(path)
        if header.get("uid"):
            self.uid = header["uid"]
        for k, v in (header.get("run_ids") or {}).items():
            self.run_ids.setdefault(k, v)
        seen = {(r.get("session"), r["seq"]) for r in records}
        self.records = deque([*records, *(r for r in self.records if (r.get("session"), r["seq"]) not in seen)])
        self.undeliverable = [r for r in self.undeliverable if (r.get("session"), r["seq"]) not in seen]
        self.rejected.clear()  # their records are queued again: maybe the store takes them now
        self.seq = max([self.seq, *(r["seq"] + 1 for r in records)])
        self._replayer = None
        return len(records)

    @property
    def pending(self) -> int:
        """Records not yet delivered (being retried)."""
        return len(self.records)

    @property
    def skipped(self) -> int:
        """Records found in the store already (a replay), not written again."""
        return self._replayer.skipped if self._replayer is not None else 0

    @property
    def client(self) -> MlflowClient:
        return self._get_replayer().client

    def add(self, rec: dict[str, Any]) -> None:
        if rec["op"] == "start":
            rec["tags"] = {**rec.get("tags", {}), TAG_RUN_KEY: f"{self.uid}/{rec['key']}"}
        rec["seq"], rec["session"] = self.seq, self.session
        self.seq += 1
        self.records.append(rec)
        if self._outage and self._fallback_written:  # the file stays whole between rewrites: a driver may die
            with open(self.fallback_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec, default=str) + "\n")

    def flush(self, force: bool = False) -> bool:
        """Deliver pending records in order; True when none is left to retry. Without
        ``force``, nothing is tried before the back-off after a failure has passed."""
        if not self.records:
            return True
        if not force and time.monotonic() < self._next_attempt:
            return False
        with fail_fast_http(self.http_timeout_s):
            try:
                rep = self._get_replayer()
            except Exception as e:  # noqa: BLE001 - the store could not even be opened
                return self._failed(e)
            changed = False
            while self.records:
                rec = self.records[0]
                if not self._blocked(rec):
                    try:
                        rep.apply(rec)
                    except Exception as e:  # noqa: BLE001 - classified below
                        if is_transient(e) and not self._give_up_on(e):
                            return self._failed(e)
                        if rec["op"] == "resume":
                            raise ValueError(
                                f"`resume_parent_run_id` {rec['run_id']!r} cannot be resumed in {self.tracking_uri}: {e}"
                            ) from None
                        self._reject(rec, e)
                if self._blocked(rec):
                    self.undeliverable.append(rec)
                    changed = True
                else:
                    self.delivered += 1
                self.records.popleft()
                self._record_failures = 0
                if rec["op"] == "resume":
                    self.adopted = rep.adopted
                if rec["op"] == "reconcile":
                    self.reconciled, rep.reconciled = rep.reconciled, {}
        self._sync()
        was_outage = self._outage
        if was_outage:
            logger.warning("MLflow store %s reachable again; %s", self.tracking_uri,
                           f"records it refused stay in {self.fallback_path}" if self.undeliverable
                           else "all records delivered")
        self._backoff, self._next_attempt, self._outage = 0.0, 0.0, False
        if self.undeliverable:
            if changed or was_outage or not self._fallback_written:
                self.write_fallback()
        elif self._fallback_written:
            self.fallback_path.unlink(missing_ok=True)
            self._fallback_written = False
        return True

    def drain(self, timeout_s: float) -> bool:
        """Keep delivering for up to ``timeout_s``; True when nothing is left to retry."""
        deadline = time.monotonic() + timeout_s
        while not self.flush(force=True):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(max(self._backoff, 0.5), left))
        return True

    def write_fallback(self) -> None:
        """Undeliverable and undelivered records, in order, and the runs they refer to that
        the store already has (``run_ids``): with none, the file can be replayed into any
        store; otherwise into the store the search used (``tntsearch.report --import``)."""
        self._sync()
        header = {
            "format": FALLBACK_FORMAT, "version": 2, "tracking_uri": self.tracking_uri, **self.meta, "uid": self.uid,
            "run_ids": self.run_ids, "delivered": self.delivered, "rejected": self.rejected,
            "written_at": datetime.now(timezone.utc).isoformat(),
        }
        self.fallback_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.fallback_path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(header) + "\n")
            for rec in sorted([*self.undeliverable, *self.records], key=lambda r: r["seq"]):
                f.write(json.dumps(rec, default=str) + "\n")
        os.replace(tmp, self.fallback_path)
        self._fallback_written = True

    def _blocked(self, rec: Mapping[str, Any]) -> bool:
        """A record of a run whose records the store rejected (or a child of such a run)."""
        if not self.rejected:
            return False
        key, parent = rec.get("key"), rec.get("parent")
        if key in self.rejected or "*" in self.rejected or parent in self.rejected:
            self.rejected.setdefault(key or "*", self.rejected.get(parent or "*", ""))
            return True
        return False

    def _reject(self, rec: Mapping[str, Any], e: BaseException) -> None:
        key = rec.get("key") or "*"  # an experiment the store refuses: nothing can follow
        reason = f"{rec['op']} record refused: {str(e).splitlines()[0][:300] if str(e) else type(e).__name__}"
        self.rejected[key] = reason
        logger.warning("MLflow store %s %s; the records of %s go to %s", self.tracking_uri, reason,
                       "the search" if key in ("*", PARENT) else key, self.fallback_path)

    def _sync(self) -> None:
        if self._replayer is not None:
            self.run_ids = self._replayer.run_ids
            self.experiment_id = self._replayer.experiment_id

    def _get_replayer(self) -> RecordReplayer:
        if self._replayer is None:
            client = MlflowClient(tracking_uri=self.tracking_uri)
            self._replayer = RecordReplayer(client, self.run_ids, self.experiment_id, uid=self.uid)
        return self._replayer

    def _give_up_on(self, e: BaseException) -> bool:
        """A record that keeps failing while the store answers is bad, not unlucky."""
        self._record_failures += 1
        if self._record_failures < _GIVE_UP_AFTER:
            return False
        try:
            self._get_replayer().client.search_experiments(max_results=1)
        except Exception:  # noqa: BLE001 - store down: keep the record
            return False
        return True

    def _failed(self, e: BaseException) -> bool:
        self._sync()
        self._backoff = min(max(2 * self._backoff, 1.0), self.max_backoff_s)
        self._next_attempt = time.monotonic() + self._backoff
        if not self._outage:
            logger.warning("MLflow store %s unreachable (%s); buffering records and retrying", self.tracking_uri,
                           str(e).splitlines()[0][:300] if str(e) else type(e).__name__)
            self._outage = True
        self.write_fallback()
        return False
