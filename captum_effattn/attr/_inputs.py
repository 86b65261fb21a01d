"""Checks on what an attribution is given, before the forward pass runs (and one after it).

Each check turns a failure that would otherwise surface deep inside the model (an index error in
the position embeddings, a broadcast mask, a multi-minute compile that ends blaming the
architecture) into a specific error naming the argument and what was expected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from captum_effattn.models import CapturedHeads

# Modules holding learned absolute position embeddings, by the name transformers gives them.
_POSITION_EMBEDDING_NAMES = ("position_embeddings", "wpe")


def check_not_compiled(forward_func: Callable, model: nn.Module | None) -> None:
    """Refuse a ``torch.compile``'d ``forward_func`` or ``model`` at once.

    A compiled graph runs the model's attention without the capture, so the attribution would
    fail only after the (long) compilation, with an error about the model's layout.

    Raises:
        TypeError: either one is compiled (the message says to pass the original module).
    """
    for name, candidate in (("forward_func", forward_func), ("model", model)):
        if isinstance(candidate, nn.Module) and hasattr(candidate, "_orig_mod"):
            raise TypeError(
                f"{name} is a torch.compile'd module ({type(candidate).__name__}); efficient "
                "attention captures attention inside the original module, which a compiled "
                f"graph bypasses: pass {name}._orig_mod instead"
            )
        if candidate is not None and hasattr(candidate, "_torchdynamo_orig_callable"):
            raise TypeError(
                f"{name} is a torch.compile'd function; efficient attention captures attention "
                "inside the model, which a compiled graph bypasses: pass the original function"
            )


def check_inputs(
    inputs: tuple[Tensor, ...], additional_forward_args: Any, model: nn.Module
) -> None:
    """Check the inputs and extra arguments of an attribution before the forward pass.

    Args:
        inputs: the formatted inputs, batch first.
        additional_forward_args: as given by the user.
        model: the transformer whose attention is read.

    Raises:
        TypeError: ``additional_forward_args`` is a dict (Captum passes them positionally).
        ValueError: an input without a batch and a sequence axis, an empty batch, inputs or
            tensor arguments of different batch sizes, or a sequence longer than the model's
            learned positions.
    """
    if isinstance(additional_forward_args, dict):
        raise TypeError(
            "additional_forward_args is a dict, but Captum passes additional_forward_args "
            "positionally after the inputs: pass a tuple such as (attention_mask,), or bind "
            "keyword arguments inside forward_func (a lambda or functools.partial)"
        )
    batch = _check_batched(inputs)
    extra = additional_forward_args
    extra = extra if isinstance(extra, tuple | list) else () if extra is None else (extra,)
    for index, argument in enumerate(extra):
        if isinstance(argument, Tensor) and argument.dim() > 0 and argument.shape[0] != batch:
            raise ValueError(
                f"additional_forward_args[{index}] has shape {tuple(argument.shape)} but the "
                f"inputs have batch size {batch}; tensor arguments are batch first (Captum "
                "expands them along axis 0), e.g. an attention mask of shape (batch, sequence)"
            )
    _check_positions(inputs, extra, model)


def _check_batched(inputs: tuple[Tensor, ...]) -> int:
    """The batch size shared by every input."""
    for index, tensor in enumerate(inputs):
        if not isinstance(tensor, Tensor) or tensor.dim() < 2:
            shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(
                f"input {index} has shape {shape}; inputs need a batch and a sequence axis, "
                "(batch, sequence, ...): add a batch axis for a single example (x[None])"
            )
    batch = inputs[0].shape[0]
    if batch == 0:
        raise ValueError(f"input 0 has shape {tuple(inputs[0].shape)}: the batch is empty")
    for index, tensor in enumerate(inputs):
        if tensor.shape[0] != batch:
            raise ValueError(
                f"input {index} has batch size {tensor.shape[0]} but input 0 has {batch}"
            )
    return batch


def _position_embeddings(model: nn.Module) -> nn.Embedding | None:
    """The model's learned absolute position embeddings, if it has them (rotary and relative
    positions have no hard limit)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.endswith(_POSITION_EMBEDDING_NAMES):
            return module
    return None


def position_limit(model: nn.Module) -> int | None:
    """How many positions the model's learned absolute position embeddings cover, if any."""
    embeddings = _position_embeddings(model)
    if embeddings is None:
        return None
    # RoBERTa numbers positions after its padding index.
    offset = 0 if embeddings.padding_idx is None else embeddings.padding_idx + 1
    return embeddings.num_embeddings - offset


def _check_positions(inputs: tuple[Tensor, ...], extra: Sequence[Any], model: nn.Module) -> None:
    limit, embeddings = position_limit(model), _position_embeddings(model)
    if limit is None or embeddings is None:
        return
    for tensor in (*inputs, *extra):
        length = _sequence_length(tensor, embeddings.embedding_dim)
        if length is not None and length > limit:
            raise ValueError(
                f"the inputs have {length} tokens but {type(model).__name__} has learned "
                f"positions for {limit} only: truncate them to at most {limit} tokens"
            )


def _sequence_length(tensor: Any, hidden: int) -> int | None:
    """The sequence length of token ids or a mask ``(B, S)``, or of embeddings ``(B, S, E)``."""
    if not isinstance(tensor, Tensor):
        return None
    if tensor.dim() == 2 and not tensor.is_floating_point():
        return tensor.shape[1]
    if tensor.dim() == 3 and tensor.shape[-1] == hidden:
        return tensor.shape[1]
    return None


def check_whole_sequence(captured: Sequence[CapturedHeads]) -> None:
    """Refuse a forward that attended from fewer queries than keys (a key/value cache).

    Raises:
        ValueError: the queries do not cover every key.
    """
    first = captured[0]
    query = first.query if first.query is not None else first.attn
    queries, keys = query.shape[-2], first.key_mask.shape[-1]
    if queries != keys:
        raise ValueError(
            f"forward_func ran the model on {queries} new tokens attending to {keys} keys, the "
            "others from a key/value cache (past_key_values): attribution needs the whole "
            "sequence in one forward pass, without a cache"
        )
