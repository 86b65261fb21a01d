"""Every GPU figure of issue 16 in one short run (prepared for the minutes a GPU machine is lent).

On one device (``--device``, CUDA by default), on a MiniLM-shaped BERT classifier (6 layers, 12
heads, d = 32; the real MiniLM checkpoint when its offline package is installed, otherwise random
weights from the same config, which the output says) and random token ids:

1. ``attribute`` against the plain forward pass at ``--batch`` x ``--tokens`` (default 32 x 512):
   the default view (also with ``stop_early=True``) and ``weighting="gradient"``, and the
   default view with the Newton phase
   replayed from CUDA graphs (``"auto"`` pointed at ``backend="cudagraph"`` for the call),
   interleaved rounds (``benchmarks/timing.py``), each call followed by a device
   synchronization; medians of per-round ratios, [IQR].
2. ``efficient_attention`` on every row of one layer's 12 heads at ``--tokens`` (the captured
   attention of the first example), per backend that runs on the device (``torch``, ``triton``
   and ``cudagraph`` on CUDA, ``numba`` on CPU) and ``auto``, interleaved; which backend
   ``auto`` resolves to and whether it is the fastest. A backend that fails on the device (a
   CUDA graph that cannot be captured) is reported and left out.
3. Launches per Newton step, per backend of item 2 that runs the batched solver: the Newton phase
   alone on every row of the layer's 12 heads (orthonormal bases of ``[1, V]``, the backend's own
   step cap), the kernel and graph launches the profiler records (host-side launch calls, and the
   kernels the device ran) divided by the most steps a row took (rows step together).

Run on the GPU machine (nothing to download; the offline model package is optional):
``PYTHONPATH=. python benchmarks/bench_gpu.py``; ``--device cpu --quick`` (2 x 64 tokens, 2
rounds) checks the script on a CPU.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from benchmarks.timing import interleaved, machine_line
from captum_effattn import EfficientAttentionAttribution, efficient_attention
from captum_effattn.data import minilm_path
from captum_effattn.kernels import KernelUnavailableError
from captum_effattn.models import capture_attention
from captum_effattn.projection.basis import value_space_basis
from captum_effattn.projection.efficient import NEWTON_TOL
from captum_effattn.projection.engine.backends import AUTO_ORDER, BACKENDS, resolve_backend

# Host-side calls that start work on the device: one per kernel, or one per graph replay.
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cudaGraphLaunch")


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


@contextmanager
def auto_resolving_to(device: torch.device, name: str) -> Iterator[None]:
    """``backend="auto"`` picks ``name`` on ``device``'s type inside the block (the attribution
    has no backend argument: it always asks for ``"auto"``)."""
    before = AUTO_ORDER.get(device.type)
    AUTO_ORDER[device.type] = (name,)
    try:
        yield
    finally:
        if before is None:
            del AUTO_ORDER[device.type]
        else:
            AUTO_ORDER[device.type] = before


def print_ratios(title: str, summaries, unit: str) -> None:
    print(f"\n{title}\n")
    for name, summary in summaries.items():
        print(f"- {name}: {summary.median_seconds * 1e3:.1f} ms, {summary.cell()} {unit}")


def attribution_against_forward(model, device, args, graphs: bool) -> None:
    """Item 1; ``graphs``: ``backend="cudagraph"`` runs here (then timed too)."""
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

    def graphed() -> None:
        with auto_resolving_to(device, "cudagraph"):
            explainer.attribute(ids, **kwargs)

    methods = {
        "forward": synchronized(device, plain),
        "efficient (default)": synchronized(device, lambda: explainer.attribute(ids, **kwargs)),
        "efficient, stop_early=True": synchronized(
            device, lambda: explainer.attribute(ids, stop_early=True, **kwargs)
        ),
        "efficient+gradient": synchronized(
            device, lambda: explainer.attribute(ids, weighting="gradient", **kwargs)
        ),
    }
    if graphs:
        methods["efficient (cudagraph)"] = synchronized(device, graphed)
    summaries = interleaved(methods, unit="forward", rounds=args.rounds)
    title = f"1. attribute vs forward, {args.batch} x {args.tokens} tokens"
    print_ratios(title, summaries, "forward")


def one_layer(model, device, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1000, 30000, (1, tokens), device=device)
    with torch.no_grad(), capture_attention(model, materialize=True) as record:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    layer = record.layers[0]
    return layer.attn[0], layer.values[0]  # (12, n, n), (12, n, d)


def runs(device: torch.device, name: str, call: Callable[[], object]) -> bool:
    """Whether ``call`` runs on the device; says why not when it does not."""
    try:
        synchronized(device, call)()
    except KernelUnavailableError as error:
        print(f"\n{name} left out: {error}")
        return False
    return True


def projection(device, attn, values, backend: str) -> Callable[[], None]:
    """``efficient_attention`` of every row with ``backend``, synchronized."""
    return synchronized(device, lambda: efficient_attention(attn, values, backend=backend))


def working_backends(device, attn, values) -> list[str]:
    """The backends that run on the device, named (so a CUDA graph that cannot be captured
    raises instead of falling back): the others are reported and left out."""
    return [
        name
        for name, b in BACKENDS.items()
        if b.unavailable_reason(device) is None
        and runs(device, name, projection(device, attn, values, name))
    ]


def backends_on_all_rows(device, args, attn, values, names: list[str]) -> None:
    """Items 2 and 3, for the backends ``names`` on the layer's rows."""
    methods = {name: projection(device, attn, values, name) for name in [*names, "auto"]}
    summaries = interleaved(methods, unit=names[0], rounds=args.rounds)
    title = f"2. efficient_attention, every row of 12 heads, n = {args.tokens}"
    print_ratios(title, summaries, names[0])
    chosen = resolve_backend("auto", device).name
    fastest = min(names, key=lambda name: summaries[name].median_seconds)
    print(f"\n`auto` resolves to {chosen!r}; the fastest here is {fastest!r}")

    print("\n3. launches per Newton step, one call each\n")
    for name in names:
        if BACKENDS[name].batched_newton:
            launches_per_step(device, attn, values, name)


