"""One-shot training of a supernet, free of Ray: every step trains a few of its sub-networks.

The recipe is ``tntsearch.train``'s (``make_optimizer``, ``make_schedule``, ``make_loss``,
``evaluate``: AdamW, cosine, label smoothing, Mixup/CutMix, clipping, autocast), run for
``spec.supernet.epochs``. Each step (docs/supernet.md):

- :class:`~tntsearch.supernet.sampling.SubnetSampler` draws the step's sub-networks from a
  generator seeded by the step number, so every rank trains the same ones;
- each sub-network runs forward and backward on the same batch, gradients accumulating in
  the shared weights; with ``sandwich`` and ``distill`` the largest learns from the labels
  and the others from the largest's predictions (in-place distillation, BigNAS/NASViT);
- the gradients are averaged over the ranks with one all-reduce, then one optimizer step.

Why not ``DistributedDataParallel``: it all-reduces after every backward (k of them per
step here) and needs ``find_unused_parameters`` because each sub-network leaves other
parameters unused. One all-reduce of the gradients that exist computes the same average;
they are the same tensors on every rank, because every rank ran the same sub-networks.

Every epoch reports ``epoch``, ``train_loss`` (mean over the step's sub-networks), ``lr``,
``images_per_s``, ``epoch_time_s``, and ``val_loss_<name>``, ``val_top1_<name>``,
``val_top5_<name>`` for the ``largest``, the ``smallest`` and every ``search.baselines``
sub-network, evaluated with inherited weights (``Supernet.extract``).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from tntsearch.model import TNTConfig
from tntsearch.spec import SearchSpec
from tntsearch.supernet.model import Supernet
from tntsearch.supernet.sampling import SubnetSampler
from tntsearch.train import (
    NonFiniteLossError, evaluate, make_loss, make_optimizer, make_schedule, resolve_precision,
)

__all__ = ["SUPERNET_METRICS", "eval_archs", "average_gradients", "fit_supernet"]

# What every epoch reports besides the per-sub-network ``val_*_<name>`` metrics.
SUPERNET_METRICS = ("epoch", "train_loss", "lr", "images_per_s", "epoch_time_s")

Report = Callable[[dict[str, Any], "dict[str, Any] | None"], None]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def eval_archs(spec: SearchSpec, net: Supernet) -> dict[str, TNTConfig]:
    """The sub-networks validated every epoch: ``largest``, ``smallest`` and the baselines."""
    from tntsearch.space import arch_from_params, baseline_points

    archs = {"largest": net.largest(), "smallest": net.smallest()}
    for name, params in baseline_points(spec):
        archs[name] = arch_from_params(params, spec.space)
    return archs


def average_gradients(net: nn.Module) -> None:
    """Average the existing gradients over the ranks, in one all-reduce (no-op on one rank)."""
    world = _world()[1]
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def fit_supernet(
    spec: SearchSpec,
    *,
    device: torch.device | str = "cpu",
    report: Report | None = None,
    start_state: Mapping[str, Any] | None = None,
    stop_epoch: int | None = None,
) -> list[dict[str, Any]]:
    """Train the supernet of ``spec.space`` with ``spec.supernet``'s sampling; return each epoch's metrics.

    ``report(metrics, state)`` is called once per epoch on every rank, ``state`` on rank 0
    only (live tensors: save it before returning): ``epoch``, ``space`` and ``supernet``
    (the spec's sections, JSON-able), ``model``, ``optimizer``, ``scheduler``, ``scaler``,
    ``sampler`` and ``metrics``. ``start_state`` is such a state: training continues at
    the next epoch with the sampler where it stopped. ``stop_epoch`` returns after that
    epoch, keeping the schedule of ``spec.supernet.epochs``.
    """
    from timm.loss import SoftTargetCrossEntropy

    from tntsearch.data import make_loaders

    if spec.supernet is None:
        raise ValueError("the spec has no supernet section")
    if stop_epoch is not None and stop_epoch < 1:
        raise ValueError(f"stop_epoch must be >= 1 or None; got {stop_epoch}")
    sup, data = spec.supernet, spec.data
    recipe = spec.train.model_copy(update={"epochs": sup.epochs})
    device = torch.device(device)
    rank, world = _world()
    amp = resolve_precision(recipe.precision, device)

    torch.manual_seed(recipe.seed)  # the same initial weights on every rank
    net = Supernet(spec.space).to(device)
    torch.manual_seed(recipe.seed + 1 + rank)  # independent drop-path masks per rank
    bounds = net.space.bounds
    # NOTE: data.search_fraction's held-out images score the search's candidates: never trained on.
    from tntsearch.supernet.selection import search_split

    train_indices, _ = search_split(data, recipe.seed)
    train_loader, val_loader = make_loaders(
        data, bounds.img_size, device=device, distributed=world > 1, seed=recipe.seed,
        num_classes=bounds.num_classes, label_smoothing=recipe.label_smoothing, drop_last=True,
        train_indices=train_indices,
    )
    steps = len(train_loader)
    if steps == 0:
        raise ValueError(f"data.batch_size={data.batch_size} is larger than one worker's share of the training set")
    optimizer = make_optimizer(net, recipe, data.batch_size * world)
    scheduler = make_schedule(optimizer, recipe, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    loss_fn, distill_fn = make_loss(recipe), SoftTargetCrossEntropy()
    sampler = SubnetSampler(net.space, sup.sampling, sup.k, seed=recipe.seed)
    archs = eval_archs(spec, net)

    start_epoch = 0
    if start_state is not None:
        net.load_state_dict(start_state["model"])
        optimizer.load_state_dict(start_state["optimizer"])
        scheduler.load_state_dict(start_state["scheduler"])
        scaler.load_state_dict(start_state["scaler"])
        sampler.load_state_dict(start_state["sampler"])
        start_epoch = int(start_state["epoch"])
    # NOTE: as in tntsearch.train.fit: the resumed run's loader visits epoch e in the order
    # an unbroken run would.
    train_loader.next_epoch = start_epoch

    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext
    last = sup.epochs if stop_epoch is None else min(stop_epoch, sup.epochs)
    history: list[dict[str, Any]] = []
    for epoch in range(start_epoch + 1, last + 1):
        tic = time.perf_counter()
        net.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        for step, (images, targets) in enumerate(train_loader, start=1):
            scheduler.step_update(num_updates=(epoch - 1) * steps + step - 1)
            optimizer.zero_grad(set_to_none=True)
            teacher = None
            for arch in sampler.draw():
                with autocast():
                    logits = net(images, arch).float()
                loss = loss_fn(logits, targets) if teacher is None else distill_fn(logits, teacher)
                if sup.distill and teacher is None:  # the largest comes first
                    teacher = logits.detach().softmax(dim=-1)
                scaler.scale(loss).backward()
                loss_sum += loss.detach().double() * len(images) / sampler.per_step
            average_gradients(net)
            if recipe.clip_grad is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(net.parameters(), recipe.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            seen += len(images)
        elapsed = time.perf_counter() - tic
        totals = torch.tensor([loss_sum.item(), seen, elapsed], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(totals[:2])
            dist.all_reduce(totals[2:], op=dist.ReduceOp.MAX)
        total_loss, total_seen, max_elapsed = totals.tolist()
        if not torch.isfinite(torch.tensor(total_loss)):
            raise NonFiniteLossError(
                f"the supernet's training loss became {total_loss} in epoch {epoch}: lower train.lr or set train.clip_grad")
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": total_loss / total_seen,
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": total_seen / max_elapsed,
        }
        for name, arch in archs.items():
            val_loss, top1, top5 = evaluate(net.extract(arch), val_loader, device, amp, bounds.num_classes)
            metrics.update({f"val_loss_{name}": val_loss, f"val_top1_{name}": top1, f"val_top5_{name}": top5})
        metrics["epoch_time_s"] = time.perf_counter() - tic  # this rank's training + validation
        history.append(metrics)
        if report is not None:
            state = None
            if rank == 0:
                dumped = spec.model_dump(mode="json")
                state = {"epoch": epoch, "space": dumped["space"], "supernet": dumped["supernet"],
                         "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                         "sampler": sampler.state_dict(), "metrics": dict(metrics)}
            report(metrics, state)
    return history
