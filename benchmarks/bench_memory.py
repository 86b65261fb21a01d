"""Extra peak memory and time of ``attribute`` on a long decoder input: both must grow linearly.

For each sequence length ``n`` a fresh process builds a tiny decoder (GPT-2 or Llama, 2 layers,
positions raised to cover ``n``), warms up on 64 tokens, then runs ``attribute`` once (default
query: the last token's row, all layers and heads) on ``n`` random tokens without padding. The
extra peak is the growth of the process's peak resident memory (``ru_maxrss``) over that call;
a quadratic term (an ``n x n`` mask or score matrix) shows as a 4x jump per doubling of ``n``.
Time: the same call, and a plain forward pass on the same tokens, interleaved over ``--rounds``
rounds (medians). The forward's own attention is quadratic in time (every query reads every
earlier key); what ``attribute`` adds on top (capture, one row per head, its projection) should be
linear: ``(attribute - forward) / n`` stays flat as ``n`` doubles.

Run: ``PYTHONPATH=. python benchmarks/bench_memory.py [--model gpt2] [--lengths 8192 65536]``
(``--quick``: GPT-2 at 1,024 and 2,048 tokens, to check the script).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_long_decoder(name: str, positions: int):
    """A 2-layer, 4-head decoder of width 32 with room for ``positions`` tokens."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if name == "gpt2":
        config = tf.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=positions)
        model = tf.GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    else:
        config = tf.LlamaConfig(
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=37,
            max_position_embeddings=positions,
            attention_bias=True,
        )
        model = tf.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    return model.eval()


def measure(name: str, length: int, rounds: int = 0) -> dict[str, float]:
    """Growth of this process's peak RSS (MiB) over one ``attribute`` call at ``length`` tokens
    (``extra_mib``); with ``rounds``, also the median seconds of ``attribute`` and of a plain
    forward, interleaved (``attribute_s``, ``forward_s``)."""
    import torch

    from benchmarks.timing import interleaved
    from captum_effattn import EfficientAttentionAttribution

    torch.set_num_threads(1)
    model = tiny_long_decoder(name, length)

    def forward(ids):
        return model(input_ids=ids).logits[:, -1]

    explainer = EfficientAttentionAttribution(forward, model=model)
    generator = torch.Generator().manual_seed(0)
    explainer.attribute(torch.randint(3, 99, (1, 64), generator=generator))  # warm up
    ids = torch.randint(3, 99, (1, length), generator=generator)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scores = explainer.attribute(ids)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert scores.shape == (1, length)
    assert bool(torch.isfinite(scores).all())
    result = {"extra_mib": (after - before) / 1024}  # ru_maxrss is in KiB on Linux
    if rounds:

        def plain_forward() -> None:
            with torch.no_grad():
                forward(ids)

        # Already warm (the memory call above): no warm-up round at 30 s a forward pass.
        summaries = interleaved(
            {"attribute": lambda: explainer.attribute(ids), "forward": plain_forward},
            unit="forward",
            rounds=rounds,
            warmup=0,
        )
        result["attribute_s"] = summaries["attribute"].median_seconds
        result["forward_s"] = summaries["forward"].median_seconds
    return result


def measure_in_subprocess(name: str, length: int, rounds: int = 0) -> dict[str, float]:
    """:func:`measure` in a fresh interpreter (peak RSS never goes down)."""
    code = (
        "import json, sys; from benchmarks.bench_memory import measure; "
        f"print(json.dumps(measure({name!r}, {length}, {rounds})))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["gpt2", "llama"], nargs="+", default=["gpt2", "llama"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (0: memory only)")
    parser.add_argument("--quick", action="store_true", help="GPT-2 at 1024 and 2048, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.model, args.lengths, args.rounds = ["gpt2"], [1024, 2048], 1
    import torch

    from benchmarks.timing import machine_line

    torch.set_num_threads(1)  # as in each measuring process
    print(f"one thread per measuring process; {machine_line()}")
    for name in args.model:
        for length in args.lengths:
            got = measure_in_subprocess(name, length, args.rounds)
            line = f"{name:<6} n={length:>6}  extra peak {got['extra_mib']:8.1f} MiB"
            if "attribute_s" in got:
                added = got["attribute_s"] - got["forward_s"]
                line += (
                    f"  forward {got['forward_s']:8.3f} s  attribute {got['attribute_s']:8.3f} s"
                    f"  ratio {got['attribute_s'] / got['forward_s']:5.2f}"
                    f"  added {added:7.3f} s = {added / length * 1e6:6.2f} us/token"
                )
            print(line, flush=True)


if __name__ == "__main__":
    main()
