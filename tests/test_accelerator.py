"""The whole pipeline on an accelerator agrees with the CPU.

Skipped where there is no CUDA device (as in CI). On a CUDA machine every test runs the same problem
on the GPU and on the CPU and compares. ``CAPTUM_EFFATTN_TEST_DEVICE`` names the device to test
(``cuda``, ``cuda:1``; ``cpu`` compares the CPU with itself: a check of the tests themselves).
"""

from __future__ import annotations

import os

import pytest
import torch
from captum.attr import IntegratedGradients, Saliency

from captum_effattn import EfficientAttentionAttribution, effective_attention, efficient_attention
from captum_effattn.attr import check_sufficiency
from captum_effattn.metrics import TokenGate, compare_methods, gated_inputs
from captum_effattn.projection import efficient_attention_from_qk
from captum_effattn.projection.engine.grouped import GroupedMatrices
from captum_effattn.projection.solvers.static_newton import BLOCK_STEPS, NewtonBlock
from tests.attr.helpers import text_setup
from tests.models.tiny import tiny_inputs, tiny_model
from tests.projection.problems import dual_problem


@pytest.fixture(scope="module")
def device() -> torch.device:
    name = os.environ.get("CAPTUM_EFFATTN_TEST_DEVICE")
    if name is None:
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device (set CAPTUM_EFFATTN_TEST_DEVICE to test another)")
        name = "cuda"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # what tensors report
    return device


def _to(device, *tensors):
    return tuple(t.to(device) for t in tensors)


def _problem(causal: bool, dtype: torch.dtype):
    """Two examples x 3 query heads sharing one value head (as in grouped-query attention); the
    second example has 6 padding keys on the right; 24 keys over 6-wide values."""
    gen = torch.Generator().manual_seed(11)
    batch, heads, n, d = 2, 3, 24, 6
    key_mask = torch.ones(batch, 1, n, dtype=torch.bool)
    key_mask[1, :, -6:] = False
    scores = 3 * torch.randn(batch, heads, n, n, generator=gen, dtype=torch.float64)
    hidden = ~key_mask[:, :, None, :]
    if causal:
        hidden = hidden | torch.ones(n, n, dtype=torch.bool).triu(1)
    attn = torch.softmax(scores.masked_fill(hidden, -torch.inf), -1)
    values = torch.randn(batch, 1, n, d, generator=gen, dtype=torch.float64)
    # Rows of padding queries see only real keys; keep them (they are valid distributions).
    return attn.to(dtype), values.to(dtype), key_mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_projections_agree_with_the_cpu(device, causal, dtype):
    attn, values, key_mask = _problem(causal, dtype)
    for project in (efficient_attention, effective_attention):
        on_cpu, cpu_report = project(attn, values, key_mask, causal, return_certificate=True)
        here, report = project(
            *_to(device, attn, values, key_mask), causal, return_certificate=True
        )
        assert here.device == device
        assert here.dtype == dtype
        assert here.shape == attn.shape
        assert report.all_converged
        assert cpu_report.all_converged
        tol = 1e-9 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(here.cpu(), on_cpu, atol=tol, rtol=0)


@pytest.fixture
def cuda_device(device) -> torch.device:
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    return device


@pytest.mark.parametrize("causal", [False, True])
def test_cudagraph_backend_agrees_with_the_cpu(cuda_device, causal):
    attn, values, key_mask = _problem(causal, torch.float64)
    on_cpu = efficient_attention(attn, values, key_mask, causal)
    here, report = efficient_attention(
        *_to(cuda_device, attn, values, key_mask),
        causal,
        return_certificate=True,
        backend="cudagraph",
    )
    assert report.all_converged
    torch.testing.assert_close(here.cpu(), on_cpu, atol=1e-9, rtol=0)


def test_a_newton_block_does_not_synchronize(cuda_device):
    """What a CUDA graph needs: a block of Newton steps waits for nothing on the device."""
    ops, c = dual_problem(3, 8, 64, 8, 4, seed=2)
    ops = GroupedMatrices(ops.matrices.to(cuda_device), ops.group.to(cuda_device))
    c = c.to(cuda_device)
    block = NewtonBlock.start(ops, c, c, 50, 1e-13)
    block.step()  # builds the products' caches and the libraries' workspaces
    torch.cuda.set_sync_debug_mode("error")
    try:
        block.run(BLOCK_STEPS)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("causal", [False, True])
