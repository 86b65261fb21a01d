"""Small batched solves run on one CPU thread.

The solver's batched LAPACK calls on many small matrices (Cholesky, QR, eigh of ``r x r`` with
``r <= d + 1``) hand every matrix to the thread pool, whose hand-off costs more than the small
matrices' arithmetic: such solves, and whole [CLS]-row projections, run faster on one thread.
Large chunks still gain from threads, so only
chunks below :data:`SINGLE_THREAD_WORK` switch, and the caller's setting is restored on exit,
also when the solve raises. With PyTorch's OpenMP backend ``torch.set_num_threads`` holds for
the calling thread only (a product on the main thread keeps its threads while another thread has
set one), so other threads computing at the same moment keep
theirs.

Work that runs outside PyTorch's pool (the compiled Newton phase) asks :func:`allowed_threads`
for the caller's setting, which stays what it was outside the single-thread block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

SINGLE_THREAD_WORK = 8_000_000
"""Rows x keys x basis width of a chunk below which it is solved on one thread."""

_CALLER_THREADS: ContextVar[int | None] = ContextVar("caller_threads", default=None)


def allowed_threads() -> int:
    """The threads the caller gave PyTorch (``torch.get_num_threads()`` outside
    :func:`threads_for`'s single-thread block, and the setting from before it inside)."""
    caller = _CALLER_THREADS.get()
    return torch.get_num_threads() if caller is None else caller


@contextmanager
def single_thread() -> Iterator[None]:
    """Run the block on one PyTorch thread of the calling thread (and so one solver thread); the
    setting from before is restored on exit, also when the block raises."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def threads_for(work: int, device: torch.device) -> Iterator[None]:
    """Run the block on one thread if it is CPU work below ``SINGLE_THREAD_WORK`` entries (the
    compiled phase still reads the caller's setting from :func:`allowed_threads`)."""
    before = torch.get_num_threads()
    if device.type != "cpu" or work >= SINGLE_THREAD_WORK or before == 1:
        yield
        return
    token = _CALLER_THREADS.set(before)
    try:
        with single_thread():
            yield
    finally:
        _CALLER_THREADS.reset(token)
