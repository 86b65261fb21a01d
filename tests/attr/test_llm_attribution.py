"""LLMEfficientAttentionAttribution: Captum's LLM API, one teacher-forced forward per call."""

from __future__ import annotations

import matplotlib
import pytest
import torch
from captum.attr import LLMAttributionResult, TextTemplateInput, TextTokenInput

from captum_effattn import EfficientAttentionAttribution, LLMEfficientAttentionAttribution
from tests.attr.tiny_tokenizer import tiny_tokenizer
from tests.models.tiny import tiny_model

matplotlib.use("Agg")

PROMPT = "the cat sees the dog and the bird in the big old house near the river"
TARGET = "paris is the capital of france"


@pytest.fixture(params=["gpt2", "llama", "mistral"])
def decoder(request):
    """``(model, tokenizer)``: the Llama tokenizer prepends ``<s>``, GPT-2's adds nothing.
    Mistral's 12-token sliding window is shorter than prompt + target."""
    return tiny_model(request.param), tiny_tokenizer(bos=request.param != "gpt2")


def reference_rows(model, prompt_ids, target_ids, **options):
    """One EfficientAttentionAttribution per target token, on the row that predicts it."""
    ids = torch.cat([prompt_ids, target_ids])[None]
    method = EfficientAttentionAttribution(model)
    rows = [
        method.attribute(ids, query=len(prompt_ids) - 1 + t, **options)[0, : len(prompt_ids)]
        for t in range(len(target_ids))
    ]
    return torch.stack(rows)


def count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_result_matches_one_attribution_per_target_row(decoder):
    model, tokenizer = decoder
    inp = TextTokenInput(PROMPT, tokenizer)
    calls, handle = count_forwards(model)
    try:
        result = LLMEfficientAttentionAttribution(model, tokenizer).attribute(inp, target=TARGET)
    finally:
        handle.remove()
    assert len(calls) == 1  # prompt + target in one forward
    assert isinstance(result, LLMAttributionResult)
    target_ids = torch.tensor(tokenizer.encode(TARGET, add_special_tokens=False))
    assert result.token_attr.shape == (len(target_ids), inp.n_itp_features)
    assert result.output_tokens == TARGET.split()
    assert result.input_tokens == inp.values
    torch.testing.assert_close(result.seq_attr, result.token_attr.sum(0))
    expected = reference_rows(model, inp.inp_tensor[0], target_ids)
    torch.testing.assert_close(result.token_attr, expected, atol=1e-6, rtol=0)
    # distributions restricted to the prompt: the first row sees nothing else
    assert float(result.token_attr.min()) >= 0
    sums = result.token_attr.sum(1)
    assert float(sums[0]) == pytest.approx(1, abs=1e-5)
    assert bool((sums <= 1 + 1e-5).all())
    assert bool((sums[1:] < 1 - 1e-3).all())  # later rows also weigh earlier target tokens
    assert result.output_probs.shape == (len(target_ids),)
    assert bool(((result.output_probs > 0) & (result.output_probs < 1)).all())


@pytest.mark.parametrize(
    "options",
    [
        {"layers": [0, 2], "heads": [1, 3], "view": "effective"},
        {"view": "raw", "reduce": "max"},
        {"reduce": "rollout"},
    ],
)
def test_options_match_efficient_attention(options):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer(bos=True)
    inp = TextTokenInput(PROMPT, tokenizer)
    result = LLMEfficientAttentionAttribution(model, tokenizer).attribute(
        inp, target="paris is", **options
    )
    target_ids = torch.tensor(tokenizer.encode("paris is", add_special_tokens=False))
    expected = reference_rows(model, inp.inp_tensor[0], target_ids, **options)
    torch.testing.assert_close(result.token_attr, expected, atol=1e-6, rtol=0)


def test_skip_tokens_drop_features():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer(bos=True)
    method = LLMEfficientAttentionAttribution(model, tokenizer)
    full = method.attribute(TextTokenInput(PROMPT, tokenizer), target=TARGET)
    skipped = method.attribute(
        TextTokenInput(PROMPT, tokenizer, skip_tokens=["<s>"]), target=TARGET
    )
    assert full.input_tokens[0] == "<s>"
    assert skipped.input_tokens == full.input_tokens[1:]
    torch.testing.assert_close(skipped.token_attr, full.token_attr[:, 1:])


