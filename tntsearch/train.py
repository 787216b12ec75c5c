"""Training one architecture with the paper's recipe (Table 3), free of Ray.

Table 3 of Han et al. (TNT, from DeiT): AdamW, lr 1e-3 at batch 1024 (5e-4 per 512 images,
scaled linearly with the global batch), cosine decay after a linear warm-up, weight decay
0.05 (none on norms, biases, position embeddings and the class token), label smoothing
0.1, drop path, Mixup/CutMix. The spec scales it down (``TrainSpec``) and this module runs
it with timm's and torch's parts: ``param_groups_weight_decay``, ``CosineLRScheduler``
(stepped every optimizer step), ``SoftTargetCrossEntropy``, ``clip_grad_norm_``, autocast.

It reads like Ray Train's example loops: set-up (:func:`make_optimizer`,
:func:`make_schedule`, :func:`make_loss`), one epoch (:func:`train_epoch`),
:func:`evaluate`, :func:`resume`, :func:`report_epoch`, and :func:`fit` tying them
together on whatever ``torch.distributed`` group exists (or none). The Ray Train wrapper
around :func:`fit` is ``tntsearch.trainer`` (see docs/design.md and docs/train.md).

Every epoch reports ``epoch`` (1-based), ``train_loss``, ``val_loss``, ``val_top1`` and
``val_top5`` (percent, like the paper's tables, over the whole validation set across
ranks), ``lr`` (of the epoch's last step), ``images_per_s`` (training images per second
over all ranks) and ``epoch_time_s``, merged with the caller's ``extra_metrics``.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from tntsearch.exclusive import training_step
from tntsearch.model import TNTConfig, create_model, get_config
from tntsearch.spec import DataSpec, TrainSpec

__all__ = [
    "CHECKPOINT_FILE",
    "NONFINITE_CHECK_STEPS",
    "TRAIN_METRICS",
    "NonFiniteLossError",
    "TrainingOOMError",
    "Training",
    "resolve_precision",
    "make_optimizer",
    "make_schedule",
    "make_loss",
    "train_epoch",
    "evaluate",
    "load_state",
    "resume",
    "report_epoch",
    "fit",
]

CHECKPOINT_FILE = "checkpoint.pt"
# What every epoch reports; ``extra_metrics`` may not reuse these names.
TRAIN_METRICS = ("epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "images_per_s", "epoch_time_s")
# The host looks at the device-side non-finite-loss flag every this many steps (and at the
# end of each epoch), not every step: reading it waits for the GPU to catch up.
NONFINITE_CHECK_STEPS = 8
# DeiT's warm-up start (``--warmup-lr 1e-6``), reached linearly from here to the peak lr.
_WARMUP_LR_INIT = 1e-6

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
# Set-up
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


def make_optimizer(net: nn.Module, recipe: TrainSpec, global_batch: int) -> torch.optim.AdamW:
    """AdamW at ``recipe.lr`` per 512 images scaled to ``global_batch`` (DeiT's linear
    scaling), without weight decay on norms, biases and ``net.no_weight_decay()``."""
    from timm.optim import param_groups_weight_decay

    groups = param_groups_weight_decay(net, recipe.weight_decay, no_weight_decay_list=net.no_weight_decay())
    return torch.optim.AdamW(groups, lr=recipe.lr * global_batch / 512)


def make_schedule(optimizer: torch.optim.Optimizer, recipe: TrainSpec, steps_per_epoch: int):
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


def make_loss(recipe: TrainSpec) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy with label smoothing for class indices; timm's soft-target
    cross-entropy for Mixup/CutMix targets (the loader folds the smoothing into them)."""
    from timm.loss import SoftTargetCrossEntropy

    hard, soft = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing), SoftTargetCrossEntropy()
    return lambda logits, targets: soft(logits, targets) if targets.ndim == 2 else hard(logits, targets)


@dataclass
class Training:
    """What one process trains with: ``model`` is what runs (maybe DDP-wrapped), ``net`` the
    plain module whose state is saved; ``oom_context`` names batch and architecture for
    out-of-memory messages."""

    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    device: torch.device
    amp: torch.dtype | None
    clip_grad: float | None
    global_batch: int
    oom_context: str

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext()

    def oom(self, e: BaseException, where: str) -> TrainingOOMError:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return TrainingOOMError(f"out of memory on {self.device} during {where} {self.oom_context} ({reason})")


# ---------------------------------------------------------------------------------------
# One epoch, evaluation, checkpoints
# ---------------------------------------------------------------------------------------

