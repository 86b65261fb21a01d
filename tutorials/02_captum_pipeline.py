# %% [markdown]
# # Tutorial 2: efficient attention in a Captum pipeline
#
# Run: `PYTHONPATH=. .venv/bin/python tutorials/02_captum_pipeline.py` (builds or loads the cached
# fine-tuned classifier: the first run fine-tunes it, on the CPU). Set `TUTORIAL_QUICK=1` for fewer
# IntegratedGradients steps.
#
# You already explain a classifier with IntegratedGradients and Saliency. Add
# `EfficientAttentionAttribution` to the same loop, with the same inputs and the same
# `forward_func`, and get attributions of the same shape.

# %%
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

from captum_effattn import EfficientAttentionAttribution
from captum_effattn.attr import check_sufficiency
from captum_effattn.data import imdb_heldout, load_sentiment_classifier

STEPS = 8 if os.environ.get("TUTORIAL_QUICK") else 50
classifier = load_sentiment_classifier()
model, tokenizer = classifier.model, classifier.tokenizer
review = imdb_heldout(2)[0]
enc = tokenizer(review.text, return_tensors="pt", truncation=True, max_length=128)
mask = enc["attention_mask"]
# Gradient methods differentiate with respect to the input: ask for its gradient up front, as
# Captum expects (it would otherwise set requires_grad itself and warn on every Saliency call).
embeddings = model.get_input_embeddings()(enc["input_ids"]).detach().requires_grad_()


def forward(embeddings, mask):
    return model(inputs_embeds=embeddings, attention_mask=mask).logits


target = int(forward(embeddings, mask).argmax())
print(f"predicted: {classifier.labels[target]}; true: {classifier.labels[review.label]}")

# %% [markdown]
# ## One loop, three methods

# %%
methods = {
    "IntegratedGradients": IntegratedGradients(forward),
    "Saliency": Saliency(forward),
    "EfficientAttention": EfficientAttentionAttribution(forward, model=model),
}
extra = {"IntegratedGradients": {"n_steps": STEPS}}
attributions = {
    name: method.attribute(
        embeddings, target=target, additional_forward_args=(mask,), **extra.get(name, {})
    )
    for name, method in methods.items()
}
tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0].tolist())
for name, attribution in attributions.items():
    scores = attribution[0].sum(-1)  # (S,): every method spreads or sums over the features
    top = scores.abs().argsort(descending=True)[:6].tolist()
    print(f"{name:20s} {tuple(attribution.shape)} top: {[tokens[i] for i in top]}")

# %% [markdown]
# ## Options
#
# - `view`: `"efficient"` (default), `"effective"`, `"raw"`.
# - `layers` / `heads`: ints, negative ints, slices, lists, `"all"`, or `{layer: heads}`.
# - `query`: `"auto"` (the [CLS] row here), an int position, or `"all"` rows.
# - `reduce`: `"mean"`, `"sum"`, `"max"`, `"rollout"`, or `None` for a `(B, L, H, S)` tensor.
# - `return_convergence_delta=True`: the largest relative head-output error per example.

# %%
explainer = methods["EfficientAttention"]
last_layer, delta = explainer.attribute(
    embeddings,
    additional_forward_args=(mask,),
    layers=-1,
    heads=[0, 5],
    return_convergence_delta=True,
)
rollout = explainer.attribute(embeddings, additional_forward_args=(mask,), reduce="rollout")
per_head = explainer.attribute(embeddings, additional_forward_args=(mask,), reduce=None)
matrices = explainer.attention_matrices(embeddings, additional_forward_args=(mask,), layers=[4, 5])
print("last layer, heads 0 and 5:", tuple(last_layer.shape), f"delta {delta.item():.1e}")
print("rollout sums to", f"{rollout.sum().item():.4f}", "(efficient rows are distributions)")
print("per head:", tuple(per_head.shape), "; matrices:", tuple(matrices.shape))

# %% [markdown]
# ## The claim, checked
#
# Replacing the attention of all 72 heads by their efficient attention leaves the logits
# unchanged; a perturbed distribution does not.

# %%
report = check_sufficiency(model, embeddings, (mask,), forward_func=forward)
print(f"relative logit change: {report.max_relative_change:.1e} (holds: {report.holds(1e-5)})")


def mixed_with_uniform(attn, values, key_mask, causal):
    visible = key_mask[:, None, None, :].to(attn.dtype)
    return 0.5 * attn + 0.5 * visible / visible.sum(-1, keepdim=True)


perturbed = check_sufficiency(
    model, embeddings, (mask,), forward_func=forward, view=mixed_with_uniform
)
print(f"perturbed attention: relative logit change {perturbed.max_relative_change:.1e}")

# %% [markdown]
# ## NoiseTunnel works as with any Captum method

# %%
smooth = NoiseTunnel(explainer).attribute(
    embeddings, nt_type="smoothgrad", nt_samples=4, stdevs=0.01, additional_forward_args=(mask,)
)
print("SmoothGrad-style efficient attention:", tuple(smooth.shape))
