"""``python -m tntsearch.export``: read a search back from MLflow, pick a front point, load
its weights (its checkpoint, or extracted from the supernet in supernet mode; optionally
trained further or again), write and check every format, register the model, publish
OUT_DIR (docs/export.md). Each step is one function below; :func:`export` runs them in order."""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from tntsearch.tracking import (  # first: MLflow telemetry off
    SELECTION_METRIC, TAG_ARCH, TAG_CHECKPOINT_URI, TAG_ROLE, TAG_WEIGHTS, as_chosen, env_defaults, front_rows,
    resolve_tracking_uri,
)

from tntsearch.export.card import model_card, weights_text  # noqa: E402
from tntsearch.export.choose import ACCURACY_METRIC, PICK_RULES, limits_text, pick, value  # noqa: E402
from tntsearch.export.formats import FILES, FORMAT, FORMAT_VERSION, class_names, preprocessing, verify_export, write_export  # noqa: E402
from tntsearch.export.registry import check_model_name, log_and_register, promote  # noqa: E402
from tntsearch.export.weights import find_checkpoint, inherited_model, read_state, retrain  # noqa: E402
from tntsearch.model import TNT, TNTConfig, create_model  # noqa: E402

__all__ = ["EXIT_BAD_INPUT", "ExportResult", "export", "main"]

EXIT_BAD_INPUT = 2


@dataclass
class ExportResult:
    """What :func:`export` wrote and published."""

    out_dir: Path
    files: dict[str, Path]
    config: dict[str, Any]
    row: dict[str, Any]  # the exported trial, as :func:`tntsearch.tracking.trial_row` gives it
    max_abs_diff: dict[str, float]  # per reloaded format, against the eager model
    registered_model: str | None = None
    version: str | None = None
    model_uri: str | None = None  # ``models:/NAME@champion``
    logged_model_id: str | None = None
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# Arguments, the store and OUT_DIR


def _check_arguments(run_id: str | None, pick_rule: str, min_accuracy: float | None, max_macs: float | None,
                     retrain_epochs: int | None, finetune: int | None, registered_model: str | None) -> None:
    if retrain_epochs is not None and retrain_epochs < 1:
        raise ValueError(f"`retrain_epochs` must be >= 1; got {retrain_epochs}")
    if finetune is not None and finetune < 1:
        raise ValueError(f"`finetune` must be >= 1; got {finetune}")
    if retrain_epochs is not None and finetune is not None:
        raise ValueError("--retrain-epochs trains from scratch, --finetune from the trial's weights: pick one")
    if pick_rule not in PICK_RULES:
        raise ValueError(f"`pick` must be one of {', '.join(PICK_RULES)}; got {pick_rule!r}")
    if run_id is not None and (pick_rule != "best-accuracy" or min_accuracy is not None or max_macs is not None):
        raise ValueError("--pick, --min-accuracy and --max-macs choose among a search's trials; "
                         "they do not apply with --run-id")
    if registered_model is not None:
        check_model_name(registered_model)


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"OUT_DIR {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"OUT_DIR {out_dir} is not empty: pass --overwrite to replace it")


def _store_uri(tracking_uri: str | None) -> str:
    uri = resolve_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None, Path.cwd())
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        # NOTE: opening a missing SQLite store would silently create an empty one.
        raise FileNotFoundError(f"no MLflow store at {uri}: pass --tracking-uri (or run where the search ran)")
    return uri


# ---------------------------------------------------------------------------------------
# The search, the trial and its spec


