"""Keep a capture's recorded tensors until the next capture replaces them, so that their memory is
reused in place instead of being handed back to the system and faulted in again.

A lazy capture (``materialize=False``) records the selected layers' queries, keys and values: the
model's own tensors, held until the call that reads them returns. Freed together at its end, they
leave the top of the C library's heap free, and glibc hands that memory back to the system; the
next call touches it afresh, one page fault per 4 KiB (MiniLM at batch 1, n = 128: about 900 a
call, some two microseconds each on the shared machine of the README's runs; at batch 8 thousands).

A :class:`CaptureCarryover` holds the last capture's tensors past its end, and lets them go one by
one as the next capture records its own: each is freed just after its successor was computed, in
the middle of a heap that stays in use, so the next layers' tensors reuse its memory. Nothing is
copied, and the records stay the model's tensors, valid for as long as anything uses them; the
cost is the memory held between calls (:data:`CARRIED_BYTES` at most). The attribution methods use
the calling thread's (:func:`thread_carryover`); :func:`release_thread_carryover` frees it.
"""

from __future__ import annotations

import math
import threading

import torch

CARRIED_BYTES = 64 * 2**20
"""What one capture carries over at most (its further tensors are freed with the record).

Beyond this the forward pass's own large temporaries are mapped and unmapped on every call
anyway (MiniLM, batch 8, n = 512: some 50,000 page faults a plain forward pass), and what is
carried over costs memory between calls without sparing faults."""


class CaptureCarryover:
    """The tensors of the last capture that used it, kept until the next one replaces them.

    Tensor ``i`` a capture records (in the order it records them) releases tensor ``i`` of the
    capture before; only CPU tensors are kept, and only while they stay within ``max_bytes``.

    Args:
        max_bytes: what one capture carries over at most (:data:`CARRIED_BYTES`).
    """

    def __init__(self, max_bytes: int = CARRIED_BYTES) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative int; got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._previous: list[torch.Tensor | None] = []
        self._current: list[torch.Tensor] = []
        self._kept_bytes = 0

    def start(self) -> None:
        """Begin a capture: what the last one kept is let go as this one's tensors arrive."""
        self._previous, self._current = list(self._current), []
        self._kept_bytes = 0

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """Keep ``tensor`` (returned as it is) past the capture, releasing its predecessor."""
        size = tensor.nbytes
        if tensor.device.type == "cpu" and self._kept_bytes + size <= self.max_bytes:
            slot = len(self._current)
            self._current.append(tensor)
            self._kept_bytes += size
            if slot < len(self._previous):
                self._previous[slot] = None  # freed now, just after its successor was computed
        return tensor

    def release(self) -> int:
        """Let go of everything kept; returns the bytes of the tensors let go (the memory comes
        back once nothing else uses them)."""
        released = sum(t.nbytes for t in self.kept)
        self._previous, self._current = [], []
        self._kept_bytes = 0
        return released

    @property
    def kept(self) -> tuple[torch.Tensor, ...]:
        """The tensors held now (the last capture's, and the one before's not yet replaced)."""
        return tuple(t for t in (*self._previous, *self._current) if t is not None)


class _ThreadCarryover(threading.local):
    def __init__(self) -> None:
        self.carryover = CaptureCarryover()
        self.scratch: torch.Tensor | None = None


_THREAD = _ThreadCarryover()


def thread_carryover() -> CaptureCarryover:
    """The calling thread's :class:`CaptureCarryover` (each thread has its own)."""
    return _THREAD.carryover


def thread_scratch(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """A tensor of ``shape`` in memory the calling thread reuses from call to call, for one it
    fills and reads within a call (the layers' values a projection concatenates); ``None`` off
    the CPU or past :data:`CARRIED_BYTES`. Its contents are those of the last use: overwrite it.
    The next call on this thread gets the same memory, so nothing may keep it past the call."""
    numel = math.prod(shape)
    if device.type != "cpu" or numel * dtype.itemsize > CARRIED_BYTES:
        return None
    scratch = _THREAD.scratch
    if scratch is None or scratch.dtype != dtype or scratch.numel() < numel:
        scratch = _THREAD.scratch = torch.empty(numel, dtype=dtype)
    return scratch[:numel].view(shape)


def release_thread_carryover() -> int:
    """Free what the calling thread's attributions keep between calls (the carried tensors and
    the scratch memory); returns the bytes let go."""
    scratch, _THREAD.scratch = _THREAD.scratch, None
    freed = 0 if scratch is None else scratch.nbytes
    return freed + _THREAD.carryover.release()
