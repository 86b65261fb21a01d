"""EfficientAttentionAttribution: efficient attention as a Captum attribution method."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
from captum_effattn.attr._views import (
    View,
    get_view,
    project_captured_matrices,
    stack_layers,
)
from captum_effattn.models import (
    CapturedHeads,
    HeadSelection,
    capture_attention,
    describe_model,
    select_heads,
)
from captum_effattn.models.selection import HeadSpec, IndexSpec


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

    Attention is not class-specific: ``target`` is accepted so the method fits pipelines that
    pass one, and ignored. Inputs may be token ids, embeddings, a token gate, or ViT pixels; the
    model must be in evaluation mode (dropout would make attention random) and comes back as it
    was: its attention implementation, hooks, training flag and grad mode are untouched.

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

    @log_usage(part_of_slo=True)
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        target: TargetType = None,
        additional_forward_args: Any = None,
        layers: IndexSpec = None,
        heads: HeadSpec = None,
        view: str = "efficient",
        query: QuerySpec = "auto",
        reduce: str | None = "mean",
        return_convergence_delta: bool = False,
    ) -> TensorOrTupleOfTensorsGeneric | tuple[TensorOrTupleOfTensorsGeneric, Tensor]:
        r"""Attribute the model's prediction to its input tokens through attention.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): what ``forward_func`` takes, as for any Captum
                method: token ids ``(B, S)``, embeddings ``(B, S, E)``, a token gate ``(B, S)``,
                or ViT pixels ``(B, C, H, W)``; several tensors as a tuple. Each input aligned
                with the model's sequence receives the token scores.
            target (int, tuple, Tensor or list, optional): accepted for compatibility and
                ignored: attention does not depend on the class being explained.
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

        Returns:
            **attributions** (*Tensor* or *tuple[Tensor, ...]*): one per input, of the input's
            shape (token scores spread evenly over embedding features, or over each patch's
            pixels); padding tokens get 0. With ``reduce=None``: a ``(B, L, H, S)`` tensor.
            **delta** (*Tensor*, returned if ``return_convergence_delta=True``): ``(B,)``.

        Raises:
            ValueError: unknown ``view``/``reduce``/``query``; layers or heads out of range (the
                message names the index and the valid range); ``reduce="rollout"`` on a selection
                that is not all heads of consecutive layers; inputs that do not fit the model.
            RuntimeError: the model is in training mode, or ``forward_func`` did not run the
                model exactly once.
        """
        del target  # attention is not class-specific
        attention_view = get_view(view)
        reduction = None if reduce is None else get_reduction(reduce)
        selection = select_heads(self.model, layers, heads)
        inputs_tuple = format_tensor_into_tuples(inputs)
        check_inputs(inputs_tuple, additional_forward_args, self.model)
        if reduction is None:
            return self._per_head_scores(
                inputs_tuple,
                additional_forward_args,
                selection,
                query,
                attention_view,
                return_convergence_delta,
            )
        reduction.check_selection(selection)
        reading = self._read(
            inputs_tuple,
            additional_forward_args,
            selection,
            query,
            attention_view,
            project_queries=not reduction.reads_full_matrices,
        )
        scores, delta = reduction.reduce(reading, attention_view)
        attributions = tuple(
            spread_to_input(scores, tensor, i, self.architecture)
            for i, tensor in enumerate(inputs_tuple)
        )
        output = format_output(is_tuple(inputs), attributions)
        return _with_delta(output, delta, return_convergence_delta)

    def _per_head_scores(
        self,
        inputs: tuple[Tensor, ...],
        additional_forward_args: Any,
        selection: HeadSelection,
        query: QuerySpec,
        view: View,
        return_convergence_delta: bool,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``reduce=None``: ``(B, L, H, S)`` token scores of every selected head."""
        _require_rectangular(selection, "reduce=None")
        reading = self._read(inputs, additional_forward_args, selection, query, view)
        assert reading.projected is not None  # projected during the forward
        per_head, delta = per_head_scores(reading.projected, reading.queries)
        batch, _, length = per_head.shape
        result = per_head.reshape(batch, len(selection.layers), -1, length)
        return _with_delta(result, delta, return_convergence_delta)

    def _read(
        self,
        inputs: tuple[Tensor, ...],
        additional_forward_args: Any,
        selection: HeadSelection,
        query: QuerySpec,
        view: View,
        project_queries: bool = True,
    ) -> AttentionReading:
        """Run the forward pass once, capturing the selected heads; with ``project_queries``,
        the explaining rows are projected layer by layer while the later layers run."""
        pipeline = LayerPipeline(query, view) if project_queries else None
        try:
            captured = self._capture(
                inputs,
                additional_forward_args,
                selection,
                on_layer=None if pipeline is None else pipeline.submit,
            )
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
    ) -> Tensor | tuple[Tensor, Tensor]:
        r"""The full selected attention matrices in one view, for analysis.

        Args:
            inputs, additional_forward_args, layers, heads, view: as in :meth:`attribute`; the
                selection must have the same heads in every selected layer.
            return_convergence_delta (bool, optional): also return the ``(B,)`` largest relative
                head-output error over all real rows.

        Returns:
            ``(B, L, H, S, S)`` matrices (rows: queries, columns: keys); rows of padding queries
            are returned as the model computed them.
        """
        attention_view = get_view(view)
        selection = select_heads(self.model, layers, heads)
        _require_rectangular(selection, "attention_matrices")
        captured = self._capture(
            format_tensor_into_tuples(inputs), additional_forward_args, selection
        )
        matrices, errors = project_captured_matrices(captured, attention_view)
        delta = per_example_max(errors * captured[0].key_mask[:, None, None, :])
        return _with_delta(matrices, delta, return_convergence_delta)

    def _capture(
        self,
        inputs: tuple[Tensor, ...],
        additional_forward_args: Any,
        selection: HeadSelection,
        on_layer: Callable[[CapturedHeads], None] | None = None,
    ) -> tuple[CapturedHeads, ...]:
        extra = format_additional_forward_args(additional_forward_args)
        with (
            capture_attention(
                self.model, selection, materialize=False, on_layer=on_layer
            ) as record,
            torch.no_grad(),
        ):
            try:
                self.forward_func(*inputs, *extra)
            except (IndexError, RuntimeError, ValueError) as error:
                shapes = [tuple(t.shape) for t in inputs]
                raise ValueError(
                    f"forward_func failed on inputs of shapes {shapes} inside "
                    f"{self.architecture.model_class}: {error}"
                ) from error
        check_whole_sequence(record.layers)
        return record.layers


def _with_delta(result: Any, delta: Tensor, return_convergence_delta: bool) -> Any:
    return (result, delta) if return_convergence_delta else result


def _require_rectangular(selection: HeadSelection, what: str) -> None:
    if len(set(selection.heads)) > 1:
        chosen = dict(selection.items())
        raise ValueError(
            f"{what} keeps a (layer, head) axis and needs the same heads in every selected "
            f"layer; got {chosen}. Make one call per layer instead."
        )
