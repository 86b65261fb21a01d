"""Random projection problems for the tests (seeded, float64 unless asked otherwise)."""

from __future__ import annotations

import torch


def attention_rows(
    *shape: int, sharpness: float = 1.0, generator: torch.Generator, dtype=torch.float64
) -> torch.Tensor:
    """Softmax rows of shape ``shape`` (last dim = keys); larger ``sharpness`` = peakier rows."""
    scores = torch.randn(*shape, generator=generator, dtype=torch.float64) * sharpness
    return scores.softmax(-1).to(dtype)


def value_vectors(*shape: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)


def head_output_error(x: torch.Tensor, a: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``||x V - a V|| / ||a V||`` per row, in float64."""
    x, a, values = x.double(), a.double(), values.double()
    return ((x - a) @ values).norm(dim=-1) / (a @ values).norm(dim=-1)
