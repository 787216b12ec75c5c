"""MLflow tracking of a search: one parent run per search, one nested child run per trial.

One job per module (docs/design.md, module map; docs/tracking.md for what lands in MLflow):

- ``store``: which tracking URI, its SQLite schema, the telemetry environment, HTTP time-outs;
- ``schema``: tag, param and metric names, trial statuses, a child run as a row;
- ``outbox``: in-order delivery of records with retries and the fallback file (no Ray);
- ``trials``: the trial table (outcomes, the front) and the records its changes make;
- ``callback``: the Ray Tune callback ``MlflowTracker`` and the front's publication.

``store`` is imported first: it switches MLflow telemetry off before MLflow is imported.
``store`` and ``schema`` import neither MLflow nor Ray.
"""
import importlib

from tntsearch.tracking.store import (  # first: MLflow telemetry off before MLflow is imported
    TELEMETRY_ENV,
    default_artifact_location,
    env_defaults,
    fail_fast_http,
    prepare_store,
    resolve_tracking_uri,
)
from tntsearch.tracking.schema import (  # noqa: I001
    CONSTRAINT_PREFIX,
    COST_METRICS,
    EPOCH_METRICS,
    PARAM_EPOCHS,
    PARAM_OBJECTIVES,
    STATUSES,
    TAG_ARCH,
    TAG_BASELINE,
    TAG_CHECKPOINT_URI,
    TAG_WEIGHTS,
    TAG_INFEASIBLE,
    TAG_PARETO,
    TAG_REASON,
    TAG_ROLE,
    TAG_STATUS,
    TAG_TRIAL_ID,
    SELECTION_METRIC,
    arch_params,
    as_chosen,
    front_rows,
    trial_error,
    trial_outcome,
    trial_row,
)

# The rest needs MLflow (and the callback Ray Tune): loaded on first use, so that processes
# which only want the names above (Ray Train workers, tntsearch.train) stay light.
_LAZY = {
    "FALLBACK_FORMAT": "outbox", "Outbox": "outbox", "RecordReplayer": "outbox", "read_fallback": "outbox",
    "search_children": "outbox", "MlflowTracker": "callback", "publish_front": "callback",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)


__all__ = [
    "TELEMETRY_ENV",
    "default_artifact_location",
    "env_defaults",
    "fail_fast_http",
    "prepare_store",
    "resolve_tracking_uri",
    "CONSTRAINT_PREFIX",
    "COST_METRICS",
    "EPOCH_METRICS",
    "PARAM_EPOCHS",
    "PARAM_OBJECTIVES",
    "STATUSES",
    "TAG_ARCH",
    "TAG_BASELINE",
    "TAG_CHECKPOINT_URI",
    "TAG_WEIGHTS",
    "TAG_INFEASIBLE",
    "TAG_PARETO",
    "TAG_REASON",
    "TAG_ROLE",
    "TAG_STATUS",
    "TAG_TRIAL_ID",
    "SELECTION_METRIC",
    "arch_params",
    "as_chosen",
    "front_rows",
    "trial_error",
    "trial_outcome",
    "trial_row",
    "FALLBACK_FORMAT",
    "Outbox",
    "RecordReplayer",
    "read_fallback",
    "search_children",
    "MlflowTracker",
    "publish_front",
]
