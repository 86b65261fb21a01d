"""A common token-level input space for text classifiers: the token gate.

Captum's metrics perturb the tensor that attributions are computed for, and compare attributions
with it element by element. Token ids cannot take continuous noise and embeddings ``(B, S, E)``
make every method's attributions ``E`` times larger than a token score. The *token gate* ``g`` of
shape ``(B, S)`` is one number per token: the model sees the embedding

    e_i(g) = b + g_i * (t_i - b)

of token ``i``, where ``t_i`` is the token's own embedding and ``b`` the embedding of a baseline
token (``[PAD]`` by default). ``g = 1`` is the real input, ``g_i = 0`` removes token ``i`` (replaces
it by the baseline token), values between interpolate. The ids and the attention mask travel in
``additional_forward_args``, so every Captum method (IntegratedGradients with its default zero
baseline, Saliency, InputXGradient, FeatureAblation, EfficientAttentionAttribution) runs
unchanged on ``g`` and returns ``(B, S)`` token scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from torch import Tensor, nn

from captum_effattn.metrics._checks import check_max_length, check_texts

TokenGateTensor = Annotated[Tensor, "(B, S)"]
"""One float per token: 1 = the token as it is, 0 = replaced by the baseline token."""

TokenIds = Annotated[Tensor, "(B, S)"]
AttentionMask = Annotated[Tensor, "(B, S)"]


@dataclass(frozen=True)
class GatedInputs:
    """A tokenized batch in token-gate space.

    Attributes:
        gate: ``(B, S)`` float ones: the real input.
        input_ids: ``(B, S)`` token ids.
        attention_mask: ``(B, S)`` 1 for real tokens, 0 for padding.
        removable: ``(B, S)`` bool, the tokens that ERASER-style metrics may remove or keep:
            real tokens that are not special tokens ([CLS], [SEP], ...).
    """

    gate: TokenGateTensor
    input_ids: TokenIds
    attention_mask: AttentionMask
    removable: Annotated[Tensor, "(B, S)"]

    @property
    def additional_forward_args(self) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)``: what every method passes after the gate."""
        return (self.input_ids, self.attention_mask)

    def __len__(self) -> int:
        return self.gate.shape[0]

    def slice(self, start: int, stop: int) -> GatedInputs:
        """Examples ``start:stop`` (padding as it is)."""
        return GatedInputs(
            *(
                t[start:stop]
                for t in (self.gate, self.input_ids, self.attention_mask, self.removable)
            )
        )


def _input_embeddings(model: nn.Module) -> nn.Module:
    """The model's token embedding module (Hugging Face's ``get_input_embeddings()``)."""
    get = getattr(model, "get_input_embeddings", None)
    if not callable(get):
        raise TypeError(
            f"TokenGate needs a Hugging Face model with get_input_embeddings(); got "
            f"{type(model).__name__}"
        )
    embeddings = get()
    if not isinstance(embeddings, nn.Module):
        raise TypeError(
            f"{type(model).__name__}.get_input_embeddings() returned "
            f"{type(embeddings).__name__}, not a module"
        )
    return embeddings


def _embedding_table(model: nn.Module) -> Tensor:
    """``(V, E)``: the token embedding matrix."""
    weight = getattr(_input_embeddings(model), "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise TypeError(
            f"the input embeddings of {type(model).__name__} have no (vocabulary, features) "
            "weight matrix"
        )
    return weight


