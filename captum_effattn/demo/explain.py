"""Explain one text with every method, as token scores over the model's word pieces."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from captum.attr import IntegratedGradients, Saliency

from captum_effattn import EfficientAttentionAttribution
from captum_effattn.attr import VIEWS, check_sufficiency
from captum_effattn.attr._views import get_view
from captum_effattn.data.training import SentimentClassifier
from captum_effattn.metrics._checks import check_max_length, check_positive_int, check_texts

GRADIENT_METHODS = ("IntegratedGradients", "Saliency")
"""The Captum methods shown next to the attention views."""

LEAD_VIEW, LEAD_WEIGHTING = "efficient", "gradient"
"""The mode shown first: the best efficient-based mode of the faithfulness report
(``docs/faithfulness.md``, chosen on validation texts), efficient rows weighted by the positive
part of the predicted class's gradient."""
LEAD_METHOD = f"{LEAD_VIEW}+{LEAD_WEIGHTING} attention"


def method_names(views: Sequence[str] | None = None) -> tuple[str, ...]:
    """The demo's methods: :data:`LEAD_METHOD` first, one per attention view (default: every
    registered view, in :data:`~captum_effattn.attr.VIEWS` order), then
    :data:`GRADIENT_METHODS`.

    Raises:
        ValueError: an unknown view (the message lists the registered ones).
    """
    chosen = tuple(VIEWS) if views is None else tuple(views)
    return (LEAD_METHOD, *(get_view(view).method_name for view in chosen), *GRADIENT_METHODS)


@dataclass
class Explanation:
    """Every method's token scores for one text, with what the checks measured.

    Attributes:
        tokens: the word pieces the model saw ([CLS] ... [SEP]).
        special: which of them are the tokenizer's special tokens (kept out of the colour
            scale and the top-token tables: attention parks mass there, and they are never
            removed in the faithfulness metrics).
        label: the true label's name; ``prediction``/``probability``: the model's answer.
        scores: method name -> ``(S,)`` token scores (float64).
        seconds: method name -> wall time of its ``attribute`` call.
        logit_change: relative logit change when every head's attention is replaced by its
            efficient attention (the sufficiency check).
        head_output_error: largest relative head-output error of the efficient rows.
        effective_sums: (min, max) over heads and layers of the effective [CLS] rows' sums.
        effective_min: the smallest entry of those rows (negative: not a distribution).
        identifiable: raw and efficient scores are identical (the rows were identifiable).
    """

    text: str
    tokens: list[str]
    label: str
    prediction: str
    probability: float
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    special: list[bool] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    logit_change: float = 0.0
    head_output_error: float = 0.0
    effective_sums: tuple[float, float] = (1.0, 1.0)
    effective_min: float = 0.0

    @property
    def identifiable(self) -> bool:
        """Whether efficient attention left every explained row as it was (short inputs)."""
        raw, efficient = (self.scores.get(get_view(v).method_name) for v in ("raw", "efficient"))
        return raw is not None and efficient is not None and bool(torch.equal(raw, efficient))


