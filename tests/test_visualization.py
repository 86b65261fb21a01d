"""captum_effattn.visualization: records whose colour scale special tokens do not take over."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from captum.attr import visualization as viz
from captum.attr._utils.visualization import _get_color

from captum_effattn import EfficientAttentionAttribution
from captum_effattn.visualization import (
    scale_scores,
    special_token_mask,
    visualization_record,
    visualization_records,
)
from tests.models.tiny import tiny_inputs, tiny_model

TOKENS = ["[CLS]", "a", "good", "film", "[SEP]"]
SCORES = torch.tensor([5.0, 0.2, -0.1, 0.4, 3.0])


def test_special_tokens_are_out_of_the_scale():
    assert special_token_mask(TOKENS).tolist() == [True, False, False, False, True]
    assert special_token_mask(["<s>", "x", "<|endoftext|>", "</s>"]).tolist() == [
        True,
        False,
        True,
        True,
    ]
    assert special_token_mask(TOKENS, special_tokens={"good"}).tolist() == [0, 0, 1, 0, 0]
    scaled = scale_scores(SCORES, TOKENS)
    torch.testing.assert_close(scaled, torch.tensor([0.0, 0.5, -0.25, 1.0, 0.0]))
    shown = scale_scores(SCORES, TOKENS, show_special=True)
    torch.testing.assert_close(shown, torch.tensor([1.0, 0.5, -0.25, 1.0, 1.0]))
    assert scale_scores(torch.tensor([1.0, 0.0]), ["[CLS]", "a"]).tolist() == [0, 0]
    with pytest.raises(ValueError, match=r"shape \(S,\) = \(5,\)"):
        scale_scores(SCORES[None], TOKENS)


def test_cls_no_longer_takes_the_whole_colour_scale():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert", batch=1)
    scores = EfficientAttentionAttribution(model).attribute(
        inputs["input_ids"], additional_forward_args=(inputs["attention_mask"],)
    )[0]
    tokens = ["[CLS]"] + [f"w{i}" for i in range(1, 15)] + ["[SEP]"]
    record = visualization_record(
        scores, tokens, pred_prob=0.9, pred_class=1, true_class=1, attr_class=1
    )
    assert isinstance(record, viz.VisualizationDataRecord)
    colours = [_get_color(float(v)) for v in record.word_attributions]
    assert colours[0] == colours[-1] == _get_color(0)  # neutral
    strongest = int(scores[1:-1].abs().argmax()) + 1
    assert record.word_attributions[strongest] == pytest.approx(1)
    assert colours[strongest] == _get_color(1)  # the full colour goes to a word
    assert record.attr_score == pytest.approx(float(scores.sum()))
    assert record.raw_input_ids == tokens


def test_batch_records():
    attributions = torch.stack([SCORES, -SCORES])[..., None].expand(-1, -1, 4)  # (B, S, F)
    records = visualization_records(
        attributions,
        [TOKENS, TOKENS[:4]],
        pred_probs=[0.7, 0.6],
        pred_classes=[1, 0],
        true_classes=[1, 1],
        attr_classes=[1, 0],
        convergence_deltas=torch.tensor([1e-9, 2e-9]),
    )
    assert len(records) == 2
    assert records[0].word_attributions.tolist() == pytest.approx([0, 0.5, -0.25, 1, 0])
    assert len(records[1].word_attributions) == 4
    assert records[1].convergence_score == pytest.approx(2e-9)
    with pytest.raises(ValueError, match="2 examples"):
        visualization_records(
            attributions,
            [TOKENS],
            pred_probs=[0.7, 0.6],
            pred_classes=[1, 0],
            true_classes=[1, 1],
            attr_classes=[1, 0],
        )


def test_records_build_without_ipython():
    code = (
        "import sys; sys.modules['IPython'] = None\n"
        "import torch\n"
        "from captum_effattn.visualization import visualization_record\n"
        "r = visualization_record(torch.ones(2), ['[CLS]', 'a'], pred_prob=1, pred_class=0, "
        "true_class=0, attr_class=0)\n"
        "print(r.word_attributions.tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[0.0, 1.0]"
