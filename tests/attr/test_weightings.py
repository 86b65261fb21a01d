"""Weightings: value norms and target gradients, checked by hand on tiny models."""

from __future__ import annotations

import pytest
import torch

from captum_effattn import EfficientAttentionAttribution
from captum_effattn.attr import REDUCTIONS, VIEWS, WEIGHTINGS
from captum_effattn.attr._queries import select_query_rows
from captum_effattn.attr._reductions import mean_over_queries
from captum_effattn.attr._views import get_view, project_matrices
from captum_effattn.models import capture_attention, select_heads
from tests.attr.helpers import logits_of_last_real_token, positions, text_setup
from tests.models.tiny import NUM_HEADS, NUM_LABELS, tiny_inputs, tiny_model

HEAD_DIM = 8


# ---------------------------------------------------------------- hand computations (no package)


def _values_hook(name, model, layer):
    """``(module, read)``: the module whose output holds the values, and ``(B, S, H_kv, d)``."""
    if name == "bert":
        module = model.bert.encoder.layer[layer].attention.self.value
        return module, lambda out: out
    if name == "gpt2":
        module = model.transformer.h[layer].attn.c_attn
        width = model.config.n_embd
        return module, lambda out: out[..., 2 * width :]
    module = model.model.layers[layer].self_attn.v_proj  # llama
    return module, lambda out: out


def _output_slice(name, model, layer, head):
    """``(d, E)``: head ``head``'s slice of the output projection, written out per layout."""
    rows = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
    if name == "bert":
        return model.bert.encoder.layer[layer].attention.output.dense.weight[:, rows].T
    if name == "gpt2":
        return model.transformer.h[layer].attn.c_proj.weight[rows, :]  # Conv1D: (in, out)
    return model.model.layers[layer].self_attn.o_proj.weight[:, rows].T