def _chosen_trial(client: Any, experiment: str | None, run_id: str | None, pick_rule: str,
                  min_accuracy: float | None, max_macs: float | None) -> tuple[Any, dict[str, Any], str]:
    """The search (:class:`tntsearch.report.SearchResult`), the trial to export (a trial_row
    dict) and how it was chosen."""
    from tntsearch.report import load_search

    if run_id is not None:
        try:
            child = client.get_run(run_id)
        except Exception as e:  # noqa: BLE001 - MLflow raises its own exception for a missing run
            raise ValueError(f"--run-id {run_id!r}: no such run in {client.tracking_uri} "
                             f"({str(e).splitlines()[0]})") from None
        parent_id = child.data.tags.get("mlflow.parentRunId")
        if child.data.tags.get(TAG_ROLE) != "trial" or not parent_id:
            raise ValueError(f"--run-id {run_id!r} is not a tntsearch trial run (a child run of a search)")
        search = load_search(client=client, run_id=parent_id)
        row = next(r for r in search.rows if r["run_id"] == run_id)
        if not front_rows([row]):
            raise ValueError(f"--run-id {run_id!r}: trial {row['trial_id']} is {row['status']}"
                             + (f" ({row['reason']})" if row.get("reason") else "")
                             + "; only completed or early-stopped feasible trials have trained weights")
        return search, dict(row), "run id"
    search = load_search(client=client, experiment=experiment)
    if not search.candidates:
        counts: dict[str, int] = {}
        for r in search.rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        raise ValueError(f"experiment {experiment!r}: search {search.name!r} (parent run {search.parent_run_id}) "
                         f"has no finished feasible trial to export (trials by status: {counts or 'none'})")
    rows = search.candidates
    chosen = pick(as_chosen(rows), search.objectives, pick_rule, min_accuracy=min_accuracy, max_macs=max_macs)
    row = next(r for r in rows if r["run_id"] == chosen["run_id"])
    # NOTE: supernet mode chose its front on the held-out selection data (as_chosen): the
    # rule picks there too, and data.val stays for reporting (docs/supernet.md).
    on = f" on {SELECTION_METRIC}" if SELECTION_METRIC in row["metrics"] else ""
    return search, dict(row), pick_rule + on


