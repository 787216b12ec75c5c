"""A machine's CPUs to one measurement at a time: training steps yield to it.

Ray's CPUs are logical: a measuring task holding one still shares the cores, caches and
memory bandwidth with every trial training beside it, and asking Ray for all of a node's
CPUs would leave it pending until no trial trains there (Ray gives a large request no
priority over the next trials' 1-CPU workers). So a measurement on CPU and the training
steps on CPU meet at two ``flock(2)`` files in the temp directory (docs/model_and_cost.md,
"Measuring in a search"):

- the *gate*: a measurement holds it exclusively from the moment it asks; every training
  step passes it (shared) on its way in, so no step starts while a measurement waits or
  runs -- a measurement is never starved by steps that keep coming;
- the *room*: every step holds it shared while it runs, the measurement exclusively, so the
  timing starts once the steps already past the gate have ended.

A training process waits at most for the measurements queued at the gate, each a few
seconds and taken once per trial. The kernel drops a dead process's locks with its files.
On a GPU nothing is locked: the measuring task holds the GPU through Ray, which keeps every
Train worker off it.
"""
from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

__all__ = ["measuring", "training_step"]


def _path(name: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"tntsearch-cpu-{name}.lock")


@contextmanager
def _held(name: str, how: int) -> Iterator[None]:
    """``flock(how)`` on a fresh descriptor of lock file ``name`` (fresh, so that two holders
    in one process conflict too); released when it is closed."""
    fd = os.open(_path(name), os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, how)
        yield
    finally:
        os.close(fd)


@contextmanager
def measuring(device: str | torch.device) -> Iterator[None]:
    """Hold this machine's CPUs for a measurement on ``device`` (nothing to hold off CPU)."""
    if torch.device(device).type != "cpu":
        yield
        return
    with _held("gate", fcntl.LOCK_EX), _held("room", fcntl.LOCK_EX):
        yield


@contextmanager
def training_step(device: str | torch.device) -> Iterator[None]:
    """One training (or validation) step on ``device``, started only while no measurement
    holds the CPUs.

    NOTE: ranks of a distributed run do not yield: one rank waiting at the gate while
    another, already past it, waits for it inside a collective (holding the room) would
    deadlock with the measurement. Yielding there would need the ranks to agree on the step
    to pause at.
    """
    if torch.device(device).type != "cpu" or (dist.is_available() and dist.is_initialized()
                                              and dist.get_world_size() > 1):
        yield
        return
    with _held("gate", fcntl.LOCK_SH):
        pass
    with _held("room", fcntl.LOCK_SH):
        yield
