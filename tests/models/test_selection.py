"""Layer/head selection: every accepted spelling, and a specific error for every bad one."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from captum_effattn.models import HeadSelection, describe_model, select_heads
from captum_effattn.models.selection import select_architecture_heads
from tests.models.tiny import NUM_HEADS, NUM_LAYERS, tiny_model


def parse(layers=None, heads=None, num_layers=6, num_heads=12):
    return HeadSelection.parse(layers, heads, num_layers=num_layers, num_heads=num_heads)


ALL12 = tuple(range(12))


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        (None, (0, 1, 2, 3, 4, 5)),
        ("all", (0, 1, 2, 3, 4, 5)),
        (2, (2,)),
        (-1, (5,)),
        (-6, (0,)),
        (slice(1, 4), (1, 2, 3)),
        (slice(None, None, -2), (1, 3, 5)),
        ([4, -6, 2], (0, 2, 4)),
        ((3,), (3,)),
        (range(2, 4), (2, 3)),
    ],
)
def test_layer_spellings(layers, expected):
    selection = parse(layers)
    assert selection.layers == expected
    assert selection.heads == (ALL12,) * len(expected)


@pytest.mark.parametrize(
    ("heads", "expected"),
    [
        (None, ALL12),
        ("all", ALL12),
        (3, (3,)),
        (-1, (11,)),
        ([5, 0, -2], (0, 5, 10)),
        (slice(0, 3), (0, 1, 2)),
    ],
)
def test_head_spellings_apply_to_every_layer(heads, expected):
    selection = parse([1, 3], heads)
    assert selection.heads == (expected, expected)


def test_head_mapping_per_layer():
    selection = parse(None, {-1: [0, 1], 2: "all", 0: 7})
    assert selection.layers == (0, 2, 5)
    assert selection.heads == ((7,), ALL12, (0, 1))
    # With explicit layers, layers the mapping does not name get every head.
    selection = parse([1, 2], {2: -1})
    assert selection.heads == (ALL12, (11,))
    assert selection.heads_of(2) == (11,)
    assert list(selection.items()) == [(1, ALL12), (2, (11,))]
    assert selection.num_selected_heads == 13


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"layers": 7},
            IndexError,
            r"layer 7 is out of range for a model with 6 layers \(valid: -6\.\.5\)",
        ),
        (
            {"layers": -7},
            IndexError,
            r"layer -7 is out of range for a model with 6 layers \(valid: -6\.\.5\)",
        ),
        ({"layers": [0, 9]}, IndexError, r"layer 9 is out of range"),
        (
            {"heads": 12},
            IndexError,
            r"head 12 is out of range in layer 0 of a model with 12 heads per layer "
            r"\(valid: -12\.\.11\)",
        ),
        ({"heads": {4: [0, -13]}}, IndexError, r"head -13 is out of range in layer 4 "),
        ({"heads": {6: 0}}, IndexError, r"layer 6 is out of range for a model with 6 layers"),
        ({"layers": [1, -5]}, ValueError, r"layer -5 is selected twice \(as 1\)"),
        ({"heads": [2, 2]}, ValueError, r"head 2 is selected twice in layer 0"),
        ({"heads": {1: 0, -5: 1}}, ValueError, r"heads names layer 1 twice"),
        (
            {"layers": [0, 1], "heads": {3: 0}},
            ValueError,
            r"heads names layer 3, which is not among the selected layers \(0, 1\)",
        ),
        ({"layers": []}, ValueError, r"layers=\[\] selects no layer"),
        ({"layers": slice(4, 2)}, ValueError, r"selects no layer for a model with 6 layers"),
        ({"heads": slice(20, None)}, ValueError, r"selects no head in layer 0"),
        ({"layers": "every"}, ValueError, r"got the string 'every'"),
        ({"layers": True}, TypeError, r"not booleans; got True"),
        ({"heads": [1.5]}, TypeError, r"head indices must be ints; got 1.5 \(float\)"),
        ({"heads": {"a": 1}}, TypeError, r"layer indices must be ints; got 'a'"),
    ],
)
def test_bad_specs_get_specific_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        parse(**kwargs)


def test_selection_is_immutable_and_hashable():
    a, b = parse([0, 1], [2, 3]), parse(slice(0, 2), [3, 2])
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b, parse([0, 1])}) == 2
    with pytest.raises(AttributeError):
        a.layers = (3,)


def test_direct_construction_is_validated():
    with pytest.raises(ValueError, match="distinct, ascending"):
        HeadSelection((2, 1), ((0,), (0,)), 6, 12)
    with pytest.raises(ValueError, match="heads of layer 1"):
        HeadSelection((1,), ((12,),), 6, 12)
    with pytest.raises(ValueError, match="one tuple of heads per layer"):
        HeadSelection((1, 2), ((0,),), 6, 12)


@pytest.mark.parametrize(
    ("layers", "heads", "expected"),
    [
        (None, None, True),
        (slice(2, 5), "all", True),
        (3, None, True),
        ([1, 3], None, False),
        (slice(2, 5), {3: [0, 1]}, False),
        (slice(2, 5), list(range(12)), True),
    ],
)
def test_all_heads_of_consecutive_layers(layers, heads, expected):
    assert parse(layers, heads).all_heads_of_consecutive_layers is expected


def test_select_heads_reads_the_model_size():
    model = tiny_model("llama")
    selection = select_heads(model, layers=-1, heads=[0, -1])
    assert (selection.num_layers, selection.num_heads) == (NUM_LAYERS, NUM_HEADS)
    assert selection.layers == (NUM_LAYERS - 1,)
    assert selection.heads == ((0, NUM_HEADS - 1),)
    with pytest.raises(
        IndexError,
        match=rf"layer {NUM_LAYERS} is out of range for a model with {NUM_LAYERS} layers",
    ):
        select_heads(model, layers=NUM_LAYERS)


sizes = st.tuples(st.integers(1, 8), st.integers(1, 8))


@given(sizes, st.data())
def test_integer_lists_select_what_python_indexing_selects(size, data):
    num_layers, num_heads = size
    layer_list = data.draw(
        st.lists(
            st.integers(-num_layers, num_layers - 1), min_size=1, unique_by=lambda i: i % num_layers
        )
    )
    head_list = data.draw(
        st.lists(
            st.integers(-num_heads, num_heads - 1), min_size=1, unique_by=lambda i: i % num_heads
        )
    )
    selection = HeadSelection.parse(
        layer_list, head_list, num_layers=num_layers, num_heads=num_heads
    )
    layer_range, head_range = list(range(num_layers)), list(range(num_heads))
    assert selection.layers == tuple(sorted(layer_range[i] for i in layer_list))
    assert selection.heads == (tuple(sorted(head_range[i] for i in head_list)),) * len(layer_list)


@given(sizes, st.slices(10))
def test_slices_select_what_python_slicing_selects(size, layer_slice):
    num_layers, num_heads = size
    expected = tuple(sorted(range(num_layers)[layer_slice]))
    if not expected:
        with pytest.raises(ValueError, match="selects no layer"):
            HeadSelection.parse(layer_slice, num_layers=num_layers, num_heads=num_heads)
        return
    selection = HeadSelection.parse(layer_slice, num_layers=num_layers, num_heads=num_heads)
    assert selection.layers == expected
    assert selection.all_heads_of_consecutive_layers == (
        expected == tuple(range(expected[0], expected[-1] + 1))
    )


@given(sizes, st.integers(-50, 50))
def test_out_of_range_indices_name_the_index_and_the_range(size, index):
    num_layers, num_heads = size
    if -num_layers <= index < num_layers:
        assert HeadSelection.parse(index, num_layers=num_layers, num_heads=num_heads).layers == (
            index % num_layers,
        )
    else:
        with pytest.raises(IndexError) as error:
            HeadSelection.parse(index, num_layers=num_layers, num_heads=num_heads)
        assert f"layer {index} is out of range" in str(error.value)
        assert f"(valid: {-num_layers}..{num_layers - 1})" in str(error.value)


def test_an_index_out_of_range_is_both_an_index_and_a_value_error():
    from captum_effattn.models import select_heads
    from tests.models.tiny import tiny_model

    model = tiny_model("bert")
    for kwargs in ({"layers": 9}, {"heads": 7}):
        with pytest.raises(ValueError, match="out of range"):
            select_heads(model, **kwargs)
        with pytest.raises(IndexError, match="out of range"):
            select_heads(model, **kwargs)


@pytest.mark.parametrize(
    ("layers", "heads"),
    [(None, None), (-1, [0, -1]), ([0, 1], {1: 0}), ("all", slice(1, None))],
)
def test_selection_from_a_described_model_is_select_heads(layers, heads):
    model = tiny_model("bert")
    architecture = describe_model(model)
    assert select_architecture_heads(architecture, layers, heads) == select_heads(
        model, layers, heads
    )
    with pytest.raises(IndexError, match=rf"layer {NUM_LAYERS} is out of range"):
        select_architecture_heads(architecture, layers=NUM_LAYERS)
