"""Memory that captures reuse from call to call for the queries, keys and values they record.

A lazy capture (``materialize=False``) records the selected layers' queries, keys and values.
Holding the model's own tensors until the forward pass returns keeps the allocator from reusing
their memory for the layers after them, and when the call ends and they are freed, the C library
hands that memory back to the system: the next call touches it afresh, one page fault per 4 KiB.
On MiniLM at batch 1, n = 128 that was some 900 faults a call (about 1.9 us each on the shared
two-core machine of the benchmarks); holding the three tensors of each layer made a plain forward
pass 1.06x its time (`benchmarks/` README section "Benchmarks").

:class:`CaptureBuffers` records copies instead, in buffers kept from one capture to the next, so
the model's tensors are freed as in a plain forward pass and the copies' pages stay mapped. The
records of a capture are then valid until the next capture with the same buffers: the attribution
methods use this thread's buffers (:func:`thread_buffers`) for the records they read and drop
within one call, and a capture a user opens keeps the model's tensors (no buffers) unless given
some.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

POOLED_BYTES = 64 * 2**20
"""What one capture copies into buffers at most (the rest is recorded as the model computed it).

Beyond it the forward pass's own large temporaries are already mapped and unmapped on every call
(MiniLM, batch 8, n = 512: 50,000-65,000 page faults a plain forward pass), so copies would cost
their time and save none; below it they take the place of the faults."""


class CaptureBuffers:
    """Buffers a capture copies the tensors it records into, reused by the next capture.

    Each tensor recorded takes the next buffer in order (one capture: ``layers x 3`` of them);
    a buffer whose shape or dtype no longer fits is replaced. Only CPU tensors are copied, and
    only while the capture's copies stay within ``max_bytes``; others are returned as they are.

    Args:
        max_bytes: what one capture copies at most (:data:`POOLED_BYTES`).
    """

    def __init__(self, max_bytes: int = POOLED_BYTES) -> None:
        self.max_bytes = max_bytes
        self._buffers: list[torch.Tensor] = []
        self._next = 0
        self._copied = 0

    def start(self) -> None:
        """Begin a capture: its records reuse the buffers from the first (those of the last
        capture are overwritten from here on)."""
        self._next = 0
        self._copied = 0

    def hold(self, tensor: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of ``tensor`` in the next buffer, or ``tensor`` itself (not on the
        CPU, part of an autograd graph, or past ``max_bytes``)."""
        size = tensor.numel() * tensor.element_size()
        if (
            tensor.device.type != "cpu"
            or tensor.requires_grad
            or self._copied + size > self.max_bytes
        ):
            return tensor
        slot = self._next
        if slot == len(self._buffers):
            self._buffers.append(torch.empty(0))
        buffer = self._buffers[slot]
        if buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = self._buffers[slot] = torch.empty(tensor.shape, dtype=tensor.dtype)
        buffer.copy_(tensor)
        self._next += 1
        self._copied += size
        return buffer

    @property
    def nbytes(self) -> int:
        """The memory the buffers hold."""
        return sum(b.numel() * b.element_size() for b in self._buffers)


class _ThreadBuffers(threading.local):
    def __init__(self) -> None:
        self.buffers = CaptureBuffers()
        self.in_use = False


_THREAD = _ThreadBuffers()


@contextmanager
def thread_buffers() -> Iterator[CaptureBuffers | None]:
    """This thread's :class:`CaptureBuffers`, for one capture whose records are dropped when the
    block ends; ``None`` inside another such block on this thread (a capture within a capture's
    forward pass records the model's tensors, not over the outer one's copies)."""
    state = _THREAD
    if state.in_use:
        yield None
        return
    state.in_use = True
    try:
        yield state.buffers
    finally:
        state.in_use = False
