"""The compat module is the only importer of Captum's private helpers, and each of its wrappers
behaves as the installed Captum's own helper (where it differs, on purpose, the test says so)."""

from __future__ import annotations

import re
from pathlib import Path

import captum
import pytest
import torch
from captum._utils import common, typing
from captum.attr import Attribution as PublicAttribution

from captum_effattn import _captum_compat as compat

PACKAGE = Path(compat.__file__).parent


def test_no_other_module_imports_captum_privates():
    private = re.compile(r"^\s*(from|import)\s+captum(\.\w+)*\._", re.M)
    offenders = [
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*.py")
        if path != Path(compat.__file__) and private.search(path.read_text())
    ]
    assert offenders == []
    assert private.search(Path(compat.__file__).read_text())  # the pattern does match


def test_the_installed_captum_is_a_tested_release():
    major_minor = {".".join(v.split(".")[:2]) for v in compat.TESTED_CAPTUM_VERSIONS}
    assert ".".join(captum.__version__.split(".")[:2]) in major_minor


def test_reexported_types_are_captums():
    assert compat.Attribution is PublicAttribution
    assert compat.TargetType == typing.TargetType
    assert compat.TensorOrTupleOfTensorsGeneric is typing.TensorOrTupleOfTensorsGeneric


def test_is_tuple_matches_captum():
    tensor = torch.ones(2, 3)
    for inputs in (tensor, (tensor,), (tensor, tensor)):
        assert compat.is_tuple(inputs) == common._is_tuple(inputs)
    assert compat.is_tuple((tensor,))
    assert not compat.is_tuple(tensor)


def test_format_tensor_into_tuples_matches_captum():
    a, b = torch.ones(2, 3), torch.zeros(2)
    for inputs in (a, (a,), (a, b)):
        ours = compat.format_tensor_into_tuples(inputs)
        theirs = common._format_tensor_into_tuples(inputs)
        assert isinstance(ours, tuple)
        assert theirs is not None
        assert len(ours) == len(theirs)
        assert all(x is y for x, y in zip(ours, theirs, strict=True))
    pair = (a, b)
    assert compat.format_tensor_into_tuples(pair) is pair  # a tuple passes through, not copied


def test_format_tensor_into_tuples_rejects_what_captum_rejects_with_a_type_error():
    with pytest.raises(AssertionError):
        common._format_tensor_into_tuples([torch.ones(1)])  # Captum asserts
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor or a tuple"):
        compat.format_tensor_into_tuples([torch.ones(1)])  # type: ignore[arg-type]
    assert common._format_tensor_into_tuples(None) is None  # Captum passes None through
    with pytest.raises(TypeError, match="got None"):
        compat.format_tensor_into_tuples(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "extra",
    [torch.ones(2), (torch.ones(2), 3), [1, 2], 5, "text", ()],
    ids=["tensor", "tuple", "list", "int", "str", "empty"],
)
def test_format_additional_forward_args_matches_captum(extra):
    ours, theirs = (
        compat.format_additional_forward_args(extra),
        common._format_additional_forward_args(extra),
    )
    assert isinstance(ours, tuple)
    assert len(ours) == len(theirs)
    assert all(x is y for x, y in zip(ours, theirs, strict=True))


def test_no_additional_forward_args_become_an_empty_tuple():
    assert common._format_additional_forward_args(None) is None
    assert compat.format_additional_forward_args(None) == ()


def test_format_output_matches_captum():
    a, b = torch.ones(2), torch.zeros(2)
    assert compat.format_output(False, (a,)) is common._format_output(False, (a,)) is a
    both = (a, b)
    assert compat.format_output(True, both) is common._format_output(True, both) is both
    with pytest.raises(AssertionError):
        compat.format_output(False, both)  # a tensor input cannot get two outputs


def test_pretty_tokens_match_captum():
    from captum.attr._core.llm_attr import _convert_ids_to_pretty_tokens

    from tests.attr.tiny_tokenizer import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    ids = torch.tensor(tokenizer.encode("the movie was good", add_special_tokens=False))
    ours = compat.convert_ids_to_pretty_tokens(ids, tokenizer)
    assert ours == _convert_ids_to_pretty_tokens(ids, tokenizer)
    assert isinstance(ours, list)
    assert len(ours) == len(ids)
