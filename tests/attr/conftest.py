"""Attribution tests run tiny models: single-threaded torch, as in tests/models."""

from tests.models.conftest import single_threaded_torch

__all__ = ["single_threaded_torch"]
