"""``bench_attribution.py``'s methods run on the real classifier: its *capture alone* and
*projection alone* rows call the package's internals (``capture_attention``, ``project_layers``),
which a refactoring could break without any other test noticing."""

from __future__ import annotations

import argparse

import torch

from benchmarks.bench_attribution import build_methods
from captum_effattn.models import _interface

REVIEW = "A gripping, beautifully shot film whose ending I will not forget."


def test_every_method_runs_and_leaves_the_model_as_it_was(sentiment_classifier):
    model, tokenizer = sentiment_classifier.model, sentiment_classifier.tokenizer
    enc = tokenizer([REVIEW], return_tensors="pt")
    n = enc["input_ids"].shape[1]
    args = argparse.Namespace(all_rows_sizes=[n], ig_sizes=[])
    threads = torch.get_num_threads()
    methods = build_methods(model, enc, args, n, batch=1)
    assert list(methods)[:4] == [
        "forward",
        "capture alone",
        "capture, freed at its end",
        "projection alone",
    ]
    assert {"efficient", "raw", 'efficient, query="all"', "projection alone, every row"} <= set(
        methods
    )
    assert "IntegratedGradients (50)" not in methods  # not at this size
    for method in methods.values():
        method()
    assert not _interface.active_taps()  # every capture closed
    assert torch.get_num_threads() == threads
    assert not model.training
