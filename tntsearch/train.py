"""Training one architecture: the paper's recipe (Table 3) as a Ray Train ``TorchTrainer``.

Table 3 of Han et al. (TNT, from DeiT): AdamW, lr 1e-3 at batch 1024 (5e-4 per 512 images,
scaled linearly with the global batch), cosine decay after a linear warm-up, weight decay
0.05 (none on norms, biases, position embeddings and the class token), label smoothing
0.1, drop path, Mixup/CutMix. The spec scales it down (``TrainSpec``) and this module runs
it with timm's and torch's parts: ``param_groups_weight_decay``, ``CosineLRScheduler``
(stepped every optimizer step), ``SoftTargetCrossEntropy``, ``clip_grad_norm_``, autocast.

Three layers, as in Ray's own examples:

- :func:`fit` is Ray-free: it trains on whatever ``torch.distributed`` group exists (or
  none) and calls ``report(metrics, state)`` once per epoch. Tests call it directly.
- :func:`train_loop_per_worker` is the Ray Train loop: it turns the plain ``config`` dict
  into typed configs, loads ``ray.train.get_checkpoint()`` and calls :func:`fit` with a
  reporter that hands ``ray.train.report`` the metrics and a checkpoint.
- :func:`make_trainer` builds the ``TorchTrainer`` from a spec (workers, resources,
  failure handling); ``python -m tntsearch.train`` runs one architecture through it.

Every epoch reports ``epoch`` (1-based), ``train_loss``, ``val_loss``, ``val_top1`` and
``val_top5`` (percent, like the paper's tables, over the whole validation set across
ranks), ``lr`` (of the epoch's last step) and ``images_per_s`` (training images per second
over all ranks), merged with the caller's ``extra_metrics``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from ray.train import UserCallback

from tntsearch.model import TNTConfig, create_model, get_config
from tntsearch.spec import DataSpec, SearchSpec, TrainSpec

__all__ = [
    "CHECKPOINT_FILE",
    "TRAIN_METRICS",
    "ForwardReports",
    "NonFiniteLossError",
    "TrainingOOMError",
    "resolve_precision",
    "fit",
    "load_state",
    "train_loop_per_worker",
    "make_trainer",
    "resolve_arch",
    "main",
]

CHECKPOINT_FILE = "checkpoint.pt"
REPORT_POLL_INTERVAL_S = "0.2"  # how often Ray Train collects the workers' reports (see make_trainer)
# What every epoch reports; ``extra_metrics`` may not reuse these names.
TRAIN_METRICS = ("epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "images_per_s", "epoch_time_s")
# DeiT's warm-up start (``--warmup-lr 1e-6``), reached linearly from here to the peak lr.
_WARMUP_LR_INIT = 1e-6
# Processes that MLflow may start on workers must not try to reach the internet.
_WORKER_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true"}

Report = Callable[[dict[str, Any], "dict[str, Any] | None"], None]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the run cannot recover by itself."""


class TrainingOOMError(RuntimeError):
    """A training or validation step ran out of device memory."""


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``TrainSpec.precision`` on ``device`` (None: float32).

    ``auto`` is bf16 on a GPU that supports it, fp16 on an older GPU, float32 on a CPU.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise ValueError(f"train.precision must be one of auto, fp32, bf16, fp16; got {precision!r}")
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ---------------------------------------------------------------------------------------
# Ray-free training
# ---------------------------------------------------------------------------------------

