"""Shared fixtures: the real offline MiniLM checkpoint and a real IMDB review."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Kernel tests run in Triton's interpreter on CPU (set TRITON_INTERPRET=0 on a CUDA machine to
# test the compiled kernels). It must be set before anything imports triton: transformers does,
# when test modules are collected, long before tests/kernels/conftest.py is read.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def minilm_dir():
    from captum_effattn.data import minilm_path

    return minilm_path()


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="session")
def long_imdb_review(minilm_tokenizer):
    """The first IMDB review of the package with at least 256 word pieces."""
    from captum_effattn.data import load_reviews

    for review in load_reviews("imdb"):
        if len(minilm_tokenizer(review.text)["input_ids"]) >= 256:
            return review.text
    raise AssertionError("no IMDB review of 256 word pieces")


@pytest.fixture(scope="session")
def sentiment_classifier(request):
    """MiniLM fine-tuned on Rotten Tomatoes (`captum_effattn.data.load_sentiment_classifier`): a
    ``SentimentClassifier`` with ``model`` (eval mode), ``tokenizer``, ``labels``, ``metadata``.

    Fine-tuned once (minutes of CPU) when the cache ($CAPTUM_EFFATTN_CACHE, else
    ~/.cache/captum_effattn) has none, then loaded from it. The fine-tune says so and shows its
    progress bar on the terminal, past pytest's output capture. Shared by the whole session: a
    test that changes the model (hooks, modes, attention implementation) must restore it.
    """
    from captum_effattn.data import load_sentiment_classifier

    with uncaptured(request):
        return load_sentiment_classifier(progress=True)


@contextlib.contextmanager
def uncaptured(request):
    """Let output through to the terminal, past pytest's capture (for long fixtures)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is None:
        yield
        return
    with capture.global_and_fixture_disabled():
        yield


@pytest.fixture
def two_threads():
    """PyTorch on two CPU threads for the test (the setting is put back afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
