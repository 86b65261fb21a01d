"""Small solves run on one CPU thread and give the caller's thread setting back."""

from __future__ import annotations

import pytest
import torch

from captum_effattn import efficient_attention
from captum_effattn.projection.engine.threads import SINGLE_THREAD_WORK, threads_for

CPU = torch.device("cpu")


def test_small_work_runs_on_one_thread_and_restores(two_threads):
    with threads_for(1000, CPU):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_large_work_keeps_the_threads(two_threads):
    with threads_for(SINGLE_THREAD_WORK, CPU):
        assert torch.get_num_threads() == 2


def test_the_setting_comes_back_when_the_block_raises(two_threads):
    with pytest.raises(RuntimeError, match="inside"), threads_for(10, CPU):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == 2


def test_projection_leaves_the_thread_setting_as_it_was(two_threads):
    gen = torch.Generator().manual_seed(0)
    attn = torch.softmax(torch.randn(3, 1, 40, generator=gen, dtype=torch.float64), -1)
    values = torch.randn(3, 40, 6, generator=gen, dtype=torch.float64)
    small = efficient_attention(attn, values)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    torch.testing.assert_close(efficient_attention(attn, values), small, atol=1e-12, rtol=0)
