"""Every GPU figure of issue 16 in one short run (prepared for the minutes a GPU machine is lent).

On one device (``--device``, CUDA by default), on a MiniLM-shaped BERT classifier (6 layers, 12
heads, d = 32; the real MiniLM checkpoint when its offline package is installed, otherwise random
weights from the same config, which the output says) and random token ids:

1. ``attribute`` against the plain forward pass at ``--batch`` x ``--tokens`` (default 32 x 512):
   the default view and ``weighting="gradient"``, interleaved rounds (``benchmarks/timing.py``),
   each call followed by a device synchronization; medians of per-round ratios, [IQR].
2. ``efficient_attention`` on every row of one layer's 12 heads at ``--tokens`` (the captured
   attention of the first example), per backend that runs on the device (``torch``, ``triton``
   on CUDA, ``numba`` on CPU) and ``auto``, interleaved; which backend ``auto`` resolves to and
   whether it is the fastest.
3. Kernel launches per Newton step: the device kernels the profiler records in one call of item
   2 (``auto``), divided by the Newton steps its certificate reports (the largest row count: rows
   step together in the batched solver).

Run on the GPU machine (nothing to download; the offline model package is optional):
``PYTHONPATH=. python benchmarks/bench_gpu.py``; ``--device cpu --quick`` (2 x 64 tokens, 2
rounds) checks the script on a CPU.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from benchmarks.timing import interleaved, machine_line
from captum_effattn import EfficientAttentionAttribution, efficient_attention
from captum_effattn.data import minilm_path
from captum_effattn.models import capture_attention
from captum_effattn.projection.engine.backends import BACKENDS, resolve_backend


def minilm_classifier(device: torch.device):
    """The MiniLM classifier shape; the checkpoint's weights when its package is installed."""
    import transformers as tf

    torch.manual_seed(0)
    try:
        path = minilm_path()
    except ModuleNotFoundError:  # the offline checkpoint package is not installed here
        path = None
    if path is not None:
        model = tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        source = "MiniLM checkpoint (classifier head random)"
    else:
        config = tf.BertConfig(
            vocab_size=30522,
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=12,
            intermediate_size=1536,
            num_labels=2,
        )
        model = tf.BertForSequenceClassification(config)
        source = "random weights, MiniLM's config (no checkpoint package here)"
    return model.to(device).eval(), source


def synchronized(device: torch.device, call: Callable[[], object]) -> Callable[[], None]:
    """``call`` followed by a device synchronization, so that its time is its work's."""

    def run() -> None:
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def print_ratios(title: str, summaries, unit: str) -> None:
    print(f"\n{title}\n")
    for name, summary in summaries.items():
        print(f"- {name}: {summary.median_seconds * 1e3:.1f} ms, {summary.cell()} {unit}")


def attribution_against_forward(model, device, args) -> None:
    ids = torch.randint(1000, 30000, (args.batch, args.tokens), device=device)
    mask = torch.ones_like(ids)

    def forward(ids, mask):
        return model(input_ids=ids, attention_mask=mask).logits

    with torch.no_grad():
        target = forward(ids, mask).argmax(-1)
    explainer = EfficientAttentionAttribution(forward, model=model)
    kwargs = {"target": target, "additional_forward_args": (mask,)}

    def plain() -> None:
        with torch.no_grad():
            forward(ids, mask)

    methods = {
        "forward": synchronized(device, plain),
        "efficient (default)": synchronized(device, lambda: explainer.attribute(ids, **kwargs)),
        "efficient+gradient": synchronized(
            device, lambda: explainer.attribute(ids, weighting="gradient", **kwargs)
        ),
    }
    summaries = interleaved(methods, unit="forward", rounds=args.rounds)
    title = f"1. attribute vs forward, {args.batch} x {args.tokens} tokens"
    print_ratios(title, summaries, "forward")


def one_layer(model, device, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1000, 30000, (1, tokens), device=device)
    with torch.no_grad(), capture_attention(model, materialize=True) as record:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    layer = record.layers[0]
    return layer.attn[0], layer.values[0]  # (12, n, n), (12, n, d)


def backends_on_all_rows(model, device, args) -> None:
    attn, values = one_layer(model, device, args.tokens)
    names = [name for name, b in BACKENDS.items() if b.unavailable_reason(device) is None]

    def project(backend: str) -> Callable[[], None]:
        return synchronized(device, lambda: efficient_attention(attn, values, backend=backend))

    methods = {name: project(name) for name in [*names, "auto"]}
    summaries = interleaved(methods, unit=names[0], rounds=args.rounds)
    title = f"2. efficient_attention, every row of 12 heads, n = {args.tokens}"
    print_ratios(title, summaries, names[0])
    chosen = resolve_backend("auto", device).name
    fastest = min(names, key=lambda name: summaries[name].median_seconds)
    print(f"\n`auto` resolves to {chosen!r}; the fastest here is {fastest!r}")

    _, certificate = efficient_attention(attn, values, return_certificate=True)
    steps = int(certificate.iterations.max())
    with torch.profiler.profile() as profile:
        synchronized(device, lambda: efficient_attention(attn, values))()
    kind = torch.autograd.DeviceType.CUDA if device.type == "cuda" else None
    events = [e for e in profile.events() if kind is None or e.device_type == kind]
    what = "device kernels" if kind is not None else "profiled CPU operations"
    print(
        f"\n3. {len(events)} {what} in one call, {steps} Newton steps at most: "
        f"{len(events) / max(steps, 1):.0f} per step"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 x 64 tokens, 2 rounds")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.tokens, args.rounds = 2, 64, 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu to check the script on a CPU")
    model, source = minilm_classifier(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{machine_line()}\ndevice: {name}; model: {source}")
    attribution_against_forward(model, device, args)
    backends_on_all_rows(model, device, args)


if __name__ == "__main__":
    main()
