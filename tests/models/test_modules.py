"""``every_module``: the capture's fast list of a model's modules must be ``model.modules()``."""

from __future__ import annotations

import pytest
from torch import nn

from captum_effattn.models._modules import every_module
from tests.models.tiny import ENCODER_DECODER_MODELS, TINY_MODELS, tiny_model


@pytest.mark.parametrize("name", [*TINY_MODELS, *ENCODER_DECODER_MODELS])
def test_the_same_modules_as_torch_lists_each_once(name):
    model = tiny_model(name)
    listed = every_module(model)
    assert len({id(m) for m in listed}) == len(listed)  # each once
    assert [id(m) for m in sorted(listed, key=id)] == [
        id(m) for m in sorted(model.modules(), key=id)
    ]


def test_shared_and_missing_children_and_parent_order():
    shared = nn.Linear(2, 2)
    inner = nn.Sequential(shared, nn.ReLU())
    model = nn.Module()
    model.first = inner
    model.second = nn.Sequential(shared)  # the same module under two parents
    model.register_module("absent", None)  # a child slot left empty
    listed = every_module(model)
    assert len(listed) == len(list(model.modules())) == 5
    assert sum(m is shared for m in listed) == 1
    position = {id(m): i for i, m in enumerate(listed)}
    for parent in listed:  # parents before their children
        for child in parent.children():
            assert position[id(parent)] < position[id(child)]


def test_a_shared_encoder_decoder_embedding_is_listed_once():
    model = tiny_model("t5")
    embedding = model.get_input_embeddings()
    assert sum(m is embedding for m in every_module(model)) == 1
