"""The trial table: every trial of one search as the tracker sees it, its outcome, the
front over them, and the records (``outbox.RecordReplayer`` kinds) each change makes.

Outcomes are decided here only (docs/tracking.md lists them); the progress view and the
final summary read this table, so the terminal and MLflow never disagree.
"""
from __future__ import annotations

import json
import math
from typing import Any, Callable, Mapping

from tntsearch import pareto
from tntsearch.tracking.outbox import PARENT
from tntsearch.tracking.schema import (
    CONSTRAINT_PREFIX,
    COST_METRICS,
    EPOCH_METRICS,
    MAX_TAG_LEN,
    STATUSES,
    TAG_ARCH,
    TAG_BASELINE,
    TAG_CHECKPOINT_URI,
    TAG_INFEASIBLE,
    TAG_PARETO,
    TAG_REASON,
    TAG_ROLE,
    TAG_STATUS,
    TAG_TRIAL_ID,
    arch_params,
    finite,
    front_rows,
    now_ms,
    trial_outcome,
    trial_row,
    violated,
)

__all__ = ["TrialTable", "CandidateTable"]


class TrialTable:
    """Trials by Ray trial id; ``emit`` receives the records that bring MLflow up to date."""

    def __init__(self, objectives: Any, epochs: int, emit: Callable[[dict[str, Any]], None]):
        self.objectives = pareto.as_objectives(objectives)
        self.epochs = int(epochs)
        self.emit = emit
        self.trials: dict[str, dict[str, Any]] = {}
        self.n_finished = 0

    # -- read side -----------------------------------------------------------------------

    def rows(self, run_ids: Mapping[str, str]) -> list[dict[str, Any]]:
        """Every trial seen so far, as ``schema.trial_row`` dicts (``run_id`` from
        ``run_ids``, ``None`` while the store has not got the run)."""
        return [{
            "run_id": run_ids.get(st["key"]),
            "trial_id": tid,
            "name": st["name"],
            "status": st["status"],
            "reason": st.get("reason") or st.get("infeasible_reason", ""),
            "baseline": st.get("baseline", ""),
            "pareto": bool(st.get("pareto")),
            "arch": st.get("arch") or {},
            "metrics": dict(st["metrics"]),
        } for tid, st in self.trials.items()]

    def front(self, run_ids: Mapping[str, str]) -> list[dict[str, Any]]:
        """The current Pareto front (same dicts as :meth:`rows`)."""
        rows = front_rows(self.rows(run_ids))
        mask = pareto.front_mask(rows, self.objectives)
        return [r for r, m in zip(rows, mask) if m]

    def summary(self) -> dict[str, Any]:
        """Counts by status, front size and hypervolume."""
        rows = self.rows({})
        counts = {s: 0 for s in STATUSES}
        for r in rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        fr = front_rows(rows)
        return {
            **counts,
            "front": int(pareto.front_mask(fr, self.objectives).sum()),
            "hypervolume": pareto.front_hypervolume(fr, self.objectives),
        }

    # -- changes -------------------------------------------------------------------------

    def ensure(self, trial: Any, restart: bool = False) -> dict[str, Any]:
        """The trial's entry; a new one (or, with ``restart``, a finished one Tune runs
        again after a restore: same child run) starts its child run."""
        tid = str(trial.trial_id)
        st = self.trials.get(tid)
        if st is None:
            st = {"key": f"trial:{tid}", "name": str(trial), "status": "running", "metrics": {}, "pareto": False}
            self.trials[tid] = st
        elif not (restart and st["status"] != "running"):
            return st
        else:
            self.n_finished -= 1
        st["status"] = "running"
        self.emit({
            "op": "start", "key": st["key"], "parent": PARENT, "name": st["name"], "time": now_ms(),
            "tags": {TAG_ROLE: "trial", TAG_TRIAL_ID: tid, TAG_STATUS: "running", TAG_PARETO: "false"},
        })
        return st

    def result(self, trial: Any, result: Mapping[str, Any], checkpoint_uri: str | None = None) -> None:
        """One Tune result: the architecture and baseline once, costs when they change,
        training metrics at step = epoch (none for an infeasible trial, none for an epoch
        MLflow already holds: see :meth:`logged`), the checkpoint's URI when it moves."""
        st = self.ensure(trial)
        now = now_ms()
        log: dict[str, Any] = {"op": "log", "key": st["key"], "metrics": [], "params": {}, "tags": {}}
        arch = result.get("arch")
        if isinstance(arch, Mapping) and not st.get("arch"):
            st["arch"] = dict(arch)
            log["params"].update(arch_params(arch))
            log["tags"][TAG_ARCH] = json.dumps(arch, default=str)
        baseline = str(result.get("baseline") or "")
        if baseline and baseline != st.get("baseline") and any(o.get("baseline") == baseline for o in self.trials.values()):
            baseline = ""  # the sampler proposed a baseline's architecture again: the first trial stands for it
        if baseline != st.get("baseline", ""):
            st["baseline"] = baseline
            log["tags"][TAG_BASELINE] = baseline
        if checkpoint_uri and checkpoint_uri != st.get("checkpoint_uri"):
            st["checkpoint_uri"] = checkpoint_uri
            log["tags"][TAG_CHECKPOINT_URI] = checkpoint_uri
        epoch = int(result.get("epoch", 0) or 0)
        costs = [*COST_METRICS, *(k for k in result if k.startswith(CONSTRAINT_PREFIX))]
        for name in costs:
            value = finite(result.get(name))
            if value is not None and st["metrics"].get(name) != value:
                st["metrics"][name] = value
                log["metrics"].append([name, value, 0, now])
        if finite(result.get("feasible")) == 0.0:
            # NOTE: the search fills objectives an infeasible trial never measured with their
            # reference values (so the sampler has numbers); they are not measurements.
            reason = str(result.get("error") or "") or violated(result)
            if reason and st.get("infeasible_reason") != reason:
                st["infeasible_reason"] = reason
                log["tags"][TAG_INFEASIBLE] = reason[:MAX_TAG_LEN]
            training: tuple[str, ...] = ()
        else:
            training = (*EPOCH_METRICS, *(o.metric for o in self.objectives if o.metric not in COST_METRICS + EPOCH_METRICS))
        for name in training:
            value = finite(result.get(name))
            if value is not None:
                st["metrics"][name] = value
                if epoch > st.get("logged_epoch", 0):
                    log["metrics"].append([name, value, epoch, now])
        st["epoch"] = max(st.get("epoch", 0), epoch)
        st["n_results"] = st.get("n_results", 0) + 1
        if "val_top1" in st["metrics"]:
            best = max(st["metrics"].get("best_val_top1", -math.inf), st["metrics"]["val_top1"])
            st["metrics"]["best_val_top1"] = best
        if "time_total_s" in result and finite(result["time_total_s"]) is not None:
            st["time_total_s"] = float(result["time_total_s"])
        if log["metrics"] or log["params"] or log["tags"]:
            self.emit(log)

    def complete(self, trial: Any) -> None:
        """A trial that ended without an error: its outcome follows from its last result."""
        st = self.ensure(trial)
        last = {"feasible": st["metrics"].get("feasible", 1.0), "epoch": st.get("epoch", 0)} if st.get("n_results") else None
        status = trial_outcome(last, self.epochs)
        self.finish(st, status, reason="the trial ended before reporting any result" if status == "failed" else "")

    def finish(self, st: dict[str, Any], status: str, reason: str = "") -> None:
        """End a trial's child run with ``status``, then update the front."""
        st["status"] = status
        tags = {TAG_STATUS: status}
        if reason:
            st["reason"] = reason
            tags[TAG_REASON] = reason[:MAX_TAG_LEN]
        step = int(st.get("epoch", 0))
        now = now_ms()
        metrics = [["epochs_done", float(step), step, now]]
        if "best_val_top1" in st["metrics"]:
            metrics.append(["best_val_top1", st["metrics"]["best_val_top1"], step, now])
        if "time_total_s" in st:
            metrics.append(["time_total_s", st["time_total_s"], step, now])
        st["metrics"]["epochs_done"] = float(step)
        self.emit({"op": "log", "key": st["key"], "metrics": metrics, "tags": tags})
        self.emit({"op": "end", "key": st["key"], "status": "FAILED" if status == "failed" else "FINISHED", "time": now})
        self.n_finished += 1
        self.update_front()

    def update_front(self) -> None:
        """Retag children whose front membership changed; log hypervolume and counts on the
        parent with step = number of finished trials (any outcome)."""
        fr = front_rows(self.rows({}))
        mask = pareto.front_mask(fr, self.objectives)
        on = {r["trial_id"] for r, m in zip(fr, mask) if m}
        for tid, st in self.trials.items():
            want = tid in on
            if want != bool(st.get("pareto")):
                st["pareto"] = want
                self.emit({"op": "log", "key": st["key"], "tags": {TAG_PARETO: "true" if want else "false"}})
        self.emit(self.parent_metrics())

    def parent_metrics(self) -> dict[str, Any]:
        """The parent's record of hypervolume, front size and counts (:meth:`summary`), with
        step = number of finished trials (any outcome)."""
        s = self.summary()
        now, step = now_ms(), self.n_finished
        metrics = [["hypervolume", s["hypervolume"], step, now], ["front_size", float(s["front"]), step, now]]
        metrics += [[f"trials_{k}", float(s[k]), step, now] for k in STATUSES]
        return {"op": "log", "key": PARENT, "metrics": metrics}

    def logged(self, epochs: Mapping[str, int]) -> None:
        """The last epoch MLflow holds per trial (a restored search: Tune's snapshot may be
        older than MLflow); a rerun trial does not log those epochs again."""
        for tid, epoch in epochs.items():
            if tid in self.trials:
                self.trials[tid]["logged_epoch"] = max(self.trials[tid].get("logged_epoch", 0), int(epoch))

    def interrupt(self) -> None:
        """The search was interrupted: running trials' runs end KILLED (they go on at ``--resume``)."""
        for st in self.trials.values():
            if st["status"] == "running":
                self.emit({"op": "end", "key": st["key"], "status": "KILLED", "time": now_ms()})

    def adopt(self, runs: list[Any]) -> None:
        """Bring the children of a resumed parent (MLflow runs) into the table."""
        for run in runs:
            row = trial_row(run)
            tid = row["trial_id"]
            if not tid or tid in self.trials:
                continue
            self.trials[tid] = {
                "key": f"trial:{tid}", "name": row["name"], "status": row["status"], "metrics": row["metrics"],
                "pareto": row["pareto"], "arch": row["arch"], "baseline": row["baseline"], "reason": row["reason"],
                "epoch": int(row["metrics"].get("epochs_done", 0)), "n_results": 1,
            }
            if row["status"] != "running":
                self.n_finished += 1
        if runs:
            self.update_front()


