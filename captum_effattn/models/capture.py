"""Capture (and optionally replace) attention probabilities and per-head values during a forward.

``with capture_attention(model, selection) as record:`` runs any forward pass of an unmodified
Hugging Face model (loaded with ``sdpa``, ``eager`` or any other implementation) under a private
attention implementation (:mod:`captum_effattn.models._interface`) that computes the selected
layers' attention explicitly:

    A = softmax(Q K^T * scaling + bias, masked)   (B, H, S_q, S_k), softmax in float32
    output = A V                                  V repeated per query head under GQA

(``bias``: T5's relative position bias, whose layers always record their probabilities; the mask
includes a layer's sliding window, recorded as :attr:`CapturedHeads.window`) and records, for the
selected heads only, ``A``, the values ``V`` (projection bias included) and
the real (non-padding) keys read from the mask the model built itself. An optional ``transform``
replaces the selected heads' probabilities before ``A V`` is taken: substituting efficient
attention leaves the model's output unchanged, substituting a perturbed distribution does not.

Rows with no key to attend to (padding queries before the first real token under left padding in
a causal model) get all-zero probabilities and output, as in ``torch``'s ``sdpa``; ``eager``
fills them with a uniform row over masked keys instead. Only such padding positions differ.

The model comes back exactly as it was: nothing stored on it or its configs changes (the switch
of attention implementation is seen by the capturing thread only, and ends on exit, also when the
body raises); no hooks are registered; training flag and grad mode are not touched. Dropout would
make attention random, so a model in training mode is refused.

Captures belong to the thread that opens them: other threads may run the same model meanwhile
(their forwards are untouched and not recorded) or capture it themselves. One thread cannot nest
two captures of one model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Annotated

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from captum_effattn.models import _interface
from captum_effattn.models._modules import every_module
from captum_effattn.models.architectures import ModelArchitecture, describe_model
from captum_effattn.models.carryover import CaptureCarryover
from captum_effattn.models.selection import HeadSelection
from captum_effattn.projection.engine.rows import (
    KeyRanges,
    RowMasking,
    attention_rows_torch,
    causal_offset,
    padding_of,
    stacked_attention_rows_of,
    visible_keys,
)

HeadAttention = Annotated[torch.Tensor, "(B, H_sel, S_q, S_k)"]
"""Post-softmax attention of the selected heads of one layer."""

HeadValues = Annotated[torch.Tensor, "(B, H_sel, S_k, d_head)"]
"""The value vectors each selected head multiplies (its key/value head's, bias included)."""

RealKeys = Annotated[torch.Tensor, "(B, S_k)"]
"""``True`` for real keys, ``False`` for padding keys."""

# Keyword arguments some attention modules pass that change the attention pattern beyond what the
# capture implements (it implements `sliding_window` and T5's `position_bias`); refuse rather than
# silently ignore one.
_UNSUPPORTED_KWARGS = ("softcap", "s_aux")


@dataclass(frozen=True, eq=False)
class CapturedHeads:
    """What one forward pass computed in the selected heads of one layer.

    The attention probabilities are either recorded during the forward (``materialize=True`` in
    :func:`capture_attention`) or computed on demand from the recorded queries and keys, the same
    way, for all rows (:attr:`attn`) or only the rows an explanation needs (:meth:`rows`).

    Attributes:
        layer: layer index (non-negative).
        heads: the selected query heads, ascending; axis 1 of every tensor here.
        kv_heads: the key/value head each selected head reads (differs from ``heads`` under
            grouped-query attention).
        values: ``(B, H_sel, S_k, d_head)`` each head's value vectors, bias included (under
            grouped-query attention, its shared key/value head's, repeated per query head).
        key_mask: ``(B, S_k)`` bool, ``True`` for real keys, read from the model's own mask.
        causal: query ``i`` sees keys ``j <= i + S_k - S_q`` only.
        query: ``(B, H_sel, S_q, d_head)`` the heads' queries (after any rotary embedding), or
            ``None`` when the probabilities were materialized.
        key: ``(B, H_sel, S_k, d_head)`` their keys, likewise.
        scaling: the score scale the layer used.
        additive_mask: what the model added to the scores besides masking, if anything: a user's
            float 4D mask, T5's relative position bias ``(1, H_sel, S_q, S_k)`` (the selected
            heads' slice).
        probabilities: ``(B, H_sel, S_q, S_k)`` recorded probabilities, or ``None``.
        window: sliding-window (local) attention: query ``i`` sees only keys ``j`` with
            ``|i + S_k - S_q - j| < window`` (on top of padding and causality), as the layer's
            ``sliding_window`` says (Mistral, Qwen2, Phi-3, ModernBERT's local layers); ``None``
            for global attention. Each row's valid set is the window it sees: see
            :meth:`visible_keys`.
    """

    layer: int
    heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    values: HeadValues
    key_mask: RealKeys
    causal: bool
    query: torch.Tensor | None = None
    key: torch.Tensor | None = None
    scaling: float = 1.0
    additive_mask: torch.Tensor | None = None
    probabilities: HeadAttention | None = None
    window: int | None = None

    @property
    def masking(self) -> RowMasking:
        """What each query row of this layer may see (padding, causal, window, additive mask)."""
        return row_masking(self, self.query_count)

    @property
    def query_count(self) -> int:
        """``S_q``: the layer's query rows."""
        for recorded in (self.probabilities, self.query):
            if recorded is not None:
                return recorded.shape[-2]
        return self.values.shape[-2]

    def visible_keys(self, positions: torch.Tensor) -> torch.Tensor:
        """The keys each query row may see: ``positions`` ``(Q,)`` or ``(B, Q)`` ->
        ``(B, Q, S_k)`` booleans (padding, causality and the window together): the keys a row's
        valid attention rows may use."""
        batch, k_len = self.key_mask.shape
        rows = positions.reshape(-1 if positions.dim() == 2 else 1, positions.shape[-1])
        visible = visible_keys(self.masking, rows, self.query_count, k_len)
        return visible.expand(batch, -1, -1)

    @property
    def attn(self) -> HeadAttention:
        """``(B, H_sel, S_q, S_k)`` post-softmax probabilities in the model's dtype; exactly 0 on
        keys the mask hides (padding, future keys). Computed once on first use when lazy."""
        if self.probabilities is not None:
            return self.probabilities
        if "_attn" not in self.__dict__:  # frozen: cache outside the dataclass fields
            query = self._recorded(self.query)
            every_row = torch.arange(query.shape[-2], device=query.device)
            self.__dict__["_attn"] = self._computed_rows(every_row)
        return self.__dict__["_attn"]

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Only some query rows: ``positions`` ``(B, Q)`` -> ``(B, H_sel, Q, S_k)``.

        When the probabilities were not materialized, only these rows are computed: memory and
        time linear in ``S_k`` per row.
        """
        batch, heads = self.values.shape[:2]
        if self.probabilities is not None or "_attn" in self.__dict__:
            index = positions[:, None, :, None].expand(batch, heads, -1, self.attn.shape[-1])
            return self.attn.gather(2, index)
        return self._computed_rows(positions)

    def _computed_rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Rows ``positions`` (``(Q,)`` or ``(B, Q)``) from the recorded queries and keys."""
        return _computed_rows_of((self,), positions)

    def _recorded(self, tensor: torch.Tensor | None) -> torch.Tensor:
        if tensor is None:
            raise RuntimeError(
                f"layer {self.layer} recorded probabilities, not queries and keys: read `attn`"
            )
        return tensor

    def detach(self) -> CapturedHeads:
        """The same record with tensors cut from the autograd graph."""

        def cut(tensor):
            return None if tensor is None else tensor.detach()

        return replace(
            self,
            values=self.values.detach(),
            query=cut(self.query),
            key=cut(self.key),
            probabilities=cut(self.probabilities),
        )


def rows_of_layers(captured: Sequence[CapturedHeads], positions: torch.Tensor) -> torch.Tensor:
    """:meth:`CapturedHeads.rows` of several layers, their heads stacked:
    ``(B, sum of H_sel, Q, S_k)``, as ``torch.cat([c.rows(positions) for c in captured], 1)``.

    Layers recorded lazily with the same masking and scale (an encoder's or a decoder's layers
    of one forward, without windows or additive masks) share one masked softmax: MiniLM's six
    [CLS] rows took 0.15 instead of 0.63 ms (each a handful of small operations, six times).
    """
    if len(captured) > 1 and _share_masking(captured):
        return _computed_rows_of(captured, positions)
    rows = [c.rows(positions) for c in captured]
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)


