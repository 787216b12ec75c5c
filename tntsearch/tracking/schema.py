"""What a search looks like in MLflow: tag, param and metric names, trial statuses, and
reading a child run back as a plain row (shared by the tracker, ``report`` and ``export``).

The names are listed in docs/tracking.md; the architecture parameters are the ones of
docs/design.md.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = [
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
    "TAG_CHECKPOINT_URI",
    "TAG_WEIGHTS",
    "TAG_RUN_KEY",
    "TAG_ORPHANED",
    "CONSTRAINT_PREFIX",
    "PARAM_OBJECTIVES",
    "PARAM_EPOCHS",
    "SELECTION_METRIC",
    "arch_params",
    "as_chosen",
    "trial_row",
    "front_rows",
    "trial_outcome",
    "trial_error",
]

# What a feasible trial reports once per epoch (step = epoch) and what every result carries.
EPOCH_METRICS = ("train_loss", "val_loss", "val_top1", "val_top5", "lr", "images_per_s", "epoch_time_s")
COST_METRICS = ("params", "macs", "throughput", "latency_ms", "throughput_raw", "latency_ms_raw", "feasible", "violation",
                "cost_time_s")
STATUSES = ("running", "completed", "stopped_early", "infeasible", "failed")
ON_FRONT_STATUSES = ("completed", "stopped_early")
SELECTION_METRIC = "search_top1"  # supernet mode: top-1 on the selection data, what the search chose on

TAG_STATUS = "status"  # one of STATUSES
TAG_REASON = "failure_reason"  # why a trial failed (first line of the exception)
TAG_PARETO = "pareto"  # "true" on the children that are on the front, "false" otherwise
TAG_ROLE = "tntsearch.role"  # "search" on the parent, "trial" on children
TAG_ARCH = "tntsearch.arch"  # the TNTConfig dict as JSON: exact round trip for export
TAG_TRIAL_ID = "ray.trial_id"
TAG_BASELINE = "baseline"  # preset name of a baseline trial, "" otherwise
TAG_INFEASIBLE = "infeasible_reason"  # which constraints an infeasible trial broke, and by how much
TAG_CHECKPOINT_URI = "tntsearch.checkpoint_uri"  # the trial's last Ray Train checkpoint (path or URI); export reads it
TAG_WEIGHTS = "tntsearch.weights"  # "supernet": the checkpoint is the supernet's, the weights are extracted (docs/supernet.md)
TAG_RUN_KEY = "tntsearch.run_key"  # "<search uid>/<record key>": a replayed `start` finds its run (docs/faults.md)
TAG_ORPHANED = "tntsearch.orphaned"  # "true": Tune forgot the trial (driver killed before its snapshot); not counted
CONSTRAINT_PREFIX = "constraint_"  # relative constraint values the search reports (> 0: violated)
PARAM_OBJECTIVES = "tntsearch.objectives"  # JSON [[metric, mode, ref], ...] on the parent
PARAM_EPOCHS = "tntsearch.epochs"

MAX_PARAM_LEN = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_LEN = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
MAX_TEXT = 100_000  # longest text artifact the tracker logs (error traces, the spec)


def now_ms() -> int:
    return int(time.time() * 1000)


def finite(v: Any) -> float | None:
    """``v`` as a float, or ``None`` when it is missing, not a number, NaN or infinite."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def arch_params(arch: Mapping[str, Any]) -> dict[str, str]:
    """MLflow params for an architecture dict (``TNTConfig.to_dict()``): the docs/design.md
    names, ``tnt_blocks`` as ``"1,4,8,12"`` (``""`` when no block is a TNT block)."""
    out = {}
    for k, v in arch.items():
        if isinstance(v, (list, tuple)):
            v = ",".join(str(x) for x in v)
        out[str(k)] = str(v)
    return out


def flatten_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested dict (the spec) as MLflow params: ``train.lr`` -> ``"0.002"``."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten_params(v, key + "."))
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out[key[:250]] = text[:MAX_PARAM_LEN]
    return out


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
    return [r for r in rows if r.get("status") in ON_FRONT_STATUSES and finite(r.get("metrics", {}).get("feasible", 1)) == 1.0]


def as_chosen(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows with the top-1 the search compared them on: supernet mode chose on the
    held-out selection data (``search_top1`` on every row) and measured ``val_top1`` on
    ``data.val`` only to report it (docs/supernet.md), so choosing there again would use the
    validation set twice. Other searches' rows come back as they are."""
    rows = list(rows)
    if rows and all(SELECTION_METRIC in r.get("metrics", {}) for r in rows):
        return [{**r, "metrics": {**r["metrics"], "val_top1": r["metrics"][SELECTION_METRIC]}} for r in rows]
    return rows


def violated(result: Mapping[str, Any]) -> str:
    """``"max_macs +25%, min_throughput +3%"`` from the search's ``constraint_*`` values."""
    parts = []
    for k, v in result.items():
        f = finite(v)
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
