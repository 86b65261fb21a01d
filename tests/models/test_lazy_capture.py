"""capture_attention(materialize=False): the model runs its own attention; probabilities later."""

from __future__ import annotations

import pytest
import torch

from captum_effattn.models import capture_attention, select_heads
from tests.models.references import relative_change
from tests.models.tiny import CAUSAL_MODELS, TINY_MODELS, tiny_inputs, tiny_model

TEXT_MODELS = tuple(name for name in TINY_MODELS if name != "vit")
PADDINGS = (
    [(n, "right") for n in TEXT_MODELS]
    + [(n, "left") for n in CAUSAL_MODELS]
    + [(n, None) for n in TEXT_MODELS]  # no padding: the layers run sdpa without a mask
    + [("vit", None)]
)


def _captures(name, padding, selection_args=None):
    model = tiny_model(name)
    inputs = tiny_inputs(name, padding=padding)
    selection = select_heads(model, **(selection_args or {}))
    with torch.no_grad():
        plain = model(**inputs)
        with capture_attention(model, selection) as eager_record:
            model(**inputs)
        with capture_attention(model, selection, materialize=False) as lazy_record:
            lazy = model(**inputs)
    return model, inputs, plain, lazy, eager_record.layers, lazy_record.layers


@pytest.mark.parametrize(("name", "padding"), PADDINGS)
def test_lazy_probabilities_equal_the_materialized_ones(name, padding):
    *_, materialized, lazy = _captures(name, padding, {"layers": [0, 2], "heads": {2: [1, 3]}})
    for full, deferred in zip(materialized, lazy, strict=True):
        assert deferred.probabilities is None
        assert deferred.query is not None
        assert (deferred.layer, deferred.heads, deferred.kv_heads) == (
            full.layer,
            full.heads,
            full.kv_heads,
        )
        # Later layers see the outputs of sdpa instead of explicit attention: rounding apart.
        torch.testing.assert_close(deferred.attn, full.attn, rtol=0, atol=1e-5)
        torch.testing.assert_close(deferred.values, full.values, rtol=0, atol=1e-5)
        assert torch.equal(deferred.key_mask, full.key_mask)


def _index(positions, captured):
    batch, heads, _, keys = captured.attn.shape
    return positions[:, None, :, None].expand(batch, heads, -1, keys)


@pytest.mark.parametrize(("name", "padding"), PADDINGS)
def test_rows_are_the_rows_of_the_full_matrix(name, padding):
    *_, materialized, lazy = _captures(name, padding)
    length = lazy[0].key_mask.shape[1]
    positions = torch.tensor([[0, length - 1, 3], [length - 1, 5, 0]])
    for full, deferred in zip(materialized, lazy, strict=True):
        rows = deferred.rows(positions)  # computed from queries and keys only
        assert "_attn" not in deferred.__dict__
        expected = full.attn[torch.arange(2)[:, None], :, positions].transpose(1, 2)
        torch.testing.assert_close(rows, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(rows, deferred.attn.gather(2, _index(positions, deferred)))
        torch.testing.assert_close(full.rows(positions), expected, rtol=0, atol=0)


@pytest.mark.parametrize(("name", "padding"), PADDINGS)
def test_the_model_output_is_its_own(name, padding):
    _, _, plain, lazy, *_ = _captures(name, padding)
    plain, lazy = (getattr(o, "logits", None) for o in (plain, lazy))
    assert relative_change(lazy, plain) <= 1e-6


def test_a_transform_needs_materialized_probabilities():
    model = tiny_model("bert")
    with (
        pytest.raises(ValueError, match="needs materialize=True"),
        capture_attention(model, transform=lambda c: c.attn, materialize=False),
    ):
        pass
