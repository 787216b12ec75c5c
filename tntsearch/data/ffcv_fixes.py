"""Workarounds for defects of FFCV 1.0.2, all in this one module.

Everything else in tntsearch builds loaders and writers through `SafeLoader` and
`SafeWriter`, so each defect is handled here once (tests: tests/test_data.py, `*defect*`):

1. JIT -> non-JIT -> JIT pipelines hang in `Loader.__init__` (libffcv/ffcv#396):
   `Graph.group_operations` assigns `current_front = next_front` without making a new
   `next_front`, so from the second stage on a node that belongs to a later stage is
   put back into the set being emptied, and the loop never ends. `SafeLoader` groups
   the graph with `_group_operations`, the same algorithm with a fresh set per stage.
2. An exception inside the loader's pipeline thread kills that thread, and the caller
   waits on its queue forever. `SafeLoader` iterates with `_EpochIterator`, whose thread
   hands the exception to the caller, who re-raises it as `PipelineError` at the next
   batch (and a dead thread without a report is noticed within a second).
3. Batches are reused buffers: FFCV cycles through `batches_ahead + 2` preallocated
   slots, so a batch kept past that many iterations is silently overwritten. Callers
   that keep a batch call `clone_batch(batch)`; nothing is copied otherwise.
4. FFCV changes torch's and numba's thread counts of the calling thread: importing it
   sets both to 1, and `Loader.__init__`/`__iter__` set them to `num_workers` (or to the
   host's cpu count for the default `num_workers=-1`). This module restores the counts
   after importing FFCV, `SafeLoader` restores them around both calls and refuses
   `num_workers < 1`. (The pipeline thread sets its own counts; they are thread-local.)
5. A custom `TraversalOrder` cannot be passed: `Loader` tests `isinstance(order,
   TraversalOrder)` on a class and then calls the instance. `SafeLoader` accepts any
   callable `order(loader) -> TraversalOrder` and installs it after construction.
6. `DatasetWriter` polls a shared counter until every sample is written, so a worker
   process that dies (an unreadable image) leaves the writer waiting forever.
   `SafeWriter` watches its workers; when one fails it stops the others and raises the
   worker's own exception (e.g. the dataset's `ValueError` naming the file) in the caller.
"""
from __future__ import annotations

import ctypes
import queue
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from multiprocessing import Process, Queue, Value
from time import sleep
from typing import Any

import numba
import torch


@contextmanager
def _keep_thread_counts() -> Iterator[None]:
    """Restore the calling thread's torch and numba thread counts on exit (defect 4)."""
    torch_threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        numba.set_num_threads(numba_threads)


with _keep_thread_counts():
    # NOTE: importing ffcv.pipeline.compiler calls Compiler.set_num_threads(1), which sets
    # this thread's torch *and* numba thread counts to 1 (defect 4).
    from ffcv.loader import Loader, OrderOption
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.graph import Graph
    from ffcv.traversal_order.base import TraversalOrder
    from ffcv.writer import DatasetWriter
    from tqdm import tqdm

__all__ = ["PipelineError", "SafeLoader", "SafeWriter", "clone_batch"]


class PipelineError(RuntimeError):
    """An exception raised inside FFCV's pipeline thread, re-raised in the caller."""