def _raise_if_nonfinite(bad_step: torch.Tensor, bad_loss: torch.Tensor, lrs: Sequence[float], epoch: int,
                        t: Training) -> None:
    step = int(bad_step.item())  # the only host-device synchronisation of the loop
    if step:
        raise NonFiniteLossError(
            f"loss became {bad_loss.item()} at epoch {epoch} step {step} (lr={lrs[step - 1]:.3g}, "
            f"global batch {t.global_batch}): lower train.lr or set train.clip_grad")


def train_epoch(t: Training, loader, epoch: int) -> dict[str, Any]:
    """Train one epoch; return this rank's ``loss_sum`` (a device tensor), ``seen``,
    ``elapsed`` (s) and the last step's ``lr``.

    Non-finite losses are flagged on the device and the flag is read every
    ``NONFINITE_CHECK_STEPS`` steps and at the end, so the host does not wait for the
    device every step; the error names the first bad step, and an epoch with one never
    reaches :func:`report_epoch`, so the last checkpoint stays good. On CPU a step waits
    while a measurement has the machine's CPUs (:func:`tntsearch.exclusive.training_step`).
    """
    device = t.device
    steps = len(loader)
    t.model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    bad_step = torch.zeros((), dtype=torch.int64, device=device)  # 1-based; 0 = none yet
    bad_loss = torch.zeros((), dtype=torch.float32, device=device)
    lrs: list[float] = []
    seen = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tic = time.perf_counter()
    for step, (images, targets) in enumerate(loader, start=1):
        t.scheduler.step_update(num_updates=(epoch - 1) * steps + step - 1)
        lrs.append(t.optimizer.param_groups[0]["lr"])
        try:
            with training_step(device):
                with t.autocast():
                    logits = t.model(images)
                loss = t.loss_fn(logits.float(), targets)
                t.optimizer.zero_grad(set_to_none=True)
                t.scaler.scale(loss).backward()
                if t.clip_grad is not None:
                    t.scaler.unscale_(t.optimizer)
                    nn.utils.clip_grad_norm_(t.net.parameters(), t.clip_grad)
                t.scaler.step(t.optimizer)
                t.scaler.update()
        except torch.OutOfMemoryError as e:
            raise t.oom(e, f"training (epoch {epoch} step {step})") from e
        loss = loss.detach()
        first = (bad_step == 0) & ~torch.isfinite(loss)
        bad_step = torch.where(first, step, bad_step)
        bad_loss = torch.where(first, loss, bad_loss)
        loss_sum += loss.double() * len(images)
        seen += len(images)
        if step % NONFINITE_CHECK_STEPS == 0:
            _raise_if_nonfinite(bad_step, bad_loss, lrs, epoch, t)
    _raise_if_nonfinite(bad_step, bad_loss, lrs, epoch, t)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"loss_sum": loss_sum, "seen": seen, "elapsed": time.perf_counter() - tic, "lr": lrs[-1]}


def evaluate(model: nn.Module, loader, device: torch.device, amp: torch.dtype | None, num_classes: int):
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
            with training_step(device), torch.autocast(device.type, dtype=amp) if amp else nullcontext():
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
    """The training state that :func:`report_epoch` handed over, as saved in a checkpoint
    directory (``CHECKPOINT_FILE``) by ``tntsearch.trainer``."""
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def _check_state_arch(state: Mapping[str, Any] | None, arch: TNTConfig) -> None:
    if state is not None and dict(state["arch"]) != arch.to_dict():
        raise ValueError(
            f"the checkpoint holds architecture {dict(state['arch'])}, not {arch.to_dict()}: "
            f"use a new run name for a new architecture")


