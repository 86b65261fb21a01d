"""LayerEfficientAttentionAttribution: efficient attention shaped like a layer's output."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, overload

from captum.attr import LayerAttribution
from captum.log import log_usage
from torch import Tensor, nn

from captum_effattn._captum_compat import TargetType, TensorOrTupleOfTensorsGeneric
from captum_effattn.attr._core.efficient_attention_attribution import (
    EfficientAttentionAttribution,
)
from captum_effattn.models import UnsupportedModelError, describe_model

LayerAttributions = Tensor | tuple[Tensor, ...]
"""Attributions shaped like the layer's output: one tensor, or a tuple when it returns a tuple."""

# How deep to follow the functions a forward function calls when looking for its model
# (the Captum BERT tutorial's forward calls ``predict``, which reads the global ``model``).
_SEARCH_DEPTH = 3


class LayerEfficientAttentionAttribution(LayerAttribution):
    r"""Efficient attention token scores, shaped like the output of one layer.

    The layer counterpart of :class:`~captum_effattn.EfficientAttentionAttribution`, built to
    replace ``LayerIntegratedGradients`` in an existing pipeline by changing the class name only::

        >>> lig = LayerEfficientAttentionAttribution(          # doctest: +SKIP
        ...     predict, model.bert.embeddings)
        >>> attributions, delta = lig.attribute(                     # doctest: +SKIP
        ...     inputs=input_ids, baselines=ref_input_ids,
        ...     additional_forward_args=(token_type_ids, position_ids, attention_mask),
        ...     return_convergence_delta=True)
        >>> token_scores = attributions.sum(dim=-1).squeeze(0)       # doctest: +SKIP

    It runs ``forward_func`` once through :class:`~captum_effattn.EfficientAttentionAttribution`
    (same rows, same views, same reductions) and records the shape of ``layer``'s output during
    that forward. Each token's score is spread evenly over the layer output's feature axes, so
    summing them gives the token scores back. Layers whose output is not aligned with the
    model's tokens (``(B, S, ...)``) cannot receive token scores.
    """

    def __init__(
        self, forward_func: Callable, layer: nn.Module, model: nn.Module | None = None
    ) -> None:
        r"""
        Args:
            forward_func (Callable): the function you give ``LayerIntegratedGradients``:
                ``forward_func(*inputs, *additional_forward_args)`` runs the model forward
                exactly once; its output is not used.
            layer (nn.Module): the layer whose output shape the attributions take, e.g.
                ``model.bert.embeddings`` (output ``(B, S, E)``). It must be a submodule of
                ``model`` and run once per forward.
            model (nn.Module, optional): the Hugging Face transformer whose attention is read.
                Default: ``forward_func`` when it is a module; otherwise the outermost supported
                transformer containing ``layer`` among the modules ``forward_func`` refers to
                (its closure, default arguments, bound ``self``, the globals it names, and the
                same for the functions it calls, three calls deep). This finds the global
                ``model`` of a notebook's ``predict`` function; pass ``model=`` when it does not.

        Raises:
            TypeError: no ``model`` given and none could be found from ``forward_func``.
            ValueError: ``layer`` is not a submodule of ``model``.
            UnsupportedModelError: the model's architecture is not supported.
        """
        if model is None:
            model = _find_model(forward_func, layer)
        _require_submodule(model, layer)
        super().__init__(forward_func, layer)
        self.model = model
        self.attribution = EfficientAttentionAttribution(forward_func, model=model)

    def has_convergence_delta(self) -> bool:
        return True

    @overload
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        baselines: Any = None,
        target: TargetType = None,
        additional_forward_args: Any = None,
        n_steps: int | None = None,
        method: str | None = None,
        internal_batch_size: int | None = None,
        return_convergence_delta: Literal[False] = False,
        attribute_to_layer_input: bool = False,
        grad_kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> LayerAttributions: ...

    @overload
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        baselines: Any = None,
        target: TargetType = None,
        additional_forward_args: Any = None,
        n_steps: int | None = None,
        method: str | None = None,
        internal_batch_size: int | None = None,
        *,
        return_convergence_delta: Literal[True],
        attribute_to_layer_input: bool = False,
        grad_kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> tuple[LayerAttributions, Tensor]: ...

    @log_usage(part_of_slo=True)
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        baselines: Any = None,
        target: TargetType = None,
        additional_forward_args: Any = None,
        n_steps: int | None = None,
        method: str | None = None,
        internal_batch_size: int | None = None,
        return_convergence_delta: bool = False,
        attribute_to_layer_input: bool = False,
        grad_kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> LayerAttributions | tuple[LayerAttributions, Tensor]:
        r"""Token scores of efficient attention, spread over ``layer``'s output.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): what ``forward_func`` takes first, as for
                ``LayerIntegratedGradients``: token ids ``(B, S)`` or embeddings ``(B, S, E)``.
            baselines (Any, optional): accepted so pipelines written for gradient methods run
                unchanged, and unused: attention needs no reference input.
            target (int, tuple, Tensor or list, optional): as in
                :meth:`EfficientAttentionAttribution.attribute
                <captum_effattn.EfficientAttentionAttribution.attribute>`: validated, used by
                ``weighting="gradient"``, ignored otherwise.
            additional_forward_args (Any, optional): extra arguments appended to ``inputs`` when
                calling ``forward_func`` (token type ids, position ids, attention mask, ...).
            n_steps, method, internal_batch_size (optional): ``LayerIntegratedGradients``'
                integration settings, accepted (in its argument order) so a call written for it
                runs unchanged, and unused: there is no path to integrate along.
            return_convergence_delta (bool, optional): also return the ``(B,)`` largest relative
                head-output error ``||x V - a V|| / ||a V||`` of the projected rows (0 for
                ``view="raw"``), as :class:`~captum_effattn.EfficientAttentionAttribution` does.
                It is not Integrated Gradients' completeness gap.
            attribute_to_layer_input (bool, optional): take the shape of the layer's first tensor
                input (e.g. the token ids ``(B, S)`` the embeddings receive) instead of its
                output.
            grad_kwargs (dict, optional): accepted like ``n_steps`` and unused (no gradients).
            **options: the selectors and options of
                :meth:`EfficientAttentionAttribution.attribute
                <captum_effattn.EfficientAttentionAttribution.attribute>`: ``layers``,
                ``heads``, ``view``, ``query``, ``reduce`` and ``weighting`` (``reduce=None``
                is refused: it gives per-head scores, not one score per token).

        Returns:
            **attributions** (*Tensor* or *tuple[Tensor, ...]*): shaped like the layer's output
            (a tuple when the layer returns a tuple; each tensor ``(B, S, *F)`` aligned with the
            tokens). Each token's score divided by ``prod(F)`` fills its features, so
            ``attributions.sum(-1)`` (or over all feature axes) gives the ``(B, S)`` token
            scores; padding tokens get 0. Contiguous tensors, in the layer output's floating
            dtype.
            **delta** (*Tensor*, returned if ``return_convergence_delta=True``): ``(B,)``.

        Raises:
            ValueError: options :meth:`EfficientAttentionAttribution.attribute
                <captum_effattn.EfficientAttentionAttribution.attribute>` refuses; ``reduce=None``;
                the layer did not run, or ran more than once, during the forward; its output or
                the inputs are not aligned with the model's tokens.
        """
        del baselines, n_steps, method, internal_batch_size, grad_kwargs  # nothing to integrate
        if "reduce" in options and options["reduce"] is None:
            raise ValueError(
                "LayerEfficientAttentionAttribution needs one score per token: reduce=None keeps "
                "a (layer, head) axis; use EfficientAttentionAttribution for per-head scores"
            )
        with _record_layer(self.layer, attribute_to_layer_input) as seen:
            scores_per_input, delta = self.attribution.attribute(
                inputs,
                target=target,
                additional_forward_args=additional_forward_args,
                return_convergence_delta=True,
                **options,
            )
        layer_tensors = _single_call(seen, self.layer, attribute_to_layer_input)
        scores = _token_scores(scores_per_input, layer_tensors[0])
        attributions = tuple(_spread(scores, tensor, i) for i, tensor in enumerate(layer_tensors))
        output = attributions if len(attributions) > 1 else attributions[0]
        return (output, delta) if return_convergence_delta else output

    def compute_convergence_delta(
        self,
        attributions: Any,
        inputs: TensorOrTupleOfTensorsGeneric,
        target: TargetType = None,
        additional_forward_args: Any = None,
        **options: Any,
    ) -> Tensor:
        r"""The ``(B,)`` largest relative head-output error of the rows behind ``inputs``.

        Args:
            attributions (Any): accepted for Captum's signature and unused: the error is a
                property of the projected attention rows, recomputed with one forward.
            inputs, target, additional_forward_args, **options: as in :meth:`attribute`.
        """
        del attributions
        _, delta = self.attribute(
            inputs,
            target=target,
            additional_forward_args=additional_forward_args,
            return_convergence_delta=True,
            **options,
        )
        return delta


