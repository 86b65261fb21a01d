# %% [markdown]
# # Tutorial 5: explaining a language model's continuation with Captum's LLM API
#
# Run: `PYTHONPATH=. .venv/bin/python tutorials/05_llm_continuation.py` (a few seconds). Set
# `TUTORIAL_QUICK=1` for fewer generated tokens.
#
# Captum explains generated text with `LLMAttribution` (perturbation methods) and
# `LLMGradientAttribution` (gradient methods): a prompt as `TextTokenInput` or
# `TextTemplateInput`, a target continuation (or one generated on the spot), and an
# `LLMAttributionResult` with one row of feature scores per target token.
# `LLMEfficientAttentionAttribution(model, tokenizer)` gives the same result type from efficient
# attention, with **one** forward pass over prompt + continuation: target token `t` at position
# `p` is explained by the attention row of position `p - 1`, the row that predicts it.
#
# **No pretrained decoder ships offline with this package**, so this tutorial builds a small
# GPT-2 with *random weights* and a word-level tokenizer written here. The explanations show how
# the API works, not what a trained model attends to; with a real checkpoint, load it with
# `AutoModelForCausalLM.from_pretrained(path)` and its tokenizer instead.

# %%
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import transformers
from captum.attr import (
    FeatureAblation,
    LayerIntegratedGradients,
    LLMAttribution,
    LLMGradientAttribution,
    TextTemplateInput,
    TextTokenInput,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from captum_effattn import LLMEfficientAttentionAttribution

NEW_TOKENS = 4 if os.environ.get("TUTORIAL_QUICK") else 8

# %% [markdown]
# ## A small decoder and a tokenizer, built offline

# %%
words = (
    "the a of to in is was and it this that cat dog bird tree house road city river sky sun "
    "moon red blue green big small old new good bad happy sad runs sees eats likes finds "
    "paris france london capital country world day night time one two three very near"
)
vocabulary = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words.split()])}
backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
backend.pre_tokenizer = pre_tokenizers.Whitespace()
backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
tokenizer = transformers.PreTrainedTokenizerFast(
    tokenizer_object=backend,
    bos_token="<s>",
    eos_token="</s>",
    unk_token="<unk>",
    pad_token="<pad>",
)

torch.manual_seed(0)
config = transformers.GPT2Config(
    vocab_size=len(vocabulary),
    n_embd=64,
    n_layer=4,
    n_head=4,
    n_positions=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    initializer_range=0.2,  # larger than the default: attention far from uniform
)
model = transformers.GPT2LMHeadModel(config).eval()
print(
    f"random-weight GPT-2: {config.n_layer} layers x {config.n_head} heads, {len(vocabulary)} words"
)

# %% [markdown]
# ## Explain a generated continuation
#
# Without a target the method generates one first (`gen_args` as in Captum; greedy by default),
# then explains it in a single forward without the generation cache.

# %%
prompt = "the old cat sees a small bird near the river and the big dog"
inp = TextTokenInput(prompt, tokenizer)
method = LLMEfficientAttentionAttribution(model, tokenizer)

forwards = []
hook = model.register_forward_hook(lambda *_: forwards.append(1))
gen_args = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False}
generated = method.attribute(inp, gen_args=gen_args)
hook.remove()
continuation = tokenizer.decode(tokenizer.encode(" ".join(generated.output_tokens)))
print(f"continuation: {continuation!r}")
print(f"generate + explain: {len(forwards)} forward passes ({len(forwards) - 1} to generate)")

forwards.clear()
hook = model.register_forward_hook(lambda *_: forwards.append(1))
result = method.attribute(inp, target=continuation)
hook.remove()
shape = tuple(result.token_attr.shape)
print(f"LLMEfficientAttention token_attr {shape}; forward passes: {len(forwards)}")
sums = result.token_attr.sum(1)
print(f"rows sum to at most 1: {bool((sums <= 1 + 1e-5).all())} (first row {sums[0]:.4f})")
for token, row in zip(result.output_tokens, result.token_attr, strict=True):
    print(f"  {token:>8s} <- {result.input_tokens[int(row.argmax())]}")

# %% [markdown]
# ## Next to Captum's methods
#
# Feature ablation (one forward per feature and target token) and layer Integrated Gradients on
# the token embeddings (one backward pass per step and target token), on the same prompt and
# target. Their scores are in log-probability units; efficient attention's are attention mass.

# %%
ablation = LLMAttribution(FeatureAblation(model), tokenizer).attribute(inp, target=continuation)
gradients = LLMGradientAttribution(
    LayerIntegratedGradients(model, model.transformer.wte), tokenizer
).attribute(inp, target=continuation, n_steps=8)
for name, other in (("FeatureAblation", ablation), ("LayerIntegratedGradients", gradients)):
    same = other.output_tokens == result.output_tokens and other.input_tokens == result.input_tokens
    print(f"{name} token_attr {tuple(other.token_attr.shape)}; same tokens: {same}")

# %% [markdown]
# ## Templates group tokens into features
#
# With `TextTemplateInput`, each value is one feature (its tokens' scores summed); a `mask`
# groups values further, exactly as Captum groups them.

# %%
template = TextTemplateInput(
    "{} sees {} near the {}", values=["the old cat", "a small bird", "river"]
)
by_value = method.attribute(template, target=continuation)
print(
    "template features:", dict(zip(by_value.input_tokens, by_value.seq_attr.tolist(), strict=True))
)

# %% [markdown]
# ## Plots
#
# `plot_token_attr` and `plot_seq_attr` are Captum's own.

# %%
out_dir = Path(tempfile.mkdtemp(prefix="tutorial05-"))
for name, plot in (("token_attr", result.plot_token_attr), ("seq_attr", result.plot_seq_attr)):
    figure, _ = plot()
    figure.savefig(out_dir / f"{name}.png")
    plt.close(figure)
print("plots saved:", sorted(p.name for p in out_dir.iterdir()))