class Explainer:
    """Every attention view and the gradient methods on one classifier, sharing one forward.

    IntegratedGradients and Saliency need continuous inputs, so every method gets the word
    embeddings ``(1, S, E)`` and the attention mask, as in a typical Captum pipeline; token scores
    are the attributions summed over the embedding features.

    Args:
        classifier: the fine-tuned model and its tokenizer.
        max_length: word pieces kept per text, special tokens included (default 256, or
            the model's positions if fewer).
        ig_steps: IntegratedGradients' ``n_steps``.
        views: the attention views to show (default: every registered view).

    Raises:
        ValueError: ``max_length`` too short for a word or beyond the model's positions,
            ``ig_steps`` below 1, or an unknown view.
        TypeError: ``max_length`` or ``ig_steps`` not an int.
    """

    def __init__(
        self,
        classifier: SentimentClassifier,
        max_length: int | None = None,
        ig_steps: int = 50,
        views: Sequence[str] | None = None,
    ):
        self.model = classifier.model.eval()
        self.tokenizer = classifier.tokenizer
        self.labels = classifier.labels
        self.max_length = check_max_length(max_length, self.model, self.tokenizer)
        self.ig_steps = check_positive_int(ig_steps, "ig_steps")

        def forward(embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.model(inputs_embeds=embeddings, attention_mask=mask).logits

        self.forward = forward
        embed = self.model.get_input_embeddings()
        pad = torch.tensor([[self.tokenizer.pad_token_id]])
        self.pad_embedding = embed(pad).detach()
        attention = EfficientAttentionAttribution(forward, model=self.model)
        ig, saliency = IntegratedGradients(forward), Saliency(forward)
        chosen = tuple(VIEWS) if views is None else tuple(views)
        self.methods: dict[str, Callable] = {
            LEAD_METHOD: lambda e, m, t: attention.attribute(
                e,
                target=t,
                additional_forward_args=(m,),
                view=LEAD_VIEW,
                weighting=LEAD_WEIGHTING,
            ),
            **{
                get_view(view).method_name: (
                    lambda e, m, t, view=view: attention.attribute(
                        e, target=t, additional_forward_args=(m,), view=view
                    )
                )
                for view in chosen
            },
            "IntegratedGradients": lambda e, m, t: ig.attribute(
                e,
                baselines=self.pad_embedding.expand_as(e),
                target=t,
                additional_forward_args=(m,),
                n_steps=self.ig_steps,
                internal_batch_size=self.ig_steps,
            ),
            "Saliency": lambda e, m, t: saliency.attribute(
                e.clone().requires_grad_(), target=t, additional_forward_args=(m,), abs=True
            ),
        }
        self._attention = attention
        self._warm = False

    def _warm_up(self, embeddings: torch.Tensor, mask: torch.Tensor, target: int) -> None:
        """Run every method once, untimed, on the first word pieces: the first call of a method
        pays one-time costs (the compiled solver's load, allocator growth) that are not its
        cost per example."""
        if not self._warm:
            for method in self.methods.values():
                method(embeddings[:, :8], mask[:, :8], target)
            self._warm = True

    def explain(self, text: str, label: int) -> Explanation:
        check_texts([text], "text")
        # Typed "[CLS]" or "[PAD]" in a text is text, not the model's special token.
        enc = self.tokenizer(
            text,
            return_tensors="pt",
            truncation=True,
            max_length=self.max_length,
            split_special_tokens=True,
        )
        ids, mask = enc["input_ids"], enc["attention_mask"]
        embeddings = self.model.get_input_embeddings()(ids).detach()
        with torch.no_grad():
            probabilities = self.forward(embeddings, mask).softmax(-1)[0]
        predicted = int(probabilities.argmax())
        tokens = self.tokenizer.convert_ids_to_tokens(ids[0].tolist())
        assert isinstance(tokens, list)  # a list of ids gives a list of tokens
        explanation = Explanation(
            text=text,
            tokens=tokens,
            label=self.labels[label],
            prediction=self.labels[predicted],
            probability=float(probabilities[predicted]),
            special=[i in self.tokenizer.all_special_ids for i in ids[0].tolist()],
        )
        self._warm_up(embeddings, mask, predicted)
        for name, method in self.methods.items():
            start = time.perf_counter()
            attributions = method(embeddings, mask, predicted)
            explanation.seconds[name] = time.perf_counter() - start
            explanation.scores[name] = attributions[0].detach().double().sum(-1)
        report = check_sufficiency(self.model, embeddings, (mask,), forward_func=self.forward)
        explanation.logit_change = report.max_relative_change
        explanation.head_output_error = float(report.head_output_error.max())
        per_head = self._attention.attribute(
            embeddings, additional_forward_args=(mask,), view="effective", reduce=None
        )
        sums = per_head.sum(-1)  # (1, L, H): each head's effective [CLS] row, summed
        explanation.effective_sums = (float(sums.min()), float(sums.max()))
        real = mask[0].bool()
        explanation.effective_min = float(per_head[..., real].min())
        return explanation
