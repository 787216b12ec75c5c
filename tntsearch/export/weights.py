"""The weights to export: a trial's last Ray Train checkpoint, read through pyarrow's
filesystems as Ray Train writes them (a local folder or a URI such as ``s3://...``), the
sub-network extracted from a supernet's checkpoint (supernet mode), or a new training run
of the picked architecture, from scratch or from those weights (docs/export.md, "Which weights")."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

from tntsearch.model import TNT, TNTConfig

__all__ = ["find_checkpoint", "read_state", "inherited_model", "retrain"]


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


def inherited_model(checkpoint: str, spec: Any, arch: TNTConfig) -> TNT:
    """``arch`` with the weights it inherits from the supernet saved in ``checkpoint`` (a
    folder or a URI, as :func:`read_state` reads it), trained for ``spec``'s space; eval mode.

    Raises:
        ValueError: the checkpoint is not a supernet's, was trained for another space, or
            ``arch`` is not in the space.
    """
    from tntsearch.supernet.model import load_supernet

    try:
        return load_supernet(read_state(checkpoint), spec).extract(arch).eval()
    except ValueError as e:
        raise ValueError(f"checkpoint {checkpoint}: {e}") from None


def retrain(arch: TNTConfig, spec: Any, epochs: int, label: str,
            initial_weights: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """Train ``arch`` for ``epochs`` with the spec's data, recipe and resources (Ray Train, as
    the search does), from scratch or from ``initial_weights`` (a state dict: fine-tuning);
    return the final state and its checkpoint path."""
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
        what = "re-training" if initial_weights is None else "fine-tuning"
        trainer = make_trainer(arch, spec, name=f"{'retrain' if initial_weights is None else 'finetune'}-{label}-"
                                                f"{epochs}ep-{stamp}",
                               storage_path=str(Path(experiment_path(spec)) / "export"), num_to_keep=1,
                               initial_weights=initial_weights)
        try:
            result = trainer.fit()
        except TrainingFailedError as e:
            raise RuntimeError(f"{what} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        if result.checkpoint is None:
            raise RuntimeError(f"{what} reported no checkpoint")
        with result.checkpoint.as_directory() as local:
            return load_state(local), result.checkpoint.path
    finally:
        if started:
            ray.shutdown()