def _share_masking(captured: Sequence[CapturedHeads]) -> bool:
    """Whether the layers' rows are still to be computed, all with one masking and scale, from
    queries and keys in the working dtype (half-precision keys would be converted for every
    layer at once: one layer at a time, as :meth:`CapturedHeads.rows` does, holds one copy)."""
    first = captured[0]
    return all(
        c.probabilities is None
        and c.query is not None
        and c.query.dtype in (torch.float32, torch.float64)
        and c.key is not None
        and c.key.dtype == c.query.dtype
        and "_attn" not in c.__dict__
        and c.additive_mask is None
        and c.window is None
        and (c.key_mask is first.key_mask or torch.equal(c.key_mask, first.key_mask))
        and c.causal == first.causal
        and c.scaling == first.scaling
        and c.query.dtype == first.query.dtype  # type: ignore[union-attr]
        and c.query.shape[-2] == first.query.shape[-2]  # type: ignore[union-attr]
        for c in captured
    )


def _computed_rows_of(captured: Sequence[CapturedHeads], positions: torch.Tensor) -> torch.Tensor:
    """Rows ``positions`` of layers that share masking and scale (one layer, or
    :func:`_share_masking`), from their recorded queries and keys, heads stacked.

    PyTorch, which differentiates (``backend="auto"`` without gradients to track: the same
    PyTorch path today, since it is faster than the Triton kernel where measured).
    """
    queries = [c._recorded(c.query) for c in captured]
    keys = [c._recorded(c.key) for c in captured]
    tracked = torch.is_grad_enabled() and any(t.requires_grad for t in (*queries, *keys))
    first = captured[0]
    probabilities = stacked_attention_rows_of(
        queries, keys, positions, first.masking, first.scaling, "torch" if tracked else "auto"
    )
    return probabilities.to(queries[0].dtype)


