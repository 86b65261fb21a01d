"""Every row of every head of the real MiniLM on a real 256-token IMDB review."""

from __future__ import annotations

import pytest
import torch

from captum_effattn import effective_attention, efficient_attention
from captum_effattn.projection.engine.backends import NumbaBackend
from captum_effattn.projection.solvers.compiled_newton import numba_available

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm_heads(minilm_dir, minilm_tokenizer, long_imdb_review):
    """Attention probabilities and per-head values of every layer, captured independently of the
    package: eager attention's returned probabilities and forward hooks on the value projections."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    enc = minilm_tokenizer(long_imdb_review, return_tensors="pt", truncation=True, max_length=256)
    values = []
    hooks = [
        layer.attention.self.value.register_forward_hook(lambda m, i, out: values.append(out))
        for layer in model.encoder.layer
    ]
    try:
        with torch.no_grad():
            out = model(**enc, output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    heads, head_dim = (
        model.config.num_attention_heads,
        model.config.hidden_size // model.config.num_attention_heads,
    )
    per_head = [v.view(1, -1, heads, head_dim).transpose(1, 2) for v in values]
    assert enc["input_ids"].shape[1] == 256
    return list(zip(out.attentions, per_head, strict=True))


def test_every_row_of_every_head_converges(minilm_heads):
    for layer, (attn, values) in enumerate(minilm_heads):
        assert attn.shape == (1, 12, 256, 256)
        assert values.shape == (1, 12, 256, 32)
        x, cert = efficient_attention(attn, values, return_certificate=True)
        assert cert.all_converged, f"layer {layer}: {cert.summary()}"
        assert cert.max_output_error <= 1e-9
        assert float(cert.simplex_violation.max()) <= 1e-12
        assert (x >= 0).all()
        # n = 256 > d + 1 = 33: the rows are not identifiable and the projection moves them.
        assert (x - attn).abs().amax() > 0.05


def test_effective_attention_is_not_a_distribution_on_the_real_model(minilm_heads):
    attn, values = minilm_heads[2]
    x, cert = effective_attention(attn, values, return_certificate=True)
    assert cert.max_output_error <= 1e-9
    sums = x.double().sum(-1)
    assert (sums - 1).abs().max() > 0.05
    assert (x < 0).double().mean() > 0.05


def test_compiled_newton_needs_no_orthonormal_basis_on_the_real_model(minilm_heads):
    """Every head of MiniLM is well conditioned: each row is solved in the coordinates of
    ``[1, V]`` itself, or left to the interior point after 200 steps as the basis route leaves it
    (layer 0 has a few dozen such rows); none is refused for its conditioning."""
    from captum_effattn.projection.solvers.compiled_newton import (
        compiled_value_newton,
        numba_available,
    )

    if not numba_available():
        pytest.skip("needs the numba extra")
    for layer, (attn, values) in enumerate(minilm_heads):
        rows = attn[0].reshape(-1, 256).double()
        group = torch.arange(12).repeat_interleave(256)
        key_mask = torch.ones(12, 256, dtype=torch.bool)
        x, steps, solved, _ = compiled_value_newton(
            values[0].double(), key_mask, group, rows / rows.sum(-1, keepdim=True), 200, 1e-13
        )
        assert (steps[~solved] == 200).all(), f"layer {layer}: a head was refused"
        assert solved.double().mean() >= 0.98, f"layer {layer}: {int((~solved).sum())} left"
        reference = efficient_attention(attn.double(), values.double(), backend="torch")
        reference = reference[0].reshape(-1, 256)
        x = x[solved] / x[solved].sum(-1, keepdim=True)
        torch.testing.assert_close(x, reference[solved].double(), atol=1e-9, rtol=0)


@pytest.mark.skipif(not numba_available(), reason="needs numba (the compiled Newton phase)")
def test_near_one_hot_rows_finish_in_the_compiled_phase(minilm_heads):
    """Layer 0's head 2 puts nearly all of many rows' weight on one key; dozens of those rows
    need 100-250 Newton steps (their optima are one entry near 1 and 32 between 1e-5 and 1e-13;
    200-400 before the line search stopped at the full Newton step). Under the compiled phase's
    default cap they finish there: at most one row of the head goes on to the basis route
    (iterations beyond the cap)."""
    attn, values = minilm_heads[0]
    head = attn[:, 2:3], values[:, 2:3]
    cap = NumbaBackend.newton_steps
    _, cert = efficient_attention(*head, return_certificate=True, backend="numba")
    iterations = cert.iterations.flatten()
    assert cert.all_converged
    assert int((iterations > 100).sum()) >= 30
    assert int((iterations > cap).sum()) <= 1
