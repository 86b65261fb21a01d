"""Careless input to the metrics entry points gets a specific error, never a silent wrong answer
(issue 18): float targets, a single string, typed special tokens, impossible max_length, empty
input and results, a model where a TokenGate is expected."""

from __future__ import annotations

import csv
import re

import pytest
import torch
from captum.attr import Saliency

from captum_effattn.metrics import (
    Comparison,
    Comprehensiveness,
    DeletionAUC,
    TokenGate,
    compare_methods,
    gated_inputs,
    resolve_targets,
    standard_methods,
)
from tests.attr.tiny_tokenizer import tiny_tokenizer
from tests.models.tiny import tiny_model

SALIENCY = {"Saliency": Saliency}


@pytest.fixture(scope="module")
def gate():
    """A tiny 3-class BERT with a word-level tokenizer that adds <s> (one special token)."""
    return TokenGate(tiny_model("bert"), tiny_tokenizer(bos=True))


@pytest.fixture(scope="module")
def minilm_gate(minilm_dir, minilm_tokenizer):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2).eval()
    return TokenGate(model, minilm_tokenizer)


def score(gate, texts, targets, **kwargs):
    return compare_methods(
        gate, texts, targets, SALIENCY, [DeletionAUC(steps=2)], progress=False, **kwargs
    )


@pytest.mark.parametrize("targets", [[0.9, 1.9], torch.tensor([0.9, 1.9]), [0, 1.5]])
def test_float_targets_are_refused_not_truncated(gate, targets):
    with pytest.raises(ValueError, match=r"targets must be whole-number class indices"):
        score(gate, ["the cat", "a dog"], targets)


def test_whole_number_targets_of_any_type_are_the_same_classes(gate):
    texts = ["the cat", "a dog"]
    expected = [r["target"] for r in score(gate, texts, [0, 2]).records]
    assert expected == [0, 2]
    for same in (torch.tensor([0, 2]), [0.0, 2.0], (torch.tensor(0), 2)):
        assert [r["target"] for r in score(gate, texts, same).records] == expected
    assert [r["target"] for r in score(gate, texts, 1).records] == [1, 1]  # one int: every text


@pytest.mark.parametrize("targets", [[0, 3], [-1, 0], 7])
def test_targets_outside_the_models_classes_name_the_number_of_classes(gate, targets):
    with pytest.raises(ValueError, match=r"targets .* out of range for 3 classes"):
        score(gate, ["the cat", "a dog"], targets)


@pytest.mark.parametrize("targets", [[True, False], {"a": 1}, [[0], [1]], torch.zeros(2, 1)])
def test_targets_that_are_not_class_indices_are_refused(gate, targets):
    with pytest.raises((TypeError, ValueError), match="targets"):
        score(gate, ["the cat", "a dog"], targets)


def test_resolve_targets_refuses_floats_too(gate):
    inputs = gate.encode(["the cat", "a dog"])
    with pytest.raises(ValueError, match="targets must be whole-number"):
        resolve_targets(gate, inputs, [0.9, 1.9])


def test_a_single_string_is_refused_not_iterated(gate):
    with pytest.raises(TypeError, match=r"texts must be a list of texts.*pass \['good'\]"):
        score(gate, "good", [0])
    with pytest.raises(TypeError, match=r"texts must be a list of texts"):
        gate.encode("good")
    with pytest.raises(TypeError, match=r"texts\[1\] is int, not str"):
        gate.encode(["good", 3])
    with pytest.raises(TypeError, match=r"texts must be a list of str"):
        score(gate, torch.ones(2, 3, dtype=torch.long), [0, 0])


def test_empty_texts_are_named_by_their_index_in_the_whole_list(gate):
    with pytest.raises(ValueError, match=r"text 9 is empty"):
        score(gate, ["the cat"] * 9 + ["  "], "predicted", batch_size=4)


@pytest.mark.parametrize("text", ["[CLS] [SEP]", "[PAD] [PAD]"])
def test_typed_special_tokens_are_text_not_special_tokens(minilm_gate, minilm_tokenizer, text):
    inputs = minilm_gate.encode([text, "a fine film"])
    ids = inputs.input_ids[0][inputs.attention_mask[0].bool()]
    specials = {minilm_tokenizer.cls_token_id, minilm_tokenizer.sep_token_id}
    specials.add(minilm_tokenizer.pad_token_id)
    # Only the tokenizer's own [CLS] ... [SEP]; the typed brackets are ordinary word pieces.
    assert [int(i) in specials for i in ids] == [True] + [False] * (len(ids) - 2) + [True]
    assert minilm_tokenizer.convert_ids_to_tokens(ids[1:4].tolist())[0] == "["
    removable = inputs.input_ids[0][inputs.removable[0]]
    assert not any(int(i) in specials for i in removable)
    result = score(minilm_gate, [text], [0])
    assert len(result.records) == 1


