"""Project the captured layers' rows while the forward pass is still running the later layers.

A layer's projection needs only that layer's queries, keys and values, which the capture records
as soon as the layer has run. On a CPU the forward pass of a short input keeps about one core
busy (a second thread barely speeds it up), so projecting early layers on a worker thread while
the later ones run hides much of the projection's time; the compiled solver and PyTorch's kernels
release the GIL.

For inputs of at most :data:`SPLIT_MAX_TOKENS` tokens on a CPU, the forward pass runs the layers
after the first on one thread fewer (the caller's setting is restored when it returns, also after
an error), so the worker has a core of its own.

Each projection call has a fixed cost (checks, layout, a few batched LAPACK calls), so the worker
takes every layer waiting when it becomes free and projects them in one batch. Layers still
waiting when the forward returns are taken by the caller's thread, which works alongside the
worker's last batch.

The caller never waits for the worker to *start*: a batch the worker has not taken when the forward
ends (the worker is busy with another thread's call, or the scheduler has not run it) is done by
the caller, and only a batch the worker is already projecting is waited for. The worker runs at
the caller's priority, so the scheduler does not starve the batch the caller may wait for.

Rows are solved one by one and bases per head, so how the layers happen to be batched does not
change the result beyond rounding in the batched products.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache

import torch

from captum_effattn.attr._queries import QueryRows, QuerySpec, select_query_rows
from captum_effattn.attr._views import LayerResult, View, project_layers
from captum_effattn.models import CapturedHeads

# Up to this many tokens (batch x sequence) a CPU forward pass gains less from its last thread
# than the worker gains from a core of its own, so the forward gives that thread's core to the
# worker; on longer inputs the forward needs every thread and the split costs time (the
# measurements behind the threshold are in the CHANGELOG).
SPLIT_MAX_TOKENS = 256


def _start_worker() -> None:
    # One thread per solve; normal priority: a worker at a lower one can be starved for as long
    # as other processes keep the cores busy, and the caller may wait for its batch.
    torch.set_num_threads(1)  # per thread: the caller's setting is untouched


@cache
def _worker() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="captum_effattn_projection", initializer=_start_worker
    )


@dataclass(eq=False)
class _Batch:
    """Layers the worker took to project together; ``done`` is set when it has finished."""

    layers: list[CapturedHeads]
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class LayerPipeline:
    """Projects captured layers on a worker thread (pass :meth:`submit` as ``on_layer``).

    Args:
        query: the query rows to project, resolved on the first layer's key mask. If it does not
            resolve (a bad position), nothing is projected early and the caller's own
            :func:`select_query_rows` raises the error after the forward.
        view: the view to apply.
    """

    def __init__(self, query: QuerySpec, view: View) -> None:
        self._query = query
        self._view = view
        self._queries: QueryRows | None = None
        self._failed = False
        self._lock = threading.Lock()
        self._submitted: list[CapturedHeads] = []
        self._waiting: list[CapturedHeads] = []
        self._drain_queued = False
        self._closed = False
        self._jobs: list[Future] = []
        self._batches: list[_Batch] = []
        self._results: dict[int, LayerResult] = {}
        self._caller_threads: int | None = None

    def submit(self, captured: CapturedHeads) -> None:
        """Queue ``captured`` for projection (called from inside the forward pass)."""
        if self._failed:
            return
        if self._queries is None:
            try:
                self._queries = select_query_rows(self._query, captured.key_mask, captured.causal)
            except (TypeError, ValueError):
                self._failed = True
                return
            self._split_threads(captured.key_mask)
        with self._lock:
            self._submitted.append(captured)
            self._waiting.append(captured)
            if self._drain_queued:
                return  # a batch not started yet will take this layer too
            self._drain_queued = True
        self._jobs.append(_worker().submit(self._work))

    def _split_threads(self, key_mask: torch.Tensor) -> None:
        """Leave a core to the worker for the rest of a small CPU forward pass."""
        threads = torch.get_num_threads()
        small = key_mask.device.type == "cpu" and key_mask.numel() <= SPLIT_MAX_TOKENS
        if small and self._view.solves and threads > 1:
            self._caller_threads = threads
            torch.set_num_threads(threads - 1)  # this thread's setting only (OpenMP, MKL)

    def _restore_threads(self) -> None:
        if self._caller_threads is not None:
            torch.set_num_threads(self._caller_threads)
            self._caller_threads = None

    def _drain(self) -> None:
        """Project every layer waiting now, in one batch (the caller's share: errors raise)."""
        with self._lock:
            taken, self._waiting = self._waiting, []
            self._drain_queued = False
        if taken:
            self._project(taken)

    def _work(self) -> None:
        """The worker's job: take the layers waiting now, if the pipeline is still open."""
        with self._lock:
            taken, self._waiting = self._waiting, []
            self._drain_queued = False
            if not taken or self._closed:
                return
            batch = _Batch(taken)
            self._batches.append(batch)
        try:
            self._project(taken)
        except BaseException as error:  # handed to the caller, which re-raises it
            batch.error = error
        finally:
            batch.done.set()

    def _project(self, taken: list[CapturedHeads]) -> None:
        assert self._queries is not None  # resolved before the first layer was queued
        with torch.no_grad():  # grad mode is per thread
            projected = project_layers(taken, self._queries, self._view)
        for captured, result in zip(taken, projected, strict=True):
            self._results[id(captured)] = result

    def results(self, captured: Sequence[CapturedHeads], queries: QueryRows) -> list[LayerResult]:
        """Each layer's projection, in layer order.

        Args:
            captured: the layers of the forward pass, as the capture returned them.
            queries: the query rows resolved after the forward.
        """
        self._restore_threads()  # the forward is over
        if len(self._submitted) != len(captured) or any(
            a is not b for a, b in zip(self._submitted, captured, strict=True)
        ):
            # Not the layers of exactly this forward pass: project them here instead.
            self.close()
            return project_layers(captured, queries, self._view)
        self._drain()  # what the worker has not taken yet, alongside its current batch
        for batch in self._started_batches():
            batch.done.wait()  # a batch the worker is projecting: it runs at normal priority
            if batch.error is not None:
                raise batch.error
        return [self._results[id(c)] for c in captured]

    def _started_batches(self) -> list[_Batch]:
        """Close the pipeline to the worker: jobs not started are cancelled, and one that starts
        later finds nothing to take. The batches it did take."""
        with self._lock:
            self._closed = True
            self._waiting = []
            batches = list(self._batches)
        for job in self._jobs:
            job.cancel()
        return batches

    def close(self) -> None:
        """Stop the worker taking layers and wait for the batch it is projecting, if any (also
        after an error), so that no work on the model's tensors outlives the call; the caller's
        thread setting is back as it was."""
        self._restore_threads()
        for batch in self._started_batches():
            batch.done.wait()  # its error, if any, was raised by results() or does not matter
        self._jobs.clear()