def resume(t: Training, state: Mapping[str, Any] | None) -> int:
    """Load a state given to ``report`` before into ``t``; return its epoch (0 without one)."""
    if state is None:
        return 0
    t.net.load_state_dict(state["model"])
    t.optimizer.load_state_dict(state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    t.scaler.load_state_dict(state["scaler"])
    return int(state["epoch"])


def report_epoch(report: Report | None, t: Training, arch: TNTConfig, metrics: dict[str, Any]) -> None:
    """``report(metrics, state)``; the state (live tensors: save or copy it) on rank 0 only."""
    if report is None:
        return
    state = None
    if _world()[0] == 0:
        state = {
            "epoch": metrics["epoch"],
            "arch": arch.to_dict(),
            "model": t.net.state_dict(),
            "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(),
            "scaler": t.scaler.state_dict(),
            "metrics": {k: metrics[k] for k in TRAIN_METRICS},
        }
    report(metrics, state)


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------

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
    initial_weights: Mapping[str, torch.Tensor] | None = None,
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
        initial_weights: a state dict of ``arch`` to start from instead of a random
            initialisation (fine-tuning, e.g. weights inherited from a supernet), with a fresh
            optimizer and schedule; a ``start_state`` still wins (a resumed fine-tuning).

    Raises:
        NonFiniteLossError: the loss became NaN/inf (the message names epoch, step and lr).
        TrainingOOMError: a step ran out of memory (the message names batch size and arch).
    """
    from tntsearch.data import make_loaders

    arch = get_config(arch)
    device = torch.device(device)
    extra = dict(extra_metrics or {})
    clash = sorted(set(extra) & set(TRAIN_METRICS))
    if clash:
        raise ValueError(f"extra_metrics may not use the training metric names {clash}")
    if stop_epoch is not None and stop_epoch < 1:
        raise ValueError(f"stop_epoch must be >= 1 or None; got {stop_epoch}")
    _check_state_arch(start_state, arch)
    rank, world = _world()
    amp = resolve_precision(recipe.precision, device)

    torch.manual_seed(recipe.seed)  # the same initial weights on every rank
    net = create_model(arch)
    if initial_weights is not None:
        net.load_state_dict(initial_weights)
    torch.manual_seed(recipe.seed + 1 + rank)  # independent drop-path masks per rank
    model = prepare_model(net) if prepare_model is not None else _default_prepare(net, device)
    model = torch.compile(model) if recipe.compile else model  # docs/model_and_cost.md, "torch.compile"
    train_loader, val_loader = make_loaders(
        data, arch.img_size, device=device, distributed=world > 1, seed=recipe.seed,
        num_classes=arch.num_classes, label_smoothing=recipe.label_smoothing, drop_last=True,
    )
    if len(train_loader) == 0:
        raise ValueError(
            f"data.batch_size={data.batch_size} is larger than the training set's share of one "
            f"worker: not a single full batch per epoch")
    global_batch = data.batch_size * world
    optimizer = make_optimizer(net, recipe, global_batch)
    t = Training(
        model=model, net=net, optimizer=optimizer, scheduler=make_schedule(optimizer, recipe, len(train_loader)),
        scaler=torch.amp.GradScaler(device.type, enabled=amp == torch.float16), loss_fn=make_loss(recipe),
        device=device, amp=amp, clip_grad=recipe.clip_grad, global_batch=global_batch,
        oom_context=(f"at data.batch_size={data.batch_size} per worker (global {global_batch}) for architecture "
                     f"{arch.to_dict()}: lower data.batch_size or constrain the architecture"),
    )
    start_epoch = resume(t, start_state)
    # NOTE: the loaders order epoch e by (seed, e), counting e from 0 in every new Loader;
    # starting the count at the resumed epoch gives a resumed run the order an unbroken run has.
    train_loader.next_epoch = start_epoch

    last = recipe.epochs if stop_epoch is None else min(stop_epoch, recipe.epochs)
    history: list[dict[str, Any]] = []
    for epoch in range(start_epoch + 1, last + 1):
        tic = time.perf_counter()
        trained = train_epoch(t, train_loader, epoch)
        try:
            val_loss, val_top1, val_top5 = evaluate(model, val_loader, device, amp, arch.num_classes)
        except torch.OutOfMemoryError as e:
            raise t.oom(e, f"validation (epoch {epoch})") from e
        total_loss, total_seen = _all_reduce([trained["loss_sum"].item(), trained["seen"]], "sum", device)
        max_elapsed, epoch_time = _all_reduce(
            [trained["elapsed"], time.perf_counter() - tic], "max", device)
        metrics = {
            **extra,
            "epoch": epoch,
            "train_loss": total_loss / total_seen,
            "val_loss": val_loss,
            "val_top1": val_top1,
            "val_top5": val_top5,
            "lr": trained["lr"],
            "images_per_s": total_seen / max_elapsed,
            "epoch_time_s": epoch_time,  # training + validation, slowest rank
        }
        history.append(metrics)
        report_epoch(report, t, arch, metrics)
    return history


if __name__ == "__main__":
    # ``python -m tntsearch.train`` (the Ray Train command line lives in tntsearch.trainer)
    import sys

    from tntsearch.trainer import main

    sys.exit(main())