def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(values: Sequence[float], op: str, device: torch.device) -> list[float]:
    """Sum or max a few numbers over all ranks (identity without a process group)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def _default_prepare(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device)
    if _world()[1] > 1:
        ids = [device.index or 0] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


def _schedule(optimizer: torch.optim.Optimizer, recipe: TrainSpec, steps_per_epoch: int):
    """Per-step cosine decay to ``min_lr`` after a linear warm-up from 1e-6 (DeiT).

    The warm-up is capped at ``epochs - 1`` so that a short (ASHA-scaled) run still has a
    cosine phase; the cosine spans exactly the epochs after the warm-up.
    """
    from timm.scheduler import CosineLRScheduler

    warmup_epochs = min(recipe.warmup_epochs, recipe.epochs - 1)
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, (recipe.epochs - warmup_epochs) * steps_per_epoch),
        lr_min=recipe.min_lr,
        warmup_t=warmup_epochs * steps_per_epoch,
        warmup_lr_init=_WARMUP_LR_INIT,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def _oom(e: BaseException, arch: TNTConfig, data: DataSpec, world: int, device: torch.device, where: str):
    return TrainingOOMError(
        f"out of memory on {device} during {where} at data.batch_size={data.batch_size} per worker "
        f"(global {data.batch_size * world}) for architecture {arch.to_dict()}: lower data.batch_size "
        f"or constrain the architecture ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    )


def _evaluate(model: nn.Module, loader, device: torch.device, amp: torch.dtype | None, num_classes: int):
    """Cross-entropy, top-1 and top-5 (percent) over the whole validation set.

    With more than one rank the loaders are sharded (``make_loaders(distributed=True)``:
    disjoint, unpadded val shards), so the sums are all-reduced; the total count is checked
    against the file's sample count, since a padded shard would count some images twice.
    """
    world = _world()[1]
    k5 = min(5, num_classes)
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, count
    model.eval()
    # NOTE: no_grad, not inference_mode: FFCV allocates its batch buffers on the first
    # iteration, and buffers made under inference_mode cannot be written by its pipeline
    # thread afterwards.
    with torch.no_grad():
        for images, labels in loader:
            with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
                logits = model(images)
            logits = logits.float()
            hits = logits.topk(k5, dim=1).indices == labels[:, None]
            totals += torch.stack([
                F.cross_entropy(logits, labels, reduction="sum").double(),
                hits[:, 0].sum().double(),
                hits.any(dim=1).sum().double(),
                torch.tensor(float(len(labels)), dtype=torch.float64, device=device),
            ])
    if world > 1:
        dist.all_reduce(totals)
    loss_sum, c1, c5, n = totals.tolist()
    expected = len(loader.indices) if hasattr(loader, "indices") else n
    if n != expected:
        raise RuntimeError(f"validation counted {n:.0f} images over {world} rank(s), the file holds {expected}")
    if n == 0:
        raise ValueError("data.val holds no samples: validation needs at least one image")
    return loss_sum / n, 100.0 * c1 / n, 100.0 * c5 / n


def load_state(directory: str | os.PathLike) -> dict[str, Any]:
    """The training state saved by :func:`train_loop_per_worker` in a checkpoint directory."""
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def fit(
    arch: TNTConfig | Mapping[str, Any] | str,
    data: DataSpec,
    recipe: TrainSpec,
    *,
    device: torch.device | str = "cpu",
    report: Report | None = None,
    start_state: Mapping[str, Any] | None = None,
    extra_metrics: Mapping[str, Any] | None = None,
    stop_epoch: int | None = None,
    prepare_model: Callable[[nn.Module], nn.Module] | None = None,
) -> list[dict[str, Any]]:
    """Train ``arch`` on ``data`` with ``recipe``; return the metrics of each epoch run here.

    Args:
        arch: the architecture (a config, its dict or a preset name).
        data: FFCV files and loader settings; ``data.batch_size`` is per process.
        recipe: the training recipe; ``recipe.lr`` is per 512 images and is scaled by the
            global batch ``data.batch_size * world_size`` (DeiT's linear scaling).
        device: where this process trains.
        report: called once per epoch on every rank as ``report(metrics, state)``; ``state``
            (model, optimizer, scheduler, scaler, epoch, arch) is given on rank 0 only,
            ``None`` on the others; its tensors are the live ones, so save or copy it
            before returning.
        start_state: a state given to ``report`` before; training continues after its epoch
            with the same optimizer, scheduler and scaler state.
        extra_metrics: merged into every epoch's metrics (the search's arch and cost fields).
        stop_epoch: return after this (1-based) epoch, keeping the schedule of
            ``recipe.epochs``, so that a later run resumes the same schedule.
        prepare_model: moves the model to ``device`` and wraps it for DDP (default: ``.to``
            and ``DistributedDataParallel`` when a process group with >1 ranks exists).

    Raises:
        NonFiniteLossError: the loss became NaN/inf (the message names epoch, step and lr).
        TrainingOOMError: a step ran out of memory (the message names batch size and arch).
    """
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import param_groups_weight_decay

    from tntsearch.data import make_loaders

    arch = get_config(arch)
    device = torch.device(device)
    extra = dict(extra_metrics or {})
    clash = sorted(set(extra) & set(TRAIN_METRICS))
    if clash:
        raise ValueError(f"extra_metrics may not use the training metric names {clash}")
    if stop_epoch is not None and stop_epoch < 1:
        raise ValueError(f"stop_epoch must be >= 1 or None; got {stop_epoch}")
    if start_state is not None and dict(start_state["arch"]) != arch.to_dict():
        raise ValueError(
            f"the checkpoint holds architecture {dict(start_state['arch'])}, not {arch.to_dict()}: "
            f"use a new run name for a new architecture")
    rank, world = _world()
    amp = resolve_precision(recipe.precision, device)

    torch.manual_seed(recipe.seed)  # the same initial weights on every rank
    net = create_model(arch)
    torch.manual_seed(recipe.seed + 1 + rank)  # independent drop-path masks per rank
    model = prepare_model(net) if prepare_model is not None else _default_prepare(net, device)
    train_loader, val_loader = make_loaders(
        data, arch.img_size, device=device, distributed=world > 1, seed=recipe.seed,
        num_classes=arch.num_classes, label_smoothing=recipe.label_smoothing, drop_last=True,
    )
    steps = len(train_loader)
    if steps == 0:
        raise ValueError(
            f"data.batch_size={data.batch_size} is larger than the training set's share of one "
            f"worker: not a single full batch per epoch")

    global_batch = data.batch_size * world
    peak_lr = recipe.lr * global_batch / 512
    optimizer = torch.optim.AdamW(
        param_groups_weight_decay(net, recipe.weight_decay, no_weight_decay_list=net.no_weight_decay()),
        lr=peak_lr,
    )
    scheduler = _schedule(optimizer, recipe, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    hard_loss = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    soft_loss = SoftTargetCrossEntropy()

    start_epoch = 0
    if start_state is not None:
        net.load_state_dict(start_state["model"])
        optimizer.load_state_dict(start_state["optimizer"])
        scheduler.load_state_dict(start_state["scheduler"])
        scaler.load_state_dict(start_state["scaler"])
        start_epoch = int(start_state["epoch"])
    # NOTE: the loaders order epoch e by (seed, e), counting e from 0 in every new Loader;
    # starting the count at the resumed epoch gives a resumed run the order an unbroken run has.
    train_loader.next_epoch = start_epoch

    last = recipe.epochs if stop_epoch is None else min(stop_epoch, recipe.epochs)
    history: list[dict[str, Any]] = []
    for epoch in range(start_epoch + 1, last + 1):
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        for step, (images, targets) in enumerate(train_loader, start=1):
            scheduler.step_update(num_updates=(epoch - 1) * steps + step - 1)
            lr = optimizer.param_groups[0]["lr"]
            try:
                with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
                    logits = model(images)
                logits = logits.float()
                loss = soft_loss(logits, targets) if targets.ndim == 2 else hard_loss(logits, targets)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"loss became {loss.item()} at epoch {epoch} step {step} (lr={lr:.3g}, "
                        f"global batch {global_batch}): lower train.lr or set train.clip_grad")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if recipe.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(net.parameters(), recipe.clip_grad)
                scaler.step(optimizer)
                scaler.update()
            except torch.OutOfMemoryError as e:
                raise _oom(e, arch, data, world, device, f"training (epoch {epoch} step {step})") from e
            loss_sum += loss.detach().double() * len(images)
            seen += len(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - tic

        try:
            val_loss, val_top1, val_top5 = _evaluate(model, val_loader, device, amp, arch.num_classes)
        except torch.OutOfMemoryError as e:
            raise _oom(e, arch, data, world, device, f"validation (epoch {epoch})") from e
        total_loss, total_seen = _all_reduce([loss_sum.item(), seen], "sum", device)
        max_elapsed, epoch_time = _all_reduce([elapsed, time.perf_counter() - tic], "max", device)
        metrics = {
            **extra,
            "epoch": epoch,
            "train_loss": total_loss / total_seen,
            "val_loss": val_loss,
            "val_top1": val_top1,
            "val_top5": val_top5,
            "lr": lr,
            "images_per_s": total_seen / max_elapsed,
            "epoch_time_s": epoch_time,  # training + validation, slowest rank
        }
        history.append(metrics)
        if report is not None:
            state = None
            if rank == 0:
                state = {
                    "epoch": epoch,
                    "arch": arch.to_dict(),
                    "model": net.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "metrics": {k: metrics[k] for k in TRAIN_METRICS},
                }
            report(metrics, state)
    return history


# ---------------------------------------------------------------------------------------
# Ray Train
# ---------------------------------------------------------------------------------------

def _ray_report(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
    """``ray.train.report`` on every rank; rank 0 attaches the checkpoint."""
    import ray.train

    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp) / CHECKPOINT_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train loop: ``config`` holds ``arch``, ``data``, ``train`` (plain dicts),
    ``extra_metrics`` and ``stop_epoch``; resumes from ``ray.train.get_checkpoint()``.
    Every report also carries ``node_id``, the Ray node this worker runs on."""
    arch = TNTConfig.from_dict(config["arch"])
    data = DataSpec.model_validate(config["data"])
    recipe = TrainSpec.model_validate(config["train"])
    extra = config.get("extra_metrics") or {}
    stop_epoch = config.get("stop_epoch")

    import ray.train
    import ray.train.torch

    # NOTE: the Ray node that trains (rank 0's reaches Tune's results): every node of a
    # one-machine cluster has the same ``node_ip``; the node id tells them apart.
    extra = {**extra, "node_id": ray.get_runtime_context().get_node_id()}
    start_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            start_state = load_state(d)
    fit(
        arch, data, recipe,
        device=ray.train.torch.get_device(),
        report=_ray_report,
        start_state=start_state,
        extra_metrics=extra,
        stop_epoch=stop_epoch,
        prepare_model=ray.train.torch.prepare_model,
    )