class _NoSplitTokenizer:
    """A tokenizer that turns typed special tokens into special ids whatever it is asked."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, texts, **kwargs):
        kwargs.pop("split_special_tokens", None)
        return self._tokenizer(texts, **kwargs)


@pytest.mark.parametrize("text", ["[CLS] [SEP]", "[PAD] [PAD]"])
def test_special_ids_from_text_are_never_removable_words(minilm_gate, minilm_tokenizer, text):
    gate = TokenGate(minilm_gate.model, _NoSplitTokenizer(minilm_tokenizer))
    with pytest.raises(
        ValueError, match=rf"text 1 \({re.escape(repr(text))}\) is only special tokens"
    ):
        gate.encode(["a fine film", text])
    inputs = gate.encode([f"good {text} bad"])
    assert inputs.removable[0].sum() == 2  # good, bad


def test_unknown_words_stay_removable_words(gate):
    inputs = gate.encode(["zebra quokka"])  # not in the tiny vocabulary: <unk> <unk>
    assert inputs.input_ids[0].tolist() == [1, 3, 3]
    assert inputs.removable[0].tolist() == [False, True, True]


@pytest.mark.parametrize("max_length", [0, 1, -5])
def test_max_length_too_short_for_a_word(gate, max_length):
    with pytest.raises(ValueError, match=r"max_length must be at least"):
        gate.encode(["the cat"], max_length=max_length)


def test_max_length_must_hold_the_special_tokens_and_a_word(minilm_gate):
    with pytest.raises(ValueError, match=r"max_length must be at least 3 .* got 2"):
        minilm_gate.encode(["a fine film"], max_length=2)
    assert minilm_gate.encode(["a fine film"], max_length=3).input_ids.shape == (1, 3)


def test_max_length_beyond_the_models_positions(gate, minilm_gate):
    with pytest.raises(ValueError, match=r"max_length 65 is longer than the 64 positions"):
        gate.encode(["the cat"], max_length=65)
    with pytest.raises(ValueError, match=r"max_length 513 is longer than the 512 positions"):
        score(minilm_gate, ["a fine film"], [0], max_length=513)
    with pytest.raises(TypeError, match=r"max_length must be an int; got float"):
        gate.encode(["the cat"], max_length=8.0)
    # The default fits a model with fewer positions than 256.
    assert gate.encode(["the cat " * 100]).input_ids.shape == (1, 64)


def test_empty_input_is_refused(gate):
    with pytest.raises(ValueError, match="texts is empty"):
        score(gate, [], [])
    ids = torch.ones(0, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"input_ids has shape \(0, 4\)"):
        gated_inputs(ids)
    with pytest.raises(ValueError, match="methods is empty"):
        compare_methods(gate, ["the cat"], [0], {}, progress=False)
    with pytest.raises(ValueError, match="metrics is empty"):
        compare_methods(gate, ["the cat"], [0], SALIENCY, [], progress=False)
    with pytest.raises(TypeError, match="methods must be a dict"):
        compare_methods(gate, ["the cat"], [0], [Saliency], progress=False)


def test_an_empty_comparison_formats_summarizes_and_writes(tmp_path):
    info = Comprehensiveness().info
    for empty in (Comparison([], (info,), ("Saliency",)), Comparison([], (), ())):
        summary = empty.summary()
        assert all(row["n"] == 0 for row in summary)
        text = empty.format()
        assert "no records" in text
        path = tmp_path / "empty.csv"
        empty.to_csv(path)
        with open(path) as file:
            rows = list(csv.reader(file))
        assert rows == [
            ["example", "method", "metric", "value", "lower_is_better", "seconds", "target"]
        ]
    assert Comparison([], (info,), ("Saliency",)).summary()[0]["metric"] == info.label
    assert "Saliency  -" in Comparison([], (info,), ("Saliency",)).format()


def test_standard_methods_needs_a_token_gate_and_steps(gate):
    with pytest.raises(TypeError, match=r"standard_methods needs a TokenGate.*got BertForSequence"):
        standard_methods(gate.model)
    for steps in (0, -3):
        with pytest.raises(ValueError, match=rf"ig_steps must be at least 1; got {steps}"):
            standard_methods(gate, ig_steps=steps)
    with pytest.raises(TypeError, match="ig_steps must be an int"):
        standard_methods(gate, ig_steps=2.5)


@pytest.mark.parametrize(("name", "value"), [("batch_size", 0), ("max_examples_per_batch", 0)])
def test_counts_below_one(gate, name, value):
    with pytest.raises(ValueError, match=rf"{name} must be at least 1"):
        score(gate, ["the cat"], [0], **{name: value})