def _eager_forward(name, model, ids, mask):
    """Logits ``(B, C)`` and the eager attentions (the tensors the model multiplied)."""
    if name == "bert":
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        return out.logits, out.attentions
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions(mask), output_attentions=True
    )
    return out.logits[:, -1], out.attentions


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_norm_weighting_equals_a_hand_computation(name):
    model = tiny_model(name, "eager")
    inputs = tiny_inputs(name, padding="right" if name == "bert" else None)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    layer = 1
    module, read = _values_hook(name, model, layer)
    seen = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append(read(out)))
    try:
        with torch.no_grad():
            _, attentions = _eager_forward(name, model, ids, mask)
    finally:
        handle.remove()
    values = seen[0].reshape(*ids.shape, -1, HEAD_DIM)  # (B, S, H_kv, d)
    group = NUM_HEADS // values.shape[2]  # llama: 2 query heads per value head
    query = 0 if name == "bert" else ids.shape[1] - 1
    expected = torch.zeros(ids.shape[0], NUM_HEADS, ids.shape[1])
    with torch.no_grad():
        for head in range(NUM_HEADS):
            through = values[:, :, head // group] @ _output_slice(name, model, layer, head)
            expected[:, head] = attentions[layer][:, head, query] * through.norm(dim=-1)

    def classify(ids, mask):
        return _eager_forward(name, model, ids, mask)[0]

    explainer = EfficientAttentionAttribution(classify, model=model)
    got = explainer.attribute(
        ids, additional_forward_args=(mask,), layers=layer, view="raw", reduce=None,
        weighting="norm",
    )  # fmt: skip
    torch.testing.assert_close(got[:, 0], expected, atol=1e-5, rtol=1e-5)
    assert (expected[1, :, mask[1] == 0] == 0).all()  # padding keys (bert) weigh nothing


def _bert64():
    """A float64 tiny BERT classifier (finite differences need the precision)."""
    model = tiny_model("bert", "eager").double()
    inputs = tiny_inputs("bert")
    return model, inputs["input_ids"], inputs["attention_mask"]


def _hand_gradients(model, ids, mask, target):
    """``d logit_target / d A`` of every layer, from the eager attentions themselves."""
    logits, attentions = _eager_forward("bert", model, ids, mask)
    explained = logits.gather(1, target[:, None]).sum()
    return attentions, torch.autograd.grad(explained, attentions)


def test_gradient_weighting_equals_finite_differences():
    model, ids, mask = _bert64()
    explainer = EfficientAttentionAttribution(model)
    target, layer, head, eps = torch.tensor([2, 0]), 1, 2, 1e-6
    weighted = explainer.attention_matrices(
        ids, (mask,), layers=layer, view="raw", weighting="gradient", target=target
    )[:, 0, head, 0]  # (B, S): the [CLS] row
    with torch.no_grad():
        attn = _eager_forward("bert", model, ids, mask)[1][layer][:, head, 0]

    def logit_with(offset):
        def transform(captured):
            changed = captured.attn.clone()
            if captured.layer == layer:
                changed[:, head, 0] += offset
            return changed

        with torch.no_grad(), capture_attention(model, transform=transform):
            logits = model(input_ids=ids, attention_mask=mask).logits
        return logits.gather(1, target[:, None])[:, 0]

    finite = torch.zeros_like(attn)
    for key in range(ids.shape[1]):
        bump = torch.zeros_like(attn)
        bump[:, key] = eps
        finite[:, key] = (logit_with(bump) - logit_with(-bump)) / (2 * eps)
    expected = finite.clamp_min(0) * attn
    assert (finite > 1e-3).any()
    assert (finite < -1e-3).any()
    torch.testing.assert_close(weighted, expected, atol=1e-7, rtol=1e-6)


def test_gradient_weighting_equals_the_autograd_of_eager_attention_and_follows_target():
    model, ids, mask = _bert64()
    explainer = EfficientAttentionAttribution(model)
    per_target = []
    for target in (0, 1):
        attentions, grads = _hand_gradients(model, ids, mask, torch.tensor([target, target]))
        expected = torch.stack(
            [(g.clamp_min(0) * a)[:, :, 0] for a, g in zip(attentions, grads, strict=True)], 1
        )  # (B, L, H, S)
        got = explainer.attribute(
            ids, target=target, additional_forward_args=(mask,), view="raw", reduce=None,
            weighting="gradient",
        )  # fmt: skip
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-9)
        per_target.append(got)
    assert (per_target[0] - per_target[1]).abs().max() > 1e-3  # class-specific


def _gradient_at_view(model, ids, mask, target, layer, view):
    """Gradient of the target logit with respect to the rows of ``view`` substituted for the
    attention of every head of ``layer`` (the model's output is unchanged by the substitution;
    the other layers run as computed)."""
    offsets = []

    def substitute(captured):
        rows, _ = project_matrices(
            captured.attn.detach(), captured.values.detach(), captured.key_mask, False, view
        )
        offsets.append(torch.zeros_like(rows, requires_grad=True))
        return rows + offsets[-1]

    with capture_attention(model, select_heads(model, layers=layer), substitute):
        logits = model(input_ids=ids, attention_mask=mask).logits
    explained = logits.gather(1, target[:, None]).sum()
    return torch.autograd.grad(explained, offsets)[0]


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_gradient_is_the_same_at_every_view_of_the_rows(layer):
    model, ids, mask = _bert64()
    target = torch.tensor([1, 2])
    gradients = {
        name: _gradient_at_view(model, ids, mask, target, layer, get_view(name))
        for name in ("raw", "effective", "efficient")
    }
    real = mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :]
    real = real.expand_as(gradients["raw"])
    assert gradients["raw"][real].abs().max() > 1e-2
    views = {name: get_view(name) for name in gradients}
    rows = {}
    with torch.no_grad(), capture_attention(model, select_heads(model, layers=layer)) as record:
        model(input_ids=ids, attention_mask=mask)
    captured = record.layers[0]
    for name, view in views.items():
        rows[name] = project_matrices(
            captured.attn, captured.values, captured.key_mask, False, view
        )[0]
    assert (rows["efficient"] - rows["raw"])[real].abs().max() > 1e-3  # the rows differ...
    for name in ("effective", "efficient"):  # ...their gradients do not
        torch.testing.assert_close(
            gradients[name][real], gradients["raw"][real], atol=1e-10, rtol=1e-8
        )
    # and the package weights each view's rows by that one gradient
    for name in views:
        weighted = EfficientAttentionAttribution(model).attention_matrices(
            ids, (mask,), layers=layer, view=name, weighting="gradient", target=target
        )[:, 0]
        expected = gradients[name].clamp_min(0) * rows[name]
        torch.testing.assert_close(weighted[real], expected[real], atol=1e-10, rtol=1e-8)


