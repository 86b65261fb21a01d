"""Forward functions for the tiny models, in the shapes Captum users write them."""

from __future__ import annotations

from tests.models.tiny import CAUSAL_MODELS, tiny_inputs, tiny_model

TEXT_MODELS = ("bert", "roberta", "distilbert", "gpt2", "llama")


def text_setup(name: str, padding: str | None = "right", implementation: str = "sdpa"):
    """``(model, forward_ids, ids, mask)``: ``forward_ids(ids, mask) -> logits``."""
    model = tiny_model(name, implementation)
    inputs = tiny_inputs(name, padding=padding)

    causal = name in CAUSAL_MODELS

    def forward_ids(ids, mask):
        extra = {"position_ids": positions(mask)} if causal else {}
        return model(input_ids=ids, attention_mask=mask, **extra).logits

    return model, forward_ids, inputs["input_ids"], inputs["attention_mask"]


def positions(mask):
    """Position ids that skip left padding, so a padded example is computed as it is alone.

    GPT-2 and Llama number positions 0..S-1 whatever the mask (as ``generate`` does not); RoBERTa
    derives its own from the ids and must not get these."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def forward_embeddings(model):
    """``forward(embeddings, mask) -> logits``: what IntegratedGradients and Saliency need."""

    def forward(embeddings, mask):
        return model(inputs_embeds=embeddings, attention_mask=mask).logits

    return forward


def logits_of_last_real_token(forward):
    """For causal LMs: ``(B, V)`` logits at each example's last real token (a class score)."""

    def classify(ids_or_embeddings, mask):
        logits = forward(ids_or_embeddings, mask)
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
        return logits[range(len(last)), last]

    return classify