class CandidateTable(TrialTable):
    """Supernet mode's table (``MlflowTracker(candidates=True)``): candidates are cheap and
    many, so they get no child run each. Every candidate is a row of ``candidates.json`` on
    the parent (:meth:`candidates_table`, written periodically); at the end, :meth:`finalize`
    gives the front's points and the baselines child runs, tagged as a trained search's are,
    with the figures the search's ``rescore`` measured on ``data.val`` as ``val_*`` and the
    selection data's scores as ``search_*``. Until then only the parent's records pass."""

    def __init__(self, objectives: Any, epochs: int, emit: Callable[[dict[str, Any]], None],
                 child_tags: Mapping[str, str] | None = None):
        self._out = emit
        self.child_tags = dict(child_tags or {})
        self.frozen = False  # finalize() ran: the front is the tagged one
        self.dirty = False  # a candidate finished since the last candidates.json
        super().__init__(objectives, epochs, self._filtered)

    def _filtered(self, rec: dict[str, Any]) -> None:
        key = rec.get("key")
        if key is None or key == PARENT or self.trials.get(key.removeprefix("trial:"), {}).get("promoted"):
            self._out(rec)

    def update_front(self) -> None:
        """Per candidate nothing is logged (the tracker writes the table and the parent's
        counts now and then: :meth:`parent_metrics`)."""
        self.dirty = True

    def front(self, run_ids: Mapping[str, str]) -> list[dict[str, Any]]:
        """The front over distinct architectures: NSGA-II proposes an architecture again as
        its population converges, and a repeat is the same point (its first trial stands for it);
        so is another config of the same network (``TNTConfig.network_key``)."""
        from tntsearch.model import TNTConfig  # torch: not for the tracker's light users

        if self.frozen:
            return [r for r in self.rows(run_ids) if r["pareto"]]
        seen: set[str] = set()
        rows = []
        for r in front_rows(self.rows(run_ids)):
            key = TNTConfig.from_dict(r["arch"]).network_key()
            if key not in seen:
                seen.add(key)
                rows.append(r)
        mask = pareto.front_mask(rows, self.objectives)
        return [r for r, m in zip(rows, mask) if m]

    def summary(self) -> dict[str, Any]:
        if not self.frozen:
            return {**super().summary(), "front": len(self.front({}))}
        rows = self.rows({})
        counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
        front = [r for r in rows if r["pareto"]]
        return {**counts, "front": len(front), "hypervolume": pareto.front_hypervolume(front, self.objectives)}

    COLUMNS = ("trial_id", "status", "baseline", "pareto", "arch", "params", "macs", "throughput", "latency_ms",
               "search_top1", "search_top5", "search_loss", "val_top1", "violation", "infeasible_reason")

    def candidates_table(self) -> dict[str, Any]:
        """Every candidate, once (by trial id), as ``mlflow.log_table`` stores a table
        (pandas' ``split`` orientation): ``{"columns": [...], "data": [[...], ...]}``.
        ``search_*`` are the selection data's scores; ``val_top1`` only where :meth:`finalize`
        measured it."""
        data = []
        for tid, st in self.trials.items():
            m = st["metrics"]
            search = {k: m.get("search_" + k, m.get("val_" + k) if not st.get("rescored") else None)
                      for k in ("top1", "top5", "loss")}
            row = {"trial_id": tid, "status": st["status"], "baseline": st.get("baseline", ""),
                   "pareto": bool(st.get("pareto")), "arch": json.dumps(st.get("arch") or {}, sort_keys=True),
                   **{k: m.get(k) for k in ("params", "macs", "throughput", "latency_ms", "violation")},
                   **{f"search_{k}": v for k, v in search.items()},
                   "val_top1": m.get("val_top1") if st.get("rescored") else None,
                   "infeasible_reason": st.get("infeasible_reason") or st.get("reason", "")}
            data.append([row[c] for c in self.COLUMNS])
        return {"columns": list(self.COLUMNS), "data": data}

    def finalize(self, rescored: Mapping[str, Mapping[str, float]]) -> None:
        """The search is over: the front (on the selection data's scores) and the baselines
        get child runs; ``rescored`` (trial id -> ``val_top1``/``val_top5``/``val_loss`` on
        ``data.val``) replaces their ``val_*`` figures, the selection data's go to ``search_*``."""
        on = {r["trial_id"] for r in self.front({})}
        for tid, st in self.trials.items():
            if st.get("promoted") or not (tid in on or st.get("baseline")):
                continue
            m = st["metrics"]
            if tid in rescored:
                for k in ("top1", "top5", "loss"):
                    if f"val_{k}" in m:
                        m[f"search_{k}"] = m[f"val_{k}"]
                m.update({k: float(v) for k, v in rescored[tid].items()})
                m["best_val_top1"] = m["val_top1"]  # one evaluation: no best-over-epochs
                st["rescored"] = True
            st["pareto"] = tid in on
            self._promote(tid, st)
        self.frozen = True
        self._out(self.parent_metrics())

    def _promote(self, tid: str, st: dict[str, Any]) -> None:
        st["promoted"] = True
        now, step = now_ms(), int(st.get("epoch", 0))
        arch = st.get("arch") or {}
        tags = {TAG_ROLE: "trial", TAG_TRIAL_ID: tid, TAG_STATUS: st["status"], TAG_PARETO: "true" if st["pareto"] else "false",
                TAG_BASELINE: st.get("baseline", ""), TAG_ARCH: json.dumps(arch, default=str), **self.child_tags}
        reason = st.get("infeasible_reason") or st.get("reason")
        if reason:
            tags[TAG_INFEASIBLE if st["status"] == "infeasible" else TAG_REASON] = reason[:MAX_TAG_LEN]
        self.emit({"op": "start", "key": st["key"], "parent": PARENT, "name": st["name"], "time": now, "tags": tags})
        metrics = [[k, float(v), 0 if k in COST_METRICS or k.startswith(CONSTRAINT_PREFIX) else step, now]
                   for k, v in st["metrics"].items() if finite(v) is not None]
        self.emit({"op": "log", "key": st["key"], "metrics": metrics, "params": arch_params(arch), "tags": {}})
        self.emit({"op": "end", "key": st["key"], "status": "FAILED" if st["status"] == "failed" else "FINISHED", "time": now})