def test_gradient_rollout_equals_a_hand_written_propagation():
    model, ids, mask = _bert64()
    layers, target = [1, 2], torch.tensor([0, 2])
    attentions, grads = _hand_gradients(model, ids, mask, target)
    relevance = torch.eye(ids.shape[1], dtype=torch.float64).repeat(len(ids), 1, 1)
    for layer in layers:  # R <- R + E_h[(grad A * A)^+] R
        cam = (grads[layer] * attentions[layer]).clamp_min(0).mean(1)
        relevance = relevance + cam @ relevance
    expected = relevance[:, 0] * mask  # the [CLS] row; padding keys 0
    got = EfficientAttentionAttribution(model).attribute(
        ids, target=target, additional_forward_args=(mask,), layers=layers, view="raw",
        reduce="rollout", weighting="gradient",
    )  # fmt: skip
    torch.testing.assert_close(got, expected.to(got.dtype), atol=1e-10, rtol=1e-9)
    assert not torch.allclose(got[:, 1:], torch.zeros_like(got[:, 1:]))


def test_norm_rollout_is_a_rollout_of_renormalized_rows():
    model, forward, ids, mask = text_setup("bert")
    explainer = EfficientAttentionAttribution(forward, model=model)
    scores = explainer.attribute(
        ids, additional_forward_args=(mask,), reduce="rollout", weighting="norm"
    )
    torch.testing.assert_close(scores.sum(-1), torch.ones(len(ids)), atol=1e-5, rtol=0)
    plain = explainer.attribute(ids, additional_forward_args=(mask,), reduce="rollout")
    assert (scores - plain).abs().max() > 1e-3


# ---------------------------------------------------------------- composability and invariances


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_every_view_weighting_and_reduction_composes(name):
    model, forward, ids, mask = text_setup(name, "left" if name == "llama" else "right")
    if name == "llama":
        forward = logits_of_last_real_token(forward)
    explainer = EfficientAttentionAttribution(forward, model=model)
    for view in VIEWS:
        for weighting in (None, *WEIGHTINGS):
            for reduce in (*REDUCTIONS, None):
                scores, delta = explainer.attribute(
                    ids, target=1, additional_forward_args=(mask,), view=view, reduce=reduce,
                    weighting=weighting, return_convergence_delta=True,
                )  # fmt: skip
                shape = ids.shape if reduce is not None else (2, 3, NUM_HEADS, ids.shape[1])
                assert scores.shape == shape, (view, weighting, reduce)
                assert torch.isfinite(scores).all()
                assert delta.shape == (2,)
                assert not scores.requires_grad
                assert scores.is_contiguous()
                padding = (mask == 0)[:, None, None, :] if reduce is None else mask == 0
                assert (scores * padding == 0).all()
        matrices = explainer.attention_matrices(ids, (mask,), view=view, weighting="norm", target=1)
        assert matrices.shape == (2, 3, NUM_HEADS, ids.shape[1], ids.shape[1])


