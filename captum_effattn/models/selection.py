"""Which layers and heads to explain: parsing, validation and an immutable selection.

Layers and heads are given the way users think of them (an index, a negative index, a slice, a
list, ``"all"``) and validated against the model, so a bad index fails with the index and the valid
range rather than an ``IndexError`` deep inside a forward pass.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, SupportsIndex

from torch import nn

from captum_effattn.models.architectures import ModelArchitecture, describe_model

IndexSpec = int | slice | Sequence[int] | Literal["all"] | None
"""One axis of a selection: an index (negative counts from the end), a slice, a sequence of
indices, or ``"all"``/``None`` for every index."""

HeadSpec = IndexSpec | Mapping[int, IndexSpec]
"""Heads: an :data:`IndexSpec` applied to every selected layer, or ``{layer: IndexSpec}``."""


def _index(value: object, axis: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{axis} indices must be ints, not booleans; got {value!r}")
    not_an_int = TypeError(f"{axis} indices must be ints; got {value!r} ({type(value).__name__})")
    if not isinstance(value, SupportsIndex):
        raise not_an_int
    try:
        return operator.index(value)  # a tensor of several elements has __index__ but refuses
    except TypeError:
        raise not_an_int from None


class SelectionIndexError(IndexError, ValueError):
    """A layer or head index out of range for the model.

    An ``IndexError`` (it is an index out of range) and a ``ValueError`` (it is a bad argument
    value, which is what the attribution methods document for ``layers`` and ``heads``), so code
    that catches either one catches it.
    """


def _normalize(index: int, size: int, axis: str, where: str) -> int:
    if not -size <= index < size:
        raise SelectionIndexError(
            f"{axis} {index} is out of range{where} (valid: {-size}..{size - 1})"
        )
    return index % size


def _parse_axis(spec: IndexSpec, size: int, axis: str, where: str) -> tuple[int, ...]:
    """Sorted, distinct, non-negative indices of ``range(size)`` named by ``spec``.

    Args:
        spec: see :data:`IndexSpec`.
        size: the number of valid indices.
        axis: ``"layer"`` or ``"head"``, for messages.
        where: suffix naming the context in messages (``" for a model with 6 layers"``).
    """
    if spec is None or (isinstance(spec, str) and spec == "all"):
        return tuple(range(size))
    if isinstance(spec, str):
        raise ValueError(
            f"{axis}s must be an index, a slice, a list of indices, 'all' or None; "
            f"got the string {spec!r}"
        )
    if isinstance(spec, slice):
        chosen = tuple(range(size)[spec])
        if not chosen:
            raise ValueError(f"{axis}s={spec!r} selects no {axis}{where}")
        return tuple(sorted(chosen))
    if isinstance(spec, Sequence):
        indices = [_index(item, axis) for item in spec]
        if not indices:
            raise ValueError(f"{axis}s={list(spec)!r} selects no {axis}")
    else:
        indices = [_index(spec, axis)]
    picked: list[int] = []
    for index in indices:
        normalized = _normalize(index, size, axis, where)
        if normalized in picked:
            alias = f" (as {normalized})" if normalized != index else ""
            raise ValueError(f"{axis} {index} is selected twice{alias}{where}")
        picked.append(normalized)
    return tuple(sorted(picked))


def _ascending_within(indices: tuple[int, ...], size: int) -> bool:
    return list(indices) == sorted(set(indices)) and set(indices) <= set(range(size))


@dataclass(frozen=True)
class HeadSelection:
    """Selected layers (ascending, i.e. in execution order) and the selected heads of each.

    Immutable and hashable. Build it with :meth:`parse` or :func:`select_heads`.

    Attributes:
        layers: selected layer indices, ascending, non-negative.
        heads: ``heads[i]`` holds the selected heads of ``layers[i]``, ascending, non-negative.
        num_layers: the model's number of layers (the selection is only valid for it).
        num_heads: the model's number of query heads per layer.
    """

    layers: tuple[int, ...]
    heads: tuple[tuple[int, ...], ...]
    num_layers: int
    num_heads: int

    def __post_init__(self) -> None:
        if len(self.layers) != len(self.heads):
            raise ValueError(
                f"HeadSelection needs one tuple of heads per layer; got {len(self.layers)} "
                f"layers and {len(self.heads)} head tuples"
            )
        if not self.layers:
            raise ValueError("HeadSelection selects no layer")
        if not _ascending_within(self.layers, self.num_layers):
            raise ValueError(
                f"HeadSelection layers must be distinct, ascending and in 0..{self.num_layers - 1}"
                f"; got {self.layers}"
            )
        for layer, heads in zip(self.layers, self.heads, strict=True):
            if not heads or not _ascending_within(heads, self.num_heads):
                raise ValueError(
                    f"HeadSelection heads of layer {layer} must be non-empty, distinct, ascending "
                    f"and in 0..{self.num_heads - 1}; got {heads}"
                )

    @classmethod
    def parse(
        cls,
        layers: IndexSpec = None,
        heads: HeadSpec = None,
        *,
        num_layers: int,
        num_heads: int,
    ) -> HeadSelection:
        """Validate a user's layer/head choice for a model of the given size.

        Args:
            layers: an index (``-1`` = last layer), a slice, a sequence of indices, or
                ``"all"``/``None`` for every layer. When ``heads`` is a mapping, ``None`` means
                the layers the mapping names.
            heads: an index, slice, sequence or ``"all"``/``None``, applied to every selected
                layer; or a mapping ``{layer: heads}`` giving the heads of some layers (keys may
                be negative); selected layers it does not name get all heads.
            num_layers: number of layers of the model.
            num_heads: number of query heads per layer.

        Returns:
            The selection, layers ascending and heads ascending per layer.

        Raises:
            SelectionIndexError: an index out of range (an ``IndexError`` and a ``ValueError``; the
                message names it and the valid range).
            ValueError: an index given twice, an empty selection, or a mapping naming a layer
                that is not selected.
            TypeError: an index that is not an int (booleans included).
        """
        model = f" for a model with {num_layers} layers"
        per_layer: dict[int, IndexSpec] = {}
        if isinstance(heads, Mapping):
            for key, spec in heads.items():
                layer = _normalize(_index(key, "layer"), num_layers, "layer", model)
                if layer in per_layer:
                    raise ValueError(f"heads names layer {layer} twice (once as {key}){model}")
                per_layer[layer] = spec
            if layers is None:
                layers = sorted(per_layer)
        chosen = _parse_axis(layers, num_layers, "layer", model)
        default = None if isinstance(heads, Mapping) else heads
        stray = sorted(set(per_layer) - set(chosen))
        if stray:
            raise ValueError(
                f"heads names layer {stray[0]}, which is not among the selected layers {chosen}"
            )
        chosen_heads = []
        for layer in chosen:
            where = f" in layer {layer} of a model with {num_heads} heads per layer"
            chosen_heads.append(
                _parse_axis(per_layer.get(layer, default), num_heads, "head", where)
            )
        return cls(tuple(chosen), tuple(chosen_heads), num_layers, num_heads)

    def heads_of(self, layer: int) -> tuple[int, ...]:
        """The selected heads of ``layer`` (a selected layer, non-negative index)."""
        try:
            return self.heads[self.layers.index(layer)]
        except ValueError:
            raise KeyError(f"layer {layer} is not selected (selected: {self.layers})") from None

    def items(self) -> Iterator[tuple[int, tuple[int, ...]]]:
        """``(layer, heads)`` pairs in execution order."""
        return zip(self.layers, self.heads, strict=True)

    @property
    def num_selected_heads(self) -> int:
        return sum(len(heads) for heads in self.heads)

    @property
    def all_heads_of_consecutive_layers(self) -> bool:
        """Every head of a run of consecutive layers (what attention rollout multiplies through)."""
        consecutive = self.layers == tuple(range(self.layers[0], self.layers[-1] + 1))
        return consecutive and all(len(heads) == self.num_heads for heads in self.heads)


def select_heads(
    model: nn.Module, layers: IndexSpec = None, heads: HeadSpec = None
) -> HeadSelection:
    """:meth:`HeadSelection.parse` with the sizes read from ``model`` (a supported architecture).

    Example:
        >>> select_heads(model, layers=-1, heads=[0, 3])          # doctest: +SKIP
        >>> select_heads(model, heads={0: "all", -1: slice(0, 4)})  # doctest: +SKIP
    """
    return select_architecture_heads(describe_model(model), layers, heads)


def select_architecture_heads(
    architecture: ModelArchitecture, layers: IndexSpec = None, heads: HeadSpec = None
) -> HeadSelection:
    """:func:`select_heads` for a model already described (:func:`describe_model`), without
    walking its modules again: what an attribution method that described its model once calls
    on every ``attribute``."""
    return HeadSelection.parse(
        layers, heads, num_layers=architecture.num_layers, num_heads=architecture.num_heads
    )
