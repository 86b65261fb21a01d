"""Where each supported Hugging Face architecture keeps its self-attention: a registry.

One :class:`ArchitectureSpec` per ``config.model_type`` says where the blocks are (relative to the
base model, so bare models such as ``BertModel`` and head models such as
``BertForSequenceClassification`` resolve alike), which submodule of a block calls the attention
function, what the model's primary input is, and whether its self-attention is causal.
:func:`describe_model` applies the spec to a concrete model.

Every supported architecture computes self-attention by dispatching on
``config._attn_implementation`` through transformers' ``AttentionInterface`` and builds its mask
with ``masking_utils`` (checked against transformers 5.24); :mod:`captum_effattn.models.capture`
relies on both. Types known to compute attention otherwise (DeBERTa, DeBERTa-v2) are refused with
the reason (:data:`KNOWN_UNSUPPORTED`).

Layers are numbered in the order the forward runs them: a block that runs as several layers
(ALBERT) is several layers; an encoder-decoder model's decoder layers follow its encoder's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

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


BlockList = Callable[[nn.Module], Sequence[nn.Module]]
"""``blocks(base_model) -> blocks``: the transformer blocks in the order the forward runs them, one
per layer; the same block may appear several times (ALBERT shares one block across layers)."""


@dataclass(frozen=True)
class ArchitectureSpec:
    """How to find the self-attention of one model family.

    Attributes:
        model_type: the ``config.model_type`` this spec handles (``"bert"``, ``"gpt2"``, ...).
        layers: dotted path from the base model (``model.base_model``) to the ``ModuleList`` of
            blocks, in execution order; a block's position in it is its layer index. Or, where
            one path cannot say it, a :data:`BlockList` function returning the blocks in
            execution order, one per layer (a block reused by several layers appears once per
            layer: each run is a layer of its own).
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
        decoder_layers: encoder-decoder models (T5, BART): dotted path from the base model to the
            decoder's blocks, whose causal self-attention (at ``attention``, as in the encoder's
            blocks) is numbered after the encoder's layers, in the order the forward runs them:
            layers ``0..L_enc-1`` are the encoder's, ``L_enc..L_enc+L_dec-1`` the decoder's.
            Cross-attention is not a layer: it runs unchanged. A model of the family without a
            decoder (``T5EncoderModel``) has the encoder's layers only.
    """

    model_type: str
    layers: str | BlockList
    attention: str
    causal: Callable[[PreTrainedConfig], bool] = _never_causal
    input_name: str = "input_ids"
    embeds_name: str | None = "inputs_embeds"
    prepends_cls_token: bool = False
    output_projection: str | None = None
    decoder_layers: str | None = None


def _albert_blocks(base: Any) -> list[nn.Module]:
    # ALBERT runs hidden layer i with layer group int(i / (L / G)), each group's blocks in order;
    # with the default single group and single block, one block serves every layer.
    config = base.config
    per_group = config.num_hidden_layers / config.num_hidden_groups
    groups = base.encoder.albert_layer_groups
    return [
        block
        for i in range(config.num_hidden_layers)
        for block in groups[int(i / per_group)].albert_layers
    ]


ARCHITECTURES: dict[str, ArchitectureSpec] = {}
"""The registry: ``config.model_type`` -> :class:`ArchitectureSpec`."""

_NO_ATTENTION_INTERFACE = (
    "computes its attention inside {module} without transformers' attention interface "
    "(ALL_ATTENTION_FUNCTIONS), so its attention probabilities cannot be captured or replaced"
)

KNOWN_UNSUPPORTED: dict[str, str] = {
    "deberta-v2": _NO_ATTENTION_INTERFACE.format(module="DisentangledSelfAttention")
    + " (its disentangled content-to-position and position-to-content terms are added to the "
    "scores there)",
    "deberta": _NO_ATTENTION_INTERFACE.format(module="DisentangledSelfAttention"),
}
"""Model types known not to work, ``config.model_type`` -> why (the error says it)."""


def register_architecture(spec: ArchitectureSpec) -> ArchitectureSpec:
    """Add (or replace) the spec for ``spec.model_type``; returns it.

    Every name a spec needs is public: paths are dotted strings, ``causal`` any function of the
    config. A model whose ``config.model_type`` is a variant of a built-in architecture (a
    renamed or fine-tuned BERT, say) reuses the built-in spec under its own type name.

    Example:
        >>> import dataclasses
        >>> import transformers
        >>> from captum_effattn.models import (
        ...     ARCHITECTURES, ArchitectureSpec, describe_model, register_architecture)
        >>> class MyBertConfig(transformers.BertConfig):
        ...     model_type = "my-bert"  # a BERT variant under its own model type
        >>> spec = register_architecture(
        ...     dataclasses.replace(ARCHITECTURES["bert"], model_type="my-bert"))
        >>> config = MyBertConfig(
        ...     vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2)
        >>> describe_model(transformers.BertModel(config)).num_layers
        2

        Written out, the same spec reads (for a new family, set the paths of its own modules):

        >>> spec = register_architecture(ArchitectureSpec(
        ...     "my-bert",
        ...     layers="encoder.layer",                      # from model.base_model
        ...     attention="attention.self",                  # from a block
        ...     causal=lambda config: config.is_decoder,
        ...     output_projection="attention.output.dense",  # from a block
        ... ))
        >>> describe_model(transformers.BertModel(config)).causal
        False

    The architecture must compute attention through transformers' attention interface
    (``ALL_ATTENTION_FUNCTIONS``) and build its masks with ``masking_utils``, as the built-in ones
    do; see :mod:`captum_effattn.models.capture`.

    Args:
        spec: where the model family keeps its self-attention.

    Returns:
        ``spec``, now in :data:`ARCHITECTURES`.
    """
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
        "electra",
        "encoder.layer",
        "attention.self",
        causal=_causal_if_decoder,
        output_projection="attention.output.dense",
    ),
    ArchitectureSpec(
        "xlm-roberta",
        "encoder.layer",
        "attention.self",
        causal=_causal_if_decoder,
        output_projection="attention.output.dense",
    ),
    ArchitectureSpec(
        "qwen2", "layers", "self_attn", causal=_decoder_causal, output_projection="self_attn.o_proj"
    ),
    ArchitectureSpec(
        "gemma", "layers", "self_attn", causal=_decoder_causal, output_projection="self_attn.o_proj"
    ),
    ArchitectureSpec(
        "phi3", "layers", "self_attn", causal=_decoder_causal, output_projection="self_attn.o_proj"
    ),
    ArchitectureSpec(
        "gpt_neox",
        "layers",
        "attention",
        causal=_decoder_causal,
        output_projection="attention.dense",
    ),
    ArchitectureSpec("albert", _albert_blocks, "attention", output_projection="attention.dense"),
    ArchitectureSpec(
        "mistral",
        "layers",
        "self_attn",
        causal=_decoder_causal,
        output_projection="self_attn.o_proj",
    ),
    ArchitectureSpec("modernbert", "layers", "attn", output_projection="attn.Wo"),
    ArchitectureSpec(
        "t5",
        "encoder.block",
        "layer.0.SelfAttention",
        output_projection="layer.0.SelfAttention.o",
        decoder_layers="decoder.block",
    ),
    ArchitectureSpec(
        "bart",
        "encoder.layers",
        "self_attn",
        output_projection="self_attn.out_proj",
        decoder_layers="decoder.layers",
    ),
    ArchitectureSpec(
        "mbart",
        "encoder.layers",
        "self_attn",
        output_projection="self_attn.out_proj",
        decoder_layers="decoder.layers",
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
        blocks: the block of each layer (index = layer index; the same module repeats where
            layers share a block); ``spec.output_projection`` is relative to these.
        causal_layers: per layer, whether its self-attention is causal (differs between the
            encoder's and the decoder's layers of an encoder-decoder model; otherwise every entry
            is ``causal``).
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
    blocks: tuple[nn.Module, ...] = ()
    causal_layers: tuple[bool, ...] = ()
    output_projections: tuple[nn.Module, ...] = ()

    def layer_causal(self, layer: int) -> bool:
        """Whether layer ``layer``'s self-attention is causal."""
        return self.causal_layers[layer] if self.causal_layers else self.causal

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