class TokenGate:
    r"""A text classifier as a function of the token gate: ``gate(g, input_ids, mask) -> logits``.

    Pass it as ``forward_func`` to any Captum attribution and metric, with
    ``additional_forward_args=(input_ids, attention_mask)``; :meth:`encode` builds those from
    texts.

    Args:
        model (nn.Module): a Hugging Face sequence classifier that accepts ``inputs_embeds`` and
            ``attention_mask`` and returns ``.logits`` ``(B, C)`` (BERT, RoBERTa, DistilBERT,
            MiniLM, ...). Decoder classifiers pick the last token from ``input_ids``, which they
            do not get here: use them with left padding.
        tokenizer (optional): its tokenizer, needed only by :meth:`encode`.
        baseline_token_id (int, optional): the token a removed token becomes. Default: the
            tokenizer's pad token, else ``model.config.pad_token_id``.

    Raises:
        ValueError: no baseline token can be found, or it is outside the vocabulary.
    """

    def __init__(self, model: nn.Module, tokenizer=None, baseline_token_id: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        if baseline_token_id is None and tokenizer is not None:
            baseline_token_id = tokenizer.pad_token_id
        if baseline_token_id is None:
            baseline_token_id = getattr(getattr(model, "config", None), "pad_token_id", None)
        vocabulary = _embedding_table(model).shape[0]
        if baseline_token_id is None or not 0 <= baseline_token_id < vocabulary:
            raise ValueError(
                f"TokenGate needs a baseline token id in [0, {vocabulary}) (the token a removed "
                f"token becomes); got {baseline_token_id}: pass baseline_token_id=..."
            )
        self.baseline_token_id = int(baseline_token_id)

    def embed(self, gate: TokenGateTensor, input_ids: TokenIds) -> Tensor:
        """``(B, S, E)`` embeddings ``b + g * (t - b)``, differentiable in ``gate``."""
        tokens = _input_embeddings(self.model)(input_ids)
        baseline = _embedding_table(self.model)[self.baseline_token_id]
        return baseline + gate.unsqueeze(-1).to(tokens.dtype) * (tokens - baseline)

    def __call__(
        self, gate: TokenGateTensor, input_ids: TokenIds, attention_mask: AttentionMask
    ) -> Tensor:
        """``(B, C)`` logits of the model on the gated input.

        Raises:
            ValueError: the gate, ids and mask do not share one ``(B, S)`` shape, or the gate is
                not a floating-point tensor.
        """
        expected = tuple(input_ids.shape)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, S); got shape {expected}")
        for name, tensor in (("gate", gate), ("attention_mask", attention_mask)):
            if tuple(tensor.shape) != expected:
                raise ValueError(
                    f"{name} has shape {tuple(tensor.shape)}; expected (B, S) = {expected}, the "
                    "shape of input_ids"
                )
        if not gate.is_floating_point():
            raise ValueError(f"the token gate must be a float tensor; got {gate.dtype}")
        embeddings = self.embed(gate, input_ids)
        return self.model(inputs_embeds=embeddings, attention_mask=attention_mask).logits

    def encode(self, texts: Sequence[str], max_length: int | None = None) -> GatedInputs:
        """Tokenize texts (right padding) into :class:`GatedInputs`.

        A text is text: strings such as ``"[CLS]"`` or ``"[PAD]"`` typed in it become ordinary
        word pieces (the tokenizer's ``split_special_tokens``), never the model's special
        tokens. Were a tokenizer to make special tokens of them anyway, they are not removable,
        and a text with nothing else is refused.

        Args:
            texts (list[str]): the texts; a single ``str`` is refused (pass ``[text]``).
            max_length (int, optional): word pieces kept per text, special tokens included. At
                least the tokenizer's special tokens plus one, at most the model's positions.
                Default: 256, or the model's positions if fewer.

        Raises:
            ValueError: no tokenizer was given, no texts, a text is empty or only special
                tokens, or ``max_length`` is out of range.
            TypeError: ``texts`` is a single string or holds a non-string, ``max_length`` is
                not an int.
        """
        if self.tokenizer is None:
            raise ValueError("TokenGate.encode needs the tokenizer: TokenGate(model, tokenizer)")
        texts = check_texts(texts)
        max_length = check_max_length(max_length, self.model, self.tokenizer)
        encoded = self.tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
            return_special_tokens_mask=True,
            split_special_tokens=True,
        )
        ids = encoded["input_ids"]
        special = encoded["special_tokens_mask"].bool() | _special_ids(self.tokenizer, ids)
        real = encoded["attention_mask"].bool()
        words = (real & ~special).any(-1)
        if not words.all():
            index = int((~words).nonzero()[0])
            raise ValueError(
                f"text {index} ({texts[index]!r}) is only special tokens, no words: there is "
                "nothing to explain"
            )
        return gated_inputs(ids, encoded["attention_mask"], special)


def _special_ids(tokenizer: Any, input_ids: TokenIds) -> Tensor:
    """``(B, S)`` bool: ids of the tokenizer's special tokens, except the unknown-word token
    (an unknown word is still a word)."""
    ids = set(getattr(tokenizer, "all_special_ids", ())) - {
        getattr(tokenizer, "unk_token_id", None)
    }
    known = torch.tensor(sorted(i for i in ids if isinstance(i, int)), dtype=input_ids.dtype)
    return torch.isin(input_ids, known.to(input_ids.device))


def gated_inputs(
    input_ids: TokenIds,
    attention_mask: AttentionMask | None = None,
    special_tokens_mask: Tensor | None = None,
) -> GatedInputs:
    """:class:`GatedInputs` from token ids you already have.

    Args:
        input_ids: ``(B, S)`` token ids, ``B, S >= 1``.
        attention_mask: ``(B, S)``, 1 for real tokens. Default: all real.
        special_tokens_mask: ``(B, S)``, 1 for [CLS], [SEP] and the like (never removed by the
            ERASER metrics). Default: none.

    Raises:
        ValueError: ``input_ids`` is not ``(B, S)`` or empty, or an example has no real token or
            only special tokens.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, S); got shape {tuple(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise ValueError(
            f"input_ids has shape {tuple(input_ids.shape)}: no examples or no tokens to explain"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    real = attention_mask.bool()
    if not real.any(-1).all():
        empty = (~real.any(-1)).nonzero().flatten().tolist()
        raise ValueError(f"examples {empty} have no real token: there is nothing to explain")
    special = torch.zeros_like(real) if special_tokens_mask is None else special_tokens_mask.bool()
    removable = real & ~special
    if not removable.any(-1).all():
        empty = (~removable.any(-1)).nonzero().flatten().tolist()
        raise ValueError(f"examples {empty} are empty texts: only special tokens, no words")
    return GatedInputs(
        gate=torch.ones(input_ids.shape, dtype=torch.float32, device=input_ids.device),
        input_ids=input_ids,
        attention_mask=attention_mask,
        removable=removable,
    )
