"""Kernels vs PyTorch, streaming vs materializing: time, peak memory and agreement.

One query row (the first, as an encoder's [CLS] row; ``--causal`` takes the last, as a decoder's),
all heads of one layer, for each ``n``. Three ways to get its efficient attention:

- *materializing*: ``A = softmax(Q K^T * scale + mask)`` for every row of every head (what
  ``output_attentions=True`` gives attention-based tools), then :func:`efficient_attention` on
  the row;
- *streaming (torch)*: :func:`efficient_attention_from_qk` with ``backend="torch"``;
- *streaming (triton)*: the same with ``backend="triton"`` (CUDA only).

Parts (``--part``):

- ``cuda``: median time and peak CUDA memory of the three paths, and of each kernel against its
  PyTorch counterpart (attention rows, fused effective projection, Gram assembly).
- ``cpu``: peak memory (resident set size) of the materializing and the streaming PyTorch paths,
  each measured in a fresh subprocess (after a warm-up run at n = 64) as the rise of the peak RSS
  over the RSS before the call, with their times side by side. One thread by default: on a
  shared, oversubscribed machine multi-threaded LAPACK calls can slow down a hundredfold.
- ``agreement``: largest difference between the kernels and the PyTorch path. Runs on CUDA, or
  on CPU in Triton's interpreter (this script then sets ``TRITON_INTERPRET=1`` itself; slow, so
  use small ``--sizes``).

Usage::

    PYTHONPATH=. python benchmarks/bench_kernels.py --part cpu
    PYTHONPATH=. python benchmarks/bench_kernels.py --part cuda
    PYTHONPATH=. python benchmarks/bench_kernels.py --part agreement --sizes 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

DEFAULT_SIZES = (512, 2048, 8192)


def make_inputs(args, n, device, dtype):
    import torch

    gen = torch.Generator().manual_seed(n)
    query = torch.randn(1, args.heads, n, args.head_dim, generator=gen).to(device, dtype)
    key = torch.randn(1, args.kv_heads, n, args.head_dim, generator=gen).to(device, dtype)
    values = torch.randn(1, args.kv_heads, n, args.head_dim, generator=gen).to(device, dtype)
    mask = torch.ones(1, n, dtype=torch.bool, device=device)
    mask[0, n - n // 8 :] = False  # some padding, as in a batch
    return query, key, values, mask


def row_of(args, n):
    return n - n // 8 - 1 if args.causal else 0


def materializing(args, query, key, values, mask):
    """The whole (H, n, n) attention of the layer, then efficient attention of one row."""
    import torch

    from captum_effattn.projection import efficient_attention

    n = key.shape[-2]
    group = args.heads // args.kv_heads
    scores = query @ key.repeat_interleave(group, 1).mT * args.head_dim**-0.5
    visible = mask[:, None, None, :]
    if args.causal:
        visible = visible & torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
    attn = scores.masked_fill(~visible, -torch.inf).softmax(-1)
    row = row_of(args, n)
    # Causal: the row's prefix is its key mask (efficient_attention's causal=True wants q == n).
    row_mask = mask & (torch.arange(n, device=query.device) <= row) if args.causal else mask
    return efficient_attention(
        attn[:, :, row : row + 1],
        values.repeat_interleave(group, 1),
        row_mask[:, None],
        backend="torch",
    )


def streaming(args, query, key, values, mask, backend):
    from captum_effattn.projection import efficient_attention_from_qk

    row = row_of(args, key.shape[-2])
    return efficient_attention_from_qk(
        query, key, values, mask, args.causal, rows=row, backend=backend
    )


# --- CPU: peak resident memory, one subprocess per measurement --------------------------------


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> None:
    """Run one path once in this fresh process; print its peak RSS rise and time as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    paths = {
        "materializing": lambda inputs: materializing(args, *inputs),
        "streaming": lambda inputs: streaming(args, *inputs, backend="torch"),
    }
    # One small run first: libraries load and allocate on first use, which is no part of the path.
    paths[args.child](make_inputs(args, 64, "cpu", torch.float32))
    inputs = make_inputs(args, args.n, "cpu", torch.float32)
    before = _current_rss_bytes()
    start = time.perf_counter()
    paths[args.child](inputs)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"peak_rise": peak - before, "seconds": seconds}))


