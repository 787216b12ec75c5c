"""Rebuild a search's Pareto front from what MLflow holds; load tracking fallback files.

    python -m tntsearch.report --experiment NAME [--out DIR] [--tracking-uri URI]
    python -m tntsearch.report --run-id PARENT_RUN_ID [--out DIR] [--tracking-uri URI]
    python -m tntsearch.report --import mlflow-pending-....jsonl [--tracking-uri URI]

The first two print the front as a table and write to ``--out`` its pictures (PNG per
accuracy/cost pair, one interactive ``front.html``) and ``report.html``: one self-contained page
with those pictures, the hypervolume over time, the baselines' places and a filterable table of
every trial (``tntsearch.report_page``); the last line printed is its path. The objectives
and their hypervolume reference point come from the parent run (param
``tntsearch.objectives``), so the numbers match what the search logged. ``--import`` replays the records a search could not deliver
(tracking server down at the end) and rebuilds the front's artifacts on the parent run.

Without ``--tracking-uri``: ``$MLFLOW_TRACKING_URI`` if set, else the embedded store of the
current directory (``sqlite:///<cwd>/mlflow.db``), as ``tntsearch.run`` would use it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from tntsearch import pareto, plots
from tntsearch.tracking import (  # first: disables MLflow telemetry before MLflow is imported
    PARAM_EPOCHS,
    PARAM_OBJECTIVES,
    TAG_ROLE,
    Outbox,
    as_chosen,
    default_artifact_location,
    fail_fast_http,
    search_children,
    front_rows,
    publish_front,
    read_fallback,
    resolve_tracking_uri,
    trial_row,
)

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

__all__ = [
    "SearchResult",
    "default_tracking_uri",
    "find_parent_run",
    "load_search",
    "front_table",
    "write_plots",
    "import_fallback",
    "main",
]


@dataclass
class SearchResult:
    """One search as MLflow holds it."""

    parent_run_id: str
    experiment_id: str
    name: str
    objectives: tuple[pareto.Objective, ...]
    epochs: int | None
    rows: list[dict[str, Any]] = field(default_factory=list)  # every trial (trial_row dicts)

    @property
    def candidates(self) -> list[Mapping[str, Any]]:
        """Trials that may be on the front (feasible; completed or stopped early)."""
        return front_rows(self.rows)

    @property
    def front(self) -> list[dict[str, Any]]:
        """The Pareto front the search chose (``as_chosen``: supernet mode's on its selection
        data), best first by the first objective."""
        cands = self.candidates
        mask = pareto.front_mask(as_chosen(cands), self.objectives)
        rows = [dict(r) for r, m in zip(cands, mask) if m]
        return _sorted(rows, self.objectives)

    @property
    def front_ids(self) -> set[str]:
        return {r["trial_id"] for r in self.front}

    @property
    def hypervolume(self) -> float:
        """Of the front's points, with the figures the search reported (``val_top1`` on data.val)."""
        return pareto.front_hypervolume(self.front, self.objectives)


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else the current directory's embedded SQLite store."""
    return resolve_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or None, Path.cwd())


def _client(tracking_uri: str | None) -> MlflowClient:
    uri = resolve_tracking_uri(tracking_uri, Path.cwd()) if tracking_uri else default_tracking_uri()
    db = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
    if db is not None and not Path(db).is_file():  # reading must not create an empty store
        raise FileNotFoundError(f"no tracking store at {db}; name one with --tracking-uri")
    return MlflowClient(tracking_uri=uri)


def find_parent_run(client: MlflowClient, experiment: str | None = None, run_id: str | None = None) -> Any:
    """The parent run: ``run_id`` itself, or the newest search run of ``experiment``."""
    if run_id:
        try:
            run = client.get_run(run_id)
        except Exception as e:  # noqa: BLE001 - MLflow raises its own exception for a missing run
            raise ValueError(f"`run_id` {run_id!r}: no such run in the tracking store ({str(e).splitlines()[0]})") from None
        return run
    if not experiment:
        raise ValueError("name a search with `experiment` or `run_id`")
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments(max_results=50)]
        raise ValueError(f"`experiment` {experiment!r} not found; the store has: {names}")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'search'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ValueError(f"`experiment` {experiment!r} has no search (parent) run")
    return runs[0]