def launches_per_step(device, attn, values, backend: str) -> None:
    """Launches of ``backend``'s Newton phase alone, on every row of the layer's heads."""
    chosen = BACKENDS[backend]
    heads, n, _ = values.shape
    key_mask = torch.ones(heads, n, dtype=torch.bool, device=device)
    basis, _ = value_space_basis(values.double(), key_mask, with_ones=True)
    group = torch.arange(heads, device=device).repeat_interleave(n)
    ops = chosen.grouped(basis, group)
    rows = attn.double().reshape(heads * n, n)
    c = ops.right(rows / rows.sum(-1, keepdim=True))

    def newton():
        return chosen.newton(ops, c, c, chosen.newton_steps, NEWTON_TOL)

    newton()  # warm-up: allocator, library handles, the products' caches
    with torch.profiler.profile() as profile:
        _, iterations, converged = newton()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    steps = max(int(iterations.max()), 1)
    events = list(profile.events())
    done = f"{int(converged.sum())} of {len(converged)} rows converged"
    if device.type == "cuda":
        launches = sum(e.name in LAUNCH_CALLS for e in events)
        kernels = sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events)
        print(
            f"- {backend}: {launches} launches in {steps} Newton steps ({launches / steps:.1f} per "
            f"step), {kernels} device kernels; {done}"
        )
    else:
        print(
            f"- {backend}: {len(events)} profiled CPU operations in {steps} Newton steps "
            f"({len(events) / steps:.0f} per step); {done}"
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
    attn, values = one_layer(model, device, args.tokens)
    names = working_backends(device, attn, values)
    attribution_against_forward(model, device, args, graphs="cudagraph" in names)
    backends_on_all_rows(device, args, attn, values, names)


if __name__ == "__main__":
    main()
