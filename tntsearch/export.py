"""Export one point of a search's Pareto front as a deployable model.

    python -m tntsearch.export --experiment NAME [--pick best-accuracy|knee|min-macs]
        [--min-accuracy X] [--max-macs M] [--retrain-epochs N] [--spec SPEC.yaml]
        [--tracking-uri URI] [--registered-model NAME] [--no-mlflow] [--overwrite] OUT_DIR
    python -m tntsearch.export --run-id CHILD_RUN_ID [...] OUT_DIR

The search is read back from MLflow (:func:`tntsearch.report.load_search`): its objectives,
every trial, the front. One front point is picked (:func:`pick`), its weights are taken
from the trial's last Ray Train checkpoint (or the architecture is re-trained for
``--retrain-epochs`` with :func:`tntsearch.trainer.make_trainer`), and OUT_DIR receives
``config.json`` (architecture + preprocessing + class names), ``model.safetensors``,
``model.torchscript.pt``, ``model.pt2`` (``torch.export``), ``model.onnx`` and a
``README.md`` model card. Every format is reloaded and checked against the eager model
before anything is published. The model is also logged to MLflow (``pt2`` flavor, with a
signature and input example) under the search's parent run, registered under the spec's
``mlflow.registered_model`` (default ``<experiment>-model``) and given the alias
``champion``. Everything is written into a temporary folder beside OUT_DIR and renamed at
the end, so a failure leaves nothing in OUT_DIR. See docs/export.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tntsearch.tracking import (  # first: disables MLflow telemetry before MLflow is imported
    TAG_ARCH,
    TAG_ROLE,
    TELEMETRY_ENV,
    arch_params,
    env_defaults,
    front_rows,
    resolve_tracking_uri,
)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from tntsearch import pareto  # noqa: E402
from tntsearch.model import TNT, TNTConfig, create_model  # noqa: E402

__all__ = [
    "PICK_RULES",
    "ACCURACY_METRIC",
    "COST_METRIC",
    "TAG_CHECKPOINT",
    "ALIAS",
    "FILES",
    "ExportResult",
    "knee_scores",
    "pick",
    "find_checkpoint",
    "preprocessing",
    "write_export",
    "verify_export",
    "log_and_register",
    "export",
    "read_config",
    "load_model",
    "main",
]

PICK_RULES = ("best-accuracy", "knee", "min-macs")
ACCURACY_METRIC = "val_top1"  # percent, as the training loop reports it
COST_METRIC = "macs"
# Child-run tag holding the trial's last Ray Train checkpoint directory (a folder with
# ``tntsearch.train.CHECKPOINT_FILE``); Tune hands it to the driver as ``checkpoint_path``.
TAG_CHECKPOINT = "checkpoint"
ALIAS = "champion"
FILES = {
    "config": "config.json",
    "weights": "model.safetensors",
    "torchscript": "model.torchscript.pt",
    "pt2": "model.pt2",
    "onnx": "model.onnx",
    "card": "README.md",
}
FORMAT = "tntsearch-model"
FORMAT_VERSION = 1
EXIT_BAD_INPUT = 2
_TOLERANCE = 1e-4  # max |logit difference| a reloaded format may show against the eager model
_EXAMPLE_BATCH = 2  # torch.export specialises a batch of 1; 2 keeps the batch axis dynamic
_CHECK_BATCH = 3  # a batch size no exporter saw, so a baked-in batch size is caught


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
# Picking a point of the front


def _value(row: Mapping[str, Any], metric: str) -> float:
    try:
        v = float(row.get("metrics", {}).get(metric, math.nan))
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def knee_scores(rows: Sequence[Mapping[str, Any]], objectives: Any) -> np.ndarray:
    """Signed distance of each front point below the hyperplane through the front's extremes,
    in objective space normalised to [0, 1] over the front (larger: more of a knee).

    Every objective is turned into a minimisation and min-max normalised over ``rows``, so
    the ideal point is the origin. With two objectives the extremes (best accuracy, best
    cost) land on (0, 1) and (1, 0) and the score is the distance to the line joining them,
    ``(1 - z1 - z2) / sqrt(2)``, positive on the ideal side: the knee is the point where
    giving up a little of one objective stops buying much of the other (Das, "On
    characterizing the 'knee' of the Pareto curve", 1999; Branke et al., PPSN 2004). With
    k > 2 objectives the hyperplane passes through the k points that are best in one
    objective each; if they do not span one, the plane ``sum(z) = 1`` is used (the
    two-objective line). A constant objective normalises to 0.
    """
    objs = pareto.as_objectives(objectives)
    points, _ = pareto.objective_matrix(rows, objs)
    if len(rows) == 0:
        return np.zeros(0)
    if not np.all(np.isfinite(points)):
        raise ValueError("knee_scores needs every objective value of every row; drop rows with missing metrics first")
    lo, hi = points.min(axis=0), points.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    z = (points - lo) / span
    k = z.shape[1]
    extremes = np.stack([z[np.lexsort((z.sum(axis=1), z[:, j]))[0]] for j in range(k)])
    normal = np.ones(k)
    if k > 1 and np.linalg.matrix_rank(extremes) == k:
        solved = np.linalg.solve(extremes, np.ones(k))
        if np.all(np.isfinite(solved)) and np.all(solved > 0):
            normal = solved
    return (1.0 - z @ normal) / np.linalg.norm(normal)


def _limits_text(min_accuracy: float | None, max_macs: float | None) -> str:
    parts = []
    if min_accuracy is not None:
        parts.append(f"{ACCURACY_METRIC} >= {min_accuracy:g}")
    if max_macs is not None:
        parts.append(f"{COST_METRIC} <= {max_macs:g}")
    return " and ".join(parts) or "no limits"


def _span(rows: Sequence[Mapping[str, Any]], metric: str) -> str:
    vals = [v for v in (_value(r, metric) for r in rows) if not math.isnan(v)]
    return f"{metric} {min(vals):g}..{max(vals):g}" if vals else f"{metric} missing"


def pick(
    rows: Sequence[Mapping[str, Any]],
    objectives: Any,
    rule: str = "best-accuracy",
    *,
    min_accuracy: float | None = None,
    max_macs: float | None = None,
) -> dict[str, Any]:
    """The front point chosen by ``rule`` among the trials ``rows`` (trial_row dicts).

    The front is the non-dominated set of ``rows`` under the search's ``objectives``; only
    its points that meet the limits (``val_top1 >= min_accuracy``, ``macs <= max_macs``)
    may be picked.

    - ``best-accuracy``: the highest ``val_top1``; ties go to fewer MACs.
    - ``knee``: the largest :func:`knee_scores` (computed over the whole front, then
      restricted to the points within the limits); ties go to higher ``val_top1``.
    - ``min-macs``: the fewest MACs (the cheapest model above the accuracy floor); ties go
      to higher ``val_top1``.

    Raises:
        ValueError: an unknown rule, no row to pick from, or no front point within the limits.
    """
    if rule not in PICK_RULES:
        raise ValueError(f"`pick` must be one of {', '.join(PICK_RULES)}; got {rule!r}")
    if not rows:
        raise ValueError("`rows` is empty: there is no finished trial to pick from")
    objs = pareto.as_objectives(objectives)
    mask = pareto.front_mask(rows, objs)
    front = [dict(r) for r, m in zip(rows, mask) if m]
    if not front:
        raise ValueError(
            f"no trial has every objective value ({', '.join(o.metric for o in objs)}): the front is empty")
    acc = np.array([_value(r, ACCURACY_METRIC) for r in front])
    macs = np.array([_value(r, COST_METRIC) for r in front])
    ok = np.ones(len(front), dtype=bool)
    if min_accuracy is not None:
        ok &= acc >= min_accuracy  # NaN compares False: a row without the metric fails the limit
    if max_macs is not None:
        ok &= macs <= max_macs
    if not ok.any():
        raise ValueError(
            f"--pick {rule}: none of the {len(front)} front point(s) satisfies {_limits_text(min_accuracy, max_macs)} "
            f"(the front spans {_span(front, ACCURACY_METRIC)}, {_span(front, COST_METRIC)})")
    # NaN sorts last: -inf for "higher is better" keys, +inf for "lower is better" ones.
    neg_acc = np.where(np.isnan(acc), np.inf, -acc)
    cheap = np.where(np.isnan(macs), np.inf, macs)
    if rule == "best-accuracy":
        keys = (cheap, neg_acc)
    elif rule == "min-macs":
        if np.isnan(macs[ok]).all():
            raise ValueError(f"--pick min-macs: no front point has a `{COST_METRIC}` metric")
        keys = (neg_acc, cheap)
    else:
        keys = (neg_acc, -knee_scores(front, objs))
    order = [i for i in np.lexsort(keys) if ok[i]]  # np.lexsort sorts by the last key first
    return front[order[0]]


# ---------------------------------------------------------------------------------------
# Weights


def _load_spec_json(text: str):
    from pydantic import ValidationError

    from tntsearch.spec import SearchSpec

    try:
        return SearchSpec.model_validate(json.loads(text))
    except (ValueError, ValidationError) as e:
        raise ValueError(f"the search's logged spec (spec/spec.json) does not validate: {str(e).splitlines()[0]}; "
                         "pass --spec") from None


def find_checkpoint(row: Mapping[str, Any], spec: Any | None = None) -> str:
    """The trial's last Ray Train checkpoint directory.

    The child run's ``checkpoint`` tag names it when the search recorded it; otherwise it is
    the newest ``checkpoint_*`` folder (Ray Train V2 names them by time) of the trial's
    Train run, ``<spec.storage>/<spec.name>/train/train-<trial_id>`` (tntsearch.search).

    Raises:
        FileNotFoundError: neither exists (the message names what was looked for).
    """
    from tntsearch.train import CHECKPOINT_FILE

    tags = row.get("tags") or {}
    who = f"trial {row.get('trial_id') or '?'} (run {row.get('run_id')})"
    tagged = tags.get(TAG_CHECKPOINT) or row.get(TAG_CHECKPOINT)
    if tagged:
        if "://" in str(tagged) and not str(tagged).startswith("file://"):
            return str(tagged)  # remote storage: read through Ray's Checkpoint
        path = Path(str(tagged).removeprefix("file://"))
        if not (path / CHECKPOINT_FILE).is_file():
            raise FileNotFoundError(f"{who}: checkpoint not found: {path / CHECKPOINT_FILE} (from the run's "
                                    f"`{TAG_CHECKPOINT}` tag)")
        return str(path)
    if spec is None:
        raise FileNotFoundError(f"{who}: the run has no `{TAG_CHECKPOINT}` tag and no spec names the Ray storage "
                                "to look in; pass --spec")
    if not row.get("trial_id"):
        raise FileNotFoundError(f"{who}: the run has no `{TAG_CHECKPOINT}` tag and no trial id to find its Train run by")
    run_dir = Path(spec.storage) / spec.name / "train" / f"train-{row['trial_id']}"
    found = sorted(p for p in run_dir.glob("checkpoint_*") if (p / CHECKPOINT_FILE).is_file())
    if not found:
        raise FileNotFoundError(f"{who}: checkpoint not found: no {run_dir}/checkpoint_*/{CHECKPOINT_FILE}")
    return str(found[-1])


def _read_state(checkpoint: str) -> dict[str, Any]:
    from tntsearch.train import load_state

    if "://" in checkpoint and not checkpoint.startswith("file://"):
        from ray.train import Checkpoint

        with Checkpoint(checkpoint).as_directory() as d:
            return load_state(d)
    return load_state(checkpoint.removeprefix("file://"))


def _retrain(arch: TNTConfig, spec: Any, epochs: int, label: str) -> tuple[dict[str, Any], str]:
    """Train ``arch`` from scratch for ``epochs`` with the spec's data, recipe and resources
    (Ray Train, as the search does); return the final state and its checkpoint path."""
    import ray
    from ray.train import TrainingFailedError

    from tntsearch.search import experiment_path
    from tntsearch.data import check_files
    from tntsearch.trainer import make_trainer

    check_files(spec.data)
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"epochs": epochs})})
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": dict(TELEMETRY_ENV)})
    try:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        trainer = make_trainer(arch, spec, name=f"retrain-{label}-{epochs}ep-{stamp}",
                               storage_path=str(Path(experiment_path(spec)) / "export"), num_to_keep=1)
        try:
            result = trainer.fit()
        except TrainingFailedError as e:
            raise RuntimeError(f"re-training failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        if result.checkpoint is None:
            raise RuntimeError("re-training reported no checkpoint")
        return _read_state(result.checkpoint.path), result.checkpoint.path
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------------------
# Writing and checking the files


def preprocessing(arch: TNTConfig, data: Any | None) -> dict[str, Any]:
    """How images must be prepared, as the validation loader prepares them
    (tntsearch.data.loaders): a centre crop of ``data.val_crop_ratio`` of the shorter side, resized to
    ``img_size`` x ``img_size``, RGB scaled to [0, 1], then ``(x - mean) / std``, NCHW float32."""
    from tntsearch.spec import DataSpec

    crop = data.val_crop_ratio if data is not None else DataSpec.model_fields["val_crop_ratio"].default
    mean = tuple(data.mean) if data is not None else DataSpec.model_fields["mean"].default
    std = tuple(data.std) if data is not None else DataSpec.model_fields["std"].default
    return {
        "img_size": arch.img_size,
        "layout": "NCHW",
        "dtype": "float32",
        "channels": "RGB",
        "center_crop_ratio": crop,
        "resize_shorter_side": int(round(arch.img_size / crop)),
        "scale": 1.0 / 255.0,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
    }


def _class_names(arch: TNTConfig, data: Any | None, notes: list[str]) -> list[str]:
    """Class names from the ``.classes.json`` beside the validation (else training) file."""
    from tntsearch.data import read_classes

    for path in ((data.val, data.train) if data is not None else ()):
        try:
            names = read_classes(path)
        except (FileNotFoundError, ValueError):
            continue
        if len(names) != arch.num_classes:
            raise ValueError(f"{path}: holds {len(names)} class names but the model has num_classes={arch.num_classes}")
        return names
    notes.append("no class list found beside the data files: class names are the label indices")
    return [str(i) for i in range(arch.num_classes)]


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    # NOTE: torch 2.14 deprecates torch.jit (FutureWarning on script/trace/save/load) in
    # favour of torch.export; TorchScript is still produced because deployment targets that
    # predate torch.export (LibTorch C++, older mobile runtimes) need it. model.pt2 is the
    # forward-looking format beside it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def _torchscript(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """``torch.jit.script`` (keeps every shape dynamic), or a trace if scripting fails; the
    caller checks the result at another batch size."""
    with _quiet_jit():
        try:
            return torch.jit.script(model)
        except Exception:  # noqa: BLE001 - any scripting failure: fall back to tracing
            return torch.jit.trace(model, example)


def _export_program(model: nn.Module, example: torch.Tensor):
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def _onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """The dynamo exporter (torch.export -> ONNX via onnxscript, torch's default since 2.9;
    the TorchScript-based one is deprecated with torch.jit), batch axis named ``batch``.
    Weights go into the one file below 2 GB (ONNXProgram.save's default)."""
    # NOTE: exporting the nn.Module, not the ExportedProgram made for model.pt2: from a
    # program the dynamic axis loses its name (it comes out as "s77").
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False)
    onnx_program.save(str(path))


def _model_card(config: Mapping[str, Any], registry: Mapping[str, Any] | None = None) -> str:
    arch, m, src, pre = config["architecture"], config["metrics"], config["source"], config["preprocessing"]

    def num(key: str, fmt: str = "{:,.0f}") -> str:
        v = m.get(key)
        return fmt.format(v) if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"

    blocks = arch["tnt_blocks"]
    kind = ("TNT" if len(blocks) == arch["depth"] else "DeiT (no TNT block)" if not blocks
            else f"hybrid: TNT blocks {', '.join(map(str, blocks))} of {arch['depth']}, the rest vanilla")
    names = config["class_names"]
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} classes)" if len(names) > 20 else "")
    if src.get("retrain_epochs"):
        weights = (f"re-trained from scratch for {src['retrain_epochs']} epochs with the search's recipe "
                   f"(checkpoint `{src['checkpoint']}`)")
    else:
        weights = f"the trial's own training, epoch {m.get('epoch', 'n/a')} (checkpoint `{src['checkpoint']}`)"
    lines = [
        f"# {src.get('registered_model') or 'tntsearch model'}: {kind}, {arch['img_size']}x{arch['img_size']}",
        "",
        f"Exported by `tntsearch.export` from search **{src['search']}** (MLflow experiment `{src['experiment']}`, "
        f"parent run `{src['parent_run_id']}`), trial `{src['trial_id']}` (run `{src['run_id']}`, "
        f"{src['status']}), picked by rule `{src['pick']}`"
        + (f" with {src['limits']}" if src.get("limits") and src["limits"] != "no limits" else "") + ".",
        "",
        "## Results",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| validation top-1 | {num('val_top1', '{:.2f} %')} |",
        f"| validation top-5 | {num('val_top5', '{:.2f} %')} |",
        f"| validation loss | {num('val_loss', '{:.4f}')} |",
        f"| MACs per image | {num('macs')} |",
        f"| parameters | {num('params')} |",
        f"| measured throughput | {num('throughput', '{:,.1f}')} images/s on the trial's device ({src.get('throughput_device') or 'n/a'}) |",
        "",
        f"Weights: {weights}.",
        "",
        "## Architecture",
        "",
        "| parameter | value |",
        "| --- | --- |",
        *[f"| `{k}` | {', '.join(map(str, v)) if isinstance(v, list) else v} |" for k, v in arch.items()],
        "",
        "## Data and preprocessing",
        "",
        f"Trained on `{src.get('data_train') or 'n/a'}`, validated on `{src.get('data_val') or 'n/a'}`; "
        f"{len(names)} classes: {shown}.",
        "",
        f"Input: float32 NCHW RGB, {pre['img_size']}x{pre['img_size']}: centre crop of "
        f"{pre['center_crop_ratio']:g} of the shorter side (resize the shorter side to {pre['resize_shorter_side']}, "
        f"crop {pre['img_size']}), scale to [0, 1], subtract mean {pre['mean']}, divide by std {pre['std']}. "
        "Output: logits over the classes of `config.json`.",
        "",
        "## Files",
        "",
        "- `config.json`: architecture, preprocessing, class names, metrics, provenance",
        "- `model.safetensors`: weights; `tntsearch.load_model(DIR)` rebuilds the model",
        "- `model.pt2`: `torch.export.load(path).module()`",
        "- `model.torchscript.pt`: `torch.jit.load(path)`",
        "- `model.onnx`: `onnxruntime.InferenceSession(path)`, input `images`, output `logits`, dynamic batch",
    ]
    if registry:
        lines += ["", "## MLflow", "",
                  f"Registered model `{registry['name']}` version {registry['version']}, alias `{ALIAS}`: "
                  f"`mlflow.pytorch.load_model(\"models:/{registry['name']}@{ALIAS}\")`."]
    notes = config.get("notes") or []
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def write_export(model: TNT, out_dir: str | os.PathLike, config: Mapping[str, Any]) -> dict[str, Path]:
    """Write config, weights and every format into ``out_dir`` (an existing folder); return
    the paths by kind. The model card is written later, by :func:`export`."""
    from safetensors.torch import save_model

    out = Path(out_dir)
    model = model.eval()
    paths = {k: out / v for k, v in FILES.items() if k != "card"}
    paths["config"].write_text(json.dumps(config, indent=2) + "\n")
    save_model(model, str(paths["weights"]), metadata={"format": "pt", "tntsearch.arch": json.dumps(config["architecture"])})
    size = config["architecture"]["img_size"]
    example = torch.randn(_EXAMPLE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scripted = _torchscript(model, example)
        with _quiet_jit():
            scripted.save(str(paths["torchscript"]))
        program = _export_program(model, example)
        torch.export.save(program, str(paths["pt2"]))
        _onnx(model, example, paths["onnx"])
    return paths


def verify_export(model: nn.Module, out_dir: str | os.PathLike, *, tolerance: float = _TOLERANCE) -> dict[str, float]:
    """Reload every file in ``out_dir``, run it on a batch no exporter saw and return each
    format's largest |logit difference| from ``model``; raise if one exceeds ``tolerance``."""
    import onnxruntime as ort

    out = Path(out_dir)
    size = read_config(out)["architecture"]["img_size"]
    x = torch.randn(_CHECK_BATCH, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.eval()(x)
        with _quiet_jit():
            scripted = torch.jit.load(str(out / FILES["torchscript"]), map_location="cpu")
        outputs = {
            "safetensors": load_model(out)(x),
            "torchscript": scripted(x),
            "pt2": torch.export.load(str(out / FILES["pt2"])).module()(x),
        }
    session = ort.InferenceSession(str(out / FILES["onnx"]), providers=["CPUExecutionProvider"])
    outputs["onnx"] = torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])
    diffs = {k: float((v - ref).abs().max()) for k, v in outputs.items()}
    bad = {k: d for k, d in diffs.items() if not d <= tolerance}
    if bad:
        raise RuntimeError(f"exported formats disagree with the model beyond {tolerance:g}: {bad}")
    return diffs


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of an export folder (or the file itself)."""
    p = Path(path)
    p = p / FILES["config"] if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"no {FILES['config']} at {p}: not a tntsearch export folder")
    config = json.loads(p.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{p}: not a tntsearch export config (format must be {FORMAT!r})")
    return config


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> TNT:
    """The exported model, in eval mode: the architecture from ``config.json`` and the
    weights from ``model.safetensors`` (no pickle, no code from the folder is run)."""
    from safetensors.torch import load_model as load_weights

    config = read_config(path)
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    model = create_model(TNTConfig.from_dict(config["architecture"]))
    load_weights(model, str(folder / FILES["weights"]), strict=True, device=str(device))  # raises on any mismatch
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------
# MLflow


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def _pip_requirements() -> list[str]:
    """The pt2 graph needs only torch to run (no tntsearch code): pinned, so MLflow does not
    infer requirements in a subprocess."""
    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]


def log_and_register(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str,
    name: str,
    row: Mapping[str, Any],
    description: str = "",
) -> dict[str, Any]:
    """Log ``model`` (pt2 flavor: a torch.export graph, loadable without pickle or tntsearch)
    under the search's parent run, register it as ``name`` and point alias ``champion`` at
    the new version. ``config.json`` of ``folder`` travels with the model."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.tracking import MlflowClient
    from mlflow.types import Schema, TensorSpec

    config = read_config(folder)
    size, classes = config["architecture"]["img_size"], config["architecture"]["num_classes"]
    signature = ModelSignature(
        # NOTE: unnamed tensors: a named input makes the serving example a dict, which the
        # pytorch pyfunc refuses ("does not support List or Dict input types").
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, size, size))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes))]),
    )
    example = np.random.default_rng(0).standard_normal((_EXAMPLE_BATCH, 3, size, size)).astype(np.float32)
    trial = str(row.get("trial_id") or row.get("run_id"))
    tags = {"tntsearch.trial_id": trial, "tntsearch.trial_run_id": str(row.get("run_id")),
            "tntsearch.pick": str(config["source"].get("pick"))}
    client = MlflowClient(tracking_uri=tracking_uri)
    with _tracking_uri(tracking_uri), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        logged = mlflow.initialize_logged_model(
            name=f"tnt-{trial}", source_run_id=parent_run_id, experiment_id=experiment_id,
            params=arch_params(config["architecture"]), tags=tags, model_type="tntsearch-tnt")
        info = mlflow.pytorch.log_model(
            model.eval(), name=f"tnt-{trial}", model_id=logged.model_id, run_id=parent_run_id,
            serialization_format="pt2", signature=signature, input_example=example,
            pip_requirements=_pip_requirements(), extra_files=[str(Path(folder) / FILES["config"])],
            metadata={"tntsearch": {"architecture": config["architecture"], "class_names": config["class_names"],
                                    "preprocessing": config["preprocessing"]}},
        )
        version = mlflow.register_model(info.model_uri, name, tags=tags)
    client.set_registered_model_alias(name, ALIAS, version.version)
    if description:
        client.update_model_version(name, version.version, description=description)
    return {"name": name, "version": str(version.version), "model_uri": f"models:/{name}@{ALIAS}",
            "logged_model_id": logged.model_id}