def load_search(
    tracking_uri: str | None = None, *, experiment: str | None = None, run_id: str | None = None,
    client: MlflowClient | None = None,
) -> SearchResult:
    """Read a search (parent run + every child) back from the tracking store."""
    client = client or _client(tracking_uri)
    parent = find_parent_run(client, experiment, run_id)
    params = parent.data.params
    if PARAM_OBJECTIVES not in params:
        raise ValueError(f"run {parent.info.run_id} is not a tntsearch parent run (no `{PARAM_OBJECTIVES}` param)")
    objectives = pareto.as_objectives(json.loads(params[PARAM_OBJECTIVES]))
    epochs = int(params[PARAM_EPOCHS]) if PARAM_EPOCHS in params else None
    children = search_children(client, parent.info.experiment_id, parent.info.run_id)
    rows = sorted((trial_row(r) for r in children), key=lambda r: (r["name"] or "", r["run_id"]))
    return SearchResult(parent.info.run_id, parent.info.experiment_id, parent.info.run_name or "", objectives, epochs, rows)


def _sorted(rows: list[dict[str, Any]], objectives: Sequence[pareto.Objective]) -> list[dict[str, Any]]:
    first = objectives[0]

    def key(r: Mapping[str, Any]) -> float:
        v = r["metrics"].get(first.metric, math.nan)
        v = -v if first.mode == "max" else v
        return v if math.isfinite(v) else math.inf

    return sorted(rows, key=key)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        if abs(v) >= 1e5:
            return f"{v:.4g}"
        return f"{v:.4f}".rstrip("0").rstrip(".") if v != int(v) else str(int(v))
    return str(v)


_TABLE_ARCH = ("outer_dim", "depth", "inner_dim", "words", "inner_heads", "se", "tnt_blocks")


def front_table(rows: Sequence[Mapping[str, Any]], objectives: Any) -> str:
    """The rows as an aligned text table, best first on the first objective (a front then
    reads as a trade-off, one objective getting better as the other gets worse): objectives
    first, then the other costs, the architecture essentials, status and run id."""
    objs = pareto.as_objectives(objectives)
    first = objs[0]
    sign = -1.0 if first.mode == "max" else 1.0
    rows = sorted(rows, key=lambda r: (first.metric not in r.get("metrics", {}),
                                       sign * float(r.get("metrics", {}).get(first.metric, 0.0))))
    metrics = list(dict.fromkeys([*(o.metric for o in objs), "val_top1", "macs", "params", "throughput"]))
    head = ["#", "trial", *(f"{m}({o.mode})" if (o := next((o for o in objs if o.metric == m), None)) else m for m in metrics),
            *_TABLE_ARCH, "baseline", "status", "run_id"]
    body = []
    for i, r in enumerate(rows, 1):
        arch = r.get("arch") or {}
        cells = [str(i), str(r.get("name") or r.get("trial_id") or "")]
        cells += [_fmt(float(r["metrics"][m])) if m in r.get("metrics", {}) else "-" for m in metrics]
        for k in _TABLE_ARCH:
            v = arch.get(k, "-")
            cells.append(",".join(map(str, v)) or "none" if isinstance(v, (list, tuple)) else str(v))
        cells += [str(r.get("baseline") or ""), str(r.get("status", "")), str(r.get("run_id") or "")]
        body.append(cells)
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_plots(search: SearchResult, out_dir: str | os.PathLike[str]) -> list[Path]:
    """The front's PNGs and interactive page (``front.html``) into ``out_dir``."""
    out = Path(out_dir)
    cands = search.candidates
    front = search.front_ids
    paths = plots.write_front_pngs(cands, search.objectives, out, title=search.name, front=front)
    paths.append(plots.write_front_html(cands, search.objectives, out / "front.html", title=search.name,
                                        hypervolume_value=search.hypervolume, front=front))
    return paths


