"""EfficientAttentionAttribution: efficient attention as a Captum attribution method."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn

from captum_effattn._captum_compat import (
    Attribution,
    TargetType,
    TensorOrTupleOfTensorsGeneric,
    format_additional_forward_args,
    format_output,
    format_tensor_into_tuples,
    is_tuple,
    log_usage,
)
from captum_effattn.attr._inputs import check_inputs, check_not_compiled, check_whole_sequence
from captum_effattn.attr._pipeline import LayerPipeline
from captum_effattn.attr._queries import QuerySpec, select_query_rows
from captum_effattn.attr._reductions import (
    AttentionReading,
    get_reduction,
    per_example_max,
    per_head_scores,
)
from captum_effattn.attr._spread import spread_to_input
from captum_effattn.attr._targets import as_output_tensor, class_indices, validate_target
from captum_effattn.attr._views import (
    View,
    get_view,
    project_captured_matrices,
    project_rows,
    stack_layers,
)
from captum_effattn.attr._weightings import (
    Weighting,
    attention_gradient,
    get_weighting,
    output_offsets,
    weight_matrices,
)
from captum_effattn.models import (
    CapturedHeads,
    HeadSelection,
    capture_attention,
    describe_model,
)
from captum_effattn.models.carryover import thread_carryover
from captum_effattn.models.selection import HeadSpec, IndexSpec, select_architecture_heads


class EfficientAttentionAttribution(Attribution):
    r"""Token attributions from efficient attention (Naim & Asher, ECAI 2024).

    Raw attention weights are not identifiable: when a sequence is longer than a head's value
    width, many attention rows give the head the same output (Brunner et al., ICLR 2020).
    *Efficient attention* replaces each row ``a`` by the minimum-norm probability distribution
    ``x`` with the same head output ``x V = a V``: identifiable, sufficient for the model's output,
    and a distribution (see :func:`captum_effattn.efficient_attention` and the method page
    of the documentation (docs/method.md) for this project's precise construction).

    The method runs ``forward_func`` once, captures the attention and value vectors of the
    selected heads inside ``model`` (whatever attention implementation it was loaded with), and
    reads the rows that explain the prediction: the first real token ([CLS]) for encoders, the
    last real token for decoders. Their efficient attention over the input tokens, reduced over
    layers and heads, is each token's attribution.

    Attention is not class-specific: ``target`` is validated and used only by the class-specific
    ``weighting="gradient"``; ``baselines`` is accepted (and unused) so the method fits pipelines
    written for Captum's gradient methods. Inputs may be token ids, embeddings, a token gate, or
    ViT pixels; the model must be in evaluation mode (dropout would make attention random) and
    comes back as it was: its attention implementation, hooks, training flag and grad mode are
    untouched.

    Example::

        >>> ig = IntegratedGradients(forward_func)                       # doctest: +SKIP
        >>> ea = EfficientAttentionAttribution(forward_func, model=model)  # doctest: +SKIP
        >>> for method in (ig, ea):                                      # doctest: +SKIP
        ...     attr = method.attribute(embeddings, target=1,
        ...                             additional_forward_args=(mask,))
    """

    def __init__(self, forward_func: Callable, model: nn.Module | None = None) -> None:
        r"""
        Args:
            forward_func (Callable): the function you already give IntegratedGradients or
                Saliency: ``forward_func(*inputs, *additional_forward_args)`` runs ``model``
                forward exactly once. It may be the model itself.
            model (nn.Module, optional): the Hugging Face transformer whose attention to read
                (BERT, RoBERTa, DistilBERT, GPT-2, Llama-family, ViT; a bare model or one with a
                head). Default: ``forward_func`` when it is an ``nn.Module``.

        Raises:
            TypeError: no ``model`` given and ``forward_func`` is not a module; ``forward_func``
                or ``model`` is ``torch.compile``'d (pass the original module, ``._orig_mod``).
            UnsupportedModelError: the model's architecture is not supported (the message lists
                what is).
        """
        super().__init__(forward_func)
        check_not_compiled(forward_func, model)
        if model is None:
            if not isinstance(forward_func, nn.Module):
                raise TypeError(
                    "EfficientAttentionAttribution needs the transformer whose attention it reads: "
                    "pass model=... when forward_func is not the model itself"
                )
            model = forward_func
        self.model = model
        self.architecture = describe_model(model)

    def has_convergence_delta(self) -> bool:
        return True

    @overload
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        baselines: Any = None,
        target: TargetType = None,
        additional_forward_args: Any = None,
        layers: IndexSpec = None,
        heads: HeadSpec = None,
        view: str = "efficient",
        query: QuerySpec = "auto",
        reduce: str | None = "mean",
        return_convergence_delta: Literal[False] = False,
        weighting: str | None = None,
        stop_early: bool = False,
    ) -> TensorOrTupleOfTensorsGeneric: ...

    @overload
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        baselines: Any = None,
        target: TargetType = None,
        additional_forward_args: Any = None,
        layers: IndexSpec = None,
        heads: HeadSpec = None,
        view: str = "efficient",
        query: QuerySpec = "auto",
        reduce: str | None = "mean",
        *,
        return_convergence_delta: Literal[True],
        weighting: str | None = None,
        stop_early: bool = False,
    ) -> tuple[TensorOrTupleOfTensorsGeneric, Tensor]: ...

    @log_usage(part_of_slo=True)
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        baselines: Any = None,
        target: TargetType = None,
        additional_forward_args: Any = None,
        layers: IndexSpec = None,
        heads: HeadSpec = None,
        view: str = "efficient",
        query: QuerySpec = "auto",
        reduce: str | None = "mean",
        return_convergence_delta: bool = False,
        weighting: str | None = None,
        stop_early: bool = False,
    ) -> TensorOrTupleOfTensorsGeneric | tuple[TensorOrTupleOfTensorsGeneric, Tensor]:
        r"""Attribute the model's prediction to its input tokens through attention.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): what ``forward_func`` takes, as for any Captum
                method: token ids ``(B, S)``, embeddings ``(B, S, E)``, a token gate ``(B, S)``,
                or ViT pixels ``(B, C, H, W)``; several tensors as a tuple. Each input aligned
                with the model's sequence receives the token scores.
            baselines (Any, optional): accepted where Captum's gradient methods take it, so
                pipelines written for them run unchanged, and unused: attention needs no
                reference input.
            target (int, tuple, Tensor or list, optional): the explained output, in Captum's
                forms. Validated against the forward output on every call (an index out of
                range raises ``ValueError`` naming the number of classes); used only by
                ``weighting="gradient"`` (attention itself does not depend on the class), and
                ignored otherwise.
            additional_forward_args (Any, optional): extra arguments appended to ``inputs`` when
                calling ``forward_func`` (e.g. the attention mask).
            layers (int, slice, list[int] or "all", optional): layers to read; negative indices
                count from the end. Default: all layers.
            heads (int, list[int], "all" or dict[int, ...], optional): heads of every selected
                layer, or ``{layer: heads}``. Default: all heads.
            view (str, optional): a name in :data:`~captum_effattn.attr.VIEWS`: ``"efficient"``
                (default; minimum-norm distributions with the same head output),
                ``"effective"`` (orthogonal projection onto the value space, Brunner et al. 2020;
                not a distribution), ``"raw"`` (attention as computed), or a registered view.
            query (str or int, optional): the attention rows that explain the prediction:
                ``"auto"`` (first real token for encoders, last real token for decoders), an int
                position, or ``"all"`` (every real token's row, averaged).
            reduce (str or None, optional): how to combine layers and heads, a name in
                :data:`~captum_effattn.attr.REDUCTIONS`: ``"mean"`` (default), ``"sum"``,
                ``"max"``, ``"rollout"`` (attention rollout through the selected consecutive
                layers; needs all their heads); or ``None`` to keep a
                per-layer, per-head axis (then a ``(B, L, H, S)`` tensor of token scores is
                returned, not input-shaped attributions; the selection must have the same heads
                in every layer).
            return_convergence_delta (bool, optional): also return, per example, the largest
                relative head-output error ``||x V - a V|| / ||a V||`` of the projected rows
                (0 for ``view="raw"``).
            weighting (str or None, optional): a name in
                :data:`~captum_effattn.attr.WEIGHTINGS`, applied to the rows of the chosen view:
                ``"norm"`` (each key times ``||v_j W_O^h||``, Kobayashi et al. 2020),
                ``"gradient"`` (each entry times the positive part of the target logit's
                gradient with respect to it, Chefer et al. 2021; with ``reduce="rollout"``,
                their relevance propagation; needs a ``(B, C)`` output and a ``target`` when
                ``C > 1``), or ``None`` (default: rows as they are).
            stop_early (bool, optional): end the forward pass once the last selected layer's
                attention is recorded (see :func:`~captum_effattn.models.capture_attention`): the
                layers after it, the last one's attention output and the model's output are
                never computed, so the call costs the selected prefix of the model plus the
                projection (with every layer of MiniLM selected, the pass is about a tenth
                shorter; selecting early layers also saves the later ones). The output is then
                not there to check ``target`` against, so ``target`` is accepted unchecked (it
                is unused), and ``forward_func`` must reach the model's selected layers in its
                first model call. Not with ``weighting="gradient"``, which differentiates the
                output. Default: ``False``.

        Returns:
            **attributions** (*Tensor* or *tuple[Tensor, ...]*): one contiguous tensor per
            input, of the input's shape (token scores spread evenly over embedding features, or
            over each patch's pixels); padding tokens get 0. With ``reduce=None``: a
            ``(B, L, H, S)`` tensor.
            **delta** (*Tensor*, returned if ``return_convergence_delta=True``): ``(B,)``.

        Raises:
            ValueError: unknown ``view``/``reduce``/``query``/``weighting``; layers or heads out
                of range (the message names the index and the valid range);
                ``reduce="rollout"`` on a selection that is not all heads of consecutive layers;
                inputs that do not fit the model; an invalid ``target`` (unless ``stop_early``);
                ``stop_early=True`` with ``weighting="gradient"``;
                ``weighting="gradient"`` on an output that is not ``(B, C)`` or that does not
                depend on the selected heads' attention.
            RuntimeError: the model is in training mode, or ``forward_func`` did not run the
                model exactly once; ``weighting="gradient"`` under ``torch.inference_mode()``.
        """
        del baselines  # attention needs no reference input
        attention_view, weighter = get_view(view), get_weighting(weighting)
        reduction = None if reduce is None else get_reduction(reduce)
        selection = select_architecture_heads(self.architecture, layers, heads)
        inputs_tuple = format_tensor_into_tuples(inputs)
        check_inputs(inputs_tuple, additional_forward_args, self.model)
        if reduction is None:
            _require_rectangular(selection, "reduce=None")
        else:
            reduction.check_selection(selection)
        _check_stop_early(stop_early, weighter, weighting)
        reading = self._read(
            _Call(inputs_tuple, additional_forward_args, target, selection, stop_early),
            query,
            attention_view,
            weighter,
            project_queries=reduction is None or not reduction.reads_full_matrices,
        )
        if reduction is None:
            return _with_delta(*self._per_head_scores(reading), return_convergence_delta)
        scores, delta = reduction.reduce(reading, attention_view)
        attributions = tuple(
            spread_to_input(scores, tensor, i, self.architecture).contiguous()
            for i, tensor in enumerate(inputs_tuple)
        )
        output = format_output(is_tuple(inputs), attributions)
        return _with_delta(output, delta, return_convergence_delta)

    def compute_convergence_delta(
        self,
        attributions: Any,
        start_point: Any,
        end_point: TensorOrTupleOfTensorsGeneric,
        target: TargetType = None,
        additional_forward_args: Any = None,
        **options: Any,
    ) -> Tensor:
        r"""The ``(B,)`` convergence delta of the attributions of ``end_point``.

        Here the delta is not a completeness gap (attention has no path from a baseline): it is
        the largest relative head-output error ``||x V - a V|| / ||a V||`` of the projected rows
        behind the attributions, as :meth:`attribute` returns with
        ``return_convergence_delta=True``. It needs the rows, so it is recomputed with one
        :meth:`attribute` call on ``end_point``.

        Args:
            attributions (Any): accepted for Captum's signature and unused.
            start_point (Any): accepted for Captum's signature (the baselines) and unused.
            end_point (Tensor or tuple[Tensor, ...]): the inputs that were explained.
            target, additional_forward_args: as in :meth:`attribute`.
            **options: the selectors and options of the :meth:`attribute` call that made
                ``attributions`` (``layers``, ``heads``, ``view``, ``query``, ``reduce``,
                ``weighting``).

        Returns:
            ``(B,)`` float64 delta, one per example.
        """
        del attributions, start_point
        options["return_convergence_delta"] = True
        _, delta = self.attribute(
            end_point, target=target, additional_forward_args=additional_forward_args, **options
        )
        return delta

    def _per_head_scores(self, reading: AttentionReading) -> tuple[Tensor, Tensor]:
        """``reduce=None``: ``(B, L, H, S)`` token scores of every selected head, and the delta."""
        assert reading.projected is not None  # projected during the forward
        per_head, delta = per_head_scores(reading.weighted(reading.projected), reading.queries)
        batch, _, length = per_head.shape
        layers = len({layer for layer, _ in reading.projected.pairs})
        return per_head.reshape(batch, layers, -1, length), delta

    def _read(
        self,
        call: _Call,
        query: QuerySpec,
        view: View,
        weighting: Weighting | None,
        project_queries: bool = True,
    ) -> AttentionReading:
        """Run the forward pass once, capturing the selected heads (with ``project_queries``,
        their explaining rows in ``view``), and weigh the rows with ``weighting``."""
        if weighting is not None and weighting.needs_gradient:
            captured, output_gradients = self._capture_gradients(call)
            queries = select_query_rows(query, captured[0].key_mask, captured[0].causal)
            # Rows read alone need their own gradients only; full matrices need every row's.
            positions = queries.positions if project_queries else None
            gradients: Sequence[Tensor | None] = [
                attention_gradient(c, g, positions)
                for c, g in zip(captured, output_gradients, strict=True)
            ]
            projected = project_rows(captured, queries, view) if project_queries else None
            reading = AttentionReading(
                captured, queries, projected, factors_per_query=project_queries
            )
        else:
            reading = self._read_projecting(call, query, view, project_queries)
            gradients = (None,) * len(reading.captured)
        if weighting is None:
            return reading
        factors = tuple(
            weighting.factors(c, self.architecture, g)
            for c, g in zip(reading.captured, gradients, strict=True)
        )
        return replace(reading, weighting=weighting, factors=factors)

    def _read_projecting(
        self, call: _Call, query: QuerySpec, view: View, project_queries: bool
    ) -> AttentionReading:
        """Run the forward pass once, capturing the selected heads; with ``project_queries``,
        the explaining rows are projected layer by layer while the later layers run."""
        pipeline = LayerPipeline(query, view) if project_queries else None
        try:
            captured = self._capture(call, on_layer=None if pipeline is None else pipeline.submit)
            queries = select_query_rows(query, captured[0].key_mask, captured[0].causal)
            if pipeline is None:
                return AttentionReading(captured, queries)
            projected = stack_layers(captured, queries, pipeline.results(captured, queries))
            return AttentionReading(captured, queries, projected)
        finally:
            if pipeline is not None:
                pipeline.close()

    def attention_matrices(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        additional_forward_args: Any = None,
        layers: IndexSpec = None,
        heads: HeadSpec = None,
        view: str = "efficient",
        return_convergence_delta: bool = False,
        weighting: str | None = None,
        target: TargetType = None,
        stop_early: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        r"""The full selected attention matrices in one view, for analysis.

        Args:
            inputs, additional_forward_args, layers, heads, view: as in :meth:`attribute`; the
                selection must have the same heads in every selected layer.
            return_convergence_delta (bool, optional): also return the ``(B,)`` largest relative
                head-output error over all real rows.
            weighting, target: as in :meth:`attribute`: every entry of the matrices is weighted
                (not renormalized).
            stop_early (bool, optional): as in :meth:`attribute`: the forward pass ends after the
                last selected layer (not with ``weighting="gradient"``).

        Returns:
            ``(B, L, H, S, S)`` matrices (rows: queries, columns: keys); rows of padding queries
            are returned as the model computed them (weighted, with a weighting).
        """
        attention_view, weighter = get_view(view), get_weighting(weighting)
        selection = select_architecture_heads(self.architecture, layers, heads)
        _require_rectangular(selection, "attention_matrices")
        _check_stop_early(stop_early, weighter, weighting)
        call = _Call(
            format_tensor_into_tuples(inputs),
            additional_forward_args,
            target,
            selection,
            stop_early,
        )
        if weighter is not None and weighter.needs_gradient:
            captured, output_gradients = self._capture_gradients(call)
            gradients: Sequence[Tensor | None] = [
                attention_gradient(c, g) for c, g in zip(captured, output_gradients, strict=True)
            ]
        else:
            captured, gradients = self._capture(call), (None,) * len(selection.layers)
        matrices, errors = project_captured_matrices(captured, attention_view)
        if weighter is not None:
            factors = [
                weighter.factors(c, self.architecture, g)
                for c, g in zip(captured, gradients, strict=True)
            ]
            matrices = weight_matrices(matrices, factors)
        delta = per_example_max(errors * captured[0].key_mask[:, None, None, :])
        return _with_delta(matrices, delta, return_convergence_delta)

    def _capture(
        self, call: _Call, on_layer: Callable[[CapturedHeads], None] | None = None
    ) -> tuple[CapturedHeads, ...]:
        """One forward without gradients; ``target`` is checked against its output (unless the
        pass stops early, before there is one)."""
        output = None
        # The record's tensors stay alive until this thread's next capture, which reuses their
        # memory in place (captum_effattn.models.carryover).
        with (
            capture_attention(
                self.model,
                call.selection,
                materialize=False,
                on_layer=on_layer,
                stop_early=call.stop_early,
                carryover=thread_carryover(),
            ) as record,
            torch.no_grad(),
        ):
            output = self._forward(call)
        check_whole_sequence(record.layers)
        if call.target is not None and not record.stopped:
            validate_target(call.target, as_output_tensor(output))
        return record.layers

    def _capture_gradients(self, call: _Call) -> tuple[tuple[CapturedHeads, ...], list[Tensor]]:
        """One forward with gradients and one backward pass from the target logit.

        The head outputs are made differentiable by
        :func:`~captum_effattn.attr._weightings.output_offsets` (the layers keep their fast
        attention); :func:`~captum_effattn.attr._weightings.attention_gradient` turns their
        gradients into gradients with respect to the attention, of the rows the caller needs.

        Returns:
            The captured layers (detached) and, per layer, the ``(B, H, S, d)`` gradients with
            respect to every head's output (zeros where the target does not depend on it).
        """
        offsets, add_offset = output_offsets()
        with (
            capture_attention(
                self.model, call.selection, materialize=False, on_output=add_offset
            ) as record,
            torch.enable_grad(),
        ):
            output = as_output_tensor(self._forward(call))
            classes = class_indices(call.target, output, "weighting='gradient'")
            explained = output.gather(1, classes[:, None]).sum()
            gradients = (
                torch.autograd.grad(explained, offsets, allow_unused=True)
                if explained.requires_grad
                else (None,) * len(offsets)
            )
        check_whole_sequence(record.layers)
        if all(g is None or not bool(g.any()) for g in gradients):
            raise ValueError(
                "weighting='gradient': the output of forward_func does not depend on the "
                f"attention of the selected heads {dict(call.selection.items())} (its gradient "
                "is zero or missing): forward_func must compute its output from the model's "
                "forward pass, with gradients enabled"
            )
        return record.layers, [
            torch.zeros_like(o) if g is None else g.detach()
            for o, g in zip(offsets, gradients, strict=True)
        ]

    def _forward(self, call: _Call) -> Any:
        extra = format_additional_forward_args(call.additional_forward_args)
        try:
            return self.forward_func(*call.inputs, *extra)
        except (IndexError, RuntimeError, ValueError) as error:
            shapes = [tuple(t.shape) for t in call.inputs]
            raise ValueError(
                f"forward_func failed on inputs of shapes {shapes} inside "
                f"{self.architecture.model_class}: {error}"
            ) from error


@dataclass(frozen=True)
class _Call:
    """One call's inputs, forward arguments, target and head selection."""

    inputs: tuple[Tensor, ...]
    additional_forward_args: Any
    target: TargetType
    selection: HeadSelection
    # end the forward pass after the last selected layer (``attribute(stop_early=True)``)
    stop_early: bool = False


def _check_stop_early(stop_early: bool, weighter: Weighting | None, weighting: str | None) -> None:
    if stop_early and weighter is not None and weighter.needs_gradient:
        raise ValueError(
            f"stop_early=True ends the forward pass before the output that "
            f"weighting={weighting!r} differentiates: pass one or the other"
        )


def _with_delta(result: Any, delta: Tensor, return_convergence_delta: bool) -> Any:
    return (result, delta) if return_convergence_delta else result


def _require_rectangular(selection: HeadSelection, what: str) -> None:
    if len(set(selection.heads)) > 1:
        chosen = dict(selection.items())
        raise ValueError(
            f"{what} keeps a (layer, head) axis and needs the same heads in every selected "
            f"layer; got {chosen}. Make one call per layer instead."
        )
