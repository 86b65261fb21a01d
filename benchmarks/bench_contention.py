"""Attribution under CPU contention: the solver worker must not hold the caller back.

``attribute`` projects early layers on a worker thread while the forward pass runs the later ones.
This script times ``attribute`` (MiniLM, all layers and heads, one review truncated to ``n`` word
pieces) on an idle machine and beside ``--busy`` busy-loop processes (one per core by default),
with the worker at normal priority (what the package does) and, for comparison, reniced to 19
(what it did before: a niced worker is starved by the busy loops while the caller waits for it).
Each configuration runs ``--rounds`` times, configurations interleaved round by round; the table
gives the median and the slowest call, in milliseconds. PyTorch runs on ``--threads`` threads (1 by
default): the worker only runs where PyTorch's threads leave a core of the process idle.

Run: ``PYTHONPATH=. python benchmarks/bench_contention.py [--rounds 15] [--tokens 128] [--quick]``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import captum_effattn.attr._pipeline as pipeline
from benchmarks.timing import machine_line
from captum_effattn import EfficientAttentionAttribution


def _busy_loop() -> None:
    while True:
        pass


def _worker_at(niceness: int) -> ThreadPoolExecutor:
    def start() -> None:
        torch.set_num_threads(1)
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)

    return ThreadPoolExecutor(max_workers=1, initializer=start)


def _setup(tokens: int):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from captum_effattn.data import imdb_heldout, minilm_path

    path = minilm_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = imdb_heldout(2)[0].text
    batch = tokenizer([text], truncation=True, max_length=tokens, return_tensors="pt")

    def forward(ids, mask):
        return model(input_ids=ids, attention_mask=mask).logits

    explainer = EfficientAttentionAttribution(forward, model=model)
    return explainer, batch["input_ids"], batch["attention_mask"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="3 rounds at 64 tokens")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.tokens = 3, 64
    torch.set_num_threads(args.threads)
    if not pipeline.spare_core():
        raise SystemExit(f"{args.threads} torch threads leave no core to the worker: use fewer")
    explainer, ids, mask = _setup(args.tokens)
    workers = {"normal": _worker_at(0), "nice 19": _worker_at(19)}
    times: dict[tuple[str, str], list[float]] = {}
    for load in ("idle", f"{args.busy} busy loops"):
        busy = []
        if load != "idle":
            busy = [
                multiprocessing.Process(target=_busy_loop, daemon=True) for _ in range(args.busy)
            ]
            for process in busy:
                process.start()
        try:
            for worker in workers.values():
                pipeline._worker = lambda worker=worker: worker  # type: ignore[assignment]
                explainer.attribute(ids, additional_forward_args=(mask,))  # warm up
            for _ in range(args.rounds):
                for name, worker in workers.items():
                    pipeline._worker = lambda worker=worker: worker  # type: ignore[assignment]
                    start = time.perf_counter()
                    explainer.attribute(ids, additional_forward_args=(mask,))
                    times.setdefault((load, name), []).append(time.perf_counter() - start)
        finally:
            for process in busy:
                process.terminate()
                process.join()
    print(machine_line())
    print(f"MiniLM, 1 x {ids.shape[1]} tokens, all layers and heads, {args.rounds} rounds")
    print(f"{'load':<16}{'worker':<10}{'median ms':>10}{'max ms':>10}")
    for (load, name), seconds in times.items():
        print(
            f"{load:<16}{name:<10}{1e3 * statistics.median(seconds):>10.1f}"
            f"{1e3 * max(seconds):>10.1f}"
        )


if __name__ == "__main__":
    main()
