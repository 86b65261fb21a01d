"""Independent references for captured attention, sharing no code with the package.

Probabilities come from transformers' own eager attention (``output_attentions=True`` on a copy
switched to ``eager``); values from forward hooks on each layer's value projection, whose paths are
written out here rather than read from the registry.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from captum_effattn import efficient_attention


def _values_from_projection(name: str, output: torch.Tensor, heads: int, head_dim: int):
    if name == "gpt2":  # c_attn projects to [query | key | value]
        output = output.split(output.shape[-1] // 3, dim=-1)[2]
    batch, seq = output.shape[:2]
    return output.view(batch, seq, -1, head_dim).transpose(1, 2)


VALUE_PROJECTIONS = {
    "bert": lambda base: [block.attention.self.value for block in base.encoder.layer],
    "roberta": lambda base: [block.attention.self.value for block in base.encoder.layer],
    "distilbert": lambda base: [block.attention.v_lin for block in base.transformer.layer],
    "gpt2": lambda base: [block.attn.c_attn for block in base.h],
    "llama": lambda base: [block.self_attn.v_proj for block in base.layers],
    "vit": lambda base: [block.attention.v_proj for block in base.layers],
}


def eager_attentions(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, ...]:
    """Per layer ``(B, H, S, S)``: what transformers' eager attention returns for ``inputs``."""
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        return reference(**inputs, output_attentions=True).attentions


def hooked_values(model: nn.Module, inputs: dict) -> list[torch.Tensor]:
    """Per layer ``(B, H_kv, S, d_head)``: the value projection's output, bias included."""
    name = model.config.model_type
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    outputs: list[torch.Tensor] = []
    handles = [
        module.register_forward_hook(lambda m, args, out: outputs.append(out))
        for module in VALUE_PROJECTIONS[name](model.base_model)
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return [
        _values_from_projection(name, out, config.num_attention_heads, head_dim) for out in outputs
    ]


def rows_with_keys(key_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """``(B, 1, S, 1)``: query rows that may attend to at least one real key."""
    allowed = key_mask[:, None, None, :]
    if causal:
        seq = key_mask.shape[-1]
        allowed = allowed & torch.ones(seq, seq, dtype=torch.bool).tril()
    return allowed.any(-1, keepdim=True)


def mixed_with_uniform(attn: torch.Tensor, key_mask: torch.Tensor, causal: bool, weight=0.5):
    """Each row moved ``weight`` of the way to the uniform distribution over its visible keys."""
    allowed = key_mask[:, None, None, :].to(attn.dtype)
    if causal:
        seq = key_mask.shape[-1]
        allowed = allowed * torch.ones(seq, seq, dtype=attn.dtype).tril()
    allowed = allowed.expand_as(attn)
    uniform = allowed / allowed.sum(-1, keepdim=True).clamp_min(1)
    return (1 - weight) * attn + weight * uniform


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    return float((new - old).double().norm() / old.double().norm())


class EfficientSubstitution:
    """Transform: efficient attention in place of each row; remembers how far rows moved."""

    def __init__(self):
        self.moved = 0.0

    def __call__(self, captured):
        rows = efficient_attention(
            captured.attn, captured.values, captured.key_mask[:, None], captured.causal
        )
        self.moved = max(self.moved, float((rows - captured.attn).abs().max()))
        return rows