def _has_submodule(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def _layer_list(model: PreTrainedModel, path: str | BlockList) -> Sequence[nn.Module]:
    """The model's transformer blocks, in execution order (one per layer)."""
    if callable(path):
        try:
            return tuple(path(model.base_model))
        except AttributeError as error:
            raise UnsupportedModelError(
                f"{type(model).__name__} (model_type {model.config.model_type!r}): its blocks "
                f"could not be listed ({error}): its layout differs from the registered one for "
                "this transformers version"
            ) from None
    blocks = _submodule(model.base_model, path, "layer list", model)
    if not isinstance(blocks, nn.ModuleList | nn.Sequential):
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type {model.config.model_type!r}) has a "
            f"{type(blocks).__name__} at {path!r}, not a list of layers: its layout differs from "
            "the registered one for this transformers version"
        )
    return tuple(blocks)


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
            registered (the message names the class, the model type and what is supported; for
            a type in :data:`KNOWN_UNSUPPORTED`, such as DeBERTa-v2, also why).
    """
    if not isinstance(model, PreTrainedModel):
        raise _unsupported(
            f"expected a transformers PreTrainedModel; got {type(model).__name__}",
        )
    config = model.config
    spec = ARCHITECTURES.get(config.model_type)
    if spec is None and config.model_type in KNOWN_UNSUPPORTED:
        raise _unsupported(
            f"{type(model).__name__} (model_type {config.model_type!r}) is not supported: it "
            f"{KNOWN_UNSUPPORTED[config.model_type]}"
        )
    if spec is None:
        raise _unsupported(
            f"{type(model).__name__} (model_type {config.model_type!r}) is not supported",
        )
    blocks = _layer_list(model, spec.layers)
    causal = spec.causal(config)
    causal_layers = [causal] * len(blocks)
    if spec.decoder_layers is not None and _has_submodule(model.base_model, spec.decoder_layers):
        decoder = _layer_list(model, spec.decoder_layers)
        blocks, causal_layers = [*blocks, *decoder], causal_layers + [True] * len(decoder)
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
        causal=causal,
        input_embeddings=model.get_input_embeddings(),
        image_size=_pair(config.image_size) if image else None,
        patch_size=_pair(config.patch_size) if image else None,
        blocks=tuple(blocks),
        causal_layers=tuple(causal_layers),
        output_projections=projections,
    )
