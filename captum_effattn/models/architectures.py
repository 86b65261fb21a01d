"""Where each supported Hugging Face architecture keeps its self-attention: a registry.

One :class:`ArchitectureSpec` per ``config.model_type`` says where the blocks are (relative to the
base model, so bare models such as ``BertModel`` and head models such as
``BertForSequenceClassification`` resolve alike), which submodule of a block calls the attention
function, what the model's primary input is, and whether its self-attention is causal.
:func:`describe_model` applies the spec to a concrete model.

Every supported architecture computes self-attention by dispatching on
``config._attn_implementation`` through transformers' ``AttentionInterface`` and builds its mask
with ``masking_utils`` (checked against transformers 5.24); :mod:`captum_effattn.models.capture`
relies on both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D


class UnsupportedModelError(ValueError):
    """The model's architecture is not in the registry (or is not a transformers model)."""


def _never_causal(config: PreTrainedConfig) -> bool:
    return False


def _decoder_causal(config: PreTrainedConfig) -> bool:
    # masking_utils.create_causal_mask builds a bidirectional mask when `config.is_causal` is False.
    return getattr(config, "is_causal", True)


def _causal_if_decoder(config: PreTrainedConfig) -> bool:
    return bool(config.is_decoder) and _decoder_causal(config)


@dataclass(frozen=True)
class ArchitectureSpec:
    """How to find the self-attention of one model family.

    Attributes:
        model_type: the ``config.model_type`` this spec handles (``"bert"``, ``"gpt2"``, ...).
        layers: dotted path from the base model (``model.base_model``) to the ``ModuleList`` of
            blocks, in execution order; a block's position in it is its layer index.
        attention: dotted path from a block to the module that calls the attention function
            (the one holding the query/key/value projections).
        causal: whether self-attention is causal for a given config.
        input_name: the forward argument carrying the primary input (``"input_ids"`` token ids or
            ``"pixel_values"``).
        embeds_name: the forward argument that takes input embeddings instead of ``input_name``
            (``"inputs_embeds"``), or ``None`` when the model has none (ViT).
        prepends_cls_token: the model itself puts a [CLS] token before its input tokens (ViT
            prepends one to the patches; text models get theirs from the tokenizer).
        output_projection: dotted path from a block to the module that applies the attention's
            output projection ``W_O`` to the concatenated heads (an ``nn.Linear``, or GPT-2's
            ``Conv1D``); head ``h``'s slice ``W_O^h`` maps its values into the residual stream.
            ``None`` when unknown (then value-norm weighting is unavailable for the model).
    """

    model_type: str
    layers: str
    attention: str
    causal: Callable[[PreTrainedConfig], bool] = _never_causal
    input_name: str = "input_ids"
    embeds_name: str | None = "inputs_embeds"
    prepends_cls_token: bool = False
    output_projection: str | None = None


ARCHITECTURES: dict[str, ArchitectureSpec] = {}
"""The registry: ``config.model_type`` -> :class:`ArchitectureSpec`."""


def register_architecture(spec: ArchitectureSpec) -> ArchitectureSpec:
    """Add (or replace) the spec for ``spec.model_type``; returns it."""
    ARCHITECTURES[spec.model_type] = spec
    return spec


for _spec in (
    ArchitectureSpec(
        "bert",
        "encoder.layer",
        "attention.self",
        causal=_causal_if_decoder,
        output_projection="attention.output.dense",
    ),
    ArchitectureSpec(
        "roberta",
        "encoder.layer",
        "attention.self",
        causal=_causal_if_decoder,
        output_projection="attention.output.dense",
    ),
    ArchitectureSpec(
        "distilbert", "transformer.layer", "attention", output_projection="attention.out_lin"
    ),
    ArchitectureSpec("gpt2", "h", "attn", causal=_decoder_causal, output_projection="attn.c_proj"),
    ArchitectureSpec(
        "llama", "layers", "self_attn", causal=_decoder_causal, output_projection="self_attn.o_proj"
    ),
    ArchitectureSpec(
        "vit",
        "layers",
        "attention",
        input_name="pixel_values",
        embeds_name=None,
        prepends_cls_token=True,
        output_projection="attention.o_proj",
    ),
):
    register_architecture(_spec)