def clone_batch(batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Copies of a batch's tensors that survive later iterations (defect 3).

    FFCV writes every batch into one of `batches_ahead + 2` preallocated buffers, so the
    tensors a loader yields are overwritten a few batches later. Clone what you keep
    beyond the current step (a sample grid, the last batch for a check, ...).
    """
    return tuple(t.clone() for t in batch)


def _group_operations(graph: Graph) -> list[list[int]]:
    """`Graph.group_operations` with a fresh `next_front` per stage (defect 1).

    Stages alternate JIT (even) and Python (odd); each stage takes every reachable node
    of its kind, deferring the others to the next stage, exactly as FFCV intends.
    """
    current_front = set(graph.root_nodes.keys())
    stages: list[list[int]] = []
    while current_front:
        next_front = set()
        stage: list[int] = []
        jitted_stage = len(stages) % 2 == 0
        while current_front:
            node = current_front.pop()
            if node.is_jitted == jitted_stage or node.is_jitted is None:
                stage.append(graph.node_to_id[node])
                current_front.update(graph.adjacency_list[node])
            else:
                next_front.add(node)
        stages.append(stage)
        current_front = next_front
    return stages


class _Failure:
    """What the pipeline thread puts in the output queue instead of a batch when it fails."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _EpochIterator(EpochIterator):
    """FFCV's epoch iterator whose thread reports its failure to the caller (defect 2)."""

    def run(self) -> None:
        try:
            super().run()
        except BaseException as error:  # noqa: BLE001 -- everything must reach the caller
            while not self.terminate_event.is_set():
                try:
                    self.output_queue.put(_Failure(error), timeout=0.5)
                    return
                except queue.Full:
                    pass

    def __next__(self) -> Any:
        while True:
            try:
                result = self.output_queue.get(timeout=1.0)
                break
            except queue.Empty:
                # The thread may have died without reporting (e.g. killed while putting).
                if not self.is_alive() and self.output_queue.empty():
                    self.close()
                    raise PipelineError(
                        f"FFCV's pipeline thread for {self.loader.fname} stopped without a result"
                    ) from None
        if isinstance(result, _Failure):
            self.close()
            raise PipelineError(
                f"FFCV's pipeline failed while reading {self.loader.fname}: "
                f"{type(result.error).__name__}: {result.error}"
            ) from result.error
        if result is None:
            self.close()
            raise StopIteration
        slot, batch = result
        if getattr(self, "current_stream", None) is not None:
            # Same as FFCV: wait for the copy made on the slot's CUDA stream.
            self.current_stream.wait_stream(self.cuda_streams[slot])
        return batch

    def close(self) -> None:
        # FFCV's close never sets `closed`, so every call exits the memory context again.
        self.terminate_event.set()
        if not self.closed:
            self.closed = True
            self.memory_context.__exit__(None, None, None)


class SafeLoader(Loader):
    """`ffcv.loader.Loader` with defects 1, 2, 4 and 5 handled (see the module docstring).

    Takes the same arguments as FFCV's Loader, except that `num_workers` must be >= 1,
    `order` may also be a callable `order(loader) -> TraversalOrder`, and
    `batch_transform(images, labels) -> (images, labels)`, if given, is applied to every
    batch (timm's Mixup has that signature). Batches are still reused buffers (defect 3):
    see `clone_batch`.
    """

    def __init__(
        self,
        fname: str,
        batch_size: int,
        num_workers: int,
        *,
        order: OrderOption | Callable[[Loader], TraversalOrder] = OrderOption.SEQUENTIAL,
        batch_transform: Callable[[Any, Any], tuple[Any, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(
                f"num_workers must be an integer >= 1 (FFCV's -1 means every host core), got {num_workers!r}"
            )
        self.batch_transform = batch_transform
        custom_order = None if isinstance(order, OrderOption) else order
        with _keep_thread_counts():
            super().__init__(
                fname,
                batch_size,
                num_workers,
                order=OrderOption.SEQUENTIAL if custom_order else order,
                **kwargs,
            )
        if custom_order is not None:
            # Defect 5: install the custom order the way Loader.__init__ would have.
            self.traversal_order = custom_order(self)
            self.first_traversal_order = self.next_traversal_order()

    def generate_code(self) -> None:
        # Defect 1: an instance attribute shadows Graph.group_operations for this graph only.
        self.graph.group_operations = lambda: _group_operations(self.graph)
        super().generate_code()

    def __iter__(self) -> Iterator[Any]:
        # Loader.__iter__ with our epoch iterator, keeping the caller's thread counts.
        with _keep_thread_counts():
            Compiler.set_num_threads(self.num_workers)
            order = self.next_traversal_order()
            selected_order = order[: len(self) * self.batch_size]
            self.next_epoch += 1
            if self.code is None or self.recompile:
                self.generate_code()
            epoch = _EpochIterator(self, selected_order)
        return self._batches(epoch)

    def _batches(self, epoch: _EpochIterator) -> Iterator[Any]:
        try:
            for batch in epoch:
                if self.batch_transform is not None:
                    batch = self.batch_transform(*batch)
                yield batch
        finally:
            epoch.close()


class SafeWriter(DatasetWriter):
    """`ffcv.writer.DatasetWriter` that fails instead of hanging when a worker dies (defect 6).

    `desc` labels the progress bar (FFCV's tqdm bar, on stderr).
    """

    def __init__(self, fname: str, fields: dict, *, desc: str | None = None, **kwargs: Any) -> None:
        super().__init__(fname, fields, **kwargs)
        self.desc = desc or f"writing {fname}"

    def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):  # noqa: ANN001
        # FFCV's _write_common, with the wait loop watching the worker processes.
        self.num_samples = num_samples
        self.prepare()
        try:
            workqueue: Queue = Queue()
            for todo in queue_content:
                workqueue.put(todo)
            allocations_queue: Queue = Queue()
            for _ in range(self.num_workers):
                workqueue.put(None)
            done_number = Value(ctypes.c_uint64, 0)
            allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
            worker_args = (workqueue, self.metadata_sm, self.metadata_type, self.fields,
                           allocator, done_number, allocations_queue, *extra_worker_args)
            errors: Queue = Queue()
            processes = [Process(target=_report_errors, args=(errors, work_fn, *worker_args))
                         for _ in range(self.num_workers)]
            for p in processes:
                p.start()
            try:
                self._wait(processes, done_number, errors)
                allocation_list = []
                for _ in processes:
                    allocation_list.extend(self._get_allocations(allocations_queue, processes, errors))
            finally:
                for p in processes:
                    if p.is_alive():
                        p.terminate()
                    p.join()
            self.finalize(allocation_list)
        finally:
            self.metadata_sm.close()
            self.metadata_sm.unlink()

    def _wait(self, processes: list[Process], done_number: Any, errors: Queue) -> None:
        progress = tqdm(total=self.num_samples, desc=self.desc, unit="img")
        previous = 0
        try:
            while previous != self.num_samples:
                val = done_number.value
                if val > previous:
                    progress.update(val - previous)
                previous = val
                _raise_worker_error(processes, errors, f"after {previous} of {self.num_samples} samples")
                sleep(0.1)
        finally:
            progress.close()

    @staticmethod
    def _get_allocations(allocations_queue: Queue, processes: list[Process], errors: Queue) -> list:
        while True:
            try:
                return allocations_queue.get(timeout=1.0)
            except queue.Empty:
                _raise_worker_error(processes, errors, "before handing back its pages")


def _report_errors(errors: Queue, work_fn: Callable[..., None], *args: Any) -> None:
    """Writer process body: run FFCV's worker, hand an exception to the parent, exit 1."""
    try:
        work_fn(*args)
    except Exception as exc:  # noqa: BLE001 -- every failure goes to the parent
        try:
            errors.put(exc)
        except Exception:  # noqa: BLE001 -- an exception that does not pickle
            errors.put(RuntimeError(f"{type(exc).__name__}: {exc}"))
        sys.exit(1)  # the queue is flushed at exit; no traceback: the parent raises it


def _raise_worker_error(processes: list[Process], errors: Queue, when: str) -> None:
    failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
    if not failed:
        return
    try:
        error = errors.get(timeout=5.0)
    except queue.Empty:
        error = RuntimeError(f"a writer process exited with code {failed[0]} {when}")
    raise error
