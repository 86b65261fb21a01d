"""Projection benchmark: effective and efficient attention against the obvious references.

For 12 heads, d in {32, 64} and n in {64, 128, 256, 512}, measured side by side in one run:

- effective attention by thin QR (this package) vs the full-SVD route of Sun & Marasovic's public
  code (null space from a full ``n x n`` U), with the largest difference between the two;
- efficient attention for all rows of all heads (this package) vs a per-row generic QP solver
  (scipy SLSQP) timed on a sample of rows and extrapolated to all rows;
- semismooth-Newton / interior-point iteration counts (median / max) and the worst output error.

The three routes run in interleaved rounds (:mod:`benchmarks.timing`): medians of their times, and
the SVD/QR ratio as the median [IQR] of per-round ratios; nothing is a "best of".

Rows come from the real MiniLM (layer ``--layer``, 12 heads, d = 32) on a real IMDB review
truncated to n tokens, and from synthetic heads (softmax of Gaussian scores, Gaussian values) for
d = 64. Run: ``PYTHONPATH=. python benchmarks/bench_projection.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from benchmarks.timing import interleaved, machine_line
from captum_effattn import effective_attention, efficient_attention
from tests.reference import efficient_by_slsqp  # the tests' independent per-row QP solver

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def effective_by_full_svd(attn: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Reference route: full SVD of V, subtract the component in its left null space."""
    u, s, _ = torch.linalg.svd(values.double(), full_matrices=True)
    rank = (s > s[..., :1] * max(values.shape[-2:]) * torch.finfo(torch.float64).eps).sum(-1)
    null = u[..., :, int(rank.min()) :]
    a = attn.double()
    return a - (a @ null) @ null.mT


def minilm_heads(n: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(12, n, n) attention and (12, n, 32) values of one MiniLM layer on a real IMDB review."""
    from transformers import AutoModel, AutoTokenizer

    from captum_effattn.data import load_reviews, minilm_path

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    text = next(r.text for r in load_reviews("imdb") if len(tokenizer(r.text)["input_ids"]) >= n)
    enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=n)
    captured = []
    value_layer = model.encoder.layer[layer].attention.self.value
    hook = value_layer.register_forward_hook(lambda m, i, out: captured.append(out))
    try:
        with torch.no_grad():
            out = model(**enc, output_attentions=True)
    finally:
        hook.remove()
    values = captured[0].view(1, n, 12, 32).transpose(1, 2)[0]
    return out.attentions[layer][0], values


def synthetic_heads(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    attn = (torch.randn(12, n, n, generator=g, dtype=torch.float64) * 3.0).softmax(-1)
    return attn, torch.randn(12, n, d, generator=g, dtype=torch.float64)


def run_case(source: str, attn, values, sample_rows: int, rounds: int) -> dict:
    heads, n, _ = attn.shape
    results = {}
    routes = {
        "qr": lambda: effective_attention(attn, values),
        "svd": lambda: effective_by_full_svd(attn, values),
        "efficient": lambda: efficient_attention(attn, values, return_certificate=True),
    }
    # Interleaved rounds (benchmarks/timing.py): the SVD/QR ratio is paired within each round.
    timed = interleaved(
        {name: lambda name=name: results.update({name: routes[name]()}) for name in routes},
        unit="qr",
        rounds=rounds,
    )
    eff, eff_ref, (_, cert) = results["qr"], results["svd"], results["efficient"]
    g = torch.Generator().manual_seed(1)
    picks = torch.randint(heads * n, (sample_rows,), generator=g).tolist()
    a64, v64 = attn.double(), values.double()
    start = time.perf_counter()
    for flat in picks:
        h, i = divmod(flat, n)
        row = a64[h, i] / a64[h, i].sum()
        efficient_by_slsqp(row.numpy(), v64[h].numpy())
    per_row = (time.perf_counter() - start) / sample_rows
    its = cert.iterations.flatten().tolist()
    return {
        "source": source,
        "d": values.shape[-1],
        "n": n,
        "eff_qr_s": timed["qr"].median_seconds,
        "eff_svd_s": timed["svd"].median_seconds,
        "svd_over_qr": timed["svd"].cell(),
        "eff_diff": float((eff.double() - eff_ref).abs().max()),
        "efficient_s": timed["efficient"].median_seconds,
        "qp_per_row_ms": 1e3 * per_row,
        "qp_all_rows_s": per_row * heads * n,
        "its_median": statistics.median(its),
        "its_max": max(its),
        "max_error": cert.max_output_error,
        "converged": cert.all_converged,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="n in {64, 128}, few samples")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512], help="n")
    parser.add_argument("--layer", type=int, default=1, help="MiniLM layer for the real heads")
    parser.add_argument("--sample-rows", type=int, default=6, help="rows timed with SLSQP")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    args = parser.parse_args()
    sizes = (64, 128) if args.quick else tuple(args.sizes)
    rounds = 2 if args.quick else args.rounds
    print(f"{machine_line()}\nfloat64 solver; median seconds of {rounds} interleaved rounds\n")
    rows = []
    for n in sizes:
        attn, values = minilm_heads(n, args.layer)
        rows.append(run_case(f"MiniLM L{args.layer}", attn, values, args.sample_rows, rounds))
        for d in (32, 64):
            attn, values = synthetic_heads(n, d)
            rows.append(run_case("synthetic", attn, values, args.sample_rows, rounds))
        print_table(rows[-3:], header=n == sizes[0])


def print_table(rows: list[dict], header: bool) -> None:
    if header:
        print(
            "| source | d | n | effective QR (s) | full SVD (s) | SVD/QR [IQR] | max diff | "
            "efficient, all rows (s) | SLSQP per row (ms) | SLSQP all rows, extrapolated (s) | "
            "speed-up | iterations median / max | max output error | all converged |"
        )
        print("|" + " --- |" * 14)
    for r in rows:
        cells = [
            r["source"],
            r["d"],
            r["n"],
            f"{r['eff_qr_s']:.4f}",
            f"{r['eff_svd_s']:.4f}",
            r["svd_over_qr"],
            f"{r['eff_diff']:.1e}",
            f"{r['efficient_s']:.2f}",
            f"{r['qp_per_row_ms']:.0f}",
            f"{r['qp_all_rows_s']:.0f}",
            f"{r['qp_all_rows_s'] / r['efficient_s']:.0f}x",
            f"{r['its_median']:.0f} / {r['its_max']}",
            f"{r['max_error']:.1e}",
            r["converged"],
        ]
        print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
