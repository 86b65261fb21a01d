"""Forward functions in token-gate space whose outputs are known in closed form."""

from __future__ import annotations

import torch


class LinearGate:
    """Two classes with logits ``(0, w . g)``: ``p(class 1) = sigmoid(w . g)``.

    Called like a :class:`~captum_effattn.metrics.TokenGate`: ``f(gate, input_ids, mask)``; the
    ids and mask are ignored (the mask only travels, as with a real model).
    """

    def __init__(self, weights: torch.Tensor):
        self.weights = weights.double()

    def __call__(self, gate, input_ids=None, attention_mask=None):
        score = (gate.double() * self.weights).sum(-1)
        return torch.stack([torch.zeros_like(score), score], -1)

    def p1(self, gate: torch.Tensor) -> float:
        """``p(class 1)`` of one ``(S,)`` gate, by hand."""
        return float(torch.sigmoid((gate.double() * self.weights).sum()))
