"""``attribute`` on a long unpadded decoder input needs extra memory linear in its length."""

from __future__ import annotations

import pytest

from benchmarks.bench_memory import measure_in_subprocess

LENGTH = 16_384
# A linear budget: 10 KiB per token (160 MiB at 16k tokens; about 70-110 MiB measured). One
# n x n boolean mask alone is 256 MiB at this length, and a float one 1 GiB.
BUDGET_MIB = 10 * LENGTH / 1024


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_extra_peak_memory_at_16k_tokens_is_linear(name):
    extra = measure_in_subprocess(name, LENGTH)["extra_mib"]
    assert extra <= BUDGET_MIB, f"{name}: {extra:.0f} MiB over {BUDGET_MIB:.0f} MiB at n={LENGTH}"
