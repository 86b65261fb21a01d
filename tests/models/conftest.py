"""Model tests run torch single-threaded.

The tiny models gain nothing from intra-op threads, and on a loaded 2-core machine two threads
contend badly: a small linear layer is far slower with two threads than with one.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def single_threaded_torch():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
