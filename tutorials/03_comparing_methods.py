# %% [markdown]
# # Tutorial 3: scoring efficient attention with Captum's metrics
#
# Run: `PYTHONPATH=. .venv/bin/python tutorials/03_comparing_methods.py` (builds or loads the
# cached fine-tuned classifier). Set `TUTORIAL_QUICK=1` for fewer steps and samples.
#
# Captum's `infidelity` and `sensitivity_max` cannot score attention out of the box: they need
# attributions of the inputs' exact shape, and they perturb the inputs with continuous noise,
# which token ids cannot take. `captum_effattn.metrics` supplies the missing pieces:
#
# - the **token gate** `g` of shape `(B, S)`: the model sees each token's embedding interpolated
#   between a baseline token (`[PAD]`) at `g = 0` and itself at `g = 1`. Every Captum method runs
#   on it unchanged and returns one score per token;
# - **perturbations** that mean something for text: token removal for `infidelity`, a fade toward
#   the baseline token for `sensitivity_max`;
# - ERASER's comprehensiveness and sufficiency, deletion and insertion curves, and one call that
#   scores every method with every metric.

# %%
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from captum.attr import IntegratedGradients
from captum.metrics import infidelity, sensitivity_max

from captum_effattn import EfficientAttentionAttribution
from captum_effattn.data import imdb_heldout, load_sentiment_classifier, rotten_tomatoes_splits
from captum_effattn.metrics import (
    TokenGate,
    compare_methods,
    explanation_function,
    gate_noise,
    standard_methods,
    token_removal,
)

QUICK = bool(os.environ.get("TUTORIAL_QUICK"))
STEPS, SAMPLES = (8, 2) if QUICK else (50, 10)
classifier = load_sentiment_classifier()
# A Rotten Tomatoes sentence (shorter than MiniLM's d + 1 = 33 word pieces: its attention rows are
# identifiable and the three attention views coincide) and an IMDB review cut to 128 word pieces
# (where they differ).
reviews = [rotten_tomatoes_splits().test[0], imdb_heldout(2)[0]]
texts = [r.text for r in reviews]

# %% [markdown]
# ## The token gate

# %%
gate = TokenGate(classifier.model, classifier.tokenizer)  # gate(g, input_ids, mask) -> logits
inputs = gate.encode(texts, max_length=128)
args = inputs.additional_forward_args  # (input_ids, attention_mask)
target = torch.tensor([r.label for r in reviews])
print("gate:", tuple(inputs.gate.shape))

ig = IntegratedGradients(gate)  # the zero gate (all [PAD]) is its default baseline
attention = EfficientAttentionAttribution(gate, model=classifier.model)
ig_scores = ig.attribute(inputs.gate, target=target, additional_forward_args=args, n_steps=STEPS)
attention_scores = attention.attribute(inputs.gate, target=target, additional_forward_args=args)
print("IntegratedGradients:", tuple(ig_scores.shape))
print("EfficientAttention:", tuple(attention_scores.shape))

# %% [markdown]
# ## Plain Captum calls
#
# `infidelity` removes each token with probability 0.2 and asks how well the summed attribution
# of the removed tokens predicts the drop of the target logit (`normalize=True` first rescales the
# attributions by the best factor, so scores that sum to 1 and gradients compete fairly).
# `sensitivity_max` re-runs the method on inputs faded by up to 0.1 and reports the largest
# relative change of its attributions.

# %%
for name, method, scores, kwargs in (
    ("IntegratedGradients", ig, ig_scores, {"n_steps": STEPS}),
    ("EfficientAttention", attention, attention_scores, {}),
):
    infid = infidelity(
        gate,
        token_removal(drop_probability=0.2),
        inputs.gate,
        scores,
        additional_forward_args=args,
        target=target,
        n_perturb_samples=SAMPLES,
        normalize=True,
    )
    sens = sensitivity_max(
        explanation_function(method, **kwargs),
        inputs.gate,
        perturb_func=gate_noise(radius=0.1),
        n_perturb_samples=SAMPLES,
        target=target,
        additional_forward_args=args,
    )
    print(f"{name:20s} infidelity {infid.tolist()} sensitivity_max {sens.tolist()}")

# %% [markdown]
# ## Every method, every metric
#
# `compare_methods` returns one record per (example, method, metric), with each method's
# attribution time per example, and a summary. Each metric carries its name, range, direction
# (the arrows) and parameters: ERASER's AOPC uses bins of 1, 5, 10, 20 and 50% of the words, and
# numbers computed with other bins are not comparable.

# %%
result = compare_methods(
    gate,
    texts,
    target,
    standard_methods(gate, ig_steps=STEPS),
    max_length=128,
    progress=False,
)
print(result.format())