def window_ranges(window: int, q_len: int, k_len: int) -> KeyRanges:
    """The :data:`KeyRanges` of a sliding window: query ``i`` sees keys ``j`` with
    ``|i + S_k - S_q - j| < window``."""
    offset = causal_offset(q_len, k_len)

    def ranges(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        at = positions + offset
        return at - window + 1, at + window

    return ranges


def _added_scores(
    attention_mask: torch.Tensor | None, extra: dict
) -> tuple[torch.Tensor | None, bool]:
    """What the layer adds to its scores besides masking keys: a float mask (a user's 4D mask)
    plus T5's relative position bias (taken out of ``extra``), and whether there was a bias.

    The bias changes the scores, not the value space: the layer's probabilities are recorded
    (computed with it) whatever ``materialize`` says, and projected like any others.
    """
    bias = extra.pop("position_bias", None)
    float_mask = None
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        float_mask = attention_mask
    if bias is None:
        return float_mask, False
    return (bias if float_mask is None else float_mask + bias), True


def _heads_of_additive(
    additive: torch.Tensor | None, heads: tuple[int, ...], num_heads: int
) -> torch.Tensor | None:
    """The selected heads' slice of a per-head additive term ``(B or 1, H, S_q, S_k)``."""
    if additive is None or additive.shape[1] != num_heads:
        return additive
    return _select_heads(additive, heads)


def _sliding_window(extra: dict, q_len: int, k_len: int) -> tuple[int | None, KeyRanges | None]:
    """The window a layer passes as ``sliding_window`` (taken out of ``extra``) and its ranges."""
    window = extra.pop("sliding_window", None)
    return window, None if window is None else window_ranges(window, q_len, k_len)


def row_masking(captured: CapturedHeads, q_len: int) -> RowMasking:
    """What each of ``q_len`` query rows of ``captured`` may see (padding, causal, window,
    additive mask)."""
    k_len = captured.key_mask.shape[-1]
    ranges = None if captured.window is None else window_ranges(captured.window, q_len, k_len)
    return RowMasking(
        key_mask=captured.key_mask,
        causal=captured.causal,
        additive=captured.additive_mask,
        key_ranges=ranges,
    )


AttentionTransform = Callable[[CapturedHeads], torch.Tensor]
"""``transform(captured) -> (B, H_sel, S_q, S_k)``: replacement probabilities for the selected
heads of ``captured.layer``; the layer's output is computed with them."""

HeadOutputHook = Callable[[CapturedHeads, torch.Tensor], torch.Tensor]
"""``on_output(captured, outputs) -> outputs``: sees ``(B, H, S_q, d)`` head outputs of every head
of ``captured.layer`` (before the heads are merged) and returns what the layer goes on with, of the
same shape (for example ``outputs + offset``, whose gradient is that of the head outputs)."""


class _PassStopped(BaseException):
    """Ends a forward pass under ``capture_attention(stop_early=True)`` once its last selected
    layer is recorded. A ``BaseException``, like ``KeyboardInterrupt``: a ``forward_func`` that
    catches ``Exception`` around the model call does not swallow it."""

    def __init__(self, record: AttentionRecord) -> None:
        super().__init__(f"forward pass stopped after layer {record.selection.layers[-1]}")
        self.record = record


class AttentionRecord:
    """The layers a :func:`capture_attention` block captured, grouped by forward pass.

    Attributes:
        architecture: the model's :class:`ModelArchitecture`.
        selection: the :class:`HeadSelection` that was captured.
        stopped: whether the pass was ended early (``stop_early=True``), so the model's output
            was never computed.
    """

    def __init__(
        self,
        architecture: ModelArchitecture,
        selection: HeadSelection,
        on_layer: Callable[[CapturedHeads], None] | None = None,
        stop_early: bool = False,
    ) -> None:
        self.architecture = architecture
        self.selection = selection
        self.stopped = False
        self._on_layer = on_layer
        self._stop_early = stop_early
        self._calls: list[list[CapturedHeads]] = []

    @property
    def calls(self) -> tuple[tuple[CapturedHeads, ...], ...]:
        """One tuple per forward pass of the model, in call order, each holding one
        :class:`CapturedHeads` per selected layer (ascending)."""
        return tuple(tuple(call) for call in self._calls)

    @property
    def layers(self) -> tuple[CapturedHeads, ...]:
        """The selected layers of the only forward pass (ascending).

        Raises:
            RuntimeError: the model ran no forward pass, or several (use :attr:`calls` then).
        """
        self.check_captured()
        if len(self._calls) != 1:
            raise RuntimeError(
                f"the model ran {len(self._calls)} forward passes inside capture_attention; "
                "`layers` needs exactly one (use `calls` for one entry per pass)"
            )
        return tuple(self._calls[0])

    def check_captured(self) -> None:
        """Raise ``RuntimeError`` if no forward pass ran a selected layer through the capture
        (then nothing was recorded, nor replaced by a transform)."""
        if not self._calls:
            raise RuntimeError(
                f"no attention of the selected layers {self.selection.layers} of "
                f"{self.architecture.model_class} ran through capture_attention: either the "
                "model ran no forward pass inside it, or its attention modules do not compute "
                "attention through transformers' AttentionInterface "
                "(config._attn_implementation), so nothing was captured or substituted"
            )

    def add(self, captured: CapturedHeads) -> None:
        """Record one selected layer of a forward pass (called by the capture as it runs)."""
        # Layers run in ascending order within a pass: a layer at or below the last one recorded
        # starts the next pass.
        if not self._calls or captured.layer <= self._calls[-1][-1].layer:
            self._calls.append([])
        self._calls[-1].append(captured)
        if self._on_layer is not None:
            self._on_layer(captured)
        if self._stop_early and captured.layer == self.selection.layers[-1]:
            self.stopped = True
            raise _PassStopped(self)

    def check_complete(self) -> None:
        """Raise ``RuntimeError`` if a forward pass skipped selected layers."""
        for number, call in enumerate(self._calls):
            layers = tuple(c.layer for c in call)
            if layers != self.selection.layers:
                raise RuntimeError(
                    f"forward pass {number} of {self.architecture.model_class} ran the attention "
                    f"of layers {layers} through the capture, but layers "
                    f"{self.selection.layers} were selected: the model's layout does not match "
                    "its registered architecture"
                )


class _LayerTap:
    """Computes the attention of one selected layer, records it, applies the transform."""

    def __init__(
        self,
        layer: int,
        heads: tuple[int, ...],
        architecture: ModelArchitecture,
        record: AttentionRecord,
        transform: AttentionTransform | None,
        keep_graph: bool,
        module: nn.Module,
        materialize: bool,
        key_masks: _KeyMaskMemo,
        on_output: HeadOutputHook | None = None,
        carryover: CaptureCarryover | None = None,
    ) -> None:
        self.on_output = on_output
        self.carryover = carryover
        self.layer = layer
        self.key_masks = key_masks
        self.module = module
        self.materialize = materialize
        self.causal = architecture.layer_causal(layer)
        self.heads = heads
        self.kv_heads = tuple(architecture.kv_head(h) for h in heads)
        self.architecture = architecture
        self.record = record
        self.transform = transform
        self.keep_graph = keep_graph

    def _check(self, query: torch.Tensor, key: torch.Tensor, dropout: float, extra: dict) -> None:
        arch = self.architecture
        expected = (arch.num_heads, arch.num_kv_heads, arch.head_dim)
        if (query.shape[1], key.shape[1], query.shape[-1]) != expected:
            raise RuntimeError(
                f"layer {self.layer} of {arch.model_class} computed attention with "
                f"{query.shape[1]} query heads, {key.shape[1]} key/value heads of width "
                f"{query.shape[-1]}; its config says {expected[0]}, {expected[1]}, {expected[2]}"
            )
        if dropout:
            raise RuntimeError(
                f"layer {self.layer} asked for attention dropout p={dropout}: call model.eval()"
            )
        for name in _UNSUPPORTED_KWARGS:
            if extra.get(name) is not None:
                raise NotImplementedError(
                    f"layer {self.layer} of {arch.model_class} passes `{name}` to its attention "
                    "function, which capture_attention does not implement"
                )

    def _key_mask(
        self, attention_mask: torch.Tensor | None, key: torch.Tensor, window: KeyRanges | None
    ) -> torch.Tensor:
        """The real keys ``(B, S_k)`` of the model's mask, which must be padding (+ causal, +
        the layer's sliding window)."""
        batch, k_len = key.shape[0], key.shape[-2]
        if attention_mask is None:
            return torch.ones(batch, k_len, dtype=torch.bool, device=key.device)
        allowed = attention_mask
        if allowed.dtype != torch.bool:
            # An additive float mask (a user's own 4D mask): hidden keys carry (about) the
            # dtype's minimum.
            allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
        key_mask = padding_of(allowed, self.causal, batch, window)
        if key_mask is None:
            kind = "padding mask combined with a causal mask" if self.causal else ""
            raise ValueError(
                f"the attention mask of layer {self.layer} of {self.architecture.model_class} is "
                f"not a {kind or 'padding mask'}; capture_attention needs masks of that form (a "
                "custom 4D mask or packed sequences are not supported; a sliding window must be "
                "the one the layer passes as `sliding_window`)"
            )
        return key_mask

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float,
        scaling: float | None,
        extra: dict,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._check(query, key, dropout, extra)
        q_len, head_dim = query.shape[-2:]
        k_len = key.shape[-2]
        scaling = head_dim**-0.5 if scaling is None else scaling
        additive, biased = _added_scores(attention_mask, extra)
        window, ranges = _sliding_window(extra, q_len, k_len)
        layer = CapturedHeads(
            layer=self.layer,
            heads=self.heads,
            kv_heads=self.kv_heads,
            values=_select_heads(value, self.kv_heads),
            key_mask=self.key_masks.get(
                attention_mask, lambda: self._key_mask(attention_mask, key, ranges)
            ),
            causal=self.causal,
            scaling=scaling,
            additive_mask=additive,
            window=window,
        )
        if not self.materialize and not biased:
            return self._record_lazily(layer, query, key, value, attention_mask, extra)
        every_row = torch.arange(q_len, device=query.device)
        probs = attention_rows_torch(query, key, every_row, row_masking(layer, q_len), scaling)
        probs = probs.to(query.dtype)
        captured = replace(
            layer,
            probabilities=_select_heads(probs, self.heads),
            additive_mask=_heads_of_additive(additive, self.heads, probs.shape[1]),
        )
        self.record.add(captured if self.keep_graph else captured.detach())
        if self.transform is not None:
            replaced = self._replacement(self.transform, captured).to(probs.dtype)
            if self.heads == tuple(range(probs.shape[1])):
                probs = replaced  # every head replaced: no copy into the computed ones
            else:
                heads = torch.tensor(self.heads, device=query.device)
                probs = probs.index_copy(1, heads, replaced)
        output = self._head_outputs(captured, _grouped_product(probs, value))
        return output.transpose(1, 2).contiguous(), probs

    def _head_outputs(self, captured: CapturedHeads, outputs: torch.Tensor) -> torch.Tensor:
        """``(B, H, S_q, d)`` head outputs through ``on_output``, when there is one."""
        if self.on_output is None:
            return outputs
        changed = self.on_output(captured, outputs)
        if not isinstance(changed, torch.Tensor) or changed.shape != outputs.shape:
            got = tuple(changed.shape) if isinstance(changed, torch.Tensor) else type(changed)
            raise ValueError(
                f"on_output must return head outputs of shape {tuple(outputs.shape)} for layer "
                f"{self.layer}; got {got}"
            )
        return changed

    def _record_lazily(
        self,
        layer: CapturedHeads,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        extra: dict,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Record queries and keys only; the layer runs transformers' own fast attention."""
        captured = replace(
            layer,
            query=_select_heads(query, self.heads),
            key=_select_heads(key, self.kv_heads),
        )
        self.record.add(self._kept(captured))
        q_len, k_len = query.shape[-2], key.shape[-2]
        if (
            layer.additive_mask is None
            and attention_mask is not None
            and q_len == k_len
            and attention_mask.shape[-2:] == (q_len, k_len)
            and self.key_masks.all_real()
            and layer.window is None
        ):
            # No padding: the mask says no more than ``is_causal`` does, and ``sdpa`` without
            # a mask takes its fast kernels (as transformers' own ``sdpa`` mask would allow).
            attention_mask = None
            extra = {**extra, "is_causal": self.causal}
        output, weights = sdpa_attention_forward(
            self.module, query, key, value, attention_mask, scaling=layer.scaling, **extra
        )
        if self.on_output is None:
            return output, weights
        # transformers' sdpa returns (B, S_q, H, d): the hook sees (B, H, S_q, d).
        changed = self._head_outputs(captured, output.transpose(1, 2))
        return changed.transpose(1, 2).contiguous(), weights

    def _kept(self, captured: CapturedHeads) -> CapturedHeads:
        """What the record keeps of a lazily captured layer: detached (unless ``keep_graph``),
        its queries, keys and values carried over to the next capture when there is a
        carryover."""
        if self.keep_graph:
            return captured
        detached = captured.detach()
        if self.carryover is not None:
            for tensor in (detached.query, detached.key, detached.values):
                if tensor is not None:
                    self.carryover.keep(tensor)
        return detached

    def _replacement(self, transform: AttentionTransform, captured: CapturedHeads) -> torch.Tensor:
        replaced = transform(captured)
        expected = tuple(captured.attn.shape)
        if not isinstance(replaced, torch.Tensor) or tuple(replaced.shape) != expected:
            got = tuple(replaced.shape) if isinstance(replaced, torch.Tensor) else type(replaced)
            raise ValueError(
                f"transform must return replacement attention of shape {expected} (batch, "
                f"selected heads, queries, keys) for layer {self.layer}; got {got}"
            )
        if not replaced.is_floating_point() or replaced.device != captured.attn.device:
            raise ValueError(
                f"transform must return a floating-point tensor on {captured.attn.device} for "
                f"layer {self.layer}; got dtype {replaced.dtype} on {replaced.device}"
            )
        return replaced


def _grouped_product(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``probs (B, H, S_q, S_k) @ value (B, H_kv, S_k, d)`` per query head, without repeating
    the key/value heads of grouped-query attention: ``(B, H, S_q, d)``."""
    batch, heads, q_len, k_len = probs.shape
    kv_heads = value.shape[1]
    grouped = probs.view(batch, kv_heads, heads // kv_heads, q_len, k_len) @ value[:, :, None]
    return grouped.view(batch, heads, q_len, value.shape[-1])


def _select_heads(states: torch.Tensor, heads: tuple[int, ...]) -> torch.Tensor:
    """``states[:, heads]`` for ``(B, H, ...)`` tensors; no copy when ``heads`` is every head."""
    if heads == tuple(range(states.shape[1])):
        return states
    return states.index_select(1, torch.tensor(heads, device=states.device))


class _KeyMaskMemo:
    """The real keys of the last attention mask seen: the layers of one forward share one mask."""

    def __init__(self) -> None:
        self._mask: torch.Tensor | None = None
        self._version = -1
        self._keys: torch.Tensor | None = None
        self._all_real: bool | None = None

    def get(self, mask: torch.Tensor | None, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        keys = self._keys
        # The same tensor, not modified in place since (holding it keeps its id from being reused).
        # Tensors made under torch.inference_mode() keep no version counter: never reused.
        if (
            keys is None
            or mask is None
            or mask.is_inference()
            or mask is not self._mask
            or mask._version != self._version
        ):
            keys = compute()
            self._mask, self._keys = mask, keys
            self._version = -1 if mask is None or mask.is_inference() else mask._version
            self._all_real = None
        return keys

    def all_real(self) -> bool:
        """Whether every key of the mask last passed to :meth:`get` is real (no padding)."""
        if self._keys is None:
            raise RuntimeError("all_real() reads the mask last passed to get(); none was")
        if self._all_real is None:
            self._all_real = bool(self._keys.all())
        return self._all_real


class _SharedModuleTap:
    """One attention module that runs as several layers (ALBERT): call ``k`` of a forward pass is
    the module's ``k``-th layer, so captures are counted per call, not per module."""

    def __init__(self, module: nn.Module, taps: list[_LayerTap | None]) -> None:
        self.module = module
        self.taps = taps  # per layer the module runs, in order; None where not selected
        self.calls = 0

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float,
        scaling: float | None,
        extra: dict,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        tap = self.taps[self.calls % len(self.taps)]
        self.calls += 1
        if tap is None:
            return sdpa_attention_forward(
                self.module,
                query,
                key,
                value,
                attention_mask,
                dropout=dropout,
                scaling=scaling,
                **extra,
            )
        return tap(query, key, value, attention_mask, dropout, scaling, extra)


def _taps_by_module(
    architecture: ModelArchitecture, layer_taps: dict[int, _LayerTap]
) -> dict[nn.Module, _interface.LayerTap]:
    """The tap each attention module dispatches to: its layer's, or, for a module that runs as
    several layers, one that counts its calls."""
    runs: dict[nn.Module, list[int]] = {}
    for layer, module in enumerate(architecture.attention_modules):
        runs.setdefault(module, []).append(layer)
    taps: dict[nn.Module, _interface.LayerTap] = {}
    for module, layers in runs.items():
        selected = [layer_taps.get(layer) for layer in layers]
        if len(layers) > 1 and any(selected):
            taps[module] = _SharedModuleTap(module, selected)
        elif selected[0] is not None:
            taps[module] = selected[0]
    return taps


def _require_eval_mode(model: nn.Module) -> None:
    if not any(module.training for module in every_module(model)):
        return
    training = [name for name, module in model.named_modules() if module.training]
    if training:
        where = "the model" if training[0] == "" else f"its submodule {training[0]!r}"
        raise RuntimeError(
            f"capture_attention needs {type(model).__name__} in evaluation mode, but {where} is "
            "in training mode, where dropout makes attention random. Call model.eval() first "
            "(and model.train() afterwards to resume training)."
        )


@contextmanager
def capture_attention(
    model: nn.Module,
    selection: HeadSelection | None = None,
    transform: AttentionTransform | None = None,
    *,
    keep_graph: bool = False,
    materialize: bool = True,
    on_layer: Callable[[CapturedHeads], None] | None = None,
    on_output: HeadOutputHook | None = None,
    stop_early: bool = False,
    carryover: CaptureCarryover | None = None,
) -> Iterator[AttentionRecord]:
    """Record (and optionally replace) the selected heads' attention during forward passes.

    Example:
        >>> selection = select_heads(model, layers=-1)            # doctest: +SKIP
        >>> with capture_attention(model, selection) as record:   # doctest: +SKIP
        ...     logits = model(**batch).logits
        >>> last = record.layers[-1]                              # doctest: +SKIP
        >>> last.attn.shape                       # (B, H, S, S)  # doctest: +SKIP

    Args:
        model: a supported transformers model (see
            :data:`~captum_effattn.models.architectures.ARCHITECTURES`) in evaluation mode, with
            any attention implementation.
        selection: layers and heads to record (:func:`~captum_effattn.models.select_heads`);
            ``None`` records every head of every layer.
        transform: ``transform(captured) -> (B, H_sel, S_q, S_k)`` replacement probabilities for
            the selected heads of ``captured.layer``; the layer's output is then computed with
            them (unselected heads untouched). ``captured`` holds the live tensors (autograd graph
            included), computed before replacement.
        keep_graph: keep the recorded tensors attached to the autograd graph (for gradients
            with respect to attention); by default they are detached.
        materialize: compute the selected layers' attention explicitly during the forward and
            record the probabilities (also what the layer returns as attention weights). With
            ``False`` the layers run transformers' ``sdpa`` and only queries, keys and values are
            recorded: :attr:`CapturedHeads.attn` and :meth:`CapturedHeads.rows` compute the
            probabilities afterwards, the same way, and a few rows cost memory linear in the
            sequence length. A ``transform`` needs the probabilities during the forward.
        on_layer: called with each selected layer's :class:`CapturedHeads` as soon as it is
            recorded, while the forward pass goes on to the next layers (work on early layers
            can overlap the rest of the forward). What it raises propagates out of the forward.
        on_output: ``on_output(captured, outputs) -> outputs`` (:data:`HeadOutputHook`): sees
            each selected layer's ``(B, H, S_q, d)`` head outputs (every head) and returns what
            the layer goes on with; works with ``materialize=False``. Adding a zero tensor that
            requires grad gives the gradient with respect to the head outputs, from which the
            gradient with respect to the attention follows (``d y / d A_ij = g_i . v_j``).
        stop_early: end the forward pass once the last selected layer is recorded: its
            attention output and the layers after it never run, the rest of the block is
            skipped, and :attr:`AttentionRecord.stopped` is set.
        carryover: with ``materialize=False``, keep the recorded queries, keys and values
            alive past the block, in this
            :class:`~captum_effattn.models.CaptureCarryover`, until the next capture
            with it records their successors: their memory is then reused in place instead of
            being handed back to the system and faulted in again on the next call.

    Yields:
        An :class:`AttentionRecord`, filled while the body runs the model (once or several
        times: :attr:`AttentionRecord.calls` has one entry per forward pass).

    Raises:
        UnsupportedModelError: the model's architecture is not registered.
        ValueError: ``selection`` was made for a model of another size; ``transform`` with
            ``materialize=False``; ``stop_early`` with ``transform`` or ``on_output``;
            ``carryover`` with ``keep_graph``; on
            forward, a mask that is not a padding (+ causal) mask, or a malformed transform
            result.
        TypeError: ``carryover`` is not a
            :class:`~captum_effattn.models.CaptureCarryover`.
        RuntimeError: the model (or a submodule) is in training mode; the model is already
            under capture on this thread; after the body, a forward pass that skipped selected
            layers.
    """
    if transform is not None and not materialize:
        raise ValueError(
            "a transform replaces probabilities during the forward: it needs materialize=True"
        )
    if carryover is not None and not isinstance(carryover, CaptureCarryover):
        raise TypeError(
            f"carryover must be a CaptureCarryover or None; got {type(carryover).__name__}"
        )
    if carryover is not None and keep_graph:
        raise ValueError(
            "a carryover keeps detached tensors past the block, keep_graph=True the autograd "
            "graph within it: pass one or the other"
        )
    if stop_early and (transform is not None or on_output is not None):
        raise ValueError(
            "stop_early=True ends the forward pass before the outputs a transform or an "
            "on_output hook change are used: pass one or the other"
        )
    architecture = describe_model(model)
    if selection is None:
        selection = HeadSelection.parse(
            num_layers=architecture.num_layers, num_heads=architecture.num_heads
        )
    elif (selection.num_layers, selection.num_heads) != (
        architecture.num_layers,
        architecture.num_heads,
    ):
        raise ValueError(
            f"the selection was made for a model with {selection.num_layers} layers of "
            f"{selection.num_heads} heads; {architecture.model_class} has "
            f"{architecture.num_layers} layers of {architecture.num_heads} heads"
        )
    _require_eval_mode(model)
    active = _interface.active_taps()
    if any(module in active for module in architecture.attention_modules):
        raise RuntimeError(
            f"this {architecture.model_class} is already under capture_attention on this "
            "thread; captures of one model cannot be nested (other threads may capture it)"
        )
    record = AttentionRecord(architecture, selection, on_layer, stop_early)
    key_masks = _KeyMaskMemo()
    layer_taps = {
        layer: _LayerTap(
            layer,
            heads,
            architecture,
            record,
            transform,
            keep_graph,
            module=architecture.attention_modules[layer],
            materialize=materialize,
            key_masks=key_masks,
            on_output=on_output,
            carryover=carryover,
        )
        for layer, heads in selection.items()
    }
    if carryover is not None:
        carryover.start()
    taps = _taps_by_module(architecture, layer_taps)
    active.update(taps)
    try:
        with _interface.attention_implementation(model, _interface.IMPLEMENTATION):
            yield record
    except _PassStopped as stop:
        if stop.record is not record:  # another capture's (of another model): not ours to end
            raise
    finally:
        for module in taps:
            active.pop(module, None)
    record.check_complete()
