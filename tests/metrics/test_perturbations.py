"""Token removal and gate noise with Captum's own infidelity and sensitivity_max, against closed
forms on models whose output is known."""

from __future__ import annotations

import pytest
import torch
from captum.attr import Saliency
from captum.metrics import infidelity, sensitivity_max

from captum_effattn.metrics import explanation_function, gate_noise, token_removal
from tests.metrics.analytic import LinearGate

B, S = 3, 12
WEIGHTS = torch.linspace(-1, 2, S)


def logit_1(gate, *args):
    """Class-1 logit minus class-0 logit of :class:`LinearGate`: linear in the gate."""
    return LinearGate(WEIGHTS)(gate)[:, 1] - LinearGate(WEIGHTS)(gate)[:, 0]


def test_token_removal_splits_the_gate_into_kept_and_removed_tokens():
    gate = torch.ones(400, S)
    removed, kept = token_removal(0.3, seed=5)(gate)
    torch.testing.assert_close(removed + kept, gate)
    assert set(kept.unique().tolist()) <= {0.0, 1.0}
    assert float(removed.mean()) == pytest.approx(0.3, abs=0.02)
    # the same seed draws the same removals; calls draw new ones
    again = token_removal(0.3, seed=5)
    assert torch.equal(again(gate)[1], kept)
    assert not torch.equal(again(gate)[1], kept)


def test_token_removal_keeps_the_tuple_convention():
    perturb = token_removal(0.5)
    removed, kept = perturb((torch.ones(2, S), torch.ones(2, 4)))
    assert isinstance(removed, tuple)
    assert isinstance(kept, tuple)
    assert [t.shape for t in kept] == [(2, S), (2, 4)]
    _, single_kept = perturb(torch.ones(2, S))
    assert isinstance(single_kept, torch.Tensor)


def test_infidelity_removing_every_token_equals_the_closed_form():
    """drop_probability=1 removes everything: I = g, so infidelity = (sum(a) - (f(g) - f(0)))^2."""
    gate = torch.ones(B, S)
    attributions = torch.randn(B, S, generator=torch.Generator().manual_seed(0))
    values = infidelity(logit_1, token_removal(1.0), gate, attributions, n_perturb_samples=4)
    drop = logit_1(gate) - logit_1(torch.zeros(B, S))
    expected = (attributions.double().sum(-1) - drop) ** 2
    torch.testing.assert_close(values.double(), expected, rtol=1e-5, atol=1e-5)


def test_infidelity_is_zero_for_the_exact_attributions_of_a_linear_model():
    gate = torch.ones(B, S)
    exact = WEIGHTS.expand(B, S).clone()  # f(g) - f(g - I) = w . I exactly
    values = infidelity(logit_1, token_removal(0.3), gate, exact, n_perturb_samples=20)
    assert float(values.abs().max()) < 1e-9
    shuffled = exact[:, torch.randperm(S, generator=torch.Generator().manual_seed(0))]
    assert (
        float(infidelity(logit_1, token_removal(0.3), gate, shuffled, n_perturb_samples=20).min())
        > 0.1
    )


def test_gate_noise_fades_each_token_within_the_radius():
    gate = torch.ones(500, S)
    faded = gate_noise(0.2, seed=3)(gate, 0.02)  # sensitivity_max's own radius is ignored
    assert bool(((faded <= 1) & (faded >= 0.8)).all())
    assert float((1 - faded).mean()) == pytest.approx(0.1, abs=0.01)
    assert torch.equal(gate_noise(0.2, seed=3)(gate), faded)
    assert isinstance(gate_noise(0.2)((gate,)), tuple)


def test_sensitivity_max_of_saliency_on_a_quadratic_model_is_bounded_by_the_radius():
    """f(g) = sum(w g^2) / 2 has gradient w * g: a fade of at most r changes it by at most
    r * |w| per token, so the relative change is at most r * ||w|| / ||w * g|| = r at g = 1."""

    def quadratic(gate):
        return 0.5 * (WEIGHTS * gate**2).sum(-1, keepdim=True)

    saliency = explanation_function(Saliency(quadratic), abs=False)
    gate = torch.ones(B, S)
    radius = 0.1
    values = sensitivity_max(
        saliency, gate, perturb_func=gate_noise(radius), n_perturb_samples=8, target=0
    )
    assert bool((values > 0.3 * radius).all())
    assert bool((values <= radius + 1e-6).all())


def test_sensitivity_max_of_a_linear_model_is_zero():
    saliency = explanation_function(Saliency(logit_1), abs=False)
    values = sensitivity_max(saliency, torch.ones(B, S), perturb_func=gate_noise(0.5))
    assert float(values.abs().max()) == 0.0


def test_explanation_function_returns_what_it_was_given():
    saliency = explanation_function(Saliency(logit_1))
    assert isinstance(saliency(torch.ones(2, S)), torch.Tensor)
    single = saliency((torch.ones(2, S),))
    assert isinstance(single, tuple)
    assert single[0].shape == (2, S)
    assert not single[0].requires_grad


@pytest.mark.parametrize("probability", [0.0, -0.1, 1.5])
def test_drop_probability_must_be_a_probability(probability):
    with pytest.raises(ValueError, match=r"drop_probability must be in \(0, 1\]"):
        token_removal(probability)


@pytest.mark.parametrize("radius", [0.0, -0.2, 2.0])
def test_radius_must_be_positive_and_at_most_one(radius):
    with pytest.raises(ValueError, match=rf"gate-noise radius must be in \(0, 1\]; got {radius}"):
        gate_noise(radius)


def test_arguments_that_sensitivity_max_expands_are_refused():
    with pytest.raises(ValueError, match=r"pass \['target'\] to sensitivity_max"):
        explanation_function(Saliency(logit_1), target=1)