def test_template_features_are_their_tokens(decoder):
    model, tokenizer = decoder
    method = LLMEfficientAttentionAttribution(model, tokenizer)
    template = "{} sees {} near the {}"
    values = ["the cat", "a dog", "river"]
    text = template.format(*values)
    tokens = method.attribute(TextTokenInput(text, tokenizer), target=TARGET).token_attr
    offset = 1 if tokenizer.bos_token_id in tokenizer.encode(text) else 0
    # tokens: [<s>] the cat | sees | a dog | near the | river
    groups = [[0, 1], [3, 4], [7]]
    expected = torch.stack([tokens[:, [offset + i for i in g]].sum(1) for g in groups], 1)
    result = method.attribute(TextTemplateInput(template, values=values), target=TARGET)
    assert result.input_tokens == values
    torch.testing.assert_close(result.token_attr, expected, atol=1e-6, rtol=0)
    named = method.attribute(
        TextTemplateInput(
            "{who} sees {whom} near the {where}",
            values={"who": "the cat", "whom": "a dog", "where": "river"},
            mask={"who": 0, "whom": 1, "where": 0},
        ),
        target=TARGET,
    )
    grouped = expected[:, 0] + expected[:, 2]  # one feature, each value shows its score
    torch.testing.assert_close(named.token_attr[:, 0], grouped, atol=1e-6, rtol=0)
    torch.testing.assert_close(named.token_attr[:, 2], grouped, atol=1e-6, rtol=0)
    torch.testing.assert_close(named.token_attr[:, 1], expected[:, 1], atol=1e-6, rtol=0)


def test_generated_continuation_is_explained(decoder):
    model, tokenizer = decoder
    method = LLMEfficientAttentionAttribution(model, tokenizer)
    inp = TextTokenInput(PROMPT, tokenizer)
    result = method.attribute(inp, gen_args={"max_new_tokens": 4, "do_sample": False})
    assert len(result.output_tokens) == 4
    with torch.no_grad():
        generated = model.generate(
            inp.inp_tensor, attention_mask=torch.ones_like(inp.inp_tensor), max_new_tokens=4
        )[0, inp.inp_tensor.shape[1] :]
    teacher_forced = method.attribute(inp, target=generated)
    torch.testing.assert_close(result.token_attr, teacher_forced.token_attr)


def test_plots_return_figures():
    model, tokenizer = tiny_model("gpt2"), tiny_tokenizer()
    result = LLMEfficientAttentionAttribution(model, tokenizer).attribute(
        TextTokenInput(PROMPT, tokenizer), target=TARGET
    )
    for plot in (result.plot_token_attr, result.plot_seq_attr):
        figure, _ = plot()
        assert isinstance(figure, matplotlib.figure.Figure)
        matplotlib.pyplot.close(figure)


def test_bad_input():
    model, tokenizer = tiny_model("gpt2"), tiny_tokenizer()
    method = LLMEfficientAttentionAttribution(model, tokenizer)
    inp = TextTokenInput(PROMPT, tokenizer)
    with pytest.raises(ValueError, match="unknown token"):
        method.attribute(inp, target="paris zzzz")
    with pytest.raises(ValueError, match="to no token"):
        method.attribute(inp, target="   ")
    with pytest.raises(ValueError, match="prompt is empty"):
        method.attribute(TextTokenInput("", tokenizer), target=TARGET)
    with pytest.raises(ValueError, match="prompt is empty"):
        method.attribute(TextTokenInput("<s>", tokenizer), target=TARGET)
    long_target = " ".join(["the"] * 60)  # 16 + 60 > 64 positions
    with pytest.raises(ValueError, match="76 positions but GPT2LMHeadModel has 64"):
        method.attribute(inp, target=long_target)
    with pytest.raises(ValueError, match="gen_args"):
        method.attribute(inp, target=TARGET, gen_args={"max_new_tokens": 2})
    with pytest.raises(ValueError, match="past_key_values"):
        method.attribute(inp, gen_args={"max_new_tokens": 2, "past_key_values": object()})
    with pytest.raises(ValueError, match="vocabulary"):
        method.attribute(inp, target=torch.tensor([5, 500]))
    with pytest.raises(ValueError, match="empty"):
        method.attribute(inp, target=torch.tensor([], dtype=torch.long))
    with pytest.raises(TypeError, match="inp must be one of"):
        method.attribute(PROMPT, target=TARGET)
    with pytest.raises(ValueError, match="reduce"):
        method.attribute(inp, target=TARGET, reduce=None)
    with pytest.raises(ValueError, match="changes its values"):
        method.attribute(TextTemplateInput(lambda x: x[::-1], values=["tac"]), target=TARGET)
    with pytest.raises(ValueError, match="not a causal language model"):
        LLMEfficientAttentionAttribution(tiny_model("bert"), tokenizer)
    with pytest.raises(ValueError, match="no language modelling head"):
        LLMEfficientAttentionAttribution(tiny_model("gpt2", head=False), tokenizer)