def test_projection_from_queries_and_keys_agrees_with_the_cpu(device, causal):
    gen = torch.Generator().manual_seed(3)
    query = torch.randn(2, 4, 40, 8, generator=gen)
    key = torch.randn(2, 2, 40, 8, generator=gen)  # two key-value heads for four query heads
    values = torch.randn(2, 2, 40, 8, generator=gen)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 33:] = False
    row = 32 if causal else 0
    on_cpu = efficient_attention_from_qk(query, key, values, mask, causal, rows=row)
    here = efficient_attention_from_qk(*_to(device, query, key, values, mask), causal, rows=row)
    assert here.device == device
    torch.testing.assert_close(here.cpu(), on_cpu, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("view", ["raw", "effective", "efficient"])
def test_attribution_agrees_with_the_cpu(device, name, view):
    padding = "left" if name in ("gpt2", "llama") else "right"
    model, forward, ids, mask = text_setup(name, padding)
    explainer = EfficientAttentionAttribution(forward, model=model)
    options = {"view": view, "return_convergence_delta": True}
    on_cpu, _ = explainer.attribute(ids, additional_forward_args=(mask,), **options)
    model.to(device)
    try:
        here, delta = explainer.attribute(
            ids.to(device), additional_forward_args=(mask.to(device),), **options
        )
        rollout = explainer.attribute(
            ids.to(device),
            additional_forward_args=(mask.to(device),),
            reduce="rollout",
            query="all",
        )
    finally:
        model.to("cpu")
    assert here.device == delta.device == rollout.device == device
    assert delta.max() <= (0 if view == "raw" else 1e-9)
    torch.testing.assert_close(here.cpu(), on_cpu, atol=1e-5, rtol=0)


def test_vit_attribution_agrees_with_the_cpu(device):
    model = tiny_model("vit")
    pixels = tiny_inputs("vit")["pixel_values"]
    explainer = EfficientAttentionAttribution(model)
    on_cpu = explainer.attribute(pixels)
    model.to(device)
    try:
        here = explainer.attribute(pixels.to(device))
    finally:
        model.to("cpu")
    assert here.device == device
    assert here.shape == pixels.shape
    torch.testing.assert_close(here.cpu(), on_cpu, atol=1e-6, rtol=0)


def test_substitution_keeps_the_logits_on_the_device(device):
    model, forward, ids, mask = text_setup("llama", "left")
    model.to(device)
    try:
        report = check_sufficiency(
            model, ids.to(device), (mask.to(device),), forward_func=forward, view="efficient"
        )
    finally:
        model.to("cpu")
    assert report.holds(1e-5), report


def test_metrics_run_on_the_device(device):
    batch = tiny_inputs("bert", batch=2, padding="right")
    model = tiny_model("bert").to(device)
    try:
        gate = TokenGate(model, baseline_token_id=0)
        inputs = gated_inputs(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        methods = {
            "efficient attention": EfficientAttentionAttribution(gate, model=model),
            "IntegratedGradients": (IntegratedGradients(gate), {"n_steps": 8}),
            "Saliency": Saliency,
        }
        result = compare_methods(gate, inputs, "predicted", methods, seed=0, progress=False)
    finally:
        model.to("cpu")
    values = torch.tensor([record["value"] for record in result.records], dtype=torch.float64)
    assert len(values) == 2 * 3 * 6
    assert torch.isfinite(values).all()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_lazy_capture_rows_agree_with_the_cpu(device, name):
    """Rows computed after a lazy capture (the Triton kernel on CUDA where triton is installed)
    are the CPU's rows, left padding and grouped heads included."""
    from captum_effattn.models import capture_attention

    inputs = tiny_inputs(name, padding="left")
    positions = torch.tensor([[15, 0, 7], [15, 2, 9]])
    rows = {}
    for where in (torch.device("cpu"), device):
        model = tiny_model(name).to(where)
        with torch.no_grad(), capture_attention(model, materialize=False) as record:
            model(**{key: value.to(where) for key, value in inputs.items()})
        rows[where.type] = [layer.rows(positions.to(where)).cpu() for layer in record.layers]
    for on_device, on_cpu in zip(rows[device.type], rows["cpu"], strict=True):
        torch.testing.assert_close(on_device, on_cpu, rtol=0, atol=1e-5)