def make_trainer(
    arch: TNTConfig | Mapping[str, Any] | str,
    spec: SearchSpec,
    *,
    name: str,
    storage_path: str | os.PathLike | None = None,
    extra_metrics: Mapping[str, Any] | None = None,
    callbacks: Sequence[Any] | None = None,
    stop_epoch: int | None = None,
    num_to_keep: int | None = 2,
):
    """A ``TorchTrainer`` that trains ``arch`` with the spec's data, recipe and resources.

    Running a trainer with the same ``name`` and ``storage_path`` again continues from the
    run's latest checkpoint (Ray Train V2 keeps a snapshot of the run's checkpoints there);
    a worker failure is retried ``spec.resources.max_failures`` times, each retry resuming
    from the latest checkpoint. Pass ``callbacks=[TuneReportCallback()]`` inside a Tune trial.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    arch = get_config(arch)
    r = spec.resources
    resources = {"CPU": r.cpus_per_worker}
    if r.use_gpu:
        resources["GPU"] = r.gpus_per_worker
    config = {
        "arch": arch.to_dict(),
        "data": spec.data.model_dump(mode="json"),
        "train": spec.train.model_dump(mode="json"),
        "extra_metrics": dict(extra_metrics or {}),
        "stop_epoch": stop_epoch,
    }
    clash = sorted(set(config["extra_metrics"]) & set(TRAIN_METRICS))
    if clash:
        raise ValueError(f"extra_metrics may not use the training metric names {clash}")
    # NOTE: Ray Train's controller collects reports when it polls its workers, every
    # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), and a worker blocks on its second
    # unpolled report: epochs shorter than the interval waited for it (the demo's 0.9 s epochs
    # took 2.1 s). ``fit`` hands this process's value to the controller; a user's value wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", REPORT_POLL_INTERVAL_S)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path if storage_path is not None else spec.storage),
            failure_config=FailureConfig(max_failures=r.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
            callbacks=list(callbacks or []),
            worker_runtime_env={"env_vars": dict(_WORKER_ENV)},
        ),
    )


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

# Architecture parameters that the data fixes: taken from the spec's space when it fixes them.
_DATA_BOUND = ("img_size", "patch_size", "num_classes")


def resolve_arch(preset: str, spec: SearchSpec, overrides: Sequence[str] = ()) -> TNTConfig:
    """The architecture ``python -m tntsearch.train`` trains: the preset, then the spec's fixed
    ``img_size``/``patch_size``/``num_classes`` (the data decides them), then ``key=value``
    overrides (values parsed as YAML: ``depth=4``, ``tnt_blocks=[1,2]``, ``se=outer``)."""
    import yaml

    fixed = {k: spec.space[k] for k in _DATA_BOUND if isinstance(spec.space.get(k), int)}
    sets: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value; got {item!r}")
        try:
            sets[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ValueError(f"--set {key.strip()}: not a valid value: {e}") from None
    return get_config(preset, **{**fixed, **sets})


class ForwardReports(UserCallback):
    """Puts the metrics of every report (rank 0's) on a ``ray.util.queue.Queue``, so that the
    driver sees epochs as they finish (Ray Train callbacks run in its controller actor)."""

    def __init__(self, queue) -> None:
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint) -> None:
        self.queue.put(dict(metrics[0]))


def _format(metrics: Mapping[str, Any]) -> str:
    return (f"epoch {metrics['epoch']:>3}  train_loss {metrics['train_loss']:.4f}  val_loss {metrics['val_loss']:.4f}"
            f"  val_top1 {metrics['val_top1']:6.2f}%  val_top5 {metrics['val_top5']:6.2f}%"
            f"  lr {metrics['lr']:.3g}  {metrics['images_per_s']:.1f} img/s")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tntsearch.train",
        description="Train one architecture with a spec's data, recipe and resources (Ray Train).")
    p.add_argument("spec", help="search spec YAML (its data, train and resources sections are used)")
    p.add_argument("--arch", required=True, help="preset name (tnt_ti, tnt_s, tnt_b, tnt_s_1..4, deit_s)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override an architecture parameter (repeatable)")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--stop-after", type=int, help="stop after this epoch; run again to resume")
    p.add_argument("--name", help="run name under the spec's storage (default: train-ARCH); "
                                  "an existing run of that name is resumed")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.update(_WORKER_ENV)
    try:
        from tntsearch.spec import load_spec

        spec = load_spec(args.spec)
        if args.epochs is not None:
            if args.epochs < 1:
                raise ValueError(f"--epochs must be >= 1; got {args.epochs}")
            spec = spec.model_copy(update={"train": TrainSpec.model_validate(
                {**spec.train.model_dump(), "epochs": args.epochs})})
        arch = resolve_arch(args.arch, spec, args.sets)
        if args.stop_after is not None and args.stop_after < 1:
            raise ValueError(f"--stop-after must be >= 1; got {args.stop_after}")
        for path in (spec.data.train, spec.data.val):
            if "://" not in path and not Path(path).is_file():
                raise FileNotFoundError(f"data file not found: {path}")
    except (ValueError, FileNotFoundError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2

    import ray
    from ray.train import TrainingFailedError
    from ray.util.queue import Empty, Queue

    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": dict(_WORKER_ENV)})
    queue = Queue()
    trainer = make_trainer(arch, spec, name=args.name or f"train-{args.arch}", stop_epoch=args.stop_after,
                           callbacks=[ForwardReports(queue)])
    print(f"training {args.arch} {arch.to_dict()}", flush=True)
    outcome: dict[str, Any] = {}

    def _run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except TrainingFailedError as e:
            outcome["error"] = e

    runner = threading.Thread(target=_run, daemon=True)
    runner.start()
    while runner.is_alive() or not queue.empty():
        try:
            print(_format(queue.get(timeout=0.5)), flush=True)
        except Empty:
            pass
    if "error" in outcome:
        print(f"training failed: {_failure_reason(outcome['error'])}", file=sys.stderr)
        return 1
    result = outcome["result"]
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else None}")
    return 0


def _failure_reason(error: BaseException) -> str:
    """The workers' own exception lines (e.g. ``NonFiniteLossError: loss became nan ...``)."""
    failures = getattr(error, "worker_failures", None) or {}
    for exc in failures.values():
        cause = getattr(exc, "cause", None) or exc
        return f"{type(cause).__name__}: {cause}".splitlines()[0]
    return str(error).splitlines()[0] if str(error) else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
