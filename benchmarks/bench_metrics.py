"""Metrics benchmark: raw / effective / efficient attention, IntegratedGradients and Saliency scored
with every metric on real held-out reviews, side by side in one run.

On the fine-tuned MiniLM sentiment classifier (``captum_effattn.data.classifier``), explaining the
true label:

- ``--sentences`` held-out Rotten Tomatoes sentences (default 100);
- ``--reviews`` held-out IMDB reviews truncated to ``--max-length`` word pieces (default 50, 256).

Every metric with its defaults (``captum_effattn.metrics.default_metrics``: infidelity with 10
Bernoulli(0.2) token removals, normalized; sensitivity_max with 5 gate-noise samples of radius 0.1;
ERASER comprehensiveness and sufficiency, AOPC over 1/5/10/20/50%; deletion and insertion AUC over
10 steps); IntegratedGradients with ``--ig-steps`` (default 50). Prints one summary table per
dataset (mean ± std over examples, and attribution seconds per example) and writes the records as
CSV next to ``--out``.

Run: ``PYTHONPATH=. python benchmarks/bench_metrics.py [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from benchmarks.timing import machine_line
from captum_effattn.data import (
    imdb_heldout,
    load_sentiment_classifier,
    rotten_tomatoes_splits,
)
from captum_effattn.metrics import TokenGate, compare_methods, standard_methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=100)
    parser.add_argument("--reviews", type=int, default=50)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--ig-steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="8 sentences, 4 reviews")
    parser.add_argument(
        "--datasets",
        nargs="+",
        choices=("rotten_tomatoes", "imdb"),
        default=["rotten_tomatoes", "imdb"],
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if args.quick:
        args.sentences, args.reviews = 8, 4
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    classifier = load_sentiment_classifier()
    gate = TokenGate(classifier.model, classifier.tokenizer)
    methods = standard_methods(gate, ig_steps=args.ig_steps)
    datasets = {
        "rotten_tomatoes": (rotten_tomatoes_splits().test[: args.sentences], 64),
        "imdb": (imdb_heldout(args.reviews), args.max_length),
    }
    print(f"{machine_line()}\nIG n_steps {args.ig_steps}, batch size {args.batch_size}")
    for name in args.datasets:
        reviews, max_length = datasets[name]
        started = time.perf_counter()
        result = compare_methods(
            gate,
            [r.text for r in reviews],
            [r.label for r in reviews],
            methods,
            batch_size=args.batch_size,
            max_length=max_length,
        )
        lengths = [
            len(classifier.tokenizer(r.text, truncation=True, max_length=max_length)["input_ids"])
            for r in reviews
        ]
        print(
            f"\n## {name}: {len(reviews)} held-out examples, {min(lengths)}-{max(lengths)} word "
            f"pieces (median {sorted(lengths)[len(lengths) // 2]}), "
            f"{time.perf_counter() - started:.0f} s in all\n"
        )
        print(result.format())
        result.to_csv(args.out / f"metrics_{name}.csv")


if __name__ == "__main__":
    main()
