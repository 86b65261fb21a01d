"""The hook point into transformers: a private attention implementation and its mask.

Supported models compute self-attention through
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` and build their mask through
``ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]``. We register one function in each
under :data:`IMPLEMENTATION` (a private name: registering it changes nothing for models not
switched to it) and switch a model's configs to that name for the duration of a capture only
(:func:`attention_implementation`). A name missing from the mask registry would make transformers
build no mask at all, so both registrations are needed.

The switch belongs to the thread that opens the capture: ``config._attn_implementation`` reads
:data:`IMPLEMENTATION` on that thread only (a per-thread override of the config property,
installed once by :func:`ensure_registered`; configs without an override read exactly what they
stored). Other threads running the same model meanwhile see its own implementation and run
exactly as they would without the capture, and taps are per thread too, so several threads can
capture one model at once. Nothing stored on the model or its configs changes.

The registered attention function dispatches on the attention module it is called for: a module
with an active :class:`LayerTap` (a selected layer under capture) computes attention through the
tap; any other module (unselected layers, cross-attention) runs transformers' own ``sdpa``
function, which accepts the boolean mask we build.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from captum_effattn.models._modules import every_module

IMPLEMENTATION = "captum_effattn_capture"
"""The private ``attn_implementation`` name a model runs under while it is being captured."""


class LayerTap(Protocol):
    """Computes one layer's attention for a capture; see :mod:`captum_effattn.models.capture`."""

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float,
        scaling: float | None,
        extra: dict,
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


class _ThreadState(threading.local):
    """What the current thread's captures switched: each thread starts with empty mappings."""

    def __init__(self) -> None:
        self.taps: dict[nn.Module, LayerTap] = {}
        self.implementations: dict[int, str] = {}


_THREAD = _ThreadState()


def active_taps() -> dict[nn.Module, LayerTap]:
    """Attention module -> the tap of the current thread's capture running it (empty outside
    captures; other threads' captures are not in it)."""
    return _THREAD.taps


def _attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``AttentionInterface`` signature: ``query (B, H, S_q, d)``, ``key``/``value``
    ``(B, H_kv, S_k, d)``; returns the output ``(B, S_q, H, d)`` and the probabilities."""
    tap = _THREAD.taps.get(module)
    if tap is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    return tap(query, key, value, attention_mask, dropout, scaling, kwargs)


def _capture_mask(**kwargs) -> torch.Tensor | None:
    """``sdpa``'s boolean mask ``(B, 1, S_q, S_k)`` (True = may attend), or ``None``.

    ``None`` when ``sdpa`` itself would skip the mask: no key is padding and the pattern is
    plain causal (or bidirectional), which ``is_causal`` expresses. The capture then reads every
    key as real, and no ``S_q x S_k`` mask is built, so long unpadded inputs need memory linear
    in their length; a padded batch needs the mask. Queries and keys of different lengths (a
    cache, or a mask that does not fit the input) always get the mask, as before.
    """
    if kwargs.get("q_length") != kwargs.get("kv_length"):
        kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return sdpa_mask(**kwargs)


_STORED_IMPLEMENTATION: Any = PreTrainedConfig.__dict__["_attn_implementation"]


def _per_thread_implementation(config: PreTrainedConfig) -> Any:
    """``config._attn_implementation`` as the current thread sees it."""
    overridden = _THREAD.implementations.get(id(config))
    if overridden is not None:
        return overridden
    return _STORED_IMPLEMENTATION.fget(config)


_PER_THREAD_PROPERTY = property(
    _per_thread_implementation, _STORED_IMPLEMENTATION.fset, doc=_STORED_IMPLEMENTATION.__doc__
)


def ensure_registered() -> None:
    """Register the private attention and mask functions with transformers, and make
    ``config._attn_implementation`` thread-aware (idempotent)."""
    AttentionInterface.register(IMPLEMENTATION, _attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, _capture_mask)
    PreTrainedConfig._attn_implementation = _PER_THREAD_PROPERTY  # type: ignore[method-assign,assignment]


def _configs_of(model: nn.Module) -> list[PreTrainedConfig]:
    """Every distinct config a module of ``model`` holds, with their sub-configs."""
    found: dict[int, PreTrainedConfig] = {}
    stack: list[PreTrainedConfig] = []
    for module in every_module(model):
        # A plain attribute, read without ``Module.__getattr__`` (whose miss raises and catches
        # an AttributeError in every module without a config: most of this loop's time).
        config = module.__dict__.get("config")
        if config is None and isinstance(getattr(type(module), "config", None), property):
            config = module.config
        if isinstance(config, PreTrainedConfig):
            stack.append(config)
    while stack:
        config = stack.pop()
        if id(config) in found:
            continue
        found[id(config)] = config
        for key in config.sub_configs:
            sub = getattr(config, key, None)
            if isinstance(sub, PreTrainedConfig):
                stack.append(sub)
    return list(found.values())


@contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Run ``model`` (all its configs and sub-configs) under attention implementation ``name``
    on the current thread only.

    Other threads keep reading each config's stored implementation, and nothing stored changes;
    the current thread's view is put back on exit, also when the body raises. Needs
    :func:`ensure_registered` (called here).
    """
    ensure_registered()
    configs = _configs_of(model)  # held: their ids key the overrides until the block ends
    overrides = _THREAD.implementations
    saved = [(id(config), overrides.get(id(config))) for config in configs]
    try:
        for config in configs:
            overrides[id(config)] = name
        yield
    finally:
        for key, value in saved:
            if value is None:
                overrides.pop(key, None)
            else:
                overrides[key] = value