@dataclass(frozen=True, eq=False)
class ModelArchitecture:
    """An :class:`ArchitectureSpec` applied to one model.

    Attributes:
        spec: the registry entry.
        model_class: the model's class name (for messages).
        attention_modules: the self-attention module of each layer; index = layer index.
        num_heads: query heads per layer ``H``.
        num_kv_heads: key/value heads per layer ``H_kv`` (``< H`` for grouped-query attention;
            query head ``h`` reads key/value head ``h // (H // H_kv)``).
        head_dim: width ``d_head`` of one head's queries, keys and values.
        causal: whether self-attention is causal (query ``i`` sees keys ``j <= i`` only).
        input_embeddings: the module that embeds the primary input: the token embedding
            (``nn.Embedding``) for text models, the patch embedding for ViT. Its output is what
            ``spec.embeds_name`` accepts, where the model has such an argument.
        image_size: ``(height, width)`` the model expects (ViT), else ``None``.
        patch_size: ``(height, width)`` of one patch (ViT), else ``None``.
        output_projections: each layer's ``W_O`` module (``spec.output_projection``), or ``()``
            when the spec does not name one.
    """

    spec: ArchitectureSpec
    model_class: str
    attention_modules: tuple[nn.Module, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    input_embeddings: nn.Module
    image_size: tuple[int, int] | None = None
    patch_size: tuple[int, int] | None = None
    output_projections: tuple[nn.Module, ...] = ()

    @property
    def num_layers(self) -> int:
        return len(self.attention_modules)

    @property
    def kv_group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def kv_head(self, head: int) -> int:
        """The key/value head that query head ``head`` reads."""
        return head // self.kv_group_size

    def output_projection_slices(self, layer: int) -> torch.Tensor:
        """``(H, d_head, E)``: head ``h``'s slice ``W_O^h`` of layer ``layer``'s output
        projection, oriented so that ``values_h @ W_O^h`` is the head's contribution to the
        residual stream (bias excluded: it is added once, not per key).

        Raises:
            UnsupportedModelError: the architecture's spec names no output projection, or the
                module is neither an ``nn.Linear`` nor a GPT-2 ``Conv1D`` of the expected width.
        """
        if not self.output_projections:
            raise UnsupportedModelError(
                f"{self.model_class}: its architecture spec ({self.spec.model_type!r}) names no "
                "output_projection, which value-norm weighting needs; register one with "
                "ArchitectureSpec(output_projection=...)"
            )
        module = self.output_projections[layer]
        width = self.num_heads * self.head_dim
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and weight is not None:
            weight = weight.T  # (in, out)
        elif not isinstance(module, Conv1D):
            weight = None
        if weight is None or weight.shape[0] != width:
            raise UnsupportedModelError(
                f"{self.model_class} layer {layer}: the output projection "
                f"{self.spec.output_projection!r} is a {type(module).__name__}; expected an "
                f"nn.Linear or Conv1D taking the {width} concatenated head features"
            )
        return weight.reshape(self.num_heads, self.head_dim, -1)


def _pair(size: int | Iterable[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    height, width = size
    return (int(height), int(width))


def _submodule(root: nn.Module, path: str, what: str, model: PreTrainedModel) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type {model.config.model_type!r}) has no {what} at "
            f"{path!r}: its layout differs from the registered one for this transformers version"
        ) from None


def _layer_list(model: PreTrainedModel, path: str) -> nn.ModuleList | nn.Sequential:
    """The model's list of transformer blocks, in order."""
    blocks = _submodule(model.base_model, path, "layer list", model)
    if not isinstance(blocks, nn.ModuleList | nn.Sequential):
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type {model.config.model_type!r}) has a "
            f"{type(blocks).__name__} at {path!r}, not a list of layers: its layout differs from "
            "the registered one for this transformers version"
        )
    return blocks


def _unsupported(why: str) -> UnsupportedModelError:
    supported = ", ".join(sorted(ARCHITECTURES))
    return UnsupportedModelError(f"{why}. Supported model types: {supported}")


def describe_model(model: nn.Module) -> ModelArchitecture:
    """Find the self-attention modules of ``model`` and read its attention geometry.

    Args:
        model: a transformers ``PreTrainedModel`` of a registered architecture, bare
            (``BertModel``) or with a head (``BertForSequenceClassification``, ``GPT2LMHeadModel``,
            ``ViTForImageClassification``, ...).

    Returns:
        The model's :class:`ModelArchitecture`.

    Raises:
        UnsupportedModelError: not a transformers model, or its ``config.model_type`` is not
            registered (the message names the class, the model type and what is supported).
    """
    if not isinstance(model, PreTrainedModel):
        raise _unsupported(
            f"expected a transformers PreTrainedModel; got {type(model).__name__}",
        )
    config = model.config
    spec = ARCHITECTURES.get(config.model_type)
    if spec is None:
        raise _unsupported(
            f"{type(model).__name__} (model_type {config.model_type!r}) is not supported",
        )
    blocks = _layer_list(model, spec.layers)
    attention = tuple(_submodule(block, spec.attention, "attention", model) for block in blocks)
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    image = spec.input_name == "pixel_values"
    projections: tuple[nn.Module, ...] = ()
    if spec.output_projection is not None:
        projections = tuple(
            _submodule(block, spec.output_projection, "output projection", model)
            for block in blocks
        )
    return ModelArchitecture(
        spec=spec,
        model_class=type(model).__name__,
        attention_modules=attention,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        causal=spec.causal(config),
        input_embeddings=model.get_input_embeddings(),
        image_size=_pair(config.image_size) if image else None,
        patch_size=_pair(config.patch_size) if image else None,
        output_projections=projections,
    )
