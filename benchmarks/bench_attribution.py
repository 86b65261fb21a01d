"""Attribution benchmark: EfficientAttentionAttribution next to Saliency and IntegratedGradients.

On the fine-tuned MiniLM sentiment classifier and real IMDB reviews truncated to n word pieces
(``--texts tweets``: real tweets, short and of different lengths, padded to the longest of the
batch), for each thread count and batch size, every method runs once per round in a rotating order
(:mod:`benchmarks.timing`) and is divided by the same round's plain forward pass. The table gives
the median of those per-round ratios and their interquartile range; nothing is a "best of".

Methods (all layers and heads of MiniLM):

- ``forward``: one plain forward pass under ``torch.no_grad()`` (the unit);
- ``capture alone``: the same forward pass under ``capture_attention`` as ``attribute`` opens it
  (queries, keys and values recorded and carried over to the next capture, which reuses their
  memory; no rows, no projection): what reading attention costs before any view; ``capture,
  freed at its end``: the same with the record freed when the call ends (``capture_attention``'s
  default, and ``attribute``'s before the carryover);
- ``projection alone``: projecting the captured [CLS] rows of a forward pass run beforehand, on the
  round's torch threads (no forward pass, nothing overlapped): the CPU work the efficient view
  adds; ``projection alone, every row`` likewise for every row (at ``--all-rows-sizes``);
- ``efficient`` / ``effective`` / ``raw``: ``attribute(view=...)``, default query ([CLS] rows);
- ``efficient, stop_early=True``: the same, its forward pass ended once the last layer's queries,
  keys and values are recorded (that layer's attention output, its feed-forward block and the
  classifier never run);
- ``efficient+gradient``: ``attribute(weighting="gradient")``, class-specific (one backward pass);
- ``efficient, query="all"``: every real row (at ``--all-rows-sizes`` only; it is the slow one);
- Captum's Saliency and IntegratedGradients (``n_steps=50``, at ``--ig-sizes`` and batch 1 only:
  at 50-100 forward passes a round it dominates the run).

Run: ``PYTHONPATH=. python benchmarks/bench_attribution.py [--quick]`` (builds or loads the
classifier; ``--quick`` is a few rounds at two sizes, to check the script).
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from captum.attr import IntegratedGradients, Saliency

from benchmarks.timing import RatioSummary, interleaved, machine_line
from captum_effattn import EfficientAttentionAttribution
from captum_effattn.attr._queries import select_query_rows
from captum_effattn.attr._views import get_view, project_layers
from captum_effattn.models import capture_attention
from captum_effattn.models.carryover import CaptureCarryover


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--ig-sizes", type=int, nargs="*", default=[64, 128])
    parser.add_argument("--all-rows-sizes", type=int, nargs="*", default=[128, 256])
    parser.add_argument(
        "--texts",
        choices=("imdb", "tweets"),
        default="imdb",
        help="IMDB reviews truncated to n word pieces (default), or real tweets batched as they "
        "come, padded to the longest (n only truncates)",
    )
    parser.add_argument("--quick", action="store_true", help="3 rounds, n = 64 and 128")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.rounds, args.batches = [64, 128], 3, [1, 2]
        args.ig_sizes, args.all_rows_sizes = [64], [64]
    return args


def main() -> None:
    args = parse_args()
    # Captum says this on every Saliency call with a plain tensor; it is expected here.
    warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")
    from captum_effattn.data import imdb_heldout, load_sentiment_classifier, load_tweets

    classifier = load_sentiment_classifier()
    model, tokenizer = classifier.model.eval(), classifier.tokenizer
    longest, most = max(args.sizes), max(args.batches)
    if args.texts == "tweets":
        texts = [r.text for r in load_tweets()[:most]]
    else:
        texts = [
            r.text for r in imdb_heldout(400) if len(tokenizer(r.text)["input_ids"]) >= longest
        ]
    if len(texts) < most:
        raise SystemExit(f"only {len(texts)} held-out reviews have {longest} word pieces")

    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batches:
            print(f"\n### {threads} thread(s), batch {batch}\n\n{machine_line()}\n", flush=True)
            columns = {}
            for n in args.sizes:
                enc = tokenizer(
                    texts[:batch], return_tensors="pt", truncation=True, max_length=n, padding=True
                )
                if args.texts == "tweets":
                    lengths = enc["attention_mask"].sum(-1).tolist()
                    print(f"n = {n}: tweets of {lengths} word pieces", flush=True)
                methods = build_methods(model, enc, args, n, batch)
                columns[n] = interleaved(methods, unit="forward", rounds=args.rounds)
            print_table(columns)


class ClassifierBatch(NamedTuple):
    """One encoded batch of the classifier, as every attribution benchmark times it."""

    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (embeddings, mask) -> logits
    embeddings: torch.Tensor
    mask: torch.Tensor
    kwargs: dict[str, Any]  # ``target`` (the predicted class) and the mask as forward argument
    attribution: EfficientAttentionAttribution
    plain: Callable[[], None]  # one forward pass without gradients: the unit


def classifier_batch(model, enc) -> ClassifierBatch:
    """The forward function on embeddings, its predicted classes as targets, the attribution and
    the plain forward pass for one encoded batch ``enc``."""
    mask = enc["attention_mask"]
    embeddings = model.get_input_embeddings()(enc["input_ids"]).detach()

    def forward(inputs_embeds, attention_mask):
        return model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).logits

    with torch.no_grad():
        target = forward(embeddings, mask).argmax(-1)

    def plain():
        with torch.no_grad():
            forward(embeddings, mask)

    kwargs = {"target": target, "additional_forward_args": (mask,)}
    attribution = EfficientAttentionAttribution(forward, model=model)
    return ClassifierBatch(forward, embeddings, mask, kwargs, attribution, plain)


def build_methods(model, enc, args, n: int, batch: int) -> dict[str, Callable[[], object]]:
    """Zero-argument callables on one encoded batch, the plain forward pass first."""
    forward, embeddings, mask, kwargs, attention, plain = classifier_batch(model, enc)

    def capture(carryover):
        with torch.no_grad(), capture_attention(model, materialize=False, carryover=carryover):
            forward(embeddings, mask)

    # The projection as `attribute` runs it (internal API), on layers captured once beforehand.
    with torch.no_grad(), capture_attention(model, materialize=False) as record:
        forward(embeddings, mask)
    captured, efficient = record.layers, get_view("efficient")

    def projection_alone(query):
        rows = select_query_rows(query, captured[0].key_mask, captured[0].causal)
        with torch.no_grad():
            project_layers(captured, rows, efficient)

    carryover = CaptureCarryover()
    methods: dict[str, Callable[[], object]] = {
        "forward": plain,
        "capture alone": lambda: capture(carryover),
        "capture, freed at its end": lambda: capture(None),
    }
    methods["projection alone"] = lambda: projection_alone("auto")
    for view in ("efficient", "effective", "raw"):
        methods[view] = lambda view=view: attention.attribute(embeddings, view=view, **kwargs)
    methods["efficient, stop_early=True"] = lambda: attention.attribute(
        embeddings, stop_early=True, **kwargs
    )
    methods["efficient+gradient"] = lambda: attention.attribute(
        embeddings, weighting="gradient", **kwargs
    )
    if n in args.all_rows_sizes and batch == 1:
        methods['efficient, query="all"'] = lambda: attention.attribute(
            embeddings, query="all", **kwargs
        )
        methods["projection alone, every row"] = lambda: projection_alone("all")
    saliency = Saliency(forward)
    methods["Saliency"] = lambda: saliency.attribute(embeddings, **kwargs)
    if n in args.ig_sizes and batch == 1:
        ig = IntegratedGradients(forward)
        methods["IntegratedGradients (50)"] = lambda: ig.attribute(
            embeddings, n_steps=50, internal_batch_size=25, **kwargs
        )
    return methods


def print_table(columns: dict[int, dict[str, RatioSummary]]) -> None:
    """One Markdown table: methods down, sizes across, median per-round ratio [IQR]."""
    sizes = list(columns)
    names = list(dict.fromkeys(name for column in columns.values() for name in column))
    print("| method | " + " | ".join(f"n = {n}" for n in sizes) + " |")
    print("| --- |" + " --- |" * len(sizes))
    for name in names:
        cells = []
        for n in sizes:
            summary = columns[n].get(name)
            if summary is None:
                cells.append("")
            elif name == "forward":
                cells.append(f"{summary.median_seconds * 1e3:.1f} ms")
            else:
                cells.append(summary.cell())
        print(f"| {name} | " + " | ".join(cells) + " |")
    # method -> its label in the row's title (a comma there would read as a separator)
    faulted = {
        "forward": "forward",
        "capture alone": "capture alone",
        "capture, freed at its end": "capture freed",
        "efficient": "efficient",
    }
    cells = [" / ".join(_faults(columns[n][name]) for name in faulted) for n in sizes]
    title = f"page faults a call ({' / '.join(faulted.values())})"
    print(f"| {title} | " + " | ".join(cells) + " |")
    rounds = next(iter(columns.values()))["forward"].rounds
    print(f"\n(medians of {rounds} per-round ratios to the same round's forward pass, [IQR];")
    print("page faults: median minor faults of the process during a call, memory touched anew)")


def _faults(summary: RatioSummary) -> str:
    return "?" if summary.median_faults is None else f"{summary.median_faults:.0f}"


if __name__ == "__main__":
    main()