def test_sliding_window_rows_explain_only_their_window():
    from tests.models.tiny import WINDOW

    model, tokenizer = tiny_model("mistral"), tiny_tokenizer(bos=True)
    inp = TextTokenInput(PROMPT, tokenizer)
    result = LLMEfficientAttentionAttribution(model, tokenizer).attribute(inp, target=TARGET)
    prompt_len = inp.inp_tensor.shape[1]
    for t, row in enumerate(result.token_attr):
        predicting = prompt_len - 1 + t  # the row that predicts target token t
        first_seen = predicting - WINDOW + 1
        assert (row[: max(first_seen, 0)] == 0).all()
        assert row[max(first_seen, 0) :].sum() > 0


def rows_at_predicting_positions(model, prompt_ids, target_ids, **options):
    """One EfficientAttentionAttribution per target token, explaining the logits at the row
    that predicts it, with the target token id as ``target``."""
    ids = torch.cat([prompt_ids, target_ids])[None]
    rows = []
    for t, token in enumerate(target_ids.tolist()):
        position = len(prompt_ids) - 1 + t
        method = EfficientAttentionAttribution(
            lambda x, position=position: model(input_ids=x).logits[:, position], model=model
        )
        scores = method.attribute(ids, query=position, target=token, **options)
        rows.append(scores[0, : len(prompt_ids)])
    return torch.stack(rows)


@pytest.mark.parametrize("weighting", [None, "norm", "gradient"])
@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral"])
def test_weighted_rows_match_efficient_attention_per_target_token(name, weighting):
    model, tokenizer = tiny_model(name), tiny_tokenizer(bos=name != "gpt2")
    inp = TextTokenInput(PROMPT, tokenizer)
    calls, handle = count_forwards(model)
    try:
        result = LLMEfficientAttentionAttribution(model, tokenizer).attribute(
            inp, target=TARGET, weighting=weighting
        )
    finally:
        handle.remove()
    assert len(calls) == 1  # one forward (with gradients for weighting="gradient")
    target_ids = torch.tensor(tokenizer.encode(TARGET, add_special_tokens=False))
    expected = rows_at_predicting_positions(
        model, inp.inp_tensor[0], target_ids, weighting=weighting
    )
    torch.testing.assert_close(result.token_attr, expected, atol=1e-5, rtol=0)
    if weighting is not None:
        unweighted = LLMEfficientAttentionAttribution(model, tokenizer).attribute(
            inp, target=TARGET
        )
        assert not torch.allclose(result.token_attr, unweighted.token_attr, atol=1e-4)


def test_gradient_weighting_is_per_target_token():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer(bos=True)
    method = LLMEfficientAttentionAttribution(model, tokenizer)
    inp = TextTokenInput(PROMPT, tokenizer)
    scores = method.attribute(inp, target="paris paris", weighting="gradient").token_attr
    # the same token at two rows: the gradient of each row's own logit differs
    assert not torch.allclose(scores[0], scores[1], atol=1e-4)
    target_ids = torch.tensor(tokenizer.encode("paris paris", add_special_tokens=False))
    expected = rows_at_predicting_positions(
        model, inp.inp_tensor[0], target_ids, weighting="gradient"
    )
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("weighting", ["norm", "gradient"])
def test_weighted_rollout_matches_efficient_attention(weighting):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer(bos=True)
    inp = TextTokenInput(PROMPT, tokenizer)
    result = LLMEfficientAttentionAttribution(model, tokenizer).attribute(
        inp, target="paris is", reduce="rollout", weighting=weighting
    )
    assert bool(torch.isfinite(result.token_attr).all())
    target_ids = torch.tensor(tokenizer.encode("paris is", add_special_tokens=False))
    expected = rows_at_predicting_positions(
        model, inp.inp_tensor[0], target_ids, reduce="rollout", weighting=weighting
    )
    torch.testing.assert_close(result.token_attr, expected, atol=1e-5, rtol=0)


def test_unknown_weighting_lists_the_choices():
    model, tokenizer = tiny_model("gpt2"), tiny_tokenizer(bos=False)
    method = LLMEfficientAttentionAttribution(model, tokenizer)
    with pytest.raises(ValueError, match=r"weighting must be one of \('norm', 'gradient', None\)"):
        method.attribute(TextTokenInput(PROMPT, tokenizer), target=TARGET, weighting="grad")


def test_gradient_weighting_refuses_inference_mode():
    model, tokenizer = tiny_model("gpt2"), tiny_tokenizer(bos=False)
    method = LLMEfficientAttentionAttribution(model, tokenizer)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        method.attribute(TextTokenInput(PROMPT, tokenizer), target=TARGET, weighting="gradient")
