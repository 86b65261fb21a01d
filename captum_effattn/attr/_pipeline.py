"""Project the captured layers' rows while the forward pass is still running the later layers.

A layer's projection needs only that layer's queries, keys and values, which the capture records
as soon as the layer has run. On a CPU the forward pass of a short input keeps about one core
busy (MiniLM at 64 tokens: 16.5 ms on one thread, 16.7 ms on two), so projecting early layers on
a worker thread while the later ones run hides much of the projection's time; the compiled solver
and PyTorch's kernels release the GIL.

Each projection call has a fixed cost (checks, layout, a few batched LAPACK calls), so the worker
takes every layer waiting when it becomes free and projects them in one batch. Layers still
waiting when the forward returns are taken by the caller's thread, which works alongside the
worker's last batch.

Rows are solved one by one and bases per head, so how the layers happen to be batched does not
change the result beyond rounding in the batched products.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache

import torch

from captum_effattn.attr._queries import QueryRows, QuerySpec, select_query_rows
from captum_effattn.attr._views import View, project_layers
from captum_effattn.models import CapturedHeads

LayerResult = tuple[torch.Tensor, torch.Tensor]
"""``(rows (B, H_sel, Q, S), output_error (B, H_sel, Q))`` of one layer."""


@cache
def _worker() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(
        max_workers=1,
        thread_name_prefix="captum_effattn_projection",
        initializer=torch.set_num_threads,
        initargs=(1,),
    )


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
        self._jobs: list[Future] = []
        self._results: dict[int, LayerResult] = {}

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
        with self._lock:
            self._submitted.append(captured)
            self._waiting.append(captured)
            if self._drain_queued:
                return  # a batch not started yet will take this layer too
            self._drain_queued = True
        self._jobs.append(_worker().submit(self._drain))

    def _drain(self) -> None:
        """Project every layer waiting now, in one batch."""
        with self._lock:
            taken, self._waiting = self._waiting, []
            self._drain_queued = False
        if not taken:
            return
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
        if len(self._submitted) != len(captured) or any(
            a is not b for a, b in zip(self._submitted, captured, strict=True)
        ):
            # Not the layers of exactly this forward pass: project them here instead.
            self.close()
            return project_layers(captured, queries, self._view)
        self._drain()  # what the worker has not taken yet, alongside its current batch
        for job in self._jobs:
            job.result()  # waits, and re-raises the worker's error
        return [self._results[id(c)] for c in captured]

    def close(self) -> None:
        """Cancel the batches not started and wait for the running one (also after an error),
        so that no work on the model's tensors outlives the call."""
        for job in self._jobs:
            job.cancel()
        for job in self._jobs:
            if not job.cancelled():
                job.exception()  # waits; results() re-raises what matters
        self._jobs.clear()
