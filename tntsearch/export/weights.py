"""The weights to export: a trial's last Ray Train checkpoint, read through pyarrow's
filesystems as Ray Train writes them (a local folder or a URI such as ``s3://...``), or a new
training run of the picked architecture (docs/export.md, "Which weights")."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

from tntsearch.model import TNTConfig

__all__ = ["find_checkpoint", "read_state", "retrain"]


def _filesystem(uri: str):
    """pyarrow's filesystem and path for a local path or a URI (what Ray Train's storage uses)."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri if "://" in uri else os.path.abspath(uri))


def _is_file(fs: Any, path: str) -> bool:
    import pyarrow.fs

    return fs.get_file_info(path).type == pyarrow.fs.FileType.File


def find_checkpoint(row: Mapping[str, Any], spec: Any | None = None) -> str:
    """The trial's last Ray Train checkpoint: the run's ``tntsearch.checkpoint_uri`` tag when
    the search recorded it (``row["tags"]``), else the newest ``checkpoint_*`` folder (Ray
    Train V2 names them by time) of the trial's Train run, ``<spec.storage>/<spec.name>/train/
    train-<trial_id>`` (tntsearch.search), wherever the storage lives.

    Raises:
        FileNotFoundError: there is none (the message names what was looked for).
    """
    import pyarrow.fs

    from tntsearch.tracking import TAG_CHECKPOINT_URI
    from tntsearch.train import CHECKPOINT_FILE

    who = f"trial {row.get('trial_id') or '?'} (run {row.get('run_id')})"
    tagged = (row.get("tags") or {}).get(TAG_CHECKPOINT_URI)
    if tagged:
        fs, path = _filesystem(tagged)
        if not _is_file(fs, f"{path}/{CHECKPOINT_FILE}"):
            raise FileNotFoundError(f"{who}: checkpoint not found: no {tagged}/{CHECKPOINT_FILE} "
                                    f"(from the run's `{TAG_CHECKPOINT_URI}` tag)")
        return tagged
    if spec is None:
        raise FileNotFoundError(f"{who}: no `{TAG_CHECKPOINT_URI}` tag and no spec names the Ray storage to look "
                                "for its checkpoint in; pass --spec")
    if not row.get("trial_id"):
        raise FileNotFoundError(f"{who}: no `{TAG_CHECKPOINT_URI}` tag and no trial id to find its Train run by")
    run_dir = "/".join((spec.storage.rstrip("/"), spec.name, "train", f"train-{row['trial_id']}"))
    fs, path = _filesystem(run_dir)
    listing = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    found = sorted(i.base_name for i in listing if i.type == pyarrow.fs.FileType.Directory
                   and i.base_name.startswith("checkpoint_") and _is_file(fs, f"{i.path}/{CHECKPOINT_FILE}"))
    if not found:
        raise FileNotFoundError(f"{who}: checkpoint not found: no {run_dir}/checkpoint_*/{CHECKPOINT_FILE}")
    return f"{run_dir}/{found[-1]}"


def read_state(checkpoint: str) -> dict[str, Any]:
    """The training state saved in ``checkpoint`` (a folder or a URI), on the CPU."""
    import pyarrow.fs

    from tntsearch.train import load_state

    fs, path = _filesystem(checkpoint)
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        return load_state(path)
    from ray.train import Checkpoint

    with Checkpoint(path, filesystem=fs).as_directory() as local:
        return load_state(local)


def retrain(arch: TNTConfig, spec: Any, epochs: int, label: str) -> tuple[dict[str, Any], str]:
    """Train ``arch`` from scratch for ``epochs`` with the spec's data, recipe and resources
    (Ray Train, as the search does); return the final state and its checkpoint path."""
    import ray
    from ray.train import TrainingFailedError

    from tntsearch.data import check_files
    from tntsearch.search import experiment_path
    from tntsearch.tracking import TELEMETRY_ENV
    from tntsearch.train import load_state
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
        with result.checkpoint.as_directory() as local:
            return load_state(local), result.checkpoint.path
    finally:
        if started:
            ray.shutdown()
