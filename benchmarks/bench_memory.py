"""Extra peak memory of ``attribute`` on a long decoder input: it must grow linearly in n.

For each sequence length ``n`` a fresh process builds a tiny decoder (GPT-2 or Llama, 2 layers,
positions raised to cover ``n``), warms up on 64 tokens, then runs ``attribute`` once (default
query: the last token's row, all layers and heads) on ``n`` random tokens without padding. The
extra peak is the growth of the process's peak resident memory (``ru_maxrss``) over that call;
a quadratic term (an ``n x n`` mask or score matrix) shows as a 4x jump per doubling of ``n``.

Run: ``PYTHONPATH=. python benchmarks/bench_memory.py [--model gpt2] [--lengths 2048 8192 16384]``
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


def extra_peak_mib(name: str, length: int) -> float:
    """Growth of this process's peak RSS over one ``attribute`` call at ``length`` tokens."""
    import torch

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
    return (after - before) / 1024  # ru_maxrss is in KiB on Linux


def measure_in_subprocess(name: str, length: int) -> float:
    """:func:`extra_peak_mib` in a fresh interpreter (peak RSS never goes down)."""
    code = (
        "import json, sys; from benchmarks.bench_memory import extra_peak_mib; "
        f"print(json.dumps(extra_peak_mib({name!r}, {length})))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, check=True
    )
    return float(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["gpt2", "llama"], nargs="+", default=["gpt2", "llama"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384])
    args = parser.parse_args()
    for name in args.model:
        for length in args.lengths:
            extra = measure_in_subprocess(name, length)
            print(f"{name:<6} n={length:>6}  extra peak {extra:8.1f} MiB")


if __name__ == "__main__":
    main()
