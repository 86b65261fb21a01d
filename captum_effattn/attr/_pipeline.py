"""Project the captured layers' rows while the forward pass is still running the later layers.

A layer's projection needs only that layer's queries, keys and values, which the capture records
as soon as the layer has run. When the process has a CPU core that PyTorch's threads leave idle
(say one torch thread on two cores), projecting early layers on a worker thread, on that core,
while the later ones run hides much of the projection's time; the compiled solver and PyTorch's
kernels release the GIL. When PyTorch's threads already cover every core, a worker would only
compete with the forward pass for them (measured on MiniLM, two threads on two cores: 1.34x-1.93x
a forward pass with a worker, 1.22x-1.36x projecting afterwards), so every layer is projected
after the forward, on all the caller's threads. On CUDA the projection always overlaps the forward.

Every row of several layers (``query="all"``) on two threads and two cores goes to the same
sharing after the forward, a thread each: the caller and the worker then each project whole
layers, their checks, copies and certificates included, while the other one solves, where the
solver's own pool on both threads runs only the solve in parallel.

Each projection call has a fixed cost (checks, layout, a few batched LAPACK calls), so layers are
taken in portions of at least :data:`PORTION_ROWS` rows (all the [CLS] rows of a small batch at
once; one layer at a time of ``query="all"``). The worker takes the portions waiting when it
becomes free; when the forward returns, the caller and the worker take the remaining portions
one by one until none is left, so that long projections (every row of every layer) are shared
between the two.

The caller never waits for the worker to *start*: a portion the worker has not taken when the
caller looks for work (the worker is busy with another thread's call, or the scheduler has not run
it) is done by the caller, and only a portion the worker is already projecting is waited for. The
worker runs at the caller's priority, so the scheduler does not starve the portion the caller may
wait for.

Rows are solved one by one and bases per head, so how the layers happen to be grouped into
portions does not change the result beyond rounding in the batched products.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache

import torch

from captum_effattn.attr._queries import QueryRows, QuerySpec, select_query_rows
from captum_effattn.attr._views import LayerResult, View, project_layers
from captum_effattn.models import CapturedHeads
from captum_effattn.projection.engine.threads import single_thread

# Rows (examples x heads x query rows) a portion of layers reaches before it is projected: small
# enough that a projection of every row of every layer is shared layer by layer, large enough
# that the [CLS] rows of a small batch go in one call.
PORTION_ROWS = 512


def spare_core() -> bool:
    """Whether this process may run on more CPU cores than PyTorch's threads use (one of them is
    then the worker's)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return torch.get_num_threads() < cores


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
    """A portion of layers the worker took; ``done`` is set when it has finished."""

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
        self._overlapping: bool | None = None  # decided on the first layer
        self._lock = threading.Lock()
        self._submitted: list[CapturedHeads] = []
        self._waiting: list[CapturedHeads] = []
        self._drain_queued = False
        self._closed = False
        self._jobs: list[Future] = []
        self._batches: list[_Batch] = []
        self._results: dict[int, LayerResult] = {}

    def submit(self, captured: CapturedHeads) -> None:
        """Queue ``captured`` for projection (called from inside the forward pass)."""
        if self._overlapping is None:
            self._overlapping = self._worth_overlapping(captured)
        if not self._overlapping:
            return
        with self._lock:
            self._submitted.append(captured)
            self._waiting.append(captured)
            if self._drain_queued:
                return  # a job not started yet will take this layer too
            self._drain_queued = True
        self._jobs.append(_worker().submit(self._work))

    def _worth_overlapping(self, captured: CapturedHeads) -> bool:
        """A view that solves, a query that resolves, and a device with room for the worker."""
        if not self._view.solves:
            return False  # rows read off the capture: cheaper after the forward than a hand-off
        try:
            self._queries = select_query_rows(self._query, captured.key_mask, captured.causal)
        except (TypeError, ValueError):
            return False
        return captured.key_mask.device.type != "cpu" or spare_core()

    def _portion(self) -> list[CapturedHeads]:
        """Take waiting layers, oldest first, until they hold :data:`PORTION_ROWS` rows (call
        with the lock held)."""
        assert self._queries is not None  # resolved before the first layer was queued
        queries = self._queries.positions.shape[-1]
        taken, rows = [], 0
        while self._waiting and rows < PORTION_ROWS:
            layer = self._waiting.pop(0)
            taken.append(layer)
            rows += layer.values.shape[0] * layer.values.shape[1] * queries
        return taken

    def _drain(self) -> None:
        """Project waiting portions until none is left (the caller's share: errors raise)."""
        while True:
            with self._lock:
                taken = self._portion()
            if not taken:
                return
            self._project(taken)

    def _work(self) -> None:
        """The worker's job: take waiting portions until none is left or the pipeline closes."""
        while True:
            with self._lock:
                self._drain_queued = False
                if self._closed:
                    return
                taken = self._portion()
                if not taken:
                    return
                batch = _Batch(taken)
                self._batches.append(batch)
            try:
                self._project(taken)
            except BaseException as error:  # handed to the caller, which re-raises it
                batch.error = error
                return
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
        if (
            not self._overlapping
            or len(self._submitted) != len(captured)
            or any(a is not b for a, b in zip(self._submitted, captured, strict=True))
        ):
            # Nothing overlapped, or not the layers of exactly this forward pass: project here.
            self.close()
            if not self._share_after_forward(captured, queries):
                return project_layers(captured, queries, self._view)
            with single_thread():  # the worker has the other thread
                return self._collect(captured)
        return self._collect(captured)

    def _share_after_forward(self, captured: Sequence[CapturedHeads], queries: QueryRows) -> bool:
        """Every row of several layers, on two CPU threads that the forward pass had to itself:
        hand the layers to the worker now, for the caller and the worker to share a thread each
        (whether it did). Each then projects whole layers, its checks, copies and certificates
        included, while the other one solves; the solver's own pool on both threads runs only
        the solve in parallel (every row of MiniLM at n = 256: 737-765 against 805-814 ms)."""
        if not (
            self._view.solves
            and queries.all_rows
            and len(captured) > 1
            and captured[0].key_mask.device.type == "cpu"
            and torch.get_num_threads() == 2
        ):
            return False
        with self._lock:
            self._queries, self._closed = queries, False
            self._submitted, self._waiting = list(captured), list(captured)
            self._batches, self._results = [], {}
            self._drain_queued = True
        self._jobs.append(_worker().submit(self._work))
        return True

    def _collect(self, captured: Sequence[CapturedHeads]) -> list[LayerResult]:
        """Project the portions left with the worker, wait for its own, and return every layer's
        result in layer order."""
        self._drain()  # the worker, when free, takes portions too
        for batch in self._started_batches():
            batch.done.wait()  # a portion the worker is projecting: it runs at normal priority
            if batch.error is not None:
                raise batch.error
        return [self._results[id(c)] for c in captured]

    def _started_batches(self) -> list[_Batch]:
        """Close the pipeline to the worker: jobs not started are cancelled, and one that starts
        later finds nothing to take. The portions it did take."""
        with self._lock:
            self._closed = True
            self._waiting = []
            batches = list(self._batches)
        for job in self._jobs:
            job.cancel()
        return batches

    def close(self) -> None:
        """Stop the worker taking layers and wait for the portion it is projecting, if any (also
        after an error), so that no work on the model's tensors outlives the call."""
        for batch in self._started_batches():
            batch.done.wait()  # its error, if any, was raised by results() or does not matter
        self._jobs.clear()
