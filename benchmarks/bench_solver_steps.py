"""Where the Newton steps go: the solver's iterations on real rows, by the kind of row.

The compiled Newton phase costs about the same per step whatever the row, so its time is its step
count. This script counts steps (deterministic: no timing, the same on any machine) on every
selected row of every head of the fine-tuned MiniLM sentiment classifier, on real IMDB reviews
truncated to ``n`` word pieces, and splits them two ways:

- by the size of the efficient row's support (its non-zero keys) against ``r = d + 1`` (33 for
  MiniLM), the number of constraints: a row with exactly ``r`` keys is a vertex of its valid set,
  where the dual Newton method adds keys back about one per step after a Newton step that drops
  part of the support;
- by the row's largest attention weight: near-one-hot rows are nearly linear programs, and their
  dual optimum lies far out.

Rows: ``--query cls`` the [CLS] row of each head (the default attribution), ``--query all`` every
real row (``query="all"``). Run: ``PYTHONPATH=. python benchmarks/bench_solver_steps.py --query cls
--sizes 128 --reviews 20`` (``--quick``: two reviews at n = 64).
"""

from __future__ import annotations

import argparse
import itertools
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from benchmarks.timing import machine_line
from captum_effattn import efficient_attention
from captum_effattn.projection import ConvergenceWarning

MAX_WEIGHT_EDGES = (0.0, 0.5, 0.9, 0.99, 0.999, 1.0)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--reviews", type=int, default=20)
    parser.add_argument("--query", choices=("cls", "all"), default="cls")
    parser.add_argument("--quick", action="store_true", help="two reviews at n = 64")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.reviews = [64], 2
    return args


def captured_rows(model, tokenizer, text: str, n: int, query: str):
    """``(rows (H, Q, n), values (H, n, d))``: the selected rows of every head of every layer."""
    from captum_effattn.models import capture_attention

    batch = tokenizer(text, return_tensors="pt", truncation=True, max_length=n)
    with torch.no_grad(), capture_attention(model, materialize=False) as record:
        model(**batch)
    first = torch.zeros(1, 1, dtype=torch.long)
    rows = [(layer.rows(first) if query == "cls" else layer.attn)[0] for layer in record.layers]
    return torch.cat(rows), torch.cat([layer.values[0] for layer in record.layers])


def table(title: str, labels: list[str], groups: torch.Tensor, steps: torch.Tensor) -> None:
    """Rows and steps of each group (``groups`` ``(R,)`` indices into ``labels``)."""
    total_rows, total_steps = len(steps), max(int(steps.sum()), 1)
    print(f"\n| {title} | rows | share of rows | mean steps | share of steps |")
    print("| --- | --- | --- | --- | --- |")
    for index, label in enumerate(labels):
        chosen = steps[groups == index]
        if not len(chosen):
            continue
        print(
            f"| {label} | {len(chosen)} | {len(chosen) / total_rows:.1%} | "
            f"{chosen.double().mean():.1f} | {int(chosen.sum()) / total_steps:.1%} |"
        )


def main() -> None:
    args = parse_args()
    from captum_effattn.data import imdb_heldout, load_sentiment_classifier

    classifier = load_sentiment_classifier()
    model, tokenizer = classifier.model.eval(), classifier.tokenizer
    longest = max(args.sizes)
    texts = [r.text for r in imdb_heldout(400) if len(tokenizer(r.text)["input_ids"]) >= longest]
    texts = texts[: args.reviews]
    print(machine_line())
    for n in args.sizes:
        steps, support, max_weight, width = [], [], [], 0
        for text in texts:
            rows, values = captured_rows(model, tokenizer, text, n, args.query)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                x, certificate = efficient_attention(rows, values, return_certificate=True)
            steps.append(certificate.iterations.flatten())
            support.append((x > 0).sum(-1).flatten())
            max_weight.append(rows.amax(-1).double().flatten())
            width = values.shape[-1]
        all_steps, all_support = torch.cat(steps), torch.cat(support)
        r = width + 1
        print(
            f"\n### n = {n}, {args.query} rows of {len(texts)} reviews: {len(all_steps)} rows, "
            f"{int(all_steps.sum())} steps (mean {all_steps.double().mean():.1f}, max "
            f"{int(all_steps.max())}); r = {r}"
        )
        by_support = torch.bucketize(all_support, torch.tensor([r, r + 1, r + 10]), right=True)
        table(
            "efficient row's support",
            [f"< {r} keys", f"exactly {r} (a vertex)", f"{r + 1} to {r + 9}", f">= {r + 10}"],
            by_support,
            all_steps,
        )
        edges = torch.tensor(MAX_WEIGHT_EDGES[1:-1], dtype=torch.float64)
        by_weight = torch.bucketize(torch.cat(max_weight), edges, right=True)
        bounds = list(itertools.pairwise(MAX_WEIGHT_EDGES))
        labels = [f"[{lo:g}, {hi:g})" for lo, hi in bounds[:-1]] + [f"[{bounds[-1][0]:g}, 1]"]
        table("largest attention weight", labels, by_weight, all_steps)


if __name__ == "__main__":
    main()
