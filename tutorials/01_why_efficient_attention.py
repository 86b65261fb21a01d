# %% [markdown]
# # Tutorial 1: why raw attention is not an explanation, and what efficient attention is
#
# Run it as a script (`PYTHONPATH=. .venv/bin/python tutorials/01_why_efficient_attention.py`) or
# open it as a notebook with jupytext; every cell prints what it shows. It uses the real
# all-MiniLM-L6-v2 checkpoint and a real IMDB review, both installed offline by `make`.
#
# For one head, attention row `a` (a distribution over `n` tokens) and value vectors `V` (`n x d`),
# the head outputs `a V`. When `n > d + 1`, many other rows `x` give exactly the same output
# (Brunner et al., 2020), so `a` is not identifiable from what the model computes. Efficient
# attention (after Naim & Asher, 2024; this package's construction) picks one canonical row among
# them: the minimum-norm *distribution* with the same output.

# %%
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import AutoModel, AutoTokenizer

from captum_effattn import EfficientAttentionAttribution, effective_attention, efficient_attention
from captum_effattn.data import load_reviews, load_sentiment_classifier, minilm_path
from captum_effattn.models import capture_attention, select_heads

torch.manual_seed(0)

# %% [markdown]
# ## First, the mode to use
#
# Explaining a classifier's prediction, use efficient attention weighted by the gradient of the
# explained class: `weighting="gradient"`. The faithfulness report (`docs/faithfulness.md`,
# chosen on validation texts, measured on held-out test texts) finds it the best efficient-based
# mode; its tables show by how much it beats raw attention and rollout, how it compares with
# IntegratedGradients, and what it costs in forward passes. Plain attention rows are not
# class-specific: `target` changes nothing without a weighting. The rest of this tutorial
# explains what efficient rows are and why raw rows are not an explanation.

# %%
classifier = load_sentiment_classifier()  # fine-tuned MiniLM, cached after the first run
sentence = "An alternately fascinating and frustrating documentary."
batch = classifier.tokenizer(sentence, return_tensors="pt")


def classify(input_ids, attention_mask):
    return classifier.model(input_ids=input_ids, attention_mask=attention_mask).logits


with torch.no_grad():
    predicted = int(classify(batch["input_ids"], batch["attention_mask"]).argmax())
explainer = EfficientAttentionAttribution(classify, model=classifier.model)
scores = explainer.attribute(
    batch["input_ids"],
    target=predicted,
    additional_forward_args=(batch["attention_mask"],),
    weighting="gradient",
)[0]
tokens = classifier.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
special = torch.tensor([t in classifier.tokenizer.all_special_tokens for t in tokens])
ranked = scores.masked_fill(special, -1).argsort(descending=True)  # [CLS]/[SEP] never ranked
print(f"predicted: {classifier.labels[predicted]}")
print("top word pieces:", ", ".join(f"{tokens[i]} {scores[i]:.3g}" for i in ranked[:3]))
print(f"smallest score {scores.min():.3g} (never negative)")
tokenizer = AutoTokenizer.from_pretrained(minilm_path())
model = AutoModel.from_pretrained(minilm_path()).eval()  # sdpa: no eager needed
review = next(r.text for r in load_reviews("imdb") if len(tokenizer(r.text)["input_ids"]) >= 256)
enc = tokenizer(review, return_tensors="pt", truncation=True, max_length=256)
print(f"{enc['input_ids'].shape[1]} tokens; MiniLM heads have d = 32, so n > d + 1")

# %% [markdown]
# ## Capture one layer's attention and value vectors
#
# `capture_attention` records the selected heads of an unmodified model for one forward pass,
# whatever attention implementation it runs, and restores it afterwards.

# %%
with torch.no_grad(), capture_attention(model, select_heads(model, layers=2)) as record:
    model(**enc)
layer = record.layers[0]
# float64 copies, so the output comparisons below are not limited by float32 rounding
attn, values = layer.attn[0].double(), layer.values[0].double()  # (12, 256, 256), (12, 256, 32)
print("attention", tuple(attn.shape), "values", tuple(values.shape))

# %% [markdown]
# ## Two different rows, the same head output
#
# The effective row (orthogonal projection onto the value space) gives the head exactly the
# same output as the raw row, but it is not a distribution. The efficient row gives the same
# output too, and it is a distribution.

# %%
raw = attn[:, :1]  # the [CLS] row of every head: (12, 1, 256), one row per head
raw = raw / raw.sum(-1, keepdim=True)  # a float32 softmax sums to 1 only within ~1e-7
effective = effective_attention(raw, values)
efficient, certificate = efficient_attention(raw, values, return_certificate=True)
for name, rows in (("raw", raw), ("effective", effective), ("efficient", efficient)):
    change = ((rows - raw).double() @ values.double()).norm(dim=-1) / (
        raw.double() @ values.double()
    ).norm(dim=-1)
    print(
        f"{name:9s}: head-output change {change.max():.1e}; sums {rows.sum(-1).min():.3f}.."
        f"{rows.sum(-1).max():.3f}; negative entries {(rows < 0).double().mean():.1%}; "
        f"distance from raw {(rows - raw).abs().max():.3f}"
    )
print(certificate.summary())

# %% [markdown]
# ## Efficient attention is canonical
#
# Every row the head cannot tell apart from `a` maps to the same efficient row: here a mixture
# of the raw and the efficient row (itself a valid row with the same output) projects back onto
# exactly the efficient row.

# %%
mixture = 0.3 * raw + 0.7 * efficient
again = efficient_attention(mixture, values)
print(
    f"max difference, efficient(mixture) vs efficient(raw): {(again - efficient).abs().max():.1e}"
)

# %% [markdown]
# ## Short inputs are identifiable
#
# With `n <= d + 1` tokens, `[V, 1]` spans all keys: the only row with the same output is the row
# itself, and efficient attention returns it unchanged. Most Rotten Tomatoes sentences are this
# short for MiniLM; long reviews are where the views differ.

# %%
short = tokenizer("An alternately fascinating and frustrating documentary.", return_tensors="pt")
with torch.no_grad(), capture_attention(model, select_heads(model, layers=2)) as record:
    model(**short)
short_layer = record.layers[0]
short_rows = short_layer.attn[0, :, :1]  # (12, 1, 9)
print(
    f"{short['input_ids'].shape[1]} tokens: efficient == raw:",
    torch.equal(efficient_attention(short_rows, short_layer.values[0]), short_rows),
)