@pytest.mark.parametrize("weighting", sorted(WEIGHTINGS))
@pytest.mark.parametrize("reduce", ["mean", "rollout"])
@pytest.mark.parametrize(("name", "padding"), [("bert", "right"), ("llama", "left")])
def test_batch_invariance_alone_versus_padded(weighting, reduce, name, padding):
    model, forward, ids, mask = text_setup(name, padding)
    if name == "llama":
        forward = logits_of_last_real_token(forward)
    explainer = EfficientAttentionAttribution(forward, model=model)
    target = torch.tensor([2, 1])
    options = {"weighting": weighting, "reduce": reduce}
    batch = explainer.attribute(ids, target=target, additional_forward_args=(mask,), **options)
    for b in range(len(ids)):
        real = mask[b].bool()
        alone = explainer.attribute(
            ids[b : b + 1, real],
            target=int(target[b]),
            additional_forward_args=(mask[b : b + 1, real],),
            **options,
        )
        torch.testing.assert_close(batch[b, real], alone[0], atol=1e-5, rtol=1e-5)
        assert (batch[b, ~real] == 0).all()


def _state(model):
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    grads = [p.grad for p in model.parameters()]
    return (
        model.config._attn_implementation,
        model.training,
        torch.is_grad_enabled(),
        hooks,
        all(g is None for g in grads),
    )


def test_gradient_weighting_leaves_the_model_as_it_was_also_after_an_error():
    model, forward, ids, mask = text_setup("bert")
    before = _state(model)
    explainer = EfficientAttentionAttribution(forward, model=model)
    explainer.attribute(ids, target=1, additional_forward_args=(mask,), weighting="gradient")
    assert _state(model) == before

    def failing(ids, mask):
        model(input_ids=ids, attention_mask=mask)
        raise RuntimeError("boom in the user's forward")

    with pytest.raises(ValueError, match="boom"):
        EfficientAttentionAttribution(failing, model=model).attribute(
            ids, target=1, additional_forward_args=(mask,), weighting="gradient"
        )
    with pytest.raises(ValueError, match="3 classes"):
        explainer.attribute(ids, target=7, additional_forward_args=(mask,), weighting="gradient")
    assert _state(model) == before
    with torch.no_grad():  # the caller's no_grad survives, and the weighting still works
        scores = explainer.attribute(
            ids, target=1, additional_forward_args=(mask,), weighting="gradient"
        )
        assert not torch.is_grad_enabled()
    assert scores.abs().sum() > 0
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        explainer.attribute(ids, target=1, additional_forward_args=(mask,), weighting="gradient")
    assert _state(model) == before


# ---------------------------------------------------------------- bad input


def test_unknown_weighting_lists_the_choices():
    model, forward, ids, mask = text_setup("bert")
    explainer = EfficientAttentionAttribution(forward, model=model)
    with pytest.raises(ValueError, match=r"weighting must be one of \('norm', 'gradient', None\)"):
        explainer.attribute(ids, additional_forward_args=(mask,), weighting="nope")
    with pytest.raises(ValueError, match="weighting must be one of"):
        explainer.attention_matrices(ids, (mask,), weighting="Norm")


