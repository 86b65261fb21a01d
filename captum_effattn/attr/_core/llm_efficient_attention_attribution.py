"""LLMEfficientAttentionAttribution: efficient attention through Captum's LLM attribution API."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, cast

import torch
from captum.attr import LLMAttributionResult, TextTemplateInput, TextTokenInput
from captum.log import log_usage
from torch import Tensor, nn
from transformers import PreTrainedModel

from captum_effattn._captum_compat import Attribution, convert_ids_to_pretty_tokens
from captum_effattn.attr._queries import QueryRows
from captum_effattn.attr._reductions import (
    REDUCTIONS,
    PairReduction,
    Reduction,
    RolloutReduction,
    attention_rollout,
)
from captum_effattn.attr._views import (
    View,
    get_view,
    project_captured_matrices,
    project_with_row_masks,
)
from captum_effattn.attr._weightings import (
    WeightFactors,
    Weighting,
    attention_gradient,
    factors_of_rows,
    get_weighting,
    output_offsets,
    weight_matrices,
)
from captum_effattn.models import CapturedHeads, capture_attention, describe_model
from captum_effattn.models.carryover import thread_carryover
from captum_effattn.models.selection import HeadSpec, IndexSpec, select_architecture_heads

DEFAULT_GEN_ARGS: dict[str, Any] = {
    "max_new_tokens": 25,
    "do_sample": False,
    "temperature": None,
    "top_p": None,
}
"""What ``model.generate`` receives when no target and no ``gen_args`` are given (Captum's
``LLMAttribution`` defaults)."""

# Private-use characters that mark where each template value lands in the formatted prompt.
_OPEN, _SEP, _CLOSE = "\ue000", "\ue001", "\ue002"
_MARKER = re.compile(f"{_OPEN}(\\d+){_SEP}|{_CLOSE}")


class LLMEfficientAttentionAttribution(Attribution):
    r"""Explain a causal language model's continuation with efficient attention.

    Captum's ``LLMAttribution`` / ``LLMGradientAttribution`` interface for this package's method:
    ``attribute(inp, target)`` returns a ``captum.attr.LLMAttributionResult`` whose
    ``token_attr`` has one row per target token and one column per interpretable input feature,
    so ``plot_token_attr`` and ``plot_seq_attr`` work as for Captum's methods::

        >>> llm_attr = LLMEfficientAttentionAttribution(model, tokenizer)   # doctest: +SKIP
        >>> inp = TextTokenInput("The capital of France is", tokenizer)     # doctest: +SKIP
        >>> result = llm_attr.attribute(inp, target=" Paris")               # doctest: +SKIP
        >>> result.plot_token_attr()                                        # doctest: +SKIP

    The prompt and the target are run through the model **once** (teacher forcing, without a
    cache). Target token ``t`` at position ``p`` is explained by the attention row of position
    ``p - 1``, the row whose output predicts it; under causal attention that row sees the prompt
    and the target tokens before ``t``, and its efficient attention is projected within that
    prefix (the same row as :class:`~captum_effattn.EfficientAttentionAttribution` with
    ``query=p - 1``). The selected heads' rows are reduced as there (mean by default); a token's
    score is its mass in the reduced row, a feature's score the sum over its tokens. Mass on
    special tokens, on template text and on earlier target tokens belongs to no input feature.
    With ``weighting`` each target token's row is weighted as there, with ``"gradient"`` by the
    gradient of that token's logit at its row (per target token).
    """

    SUPPORTED_INPUTS = (TextTemplateInput, TextTokenInput)

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        r"""
        Args:
            model (nn.Module): a supported causal Hugging Face language model with a language
                modelling head (GPT-2, Llama-family, ...), in evaluation mode.
            tokenizer: its tokenizer (a fast one for :class:`~captum.attr.TextTemplateInput`,
                which needs character offsets).

        Raises:
            UnsupportedModelError: the architecture is not supported.
            ValueError: the model is not causal (an encoder generates no continuation), or has no
                language modelling head.
        """
        super().__init__(model)
        if not isinstance(model, PreTrainedModel):
            raise TypeError(
                "LLMEfficientAttentionAttribution needs a Hugging Face PreTrainedModel (it calls "
                f"generate and reads the language modelling head); got {type(model).__name__}"
            )
        self.model: PreTrainedModel = model
        self.tokenizer = tokenizer
        self.architecture = describe_model(model)
        if not self.architecture.causal:
            raise ValueError(
                f"{self.architecture.model_class} is not a causal language model: "
                "LLMEfficientAttentionAttribution explains continuations of decoders; use "
                "EfficientAttentionAttribution for encoders"
            )
        if model.get_output_embeddings() is None:
            raise ValueError(
                f"{self.architecture.model_class} has no language modelling head (no logits over "
                "the vocabulary): load it with AutoModelForCausalLM"
            )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @log_usage(part_of_slo=True)
    def attribute(
        self,
        inp: TextTokenInput | TextTemplateInput,
        target: str | Tensor | None = None,
        gen_args: dict[str, Any] | None = None,
        *,
        layers: IndexSpec = None,
        heads: HeadSpec = None,
        view: str = "efficient",
        reduce: str = "mean",
        weighting: str | None = None,
    ) -> LLMAttributionResult:
        r"""Attribute each target token to the prompt's interpretable features.

        Args:
            inp (TextTokenInput or TextTemplateInput): the prompt. Its features are Captum's:
                the tokens left after ``skip_tokens`` (``TextTokenInput``), or the template
                values grouped by ``mask`` (``TextTemplateInput``; each value's tokens are
                found from the tokenizer's character offsets).
            target (str or Tensor, optional): the continuation to explain: a string (encoded
                without special tokens, as Captum does) or its ``(T,)`` token ids. Default:
                generate it with ``model.generate(**gen_args)``.
            gen_args (dict, optional): arguments for ``model.generate`` when ``target`` is
                ``None``. Default: :data:`DEFAULT_GEN_ARGS` (25 greedy tokens). Generation may
                use the model's cache; the explaining forward does not. ``past_key_values`` is
                refused: the explanation needs the whole prompt in one forward.
            layers, heads, view: as in :meth:`EfficientAttentionAttribution.attribute
                <captum_effattn.EfficientAttentionAttribution.attribute>`.
            reduce (str, optional): ``"mean"`` (default), ``"sum"``, ``"max"`` or
                ``"rollout"`` over the selected layers and heads, per target token.
            weighting (str or None, optional): ``None`` (default), ``"norm"`` or ``"gradient"``
                as in :meth:`EfficientAttentionAttribution.attribute
                <captum_effattn.EfficientAttentionAttribution.attribute>`, applied to each
                target token's row before the reduction. ``"gradient"`` is per target token: the
                positive part of the gradient of the logit of target token ``t`` at the row that
                predicts it (one forward with gradients, one backward pass per target token;
                with ``reduce="rollout"``, Chefer et al.'s propagation per target token).

        Returns:
            ``LLMAttributionResult`` with ``token_attr`` ``(T, n features)``, ``seq_attr``
            ``(n features,)`` its sum over the target tokens (as ``LLMGradientAttribution``),
            ``output_probs`` ``(T,)`` the model's probability of each target token in the same
            forward, ``input_tokens`` the features' values and ``output_tokens`` the target
            tokens. With ``view="efficient"`` or ``"raw"``, ``reduce="mean"`` and no weighting
            every row is non-negative and sums to at most 1 (the mass on input features).

        Raises:
            TypeError: ``inp`` of another type; ``target`` neither a string nor a tensor.
            ValueError: an empty prompt (no token apart from special tokens, or no feature); a
                target the tokenizer encodes to no token or to its unknown token; target ids
                outside the vocabulary; ``gen_args`` with a target, or with
                ``past_key_values``; prompt + target longer than the model's positions; a
                template that changes its values; options the method refuses (an unknown
                ``weighting`` lists the choices).
            RuntimeError: ``weighting="gradient"`` under ``torch.inference_mode()``.
        """
        if not isinstance(inp, self.SUPPORTED_INPUTS):
            names = ", ".join(t.__name__ for t in self.SUPPORTED_INPUTS)
            raise TypeError(f"inp must be one of {names}; got {type(inp).__name__}")
        attention_view = get_view(view)
        if reduce not in REDUCTIONS:
            raise ValueError(
                f"reduce must be one of {tuple(REDUCTIONS)}: LLMAttributionResult holds one "
                f"score per (target token, feature); got {reduce!r}"
            )
        reduction = REDUCTIONS[reduce]
        weighter = get_weighting(weighting)
        selection = select_architecture_heads(self.architecture, layers, heads)
        reduction.check_selection(selection)
        prompt_ids, feature_of_token = self._prompt(inp)
        target_ids = self._target_ids(prompt_ids, target, gen_args)
        self._require_positions(len(prompt_ids) + len(target_ids))
        positions = torch.arange(len(target_ids), device=prompt_ids.device) + len(prompt_ids) - 1
        captured, probs, factors = self._weighted_forward(
            prompt_ids,
            target_ids,
            selection,
            weighter,
            positions,
            rows_only=not isinstance(reduction, RolloutReduction),
        )
        token_scores = _explaining_rows(  # (T, N)
            captured, positions, attention_view, reduction, weighter, factors
        )
        feature_scores = _feature_scores(
            token_scores[:, : len(prompt_ids)], feature_of_token, inp.n_itp_features
        )
        token_attr = inp.format_attr(feature_scores)
        return LLMAttributionResult(
            seq_attr=token_attr.sum(0),
            token_attr=token_attr,
            output_probs=probs.cpu(),
            input_tokens=list(inp.values),
            output_tokens=convert_ids_to_pretty_tokens(target_ids.cpu(), self.tokenizer),
            inp=inp,
        )

    def _prompt(self, inp: TextTokenInput | TextTemplateInput) -> tuple[Tensor, Tensor]:
        """``(P,)`` prompt ids and ``(P,)`` the feature of each token (``-1``: none)."""
        if isinstance(inp, TextTokenInput):
            ids = inp.to_model_input()[0]
            features = torch.full((len(ids),), -1, dtype=torch.long)
            interpretable = (
                torch.ones(len(ids), dtype=torch.bool)
                if inp.itp_mask is None
                else inp.itp_mask[0].bool()
            )
            features[interpretable] = torch.arange(int(interpretable.sum()))
        else:
            ids, features = _template_tokens(inp, self.tokenizer)
        special = set(getattr(self.tokenizer, "all_special_ids", ()) or ())
        if not [i for i in ids.tolist() if i not in special] or inp.n_itp_features == 0:
            raise ValueError(
                "the prompt is empty: it has no token apart from special tokens "
                f"({len(ids)} token(s)) or no interpretable feature ({inp.n_itp_features})"
            )
        return ids.to(self.device), features.to(self.device)

    def _target_ids(
        self, prompt_ids: Tensor, target: str | Tensor | None, gen_args: dict[str, Any] | None
    ) -> Tensor:
        if target is None:
            return self._generate(prompt_ids, gen_args)
        if gen_args is not None:
            raise ValueError("gen_args is for generating a target: pass it only without target")
        if isinstance(target, str):
            ids = self.tokenizer.encode(target, add_special_tokens=False)
            if not ids:
                raise ValueError(f"the tokenizer encodes the target {target!r} to no token")
            unk = getattr(self.tokenizer, "unk_token_id", None)
            if unk is not None and unk in ids:
                raise ValueError(
                    f"the tokenizer cannot encode the target {target!r}: token "
                    f"{ids.index(unk)} is its unknown token {self.tokenizer.unk_token!r}"
                )
            return torch.tensor(ids, device=self.device)
        if not isinstance(target, Tensor):
            raise TypeError(f"target must be a str, a Tensor of ids or None; got {type(target)}")
        return self._checked_ids(target)

    def _checked_ids(self, target: Tensor) -> Tensor:
        ids = target.reshape(-1) if target.dim() == 2 and target.shape[0] == 1 else target
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
            raise ValueError(
                f"target ids must be a (T,) integer tensor; got {ids.dtype} {tuple(target.shape)}"
            )
        if len(ids) == 0:
            raise ValueError("target ids are empty: there is no target token to explain")
        vocab = cast(nn.Embedding, self.model.get_input_embeddings()).num_embeddings
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(
                f"target ids must lie in 0..{vocab - 1} (the vocabulary); got "
                f"{int(ids.min())}..{int(ids.max())}"
            )
        return ids.long().to(self.device)

    def _generate(self, prompt_ids: Tensor, gen_args: dict[str, Any] | None) -> Tensor:
        gen_args = dict(DEFAULT_GEN_ARGS if gen_args is None else gen_args)
        if gen_args.get("past_key_values") is not None:
            raise ValueError(
                "gen_args may not hold past_key_values: the explanation runs the whole prompt "
                "and continuation in one forward without a cache; pass the full prompt instead"
            )
        self._require_positions(len(prompt_ids) + 1)
        with torch.no_grad():
            # GenerationMixin.generate: the language models this class accepts all have it.
            output = cast(Any, self.model).generate(
                input_ids=prompt_ids[None],
                attention_mask=torch.ones_like(prompt_ids)[None],
                **gen_args,
            )
        sequence = output.sequences if hasattr(output, "sequences") else output
        generated = sequence[0, len(prompt_ids) :]
        if len(generated) == 0:
            raise ValueError("model.generate produced no token to explain (check gen_args)")
        return generated

    def _require_positions(self, length: int) -> None:
        config = self.model.config
        limit = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        if limit is not None and length > limit:
            raise ValueError(
                f"prompt + target take {length} positions but {self.architecture.model_class} "
                f"has {limit} (config.max_position_embeddings / n_positions): shorten them"
            )

    def _weighted_forward(
        self,
        prompt_ids: Tensor,
        target_ids: Tensor,
        selection: Any,
        weighting: Weighting | None,
        positions: Tensor,
        rows_only: bool,
    ) -> tuple[tuple[CapturedHeads, ...], Tensor, Sequence[Sequence[WeightFactors]] | None]:
        """The one forward, and with a weighting each target token's factors per layer (with
        ``rows_only``, gradient factors of the row that predicts the token only)."""
        if weighting is None or not weighting.needs_gradient:
            captured, probs = self._forward(prompt_ids, target_ids, selection)
            gradients: Sequence[Sequence[Tensor | None]] = [(None,) * len(captured)]
        else:
            captured, probs, gradients = self._forward_with_gradients(
                prompt_ids, target_ids, selection, positions, rows_only
            )
        if weighting is None:
            return captured, probs, None
        factors = [
            [
                weighting.factors(c, self.architecture, g)
                for c, g in zip(captured, per_layer, strict=True)
            ]
            for per_layer in gradients
        ]
        # Without gradients one set of factors serves every target token (the same object).
        return captured, probs, factors * (len(target_ids) // len(factors))

    def _forward(
        self, prompt_ids: Tensor, target_ids: Tensor, selection: Any
    ) -> tuple[tuple[CapturedHeads, ...], Tensor]:
        """One teacher-forced forward: captured heads and ``(T,)`` target token probabilities."""
        ids = torch.cat([prompt_ids, target_ids])[None]
        # The record's tensors stay alive until this thread's next capture, which reuses their
        # memory in place (captum_effattn.models.carryover).
        with (
            capture_attention(
                self.model, selection, materialize=False, carryover=thread_carryover()
            ) as record,
            torch.no_grad(),
        ):
            logits = self._logits(ids)
        return record.layers, _target_probs(logits, len(prompt_ids), target_ids)

    def _forward_with_gradients(
        self,
        prompt_ids: Tensor,
        target_ids: Tensor,
        selection: Any,
        positions: Tensor,
        rows_only: bool,
    ) -> tuple[tuple[CapturedHeads, ...], Tensor, Sequence[Sequence[Tensor]]]:
        """One teacher-forced forward with gradients, then one backward pass per target token:
        ``(1, H_sel, N, N)``-per-layer gradients of the logit of target token ``t`` at the row
        that predicts it, with respect to the attention; with ``rows_only``, ``(1, H_sel, 1, N)``
        for that row ``positions[t]`` alone (all a row reduction reads)."""
        ids = torch.cat([prompt_ids, target_ids])[None]
        offsets, add_offset = output_offsets()
        with (
            capture_attention(
                self.model, selection, materialize=False, on_output=add_offset
            ) as record,
            torch.enable_grad(),
        ):
            logits = self._logits(ids)
            explained = logits[0, positions, target_ids]  # (T,)
            output_gradients = [_gradients(explained[t], offsets) for t in range(len(target_ids))]
        gradients = [
            [
                attention_gradient(c, g, positions[None, t : t + 1] if rows_only else None)
                for c, g in zip(record.layers, per_layer, strict=True)
            ]
            for t, per_layer in enumerate(output_gradients)
        ]
        return record.layers, _target_probs(logits.detach(), len(prompt_ids), target_ids), gradients

    def _logits(self, ids: Tensor) -> Tensor:
        """``(1, N, V)`` logits of the teacher-forced sequence ``ids``."""
        logits = self.model(
            input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False
        ).logits
        return logits[:, 0] if logits.dim() == 4 else logits


def _gradients(explained: Tensor, offsets: Sequence[Tensor]) -> list[Tensor]:
    """The gradient of the scalar ``explained`` with respect to each offset (zeros where it does
    not depend on one), keeping the graph for the next target token."""
    gradients = torch.autograd.grad(explained, offsets, retain_graph=True, allow_unused=True)
    return [
        torch.zeros_like(o) if g is None else g.detach()
        for o, g in zip(offsets, gradients, strict=True)
    ]


def _target_probs(logits: Tensor, prompt_length: int, target_ids: Tensor) -> Tensor:
    """``(T,)`` the probability of each target token at the row that predicts it."""
    predicting = logits[0, prompt_length - 1 : -1].float().softmax(-1)
    return predicting.gather(1, target_ids[:, None])[:, 0]


def _explaining_rows(
    captured: Sequence[CapturedHeads],
    positions: Tensor,
    view: View,
    reduction: Reduction,
    weighting: Weighting | None = None,
    factors: Sequence[Sequence[WeightFactors]] | None = None,
) -> Tensor:
    """``(T, N)``: the rows at ``positions``, projected in their causal prefix (and sliding
    window), weighted with each target token's ``factors`` (one per layer) and reduced over the
    selected (layer, head) pairs."""
    if isinstance(reduction, RolloutReduction):  # full matrices through the layers
        return _rollout_rows(captured, positions, view, reduction, weighting, factors)
    # One problem per row: each row's keys are its causal prefix (within its window).
    projected = torch.cat(
        [
            project_with_row_masks(
                c.rows(positions[None]), c.values, c.visible_keys(positions[None]), view
            )[0]
            for c in captured
        ],
        dim=1,
    )  # (1, H, T, N)
    if factors is not None:
        projected = _weighted_rows(projected, positions, factors)
    per_pair = projected[0].transpose(0, 1)  # (T, H, N)
    if not isinstance(reduction, PairReduction):
        raise ValueError(f"reduce={reduction.name!r} is neither a pair reduction nor rollout")
    return reduction.combine(per_pair)


def _weighted_rows(
    projected: Tensor, positions: Tensor, factors: Sequence[Sequence[WeightFactors]]
) -> Tensor:
    """``(1, H, T, N)`` rows, row ``t`` times target token ``t``'s factors at its position
    (factors of that row only, or the same for every row)."""
    weights = [
        factors_of_rows(
            layer_factors,
            QueryRows(
                positions[None, t : t + 1], torch.ones_like(positions[None, :1]).bool(), False
            ),
            per_query=True,
        )
        for t, layer_factors in enumerate(factors)
    ]  # each (1, H, 1, N)
    return projected * torch.cat(weights, dim=2).to(projected.dtype)


def _rollout_rows(
    captured: Sequence[CapturedHeads],
    positions: Tensor,
    view: View,
    reduction: RolloutReduction,
    weighting: Weighting | None,
    factors: Sequence[Sequence[WeightFactors]] | None,
) -> Tensor:
    """``(T, N)``: rollout through the selected layers (the weighting's rollout with target token
    ``t``'s factors), row ``positions[t]`` for target token ``t``."""
    full = project_captured_matrices(captured, view)[0].double()  # (1, L, H, N, N)
    if weighting is None or factors is None:
        return attention_rollout(full.mean(2), reduction.residual)[0, positions].float()
    flows: dict[int, Tensor] = {}  # target tokens sharing their factors (norm) share the flow
    rows = []
    for position, layer_factors in zip(positions.tolist(), factors, strict=True):
        key = id(layer_factors)
        if key not in flows:
            weighted = weight_matrices(full, layer_factors)
            flows[key] = weighting.rollout(full, weighted, reduction.residual)[0]
        rows.append(flows[key][position])
    return torch.stack(rows).float()


def _feature_scores(token_scores: Tensor, feature_of_token: Tensor, n_features: int) -> Tensor:
    """``(T, P)`` token scores to ``(T, n_features)``: the sum over each feature's tokens."""
    scores = token_scores.new_zeros(token_scores.shape[0], n_features)
    belongs = feature_of_token >= 0
    return scores.index_add(1, feature_of_token[belongs], token_scores[:, belongs]).cpu()


def _template_tokens(inp: TextTemplateInput, tokenizer: Any) -> tuple[Tensor, Tensor]:
    """Token ids of the formatted template and the interpretable feature of each token."""
    text, spans = _value_spans(inp)
    try:
        encoded = tokenizer(text, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError) as error:
        raise ValueError(
            "TextTemplateInput needs a fast tokenizer (character offsets) to find each value's "
            f"tokens: {error}"
        ) from error
    ids = torch.tensor(encoded["input_ids"])
    group = inp.formatted_mask if inp.mask is not None else list(range(len(inp.values)))
    features = torch.full((len(ids),), -1, dtype=torch.long)
    for index, (start, end) in enumerate(encoded["offset_mapping"]):
        for value, value_spans in enumerate(spans):
            if end > start and any(start < stop and end > begin for begin, stop in value_spans):
                features[index] = group[value]
                break
    return ids, features


def _value_spans(inp: TextTemplateInput) -> tuple[str, list[list[tuple[int, int]]]]:
    """The formatted prompt and the character spans where each value landed."""
    marked = [f"{_OPEN}{i}{_SEP}{value}{_CLOSE}" for i, value in enumerate(inp.values)]
    if inp.dict_keys:
        text = inp.format_fn(**dict(zip(inp.dict_keys, marked, strict=True)))
    else:
        text = inp.format_fn(*marked)
    spans: list[list[tuple[int, int]]] = [[] for _ in inp.values]
    plain, cursor, opened = [], 0, []
    for match in _MARKER.finditer(text):
        plain.append(text[cursor : match.start()])
        cursor = match.end()
        length = sum(map(len, plain))
        if match.group(1) is not None:
            opened.append((int(match.group(1)), length))
        elif opened:
            value, begin = opened.pop()
            spans[value].append((begin, length))
    plain.append(text[cursor:])
    text = "".join(plain)
    if text != inp.to_model_input() or opened:
        raise ValueError(
            "the template changes its values (or drops them) on the way into the prompt, so "
            "their tokens cannot be located; use a template that inserts each value as is"
        )
    return text, spans


__all__ = ["DEFAULT_GEN_ARGS", "LLMEfficientAttentionAttribution"]