# ---------------------------------------------------------------------------------------
# The whole export


def _check_model_name(name: str) -> None:
    """MLflow's own rule for registered model names, checked before any work is done."""
    if not name.strip() or "/" in name or ":" in name:
        raise ValueError(f"registered model name {name!r}: must be non-empty and contain neither '/' nor ':'")


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"OUT_DIR {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"OUT_DIR {out_dir} is not empty: pass --overwrite to replace it")


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


def _spec_for(client: Any, parent_run_id: str, spec_path: str | os.PathLike | None):
    """The search's spec: the file given, else the copy the search logged on its parent run."""
    from tntsearch.spec import load_spec

    if spec_path is not None:
        return load_spec(spec_path)
    with tempfile.TemporaryDirectory(prefix="tntsearch-spec-") as d, env_defaults(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
        try:
            local = client.download_artifacts(parent_run_id, "spec/spec.json", d)
        except Exception:  # noqa: BLE001 - MLflow raises its own types for a missing artifact
            return None
        return _load_spec_json(Path(local).read_text())


def export(
    out_dir: str | os.PathLike,
    *,
    experiment: str | None = None,
    run_id: str | None = None,
    pick_rule: str = "best-accuracy",
    min_accuracy: float | None = None,
    max_macs: float | None = None,
    retrain_epochs: int | None = None,
    spec: str | os.PathLike | None = None,
    tracking_uri: str | None = None,
    registered_model: str | None = None,
    register: bool = True,
    overwrite: bool = False,
) -> ExportResult:
    """Export the front point that ``pick_rule`` picks from ``experiment``'s newest search
    (or the trial whose child run is ``run_id``) into ``out_dir``; see the module docstring.

    Raises:
        ValueError: bad arguments, no finished trial, no front point within the limits,
            a checkpoint that does not hold the trial's architecture.
        FileNotFoundError: the trial's checkpoint (or the spec, or the data for re-training)
            is missing.
    """
    from mlflow.tracking import MlflowClient

    from tntsearch.report import load_search

    if retrain_epochs is not None and retrain_epochs < 1:
        raise ValueError(f"`retrain_epochs` must be >= 1; got {retrain_epochs}")
    if pick_rule not in PICK_RULES:
        raise ValueError(f"`pick` must be one of {', '.join(PICK_RULES)}; got {pick_rule!r}")
    if run_id is not None and (pick_rule != "best-accuracy" or min_accuracy is not None or max_macs is not None):
        raise ValueError("--pick, --min-accuracy and --max-macs choose among a search's trials; "
                         "they do not apply with --run-id")
    if registered_model is not None:
        _check_model_name(registered_model)
    out = Path(out_dir).expanduser().absolute()
    _prepare_out_dir(out, overwrite)
    given_spec = None
    if spec is not None:
        from tntsearch.spec import load_spec

        given_spec = load_spec(spec)
        if experiment is None and run_id is None:
            experiment = given_spec.experiment
        tracking_uri = tracking_uri or given_spec.mlflow.tracking_uri
    if (experiment is None) == (run_id is None):
        raise ValueError("name the search with exactly one of `experiment` (or a spec naming it) or `run_id`")
    uri = resolve_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None, Path.cwd())
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        # NOTE: opening a missing SQLite store would silently create an empty one.
        raise FileNotFoundError(f"no MLflow store at {uri}: pass --tracking-uri (or run where the search ran)")
    client = MlflowClient(tracking_uri=uri)

    if run_id is not None:
        try:
            child = client.get_run(run_id)
        except Exception as e:  # noqa: BLE001 - MLflow raises its own exception for a missing run
            raise ValueError(f"--run-id {run_id!r}: no such run in {uri} ({str(e).splitlines()[0]})") from None
        parent_id = child.data.tags.get("mlflow.parentRunId")
        if child.data.tags.get(TAG_ROLE) != "trial" or not parent_id:
            raise ValueError(f"--run-id {run_id!r} is not a tntsearch trial run (a child run of a search)")
        search = load_search(client=client, run_id=parent_id)
        row = next(r for r in search.rows if r["run_id"] == run_id)
        if not front_rows([row]):
            raise ValueError(f"--run-id {run_id!r}: trial {row['trial_id']} is {row['status']}"
                             + (f" ({row['reason']})" if row.get("reason") else "")
                             + "; only completed or early-stopped feasible trials have trained weights")
        rule_text = "run id"
    else:
        search = load_search(client=client, experiment=experiment)
        candidates = search.candidates
        if not candidates:
            counts: dict[str, int] = {}
            for r in search.rows:
                counts[r["status"]] = counts.get(r["status"], 0) + 1
            raise ValueError(f"experiment {experiment!r}: search {search.name!r} (parent run {search.parent_run_id}) "
                             f"has no finished feasible trial to export (trials by status: {counts or 'none'})")
        row = pick(candidates, search.objectives, pick_rule, min_accuracy=min_accuracy, max_macs=max_macs)
        rule_text = pick_rule
    row = dict(row)
    row["tags"] = dict(client.get_run(row["run_id"]).data.tags)
    the_spec = given_spec or _spec_for(client, search.parent_run_id, None)
    if not row.get("arch"):
        raise ValueError(f"trial {row['trial_id']} (run {row['run_id']}) has no `{TAG_ARCH}` tag: its architecture is unknown")
    arch = TNTConfig.from_dict(row["arch"])

    notes: list[str] = []
    label = str(row.get("trial_id") or row["run_id"])
    if retrain_epochs is not None:
        if the_spec is None:
            raise FileNotFoundError("--retrain-epochs needs the search's spec (data and recipe): pass --spec")
        state, checkpoint = _retrain(arch, the_spec, retrain_epochs, label)
    else:
        checkpoint = find_checkpoint(row, the_spec)
        state = _read_state(checkpoint)
    if dict(state.get("arch", {})) != arch.to_dict():
        raise ValueError(f"checkpoint {checkpoint} holds architecture {state.get('arch')}, not the trial's {arch.to_dict()}")
    model = create_model(arch)
    model.load_state_dict(state["model"])
    model.eval()

    trained = dict(state.get("metrics") or {})
    metrics = {k: row["metrics"][k] for k in ("params", "macs", "throughput") if k in row["metrics"]}
    for k in ("val_top1", "val_top5", "val_loss", "train_loss", "epoch"):
        if k in trained:
            metrics[k] = trained[k]
        elif retrain_epochs is None and k in row["metrics"]:
            metrics[k] = row["metrics"][k]
    ckpt_acc, run_acc = _value({"metrics": trained}, ACCURACY_METRIC), _value(row, ACCURACY_METRIC)
    if retrain_epochs is None and not (math.isnan(ckpt_acc) or math.isnan(run_acc)) and abs(ckpt_acc - run_acc) > 1e-6:
        notes.append(f"the checkpoint's val_top1 ({trained.get('val_top1')}) differs from the run's last logged value "
                     f"({row['metrics'].get('val_top1')})")
    data = the_spec.data if the_spec is not None else None
    if data is None:
        notes.append("no spec found: preprocessing uses the ImageNet mean/std defaults")
    experiment_name = client.get_experiment(search.experiment_id).name
    name = (registered_model or (the_spec.mlflow.registered_model if the_spec is not None else None)
            or f"{experiment_name}-model")
    if register:
        _check_model_name(name)
    resources = the_spec.resources if the_spec is not None else None
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": arch.to_dict(),
        "preprocessing": preprocessing(arch, data),
        "class_names": _class_names(arch, data, notes),
        "metrics": metrics,
        "source": {
            "tracking_uri": uri,
            "experiment": experiment_name,
            "search": search.name,
            "parent_run_id": search.parent_run_id,
            "trial_id": row.get("trial_id"),
            "run_id": row["run_id"],
            "run_name": row.get("name"),
            "status": row.get("status"),
            "baseline": row.get("baseline") or None,
            "pick": rule_text,
            "limits": _limits_text(min_accuracy, max_macs),
            "objectives": [o.to_list() for o in search.objectives],
            "checkpoint": str(checkpoint),
            "retrain_epochs": retrain_epochs,
            "data_train": data.train if data is not None else None,
            "data_val": data.val if data is not None else None,
            "throughput_device": (f"{'cuda' if resources.use_gpu else 'cpu'}, batch "
                                  f"{the_spec.constraints.throughput_batch_size}") if resources is not None else None,
            "registered_model": name if register else None,
        },
        "notes": notes,
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_export(model, tmp, config)
        diffs = verify_export(model, tmp)
        registry = None
        if register:
            registry = log_and_register(model, tmp, tracking_uri=uri, experiment_id=search.experiment_id,
                                        parent_run_id=search.parent_run_id, name=name, row=row,
                                        description=_model_card(config))
        (tmp / FILES["card"]).write_text(_model_card(config, registry))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    p.add_argument("--retrain-epochs", type=int, help="re-train the picked architecture from scratch for N epochs "
                                                      "(Ray Train, the spec's data and recipe) instead of using its checkpoint")
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
            spec=args.spec, tracking_uri=args.tracking_uri, registered_model=args.registered_model,
            register=not args.no_mlflow, overwrite=args.overwrite,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return EXIT_BAD_INPUT
    m, src = result.config["metrics"], result.config["source"]
    print(f"exported trial {src['trial_id']} (run {src['run_id']}, picked by {src['pick']}): "
          f"val_top1 {m.get('val_top1', float('nan')):.2f}%, {m.get('macs', float('nan')):,.0f} MACs, "
          f"{m.get('params', float('nan')):,.0f} params -> {result.out_dir}")
    print("formats agree with the model (max |logit diff|): "
          + ", ".join(f"{k} {v:.1e}" for k, v in result.max_abs_diff.items()))
    if result.model_uri:
        print(f"registered {result.registered_model} version {result.version}: {result.model_uri}")
    for note in result.warnings:
        print(f"note: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
