"""The capture's carryover, measured where it matters: processes that do nothing but attribute.

``attribute`` keeps its capture's queries, keys and values until the thread's next call
(:mod:`captum_effattn.models.carryover`), so that their memory is reused in place. Without it the
tensors are freed when the call returns, glibc may hand the top of its heap back to the system,
and the next call faults that memory in again. Whether it does depends on the process's history
(one that ran larger calls before keeps its heap: ``bench_attribution.py``'s process, which runs
IntegratedGradients, shows no faults either way), so each variant runs in fresh processes that
load the classifier and only alternate a plain forward pass with ``attribute``:

- ``carried over``: ``attribute`` as it is;
- ``freed at its end``: ``attribute`` followed by ``release_thread_carryover()``, which frees the
  tensors when the call returns, as before the carryover.

Processes of the two variants alternate (``--processes`` of each); in each, ``--rounds``
interleaved rounds give the median of the per-round ratios ``attribute / forward`` and the median
page faults of the process during a call. The table lists every process's median. The
measuring processes run with ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets a policy
(:data:`MEASURING_WAIT_POLICY`; the header line says which), as the README's figures were measured.

Run: ``PYTHONPATH=. python benchmarks/bench_carryover.py [--threads 1 2] [--batches 1 8]
[--sizes 128 512] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# The measuring processes' OpenMP wait policy where the environment sets none.
MEASURING_WAIT_POLICY = "PASSIVE"

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = ("carried over", "freed at its end")


def measure(variant: str, threads: int, batch: int, n: int, rounds: int) -> dict[str, float]:
    """One process's median ratio to the forward pass and median page faults of a call."""
    import torch

    from benchmarks.bench_attribution import classifier_batch
    from benchmarks.timing import interleaved
    from captum_effattn.data import imdb_heldout, load_sentiment_classifier
    from captum_effattn.models import release_thread_carryover

    torch.set_num_threads(threads)
    classifier = load_sentiment_classifier(progress=False)
    model, tokenizer = classifier.model.eval(), classifier.tokenizer
    texts = [r.text for r in imdb_heldout(400) if len(tokenizer(r.text)["input_ids"]) >= n]
    enc = tokenizer(texts[:batch], return_tensors="pt", truncation=True, max_length=n)
    setup = classifier_batch(model, enc)

    def attribute():
        setup.attribution.attribute(setup.embeddings, **setup.kwargs)
        if variant == "freed at its end":
            release_thread_carryover()

    summaries = interleaved({"forward": setup.plain, "attribute": attribute}, "forward", rounds, 3)
    faults = summaries["attribute"].median_faults
    return {"ratio": summaries["attribute"].median, "faults": -1.0 if faults is None else faults}


def measure_in_subprocess(variant: str, threads: int, batch: int, n: int, rounds: int) -> dict:
    """:func:`measure` in a fresh interpreter: the allocator's history is the variant's own."""
    code = (
        "import json; from benchmarks.bench_carryover import measure; "
        f"print(json.dumps(measure({variant!r}, {threads}, {batch}, {n}, {rounds})))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": str(threads)}
    env.setdefault("OMP_WAIT_POLICY", MEASURING_WAIT_POLICY)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--processes", type=int, default=2, help="processes of each variant")
    parser.add_argument("--quick", action="store_true", help="1 thread, batch 1, n = 64, 3 rounds")
    args = parser.parse_args()
    if args.quick:
        args.threads, args.batches, args.sizes, args.rounds, args.processes = [1], [1], [64], 3, 1
    from benchmarks.timing import machine_line

    policy = os.environ.get("OMP_WAIT_POLICY", MEASURING_WAIT_POLICY)
    print(
        f"{machine_line()} (this process; each measuring process sets its own threads and runs "
        f"with OMP_WAIT_POLICY={policy})\n"
    )
    print("| threads, batch, n | " + " | ".join(VARIANTS) + " |")
    print("| --- |" + " --- |" * len(VARIANTS))
    for threads in args.threads:
        for batch in args.batches:
            for n in args.sizes:
                runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
                for _ in range(args.processes):
                    for variant in VARIANTS:
                        runs[variant].append(
                            measure_in_subprocess(variant, threads, batch, n, args.rounds)
                        )
                cells = [
                    " / ".join(f"{r['ratio']:.2f}x ({r['faults']:.0f})" for r in runs[v])
                    for v in VARIANTS
                ]
                print(f"| {threads}, {batch}, {n} | " + " | ".join(cells) + " |", flush=True)
    print(
        "\n(each cell: one fresh process per entry, the median of its per-round ratios of "
        "attribute to the same round's forward pass, and in parentheses the median page faults "
        "of the process during a call)"
    )


if __name__ == "__main__":
    main()