def _logged_spec(client: Any, parent_run_id: str):
    """The copy of the spec the search logged on its parent run (``spec/spec.json``), or None."""
    from pydantic import ValidationError

    from tntsearch.spec import SearchSpec

    with tempfile.TemporaryDirectory(prefix="tntsearch-spec-") as d, env_defaults(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
        try:
            local = client.download_artifacts(parent_run_id, "spec/spec.json", d)
        except Exception:  # noqa: BLE001 - MLflow raises its own types for a missing artifact
            return None
        text = Path(local).read_text()
    try:
        return SearchSpec.model_validate(json.loads(text))
    except (ValueError, ValidationError) as e:
        raise ValueError(f"the search's logged spec (spec/spec.json) does not validate: {str(e).splitlines()[0]}; "
                         "pass --spec") from None


# ---------------------------------------------------------------------------------------
# The model and its config


def _model(row: Mapping[str, Any], spec: Any | None, retrain_epochs: int | None,
           finetune: int | None) -> tuple[TNT, dict[str, Any], dict[str, Any]]:
    """The trial's model with its weights, the training state they came from (the metrics
    of a sub-network with inherited weights are the search's, not a state's) and where they
    came from: ``checkpoint``, ``weights`` (``trial``, ``supernet`` or ``scratch``) and
    ``finetuned_from``. The weights are the trial's checkpoint's, or the sub-network's slice
    of the supernet's checkpoint (a run tagged ``TAG_WEIGHTS=supernet``), trained
    ``finetune`` more epochs; or ``retrain_epochs`` from scratch."""
    who = f"trial {row.get('trial_id') or '?'} (run {row['run_id']})"
    if not row.get("arch"):
        raise ValueError(f"{who} has no `{TAG_ARCH}` tag: its architecture is unknown")
    arch = TNTConfig.from_dict(row["arch"])
    label = str(row.get("trial_id") or row["run_id"])
    if (retrain_epochs is not None or finetune is not None) and spec is None:
        raise FileNotFoundError(f"--{'retrain-epochs' if finetune is None else 'finetune'} needs the search's spec "
                                "(data and recipe): pass --spec")
    source: dict[str, Any] = {"weights": "scratch", "finetuned_from": None}
    if retrain_epochs is not None:
        state, checkpoint = retrain(arch, spec, retrain_epochs, label)
    else:
        source["weights"] = (row.get("tags") or {}).get(TAG_WEIGHTS) or "trial"
        if source["weights"] == "supernet":
            if not (row.get("tags") or {}).get(TAG_CHECKPOINT_URI):
                raise FileNotFoundError(f"{who}: its weights are a supernet's, but no `{TAG_CHECKPOINT_URI}` tag "
                                        "names the supernet's checkpoint")
            if spec is None:
                raise FileNotFoundError(f"{who}: extracting its weights from the supernet needs the search's spec "
                                        "(the space): pass --spec")
            checkpoint = find_checkpoint(row, spec)
            state = {"arch": arch.to_dict(), "model": inherited_model(checkpoint, spec, arch).state_dict(), "metrics": {}}
        elif source["weights"] == "trial":
            checkpoint = find_checkpoint(row, spec)
            state = read_state(checkpoint)
        else:
            raise ValueError(f"{who}: unknown `{TAG_WEIGHTS}` tag {source['weights']!r} (known: supernet)")
        if dict(state.get("arch", {})) != arch.to_dict():
            raise ValueError(f"checkpoint {checkpoint} holds architecture {state.get('arch')}, "
                             f"not the trial's {arch.to_dict()}")
        if finetune is not None:
            source["finetuned_from"] = str(checkpoint)
            state, checkpoint = retrain(arch, spec, finetune, label, initial_weights=state["model"])
    model = create_model(arch)
    model.load_state_dict(state["model"])
    return model.eval(), state, {**source, "checkpoint": str(checkpoint)}


def _metrics(row: Mapping[str, Any], state: Mapping[str, Any], retrained: bool, notes: list[str]) -> dict[str, Any]:
    """The costs the search measured, and the accuracy and losses of the weights exported
    (the checkpoint's own; the run's last logged values only fill gaps of the trial's own)."""
    trained = dict(state.get("metrics") or {})
    metrics = {k: row["metrics"][k] for k in ("params", "macs", "throughput", "latency_ms") if k in row["metrics"]}
    for k in ("val_top1", "val_top5", "val_loss", "train_loss", "epoch"):
        if k in trained:
            metrics[k] = trained[k]
        elif not retrained and k in row["metrics"]:
            metrics[k] = row["metrics"][k]
    ckpt_acc, run_acc = value({"metrics": trained}, ACCURACY_METRIC), value(row, ACCURACY_METRIC)
    if not retrained and not (math.isnan(ckpt_acc) or math.isnan(run_acc)) and abs(ckpt_acc - run_acc) > 1e-6:
        notes.append(f"the checkpoint's val_top1 ({trained.get('val_top1')}) differs from the run's last logged value "
                     f"({row['metrics'].get('val_top1')})")
    return metrics


def _config(arch: TNTConfig, row: Mapping[str, Any], search: Any, spec: Any | None, *, metrics: dict[str, Any],
            source: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """``config.json``: architecture, preprocessing, class names, metrics and provenance."""
    data = spec.data if spec is not None else None
    if data is None:
        notes.append("no spec found: preprocessing uses the ImageNet mean/std defaults")
    measure = spec.constraints.measure if spec is not None else None
    device = (measure.device or ("cuda" if spec.resources.use_gpu else "cpu")) if measure is not None else None
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": arch.to_dict(),
        "preprocessing": preprocessing(arch, data),
        "class_names": class_names(arch, data, notes),
        "metrics": metrics,
        "source": {
            "tracking_uri": source["tracking_uri"],
            "experiment": source["experiment"],
            "search": search.name,
            "parent_run_id": search.parent_run_id,
            "trial_id": row.get("trial_id"),
            "run_id": row["run_id"],
            "run_name": row.get("name"),
            "status": row.get("status"),
            "baseline": row.get("baseline") or None,
            "pick": source["pick"],
            "limits": source["limits"],
            "objectives": [o.to_list() for o in search.objectives],
            "checkpoint": source["checkpoint"],
            "weights": source["weights"],
            "finetuned_from": source["finetuned_from"],
            "retrain_epochs": source["retrain_epochs"],
            "finetune_epochs": source["finetune_epochs"],
            "data_train": data.train if data is not None else None,
            "data_val": data.val if data is not None else None,
            "throughput_device": f"{device}, batch {measure.batch_size}" if measure is not None else None,
            "registered_model": source["registered_model"],
        },
        "notes": notes,
    }


# ---------------------------------------------------------------------------------------
# Writing, registering, publishing


def _publish(tmp: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``tmp`` (same parent, so each rename is atomic)."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_and_publish(model: TNT, config: dict[str, Any], out: Path, *, register: bool, uri: str,
                       search: Any, row: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, Any] | None]:
    """Write every file into a temporary folder beside ``out``, check each format, log and
    register the model, rename the folder onto ``out`` and only then move the registry alias
    to the new version: on any failure the temporary folder goes, ``out`` stays as it was and
    the alias still names the version it named before."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_export(model, tmp, config)
        diffs = verify_export(model, tmp)
        registry = None
        if register:
            registry = log_and_register(model, tmp, tracking_uri=uri, experiment_id=search.experiment_id,
                                        parent_run_id=search.parent_run_id, name=config["source"]["registered_model"],
                                        row=row, description=model_card(config))
        (tmp / FILES["card"]).write_text(model_card(config, registry))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if registry is not None:
        promote(uri, registry)
    return diffs, registry


# ---------------------------------------------------------------------------------------
# The whole export


def export(
    out_dir: str | os.PathLike,
    *,
    experiment: str | None = None,
    run_id: str | None = None,
    pick_rule: str = "best-accuracy",
    min_accuracy: float | None = None,
    max_macs: float | None = None,
    retrain_epochs: int | None = None,
    finetune: int | None = None,
    spec: str | os.PathLike | None = None,
    tracking_uri: str | None = None,
    registered_model: str | None = None,
    register: bool = True,
    overwrite: bool = False,
) -> ExportResult:
    """Export the front point that ``pick_rule`` picks from ``experiment``'s newest search
    (or the trial whose child run is ``run_id``) into ``out_dir``; see docs/export.md.
    ``retrain_epochs`` trains the architecture again from scratch; ``finetune`` trains its
    weights (the trial's, or those it inherits from the supernet) that many more epochs.

    Raises:
        ValueError: bad arguments, no finished trial, no front point within the limits,
            a checkpoint that does not hold the trial's architecture.
        FileNotFoundError: the trial's checkpoint (or the spec, or the data for re-training)
            is missing.
    """
    from mlflow.tracking import MlflowClient

    from tntsearch.spec import load_spec

    _check_arguments(run_id, pick_rule, min_accuracy, max_macs, retrain_epochs, finetune, registered_model)
    out = Path(out_dir).expanduser().absolute()
    _prepare_out_dir(out, overwrite)
    given_spec = load_spec(spec) if spec is not None else None
    if given_spec is not None:
        if experiment is None and run_id is None:
            experiment = given_spec.experiment
        tracking_uri = tracking_uri or given_spec.mlflow.tracking_uri
    if (experiment is None) == (run_id is None):
        raise ValueError("name the search with exactly one of `experiment` (or a spec naming it) or `run_id`")
    uri = _store_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri)

    search, row, rule_text = _chosen_trial(client, experiment, run_id, pick_rule, min_accuracy, max_macs)
    row["tags"] = dict(client.get_run(row["run_id"]).data.tags)  # the checkpoint's URI, when recorded
    the_spec = given_spec or _logged_spec(client, search.parent_run_id)
    model, state, weights = _model(row, the_spec, retrain_epochs, finetune)
    notes: list[str] = []
    metrics = _metrics(row, state, retrain_epochs is not None or finetune is not None, notes)
    experiment_name = client.get_experiment(search.experiment_id).name
    name = (registered_model or (the_spec.mlflow.registered_model if the_spec is not None else None)
            or f"{experiment_name}-model")
    if register:
        check_model_name(name)
    config = _config(model.config, row, search, the_spec, metrics=metrics, notes=notes, source={
        "tracking_uri": uri, "experiment": experiment_name, "pick": rule_text,
        "limits": limits_text(min_accuracy, max_macs), **weights, "retrain_epochs": retrain_epochs,
        "finetune_epochs": finetune, "registered_model": name if register else None})
    diffs, registry = _write_and_publish(model, config, out, register=register, uri=uri, search=search, row=row)
    return ExportResult(
        out_dir=out, files={k: out / v for k, v in FILES.items()}, config=config, row=row, max_abs_diff=diffs,
        registered_model=registry["name"] if registry else None, version=registry["version"] if registry else None,
        model_uri=registry["model_uri"] if registry else None,
        logged_model_id=registry["logged_model_id"] if registry else None, warnings=notes,
    )


# ---------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tntsearch.export",
                                description="Export a point of a search's Pareto front as a model (see docs/export.md).")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--experiment", help="MLflow experiment of the search (its newest search run); "
                                            "default: the spec's experiment when --spec is given")
    which.add_argument("--run-id", help="export this trial (its child run id) instead of picking one")
    p.add_argument("--pick", default="best-accuracy", choices=PICK_RULES,
                   help="best-accuracy (default): most accurate; knee: the front's knee; min-macs: fewest MACs")
    p.add_argument("--min-accuracy", type=float, help="only front points with val_top1 (percent) >= this")
    p.add_argument("--max-macs", type=float, help="only front points with at most this many MACs")
    train = p.add_mutually_exclusive_group()
    train.add_argument("--retrain-epochs", type=int, metavar="N",
                       help="re-train the picked architecture from scratch for N epochs "
                            "(Ray Train, the spec's data and recipe) instead of using its checkpoint")
    train.add_argument("--finetune", type=int, metavar="N",
                       help="train the picked model's weights (its checkpoint's, or inherited from the supernet) "
                            "N more epochs (Ray Train, the spec's data and recipe) and export those")
    p.add_argument("--spec", help="the search's spec YAML (default: the copy logged on the search's parent run)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the spec's, $MLFLOW_TRACKING_URI, "
                                          "else sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--registered-model", help="registry name (default: the spec's mlflow.registered_model, "
                                              "else <experiment>-model)")
    p.add_argument("--no-mlflow", action="store_true", help="write OUT_DIR only: do not log or register the model")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.experiment is None and args.run_id is None and args.spec is None:
        print("error: name the search with --experiment, --run-id or --spec", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        result = export(
            args.out_dir, experiment=args.experiment, run_id=args.run_id, pick_rule=args.pick,
            min_accuracy=args.min_accuracy, max_macs=args.max_macs, retrain_epochs=args.retrain_epochs,
            finetune=args.finetune, spec=args.spec, tracking_uri=args.tracking_uri, registered_model=args.registered_model,
            register=not args.no_mlflow, overwrite=args.overwrite,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return EXIT_BAD_INPUT
    m, src = result.config["metrics"], result.config["source"]
    print(f"exported trial {src['trial_id']} (run {src['run_id']}, picked by {src['pick']}): "
          f"val_top1 {m.get('val_top1', float('nan')):.2f}%, {m.get('macs', float('nan')):,.0f} MACs, "
          f"{m.get('params', float('nan')):,.0f} params -> {result.out_dir}")
    print(f"weights: {weights_text(src, m)}")
    print("formats agree with the model (max |logit diff|): "
          + ", ".join(f"{k} {v:.1e}" for k, v in result.max_abs_diff.items()))
    if result.model_uri:
        print(f"registered {result.registered_model} version {result.version}: {result.model_uri}")
    for note in result.warnings:
        print(f"note: {note}", file=sys.stderr)
    return 0
