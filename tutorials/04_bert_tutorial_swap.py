# %% [markdown]
# # Tutorial 4: Captum's BERT tutorial, with only the class name changed
#
# Run: `PYTHONPATH=. .venv/bin/python tutorials/04_bert_tutorial_swap.py` (builds or loads the
# cached fine-tuned sentiment classifier: about two minutes the first time). Set
# `TUTORIAL_QUICK=1` for a shorter sentence.
#
# Captum's "Interpreting BERT Models" tutorial explains a prediction with
# `LayerIntegratedGradients(forward_func, model.bert.embeddings)`: token ids and reference ids in,
# attributions of the embeddings' shape `(1, S, E)` out, `attributions.sum(dim=-1)` for one score
# per token, and `VisualizationDataRecord`s for `visualize_text`. Here the same flow runs on this
# package's fine-tuned MiniLM sentiment classifier (a BERT), once with
# `LayerIntegratedGradients` and once with `LayerEfficientAttentionAttribution`: the two calls
# differ only in the class name. `baselines` is accepted and unused by the attention method.

# %%
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from captum.attr import LayerIntegratedGradients
from captum.attr import visualization as viz

from captum_effattn import LayerEfficientAttentionAttribution
from captum_effattn.data import load_sentiment_classifier
from captum_effattn.visualization import visualization_record

classifier = load_sentiment_classifier()
model, tokenizer = classifier.model, classifier.tokenizer
model.eval()

# %% [markdown]
# ## The tutorial's helpers, for a classifier
#
# `predict` reads the global `model`, as in the notebook: `LayerEfficientAttentionAttribution`
# finds the model there (pass `model=...` when your forward function hides it better).

# %%


def predict(inputs, token_type_ids=None, position_ids=None, attention_mask=None):
    return model(
        inputs,
        token_type_ids=token_type_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
    ).logits


def input_and_reference(text):
    """Token ids with [CLS] and [SEP], and a reference with [PAD] in place of every word."""
    text_ids = tokenizer.encode(text, add_special_tokens=False)
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    input_ids = torch.tensor([[cls, *text_ids, sep]])
    ref_input_ids = torch.tensor([[cls] + [pad] * len(text_ids) + [sep]])
    return input_ids, ref_input_ids


text = (
    "a gorgeous, witty film"
    if os.environ.get("TUTORIAL_QUICK")
    else "a gorgeous, witty, seductive movie that never loses its nerve, even when the plot sags"
)
input_ids, ref_input_ids = input_and_reference(text)
token_type_ids = torch.zeros_like(input_ids)
position_ids = torch.arange(input_ids.shape[1])[None]
attention_mask = torch.ones_like(input_ids)
all_tokens = tokenizer.convert_ids_to_tokens(input_ids[0].tolist())

with torch.no_grad():
    probabilities = predict(input_ids, token_type_ids, position_ids, attention_mask).softmax(-1)
target = int(probabilities.argmax())
print(f"text: {text!r}; predicted: {classifier.labels[target]} ({probabilities[0, target]:.2f})")

# %% [markdown]
# ## The same call for both methods

# %%
results = {}
for method_class in (LayerIntegratedGradients, LayerEfficientAttentionAttribution):
    lig = method_class(predict, model.bert.embeddings)
    attributions, delta = lig.attribute(
        inputs=input_ids,
        baselines=ref_input_ids,
        additional_forward_args=(token_type_ids, position_ids, attention_mask),
        target=target,
        return_convergence_delta=True,
    )
    results[method_class.__name__] = (attributions, delta)
    print(f"{method_class.__name__}: attributions {tuple(attributions.shape)}", end=" ")
    print(f"delta {float(delta.abs().max()):.1e}")

# %% [markdown]
# `sum(dim=-1)` gives one score per token for both. The efficient-attention scores are the
# [CLS] row of every head, averaged: a distribution over the tokens (they sum to 1). Its
# convergence delta is the largest relative head-output error of the projected rows, not
# Integrated Gradients' completeness gap.


# %%
def summarize_attributions(attributions):
    scores = attributions.sum(dim=-1).squeeze(0)
    return scores / torch.norm(scores)


for name, (attributions, _) in results.items():
    scores = attributions.sum(dim=-1).squeeze(0)
    top = scores.abs().argsort(descending=True)[:5].tolist()
    print(f"{name} top tokens: {[all_tokens[i] for i in top]}; sum {scores.sum():.4f}")

# %% [markdown]
# ## Visualization records
#
# The tutorial's records, built the tutorial's way (scores divided by their norm), colour the
# tokens by their score clipped to [-1, 1]. Attention puts much of its mass on [CLS] and [SEP],
# so those take the colour scale. `captum_effattn.visualization.visualization_record` scales by
# the strongest *word* instead and leaves special tokens neutral; no IPython is needed to build
# records, only to display them.

# %%
records = []
for name, (attributions, delta) in results.items():
    scores = summarize_attributions(attributions)
    tutorial_record = viz.VisualizationDataRecord(
        scores,
        float(probabilities[0, target]),
        classifier.labels[target],
        classifier.labels[target],
        classifier.labels[target],
        scores.sum(),
        all_tokens,
        delta,
    )
    record = visualization_record(
        attributions.sum(dim=-1).squeeze(0),
        all_tokens,
        pred_prob=float(probabilities[0, target]),
        pred_class=classifier.labels[target],
        true_class=classifier.labels[target],
        attr_class=classifier.labels[target],
        convergence_delta=delta,
    )
    records.append(record)
    words = torch.tensor([t not in ("[CLS]", "[SEP]") for t in all_tokens])
    for label, shown in (("tutorial scaling", tutorial_record), ("visualization_record", record)):
        colours = shown.word_attributions.abs().clamp(max=1)
        print(
            f"{name} {label}: [CLS] colour {colours[0]:.2f}, strongest word colour "
            f"{colours[words].max():.2f}"
        )

try:
    import IPython  # noqa: F401
except ImportError:
    print("IPython is not installed: records built, visualize_text skipped")
else:
    html = viz.visualize_text(records)
    print("visualize_text rendered", len(html.data), "characters of HTML")