@pytest.mark.parametrize("weighting", [None, "norm", "gradient"])
def test_target_is_validated_whatever_the_weighting(weighting):
    model, forward, ids, mask = text_setup("bert")
    explainer = EfficientAttentionAttribution(forward, model=model)

    def run(target):
        return explainer.attribute(
            ids, target=target, additional_forward_args=(mask,), weighting=weighting
        )

    with pytest.raises(ValueError, match=f"the output has {NUM_LABELS} classes"):
        run(NUM_LABELS)
    with pytest.raises(ValueError, match=f"the output has {NUM_LABELS} classes"):
        run(torch.tensor([0, -1]))
    with pytest.raises(ValueError, match=r"one class index or one per example \(2\)"):
        run(torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer class indices; got a tensor of dtype"):
        run(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="must hold integer indices; got float"):
        run(1.0)
    with pytest.raises(ValueError, match=r"one target per example \(2\); got 3"):
        run([0, 1, 1])
    assert run(torch.tensor([2, 0])).shape == ids.shape


def test_gradient_needs_a_class_axis_a_target_and_a_path_through_attention():
    model, forward, ids, mask = text_setup("gpt2")
    explainer = EfficientAttentionAttribution(forward, model=model)  # (B, S, V) LM logits
    with pytest.raises(ValueError, match=r"one row of class scores per example, \(B, C\)"):
        explainer.attribute(ids, target=1, additional_forward_args=(mask,), weighting="gradient")
    model, forward, ids, mask = text_setup("bert")
    with pytest.raises(ValueError, match="needs a target: the output has 3 classes"):
        EfficientAttentionAttribution(forward, model=model).attribute(
            ids, additional_forward_args=(mask,), weighting="gradient"
        )

    def detached(ids, mask):
        return forward(ids, mask).detach()

    with pytest.raises(ValueError, match="does not depend on the attention of the selected"):
        EfficientAttentionAttribution(detached, model=model).attribute(
            ids, target=1, additional_forward_args=(mask,), weighting="gradient"
        )

    def constant(ids, mask):  # runs the model, but its output does not depend on it
        return model(input_ids=ids, attention_mask=mask).logits * 0

    with pytest.raises(ValueError, match="does not depend on the attention"):
        EfficientAttentionAttribution(constant, model=model).attribute(
            ids, target=1, additional_forward_args=(mask,), weighting="gradient"
        )


def test_norm_weighting_needs_the_output_projection():
    from dataclasses import replace

    from captum_effattn.models import ARCHITECTURES, UnsupportedModelError, register_architecture

    model, forward, ids, mask = text_setup("bert")
    spec = ARCHITECTURES["bert"]
    register_architecture(replace(spec, output_projection=None))
    try:
        explainer = EfficientAttentionAttribution(forward, model=model)
        with pytest.raises(UnsupportedModelError, match="names no output_projection"):
            explainer.attribute(ids, additional_forward_args=(mask,), weighting="norm")
    finally:
        register_architecture(spec)


def test_check_sufficiency_validates_its_target():
    from captum_effattn.attr import check_sufficiency

    model, forward, ids, mask = text_setup("bert")
    report = check_sufficiency(model, ids, (mask,), forward_func=forward, target=2)
    assert report.holds(1e-5)
    with pytest.raises(ValueError, match=f"the output has {NUM_LABELS} classes"):
        check_sufficiency(model, ids, (mask,), forward_func=forward, target=99)


@pytest.mark.parametrize(
    ("name", "padding", "query"),
    [
        ("bert", "right", 3),
        ("bert", "right", "all"),
        ("gpt2", "right", "auto"),
        ("gpt2", "left", 9),
    ],
)
def test_gradient_weighting_of_any_query_rows_equals_the_autograd_of_eager_attention(
    name, padding, query
):
    # Only the explained rows' gradients are computed: per example (a right-padded decoder's last
    # real tokens differ), at a position, or every row.
    model = tiny_model(name, "eager").double()
    inputs = tiny_inputs(name, padding=padding)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    last = mask.sum(-1) - 1 if padding == "right" else torch.full((2,), ids.shape[1] - 1)

    def forward(ids, mask, output_attentions=False):
        if name == "bert":
            out = model(input_ids=ids, attention_mask=mask, output_attentions=output_attentions)
            return out.logits, out.attentions
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions(mask),
            output_attentions=output_attentions,
        )
        return out.logits[torch.arange(2), last], out.attentions

    target = torch.tensor([2, 1])
    explainer = EfficientAttentionAttribution(lambda i, m: forward(i, m)[0], model=model)
    got = explainer.attribute(
        ids, target=target, additional_forward_args=(mask,), view="raw", reduce=None,
        query=query, weighting="gradient",
    )  # fmt: skip
    logits, attentions = forward(ids, mask, output_attentions=True)
    grads = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), attentions)
    rows = select_query_rows(query, mask.bool(), causal=name == "gpt2")
    index = rows.positions[:, None, :, None].expand(-1, attentions[0].shape[1], -1, ids.shape[1])
    expected = torch.stack(
        [
            mean_over_queries((g.clamp_min(0) * a).gather(2, index), rows.real)
            for a, g in zip(attentions, grads, strict=True)
        ],
        1,
    )  # (B, L, H, S)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-9)