@contextmanager
def _record_layer(layer: nn.Module, to_input: bool) -> Iterator[list[tuple[Tensor, ...]]]:
    """Record, per call, the layer's output tensors (or its first tensor input)."""
    calls: list[tuple[Tensor, ...]] = []

    def record_input(module, args, kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        calls.append(tuple(tensors[:1]))

    def record_output(module, args, output):
        outputs = output if isinstance(output, tuple) else (output,)
        calls.append(tuple(t for t in outputs if isinstance(t, Tensor)))

    if to_input:
        handle = layer.register_forward_pre_hook(record_input, with_kwargs=True)
    else:
        handle = layer.register_forward_hook(record_output)
    try:
        yield calls
    finally:
        handle.remove()


def _single_call(
    calls: list[tuple[Tensor, ...]], layer: nn.Module, to_input: bool
) -> tuple[Tensor, ...]:
    what = "input" if to_input else "output"
    name = type(layer).__name__
    if not calls:
        raise ValueError(f"layer {name} did not run during forward_func: it has no {what} shape")
    if len(calls) > 1:
        raise ValueError(
            f"layer {name} ran {len(calls)} times during one forward (a module shared by "
            "several layers?); attributions take the shape of one call: choose a layer that runs "
            "once"
        )
    tensors = calls[0]
    if not tensors:
        raise ValueError(f"layer {name} has no tensor {what}")
    return tensors


def _token_scores(scores_per_input: TensorOrTupleOfTensorsGeneric, layer_tensor: Tensor) -> Tensor:
    """``(B, S)`` token scores from the attribution of the first input aligned with the layer."""
    batch_and_length = tuple(layer_tensor.shape[:2])
    candidates = scores_per_input if isinstance(scores_per_input, tuple) else (scores_per_input,)
    for attribution in candidates:
        if attribution.dim() >= 2 and tuple(attribution.shape[:2]) == batch_and_length:
            return attribution.reshape(*batch_and_length, -1).sum(-1)
    shapes = [tuple(a.shape) for a in candidates]
    raise ValueError(
        f"the layer's tensor of shape {tuple(layer_tensor.shape)} is not aligned with the inputs "
        f"(attributed shapes {shapes}): token scores need a layer whose output is (B, S, ...) for "
        "inputs of shape (B, S) or (B, S, ...), such as the embeddings"
    )


def _spread(scores: Tensor, tensor: Tensor, index: int) -> Tensor:
    """``(B, S)`` scores evenly over ``tensor``'s feature axes, as a contiguous tensor."""
    batch, length = scores.shape
    if tensor.dim() < 2 or tuple(tensor.shape[:2]) != (batch, length):
        raise ValueError(
            f"layer tensor {index} has shape {tuple(tensor.shape)}; token scores need "
            f"(B, S, ...) = ({batch}, {length}, ...)"
        )
    features = math.prod(tensor.shape[2:])
    dtype = tensor.dtype if tensor.is_floating_point() else scores.dtype
    per_feature = (scores / features).to(dtype=dtype, device=tensor.device)
    per_feature = per_feature.reshape(batch, length, *([1] * (tensor.dim() - 2)))
    return per_feature.expand(tensor.shape).contiguous()


def _require_submodule(model: nn.Module, layer: nn.Module) -> None:
    if not isinstance(layer, nn.Module):
        raise TypeError(f"layer must be an nn.Module; got {type(layer).__name__}")
    if not _contains(model, layer):
        raise ValueError(
            f"layer {type(layer).__name__} is not a submodule of the model "
            f"{type(model).__name__}: pass a module of that model (e.g. its embeddings), or the "
            "model that contains the layer as model=..."
        )


def _referenced_objects(func: Any) -> Iterator[Any]:
    """The objects a callable refers to directly: partial arguments, a callable object's
    attributes, bound self, closure cells, default arguments and the globals its code names."""
    if isinstance(func, functools.partial):
        yield func.func
        yield from func.args
        yield from func.keywords.values()
        return
    if not (inspect.isfunction(func) or inspect.ismethod(func)):  # an object with __call__
        yield from getattr(func, "__dict__", {}).values()
        func = type(func).__call__
    if inspect.ismethod(func):
        yield func.__self__
    func = getattr(func, "__func__", func)
    for cell in getattr(func, "__closure__", None) or ():
        try:
            yield cell.cell_contents
        except ValueError:  # an empty cell
            continue
    yield from getattr(func, "__defaults__", None) or ()
    yield from (getattr(func, "__kwdefaults__", None) or {}).values()
    code, namespace = getattr(func, "__code__", None), getattr(func, "__globals__", {})
    if code is not None:
        yield from (namespace[name] for name in code.co_names if name in namespace)


def _is_function(obj: Any) -> bool:
    """Python functions, bound methods and partials: what a forward function calls."""
    return inspect.isfunction(obj) or inspect.ismethod(obj) or isinstance(obj, functools.partial)


def _candidate_models(forward_func: Callable) -> list[nn.Module]:
    """Modules ``forward_func`` refers to, following the functions it refers to."""
    found: list[nn.Module] = []
    seen: set[int] = set()
    frontier: list[Any] = [forward_func]
    for _ in range(_SEARCH_DEPTH):
        following: list[Any] = []
        for func in frontier:
            for obj in _referenced_objects(func):
                if id(obj) in seen:
                    continue
                seen.add(id(obj))
                if isinstance(obj, nn.Module):
                    found.append(obj)
                elif _is_function(obj):
                    following.append(obj)
        frontier = following
    return found


def _supported(module: nn.Module) -> bool:
    try:
        describe_model(module)
    except (UnsupportedModelError, AttributeError, TypeError):
        return False
    return True


def _contains(module: nn.Module, part: nn.Module) -> bool:
    return any(sub is part for sub in module.modules())


def _outermost(modules: list[nn.Module]) -> list[nn.Module]:
    """The modules no other module of the list contains."""
    return [m for m in modules if not any(o is not m and _contains(o, m) for o in modules)]


def _find_model(forward_func: Callable, layer: nn.Module) -> nn.Module:
    """``forward_func`` itself when it is a module, else the outermost supported transformer
    containing ``layer`` among the modules it refers to."""
    if isinstance(forward_func, nn.Module) and _supported(forward_func):
        return forward_func
    referenced = _candidate_models(forward_func)
    if isinstance(forward_func, nn.Module):  # a wrapper around the transformer
        referenced = [*forward_func.modules(), *referenced]
    candidates = [m for m in referenced if _supported(m)]
    owners = _outermost([m for m in candidates if _contains(m, layer)])
    if len(owners) == 1:
        return owners[0]
    if not owners and candidates:
        names = sorted({type(m).__name__ for m in candidates})
        raise ValueError(
            f"layer {type(layer).__name__} is not a submodule of the model forward_func uses "
            f"({', '.join(names)}): pass a layer of that model, or the right model as model=..."
        )
    found = "several models contain the layer" if owners else "no supported model was found"
    raise TypeError(
        "LayerEfficientAttentionAttribution reads the attention of the transformer that "
        f"forward_func runs, and {found} among the objects forward_func refers to: pass "
        "model=... (the Hugging Face model containing the layer)"
    )


__all__ = ["LayerEfficientAttentionAttribution"]
