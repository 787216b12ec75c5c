"""The Ray Tune callback that logs a search to MLflow: one parent run per search, one
nested child run per trial, and the Pareto front's pictures on the parent.

Everything is logged from the Tune driver: results from every node reach the driver
anyway, a single writer cannot race itself, and trial processes never open the tracking
store. That makes the embedded SQLite store safe (its schema is created once, in the
driver, by ``store.prepare_store``, before anything logs) and keeps worker images free of
MLflow state. Delivery (order, retries, the fallback file) is ``outbox.Outbox``'s job;
outcomes and the front are ``trials.TrialTable``'s.

Why not ``ray.air.integrations.mlflow.MLflowLoggerCallback`` (Ray 2.60)? It creates flat runs
(no parent), logs ``trial.config`` and every result key as-is, drives MLflow through the
process-global ``mlflow`` module, records no failure reason, and loses records when the
server is unreachable (docs/tracking.md).
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from ray.tune import Callback
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

from tntsearch import pareto, plots
from tntsearch.tracking.outbox import PARENT, Outbox, is_transient
from tntsearch.tracking.schema import (
    MAX_PARAM_LEN,
    MAX_TAG_LEN,
    MAX_TEXT,
    PARAM_EPOCHS,
    PARAM_OBJECTIVES,
    TAG_ROLE,
    as_chosen,
    flatten_params,
    front_rows,
    now_ms,
    trial_error,
)
from tntsearch.tracking.store import default_artifact_location, fail_fast_http, sqlite_path
from tntsearch.tracking.trials import CandidateTable, TrialTable

__all__ = ["MlflowTracker", "publish_front"]

logger = logging.getLogger(__name__)


def publish_front(
    client: MlflowClient,
    parent_run_id: str,
    rows: list[Mapping[str, Any]],
    objectives: Iterable[Any],
    title: str = "",
    front: list[Mapping[str, Any]] | None = None,
) -> None:
    """Log the front's pictures (one PNG per accuracy/cost pair), its interactive page
    (``pareto/front.html``) and table (``pareto/front.json``) on the parent run. The front is
    ``front`` (a tracker's own), else the one the search chose among ``rows`` (``as_chosen``);
    its hypervolume is of the figures shown."""
    objs = pareto.as_objectives(objectives)
    rows = front_rows(rows)
    if front is None:
        mask = pareto.front_mask(as_chosen(rows), objs)
        front = [r for r, m in zip(rows, mask) if m]
    front = [dict(r) for r in front]
    hv = pareto.front_hypervolume(front, objs)
    ids = {r["trial_id"] for r in front}
    with tempfile.TemporaryDirectory(prefix="tntsearch-front-") as tmp:
        plots.write_front_pngs(rows, objs, tmp, title=title, front=ids)
        plots.write_front_html(rows, objs, Path(tmp) / "front.html", title=title, hypervolume_value=hv, front=ids)
        table = {
            "objectives": [o.to_list() for o in objs],
            "hypervolume": hv,
            "front": front,
        }
        (Path(tmp) / "front.json").write_text(json.dumps(table, indent=1, default=str))
        client.log_artifacts(parent_run_id, tmp, artifact_path="pareto")


def _git_commit(where: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _checkpoint_uri(trial: Any, path: str) -> str:
    """Ray names a checkpoint by its path inside the storage's filesystem; the storage's
    scheme makes it a URI that Ray's ``Checkpoint`` opens from anywhere (s3://...)."""
    kind = trial.storage.storage_filesystem.type_name
    return path if kind == "local" else f"{ {'gcs': 'gs'}.get(kind, kind)}://{path}"


class MlflowTracker(Callback):
    """Logs a Ray Tune search to MLflow from the driver (see the module docstring).

    Args:
        tracking_uri: an absolute URI (``resolve_tracking_uri``); for SQLite call
            ``prepare_store`` first.
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
            beside the SQLite file, or in the current directory for a server). Put it in
            the search's own folder: a restored tracker takes the records it finds there.
        final_retry_s: how long :meth:`close` keeps retrying before writing the fallback.
        http_timeout_s: per-request timeout towards a tracking server.
        max_backoff_s: the longest pause between delivery attempts during an outage.
        candidates: supernet mode (``trials.CandidateTable``): no child run per trial; every
            trial is a row of the parent's ``candidates.json``, written at most every
            ``plot_every_s`` and at the end; when the search finishes, the front's points
            and the baselines become child runs carrying ``child_tags``, their ``val_*``
            figures replaced by ``rescore(rows)`` (trial id -> metrics; a picklable callable:
            Tune saves the tracker with the search).
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
        candidates: bool = False,
        rescore: Any = None,
        child_tags: Mapping[str, str] | None = None,
    ):
        if not tracking_uri:
            raise ValueError("`tracking_uri` is required; use resolve_tracking_uri(None, workdir) for the embedded store")
        db = sqlite_path(tracking_uri)
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
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        default_dir = db.parent if db is not None else Path.cwd()
        self.outbox = Outbox(
            tracking_uri, Path(fallback_path or default_dir / f"mlflow-pending-{stamp}.jsonl").resolve(),
            meta={"experiment": experiment, "objectives": [o.to_list() for o in self.objectives]},
            http_timeout_s=http_timeout_s, max_backoff_s=max_backoff_s,
        )
        self.candidates = bool(candidates)
        self.rescore = rescore
        if self.candidates:
            self.table: TrialTable = CandidateTable(self.objectives, self.epochs, self.outbox.add, child_tags)
        else:
            self.table = TrialTable(self.objectives, self.epochs, self.outbox.add)
        self._started = False
        self._closed = False
        self._reconcile = False
        self._num_samples: int | None = None
        self._front_dirty = False
        self._last_publish = -math.inf

    # -- Tune experiment checkpoints -------------------------------------------------------

    def get_state(self) -> dict[str, Any] | None:
        return {**self.outbox.get_state(), "trials": self.table.trials, "n_finished": self.table.n_finished}

    def set_state(self, state: dict[str, Any]) -> None:
        self.outbox.set_state(state)
        self.table.trials = dict(state["trials"])
        self.table.n_finished = int(state["n_finished"])
        self._started = True
        self._closed = False
        # NOTE: the state is Tune's last snapshot, MLflow may be ahead of it (a killed
        # driver): on the first step, MLflow is made to agree with the trials Tune restored.
        self._reconcile = True

    # -- public read side --------------------------------------------------------------

    @property
    def fallback_path(self) -> Path:
        return self.outbox.fallback_path

    @property
    def undeliverable(self) -> list[dict[str, Any]]:
        """Records the store rejected for good, and the later ones of their runs (all in
        the fallback file; ``outbox.rejected`` says why)."""
        return self.outbox.undeliverable

    @property
    def parent_run_id(self) -> str | None:
        """The parent run's id, once the store has it (``None`` while it is unreachable)."""
        self.outbox._sync()
        return self.outbox.run_ids.get(PARENT)

    @property
    def pending(self) -> int:
        """Records not yet delivered to the store."""
        return self.outbox.pending

    def rows(self) -> list[dict[str, Any]]:
        """Every trial seen so far, as ``trial_row`` dicts (``run_id`` may be ``None``
        while the store is unreachable)."""
        self.outbox._sync()
        return self.table.rows(self.outbox.run_ids)

    def front(self) -> list[dict[str, Any]]:
        """The current Pareto front (same dicts as :meth:`rows`)."""
        self.outbox._sync()
        return self.table.front(self.outbox.run_ids)

    def summary(self) -> dict[str, Any]:
        """Counts by status, front size, hypervolume and undelivered records: for a progress display."""
        return {**self.table.summary(), "pending_records": self.pending}

    # -- Tune hooks ----------------------------------------------------------------------

    def setup(self, *args: Any, **info: Any) -> None:
        """Queue the parent run (once, even if called again) and try to deliver it."""
        self._num_samples = info.get("total_num_samples")  # also when restored
        if self._started:
            return
        self._started = True
        add = self.outbox.add
        add({"op": "experiment", "name": self.experiment, "artifact_location": default_artifact_location(self.tracking_uri)})
        tags = {TAG_ROLE: "search"}
        commit = _git_commit(self.spec_path.parent if self.spec_path else Path.cwd())
        if commit:
            tags["mlflow.source.git.commit"] = commit
        if self.spec_path:
            tags["tntsearch.spec_path"] = str(self.spec_path)
        if self.resume_parent_run_id:
            add({"op": "resume", "run_id": self.resume_parent_run_id})
            add({"op": "log", "key": PARENT, "tags": {**tags, "tntsearch.resumed_at": str(now_ms())}})
        else:
            add({"op": "start", "key": PARENT, "parent": None, "name": self.run_name, "tags": tags, "time": now_ms()})
            params = flatten_params(self.spec_dict)
            params.update({k: str(v)[:MAX_PARAM_LEN] for k, v in flatten_params(self.extra_params).items()})
            params[PARAM_OBJECTIVES] = json.dumps([o.to_list() for o in self.objectives])
            params[PARAM_EPOCHS] = str(self.epochs)
            add({"op": "log", "key": PARENT, "params": params})
            if self.spec_dict:
                add({"op": "text", "key": PARENT, "artifact_file": "spec/spec.json",
                     "text": json.dumps(self.spec_dict, indent=2, default=str)})
            if self.spec_path and self.spec_path.is_file():
                add({"op": "text", "key": PARENT, "artifact_file": f"spec/{self.spec_path.name}",
                     "text": self.spec_path.read_text(encoding="utf-8", errors="replace")[:MAX_TEXT]})
        self._flush()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.table.ensure(trial, restart=True)
        self._flush()

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self._reconcile:
            self._reconcile = False
            self.outbox.add({"op": "reconcile", "trials": [str(t.trial_id) for t in trials]})
            self._flush()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        path = result.get(CHECKPOINT_PATH_KEY)
        self.table.result(trial, result, checkpoint_uri=_checkpoint_uri(trial, path) if path else None)
        self._flush()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.table.complete(trial)
        self._finished()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        st = self.table.ensure(trial)
        reason, text = trial_error(trial)
        if text:
            self.outbox.add({"op": "text", "key": st["key"], "artifact_file": "error.txt", "text": text[-MAX_TEXT:]})
        self.table.finish(st, "failed", reason=reason)
        self._finished()

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        st = self.table.ensure(trial)
        reason, _ = trial_error(trial)
        self.outbox.add({"op": "log", "key": st["key"], "tags": {"last_error": reason[:MAX_TAG_LEN],
                                                                 "num_failures": str(getattr(trial, "num_failures", ""))}})
        self._flush()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        # Only deliveries here: Tune runs this every loop step and warns when it is slow;
        # drawing the front (~1 s) waits for the next trial's end, or the search's.
        self._flush()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Fewer finished trials than the search's samples mean an interruption (Ctrl-C,
        SIGTERM; Tune has stopped the running ones and saved the state ``--resume`` goes on
        from): the parent and the running children end KILLED."""
        finished = sum(st["status"] != "running" for st in self.table.trials.values())
        if self._num_samples is not None and finished < self._num_samples:
            self.table.interrupt()
            self.close(status="KILLED")
        else:
            if self.candidates:
                self._finalize_candidates()
            self.close()

    def _finalize_candidates(self) -> None:
        """Supernet mode, the search finished: rescore the front and the baselines, give them child runs."""
        table = self.table
        rows = [r for r in table.front(self.outbox.run_ids)] + [r for r in self.rows() if r["baseline"]]
        wanted = {r["trial_id"]: r for r in rows if r["status"] in ("completed", "stopped_early")}
        rescored: dict[str, Any] = {}
        if self.rescore is not None and wanted:
            try:
                rescored = self.rescore(list(wanted.values()))
            except Exception as e:  # noqa: BLE001 - the records still go out, with the selection data's figures
                logger.warning("could not score the front on data.val (%s: %s)", type(e).__name__, e)
        table.finalize(rescored)
        self._front_dirty = True
        self._flush()

    def close(self, status: str = "FINISHED") -> Path | None:
        """End the parent run, publish the final front, deliver everything (retrying for up
        to ``final_retry_s``); return the fallback file if records are still undelivered or
        undeliverable (calling it again returns the same)."""
        if self._closed:
            return self.fallback_path if self.pending or self.undeliverable else None
        self._closed = True
        if not self._started:
            self.setup()
        self._publish_if_possible(force=True)
        self.outbox.add({"op": "end", "key": PARENT, "status": RunStatus.to_string(RunStatus.from_string(status)),
                         "time": now_ms()})
        self.outbox.drain(self.final_retry_s)
        self._take_adopted()
        if self._front_dirty:  # the store came back during the final retries
            self._publish_if_possible(force=True)
            self._flush(force=True)
        if self.pending:
            self.outbox.write_fallback()
            logger.warning("MLflow store %s stayed unreachable: %d records written to %s; load them later with "
                           "`python -m tntsearch.report --import %s`", self.tracking_uri, self.pending, self.fallback_path,
                           self.fallback_path)
        if self.undeliverable:
            logger.warning("MLflow store %s refused %d records (%s); they are in %s", self.tracking_uri,
                           len(self.undeliverable), "; ".join(self.outbox.rejected.values()), self.fallback_path)
        return self.fallback_path if self.pending or self.undeliverable else None

    # -- internals -----------------------------------------------------------------------

    def _finished(self) -> None:
        """A trial ended: the front changed."""
        self._front_dirty = True
        self._flush()
        self._maybe_publish()

    def _take_adopted(self) -> None:
        if self.outbox.adopted:
            runs, self.outbox.adopted = self.outbox.adopted, []
            self.table.adopt(runs)
            self._front_dirty = True

    def _flush(self, force: bool = False) -> bool:
        """Deliver pending records in order (the children of a resumed parent join the
        table as soon as the store named them); True when none is left."""
        done = self.outbox.flush(force=force)
        if self.outbox.reconciled:
            self.table.logged(self.outbox.reconciled)
            self.outbox.reconciled = {}
        if self.outbox.adopted:
            self._take_adopted()
            done = self.outbox.flush(force=force)
        return done

    def _maybe_publish(self) -> None:
        if self._front_dirty and time.monotonic() - self._last_publish >= self.plot_every_s:
            self._publish_if_possible()

    def _write_candidates(self) -> None:
        """Supernet mode: the parent's counts and ``candidates.json`` (every candidate once)."""
        table = self.table
        self.outbox.add(table.parent_metrics())
        self.outbox.add({"op": "text", "key": PARENT, "artifact_file": "candidates.json",
                         "text": json.dumps(table.candidates_table(), default=str)})
        self.outbox.add({"op": "log", "key": PARENT, "tags": {
            "mlflow.loggedArtifacts": json.dumps([{"path": "candidates.json", "type": "table"}])}})
        table.dirty = False

    def _publish_if_possible(self, force: bool = False) -> None:
        """Pictures are derived data, not records: they are only drawn when the store is
        reachable (and rebuilt by ``tntsearch.report`` after a fallback import)."""
        if self.candidates and (self.table.dirty or force):
            self._write_candidates()
        if not (self._front_dirty or force) or not self._flush(force=force):
            return
        parent = self.parent_run_id
        if parent is None:
            return
        try:
            with fail_fast_http(self.outbox.http_timeout_s):
                publish_front(self.outbox.client, parent, self.rows(), self.objectives, title=self.run_name,
                              front=self.front())
        except Exception as e:  # noqa: BLE001 - pictures never stop the search or its parent run
            reason = " ".join(str(e).split())[:300]  # matplotlib's messages start with a newline
            if is_transient(e):
                logger.warning("could not upload the Pareto plots yet: %s", reason)
                return
            # Drawing fails the same way next time: tried again when the front changes.
            logger.warning("could not draw the Pareto plots (%s: %s); `python -m tntsearch.report` redraws them",
                           type(e).__name__, reason)
        self._front_dirty = False
        self._last_publish = time.monotonic()