def cpu_part(args) -> None:
    print(
        f"CPU, float32, one query row ({'causal, last real' if args.causal else 'first'}), "
        f"{args.heads} query heads / {args.kv_heads} key-value heads, d = {args.head_dim}, "
        f"{args.threads} threads; peak RSS rise over the RSS before the call, fresh process each"
    )
    header = (
        f"{'n':>6} | {'materializing MiB':>17} | {'streaming MiB':>13} | {'memory ratio':>12} | "
        f"{'materializing s':>15} | {'streaming s':>11} | {'time ratio':>10}"
    )
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        results = {}
        for path in ("materializing", "streaming"):
            command = [sys.executable, __file__, "--child", path, "--n", str(n), *_shape_args(args)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results[path] = json.loads(out.strip().splitlines()[-1])
        mat, stream = results["materializing"], results["streaming"]
        mib = 2**20
        print(
            f"{n:>6} | {mat['peak_rise'] / mib:>17.1f} | {stream['peak_rise'] / mib:>13.1f} | "
            f"{mat['peak_rise'] / max(stream['peak_rise'], 1):>12.1f} | "
            f"{mat['seconds']:>15.3f} | {stream['seconds']:>11.3f} | "
            f"{mat['seconds'] / stream['seconds']:>10.1f}"
        )


def _shape_args(args) -> list[str]:
    shape = [
        "--heads", str(args.heads), "--kv-heads", str(args.kv_heads),
        "--head-dim", str(args.head_dim), "--threads", str(args.threads),
    ]  # fmt: skip
    return [*shape, "--causal"] if args.causal else shape


# --- CUDA: times and peak memory ---------------------------------------------------------------


def _cuda_measure(fn, repeats):
    import torch

    fn()  # warm up (and compile the kernels)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20


def _cuda_cases(args, n):
    """What is timed at one ``n``: the three end-to-end paths, then kernel against PyTorch."""
    import torch

    from captum_effattn.projection.basis import value_space_basis
    from captum_effattn.projection.engine.backends import TorchBackend, TritonBackend
    from captum_effattn.projection.engine.rows import RowMasking, attention_rows_torch

    torch_backend, triton_backend = TorchBackend(forced=True), TritonBackend(forced=True)
    query, key, values, mask = make_inputs(args, n, "cuda", torch.float32)
    masking = RowMasking(key_mask=mask, causal=args.causal)
    rows = torch.tensor([row_of(args, n)], device="cuda")
    scale = args.head_dim**-0.5
    # The solver's operands for one row per key-value head: float64 bases of [1, V].
    basis, _ = value_space_basis(values[0], mask.expand(args.kv_heads, n), with_ones=True)
    group = torch.arange(args.kv_heads, device="cuda")
    weights = (torch.rand(args.kv_heads, n, device="cuda") > 0.5).double()
    a = torch.rand(args.kv_heads, n, device="cuda", dtype=torch.float64)
    inputs = (query, key, values, mask)
    return {
        "end to end: materializing (torch)": lambda: materializing(args, *inputs),
        "end to end: streaming (torch)": lambda: streaming(args, *inputs, "torch"),
        "end to end: streaming (triton)": lambda: streaming(args, *inputs, "triton"),
        "attention rows (torch)": lambda: attention_rows_torch(query, key, rows, masking, scale),
        "attention rows (triton)": lambda: triton_backend.attention_rows(
            query, key, rows, masking, scale
        ),
        "effective projection (torch)": lambda: torch_backend.grouped(basis, group).project(a),
        "effective projection (triton)": lambda: triton_backend.grouped(basis, group).project(a),
        "gram (torch)": lambda: torch_backend.grouped(basis, group).gram(weights),
        "gram (triton)": lambda: triton_backend.grouped(basis, group).gram(weights),
    }


def cuda_part(args) -> None:
    import torch

    if not torch.cuda.is_available():
        sys.exit("--part cuda needs a CUDA device")
    print(f"CUDA: {torch.cuda.get_device_name()}; median of {args.repeats} runs, ms / peak MiB")
    for n in args.sizes:
        print(f"n = {n}")
        for name, fn in _cuda_cases(args, n).items():
            ms, mib = _cuda_measure(fn, args.repeats)
            print(f"  {name:<36} {ms:>10.3f} ms {mib:>10.1f} MiB")


# --- Agreement ---------------------------------------------------------------------------------


def agreement_part(args) -> None:
    import torch

    from captum_effattn.kernels import grouped
    from captum_effattn.projection import attention_rows, efficient_attention_from_qk
    from captum_effattn.projection.basis import value_space_basis
    from captum_effattn.projection.engine.backends import BACKENDS

    device = "cpu" if grouped.INTERPRETED else "cuda"
    print(f"agreement on {device} ({'interpreter' if grouped.INTERPRETED else 'compiled'})")

    def relative(x, y):
        """Largest difference relative to the largest entry."""
        return float((x.double() - y.double()).abs().max() / y.double().abs().max())

    for n in args.sizes:
        row = row_of(args, n)
        for dtype in (torch.float64, torch.float32, torch.float16):
            query, key, values, mask = make_inputs(args, n, device, dtype)
            rows = {
                b: attention_rows(query, key, mask, args.causal, rows=row, backend=b)
                for b in ("torch", "triton")
            }
            projected = {
                b: efficient_attention_from_qk(
                    query, key, values, mask, args.causal, rows=row, backend=b
                )
                for b in ("torch", "triton")
            }
            # The same inputs in float64 through PyTorch: what rounding to the dtype costs.
            exact = attention_rows(
                query.double(), key.double(), mask, args.causal, rows=row, backend="torch"
            )
            print(
                f"  n = {n:>5} {dtype!s:>13}: attention rows triton vs torch "
                f"{relative(rows['triton'], rows['torch']):.1e} (vs float64 "
                f"{relative(rows['triton'], exact):.1e}), efficient rows triton vs torch "
                f"{relative(projected['triton'], projected['torch']):.1e}"
            )
        values64 = make_inputs(args, n, device, torch.float64)[2]
        basis, _ = value_space_basis(values64[0], mask.expand(args.kv_heads, n), with_ones=True)
        group = torch.arange(args.kv_heads, device=device)
        a = torch.rand(args.kv_heads, n, device=device, dtype=torch.float64)
        products = {b: BACKENDS[b].grouped(basis, group) for b in ("torch", "triton")}
        print(
            f"  n = {n:>5}  float64 basis: effective projection "
            f"{relative(products['triton'].project(a), products['torch'].project(a)):.1e}, "
            f"gram {relative(products['triton'].gram(a), products['torch'].gram(a)):.1e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("cpu", "cuda", "agreement"), default=None)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", choices=("materializing", "streaming"), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="n = 256 and 512, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.repeats = [256, 512], 2
    if args.child:
        return child(args)
    part = args.part
    if part is None:
        import torch

        part = "cuda" if torch.cuda.is_available() else "cpu"
    if part == "agreement" and not _cuda_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are imported
    import torch

    from benchmarks.timing import machine_line

    torch.set_num_threads(args.threads)  # as in the measuring processes
    print(machine_line())
    {"cpu": cpu_part, "cuda": cuda_part, "agreement": agreement_part}[part](args)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
