"""Every built-in architecture names the module that applies its attention output projection."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

from captum_effattn.models import ARCHITECTURES, describe_model
from tests.models.tiny import MORE_MODELS, TINY_MODELS, tiny_model

BUILT_IN = [*TINY_MODELS, *MORE_MODELS]


@pytest.mark.parametrize("name", BUILT_IN)
def test_output_projection_maps_heads_to_the_residual_stream(name):
    model = tiny_model(name)
    spec = ARCHITECTURES[model.config.model_type]
    assert spec.output_projection is not None
    block = describe_model(model).blocks[0]
    if isinstance(spec.layers, str):
        assert block is operator.attrgetter(spec.layers)(model.base_model)[0]
    projection = operator.attrgetter(spec.output_projection)(block)
    assert isinstance(projection, nn.Module)
    hidden = model.config.hidden_size
    weight = projection.weight
    # nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out): both are hidden x hidden here.
    assert tuple(weight.shape) == (hidden, hidden)
    out = projection(torch.zeros(1, 1, hidden))
    assert out.shape[-1] == hidden