def import_fallback(path: str | os.PathLike[str], tracking_uri: str | None = None) -> str:
    """Replay a tracker's fallback file through an :class:`~tntsearch.tracking.Outbox`;
    return the parent run id.

    A file from a search whose store never answered holds every record and can go into
    any store (``tracking_uri``, default: the one the search named). A file from a store
    that went away mid-search continues runs that store already has (its header lists
    them): it must go back into that store. Importing is idempotent: records the store
    holds already (an earlier import, a resumed search) are skipped. The front's pictures
    are then rebuilt on the parent run from what the store holds.
    """
    header, _ = read_fallback(path)
    uri = resolve_tracking_uri(tracking_uri or header.get("tracking_uri"), Path.cwd())
    outbox = Outbox(uri, path, meta={k: header[k] for k in ("experiment", "objectives") if k in header}, http_timeout_s=30)
    outbox.absorb(path)
    run_ids = header.get("run_ids") or {}
    with fail_fast_http(30):
        if run_ids:
            try:
                outbox.experiment_id = MlflowClient(uri).get_run(run_ids["parent"]).info.experiment_id
            except Exception:  # noqa: BLE001 - MLflow raises its own "not found"
                raise ValueError(
                    f"{path}: continues runs of {header.get('tracking_uri')} (parent run {run_ids.get('parent')}), "
                    f"which {uri} does not have; import it into that store"
                ) from None
        else:
            # Artifacts of a new experiment go where this store keeps them, not the original's.
            for rec in outbox.records:
                if rec["op"] == "experiment":
                    rec["artifact_location"] = default_artifact_location(uri)
        if not outbox.flush(force=True):
            raise ValueError(f"{path}: {uri} did not answer; nothing was lost: import the file again later")
        if outbox.undeliverable:
            raise ValueError(f"{path}: {uri} refused {len(outbox.undeliverable)} records "
                             f"({'; '.join(outbox.rejected.values())}); they stay in the file")
        parent_id = outbox.run_ids["parent"]
        search = load_search(client=outbox.client, run_id=parent_id)
        publish_front(outbox.client, parent_id, search.rows, search.objectives, title=search.name)
    return parent_id


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tntsearch.report", description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--experiment", help="MLflow experiment name (its newest search)")
    which.add_argument("--run-id", help="the search's parent run id")
    which.add_argument("--import", dest="import_file", metavar="FILE", help="a tracking fallback JSONL file to load")
    p.add_argument("--out", help="folder for the pictures (default: ./pareto-<parent run id prefix>)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from tntsearch.report_page import write_report  # imports Ray (through the screen's numbers)

    args = _parser().parse_args(argv)
    try:
        with fail_fast_http(30):
            if args.import_file:
                parent = import_fallback(args.import_file, args.tracking_uri)
                print(f"imported {args.import_file} into parent run {parent}")
                return 0
            client = _client(args.tracking_uri)
            search = load_search(client=client, experiment=args.experiment, run_id=args.run_id)
            history = client.get_metric_history(search.parent_run_id, "hypervolume")
        out = Path(args.out or f"pareto-{search.parent_run_id[:8]}")
        paths = write_plots(search, out)
        page = write_report(search, out / "report.html", history)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except MlflowException as e:  # e.g. the tracking server is not reachable
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    by_status: dict[str, int] = {}
    for r in search.rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    objs = ", ".join(f"{o.metric} ({o.mode}, ref {o.ref:g})" for o in search.objectives)
    print(f"search {search.name!r} (parent run {search.parent_run_id}): {len(search.rows)} trials "
          f"{json.dumps(by_status)}; objectives {objs}; hypervolume {search.hypervolume:.6g}")
    front = search.front
    print(f"Pareto front ({len(front)} trials):")
    print(front_table(front, search.objectives))
    print(f"pictures: {', '.join(str(p) for p in paths)}")
    print(f"report: {page.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
