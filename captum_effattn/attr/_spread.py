"""Put token scores back onto the inputs the user passed, in their shapes.

Attention scores tokens; Captum attributions have the inputs' shapes. Each input tensor aligned
with the model's sequence receives the token scores:

- ``(B, S)`` (token ids, a token gate): the scores themselves;
- ``(B, S, *F)`` (embeddings): each score spread evenly over the features, so summing the feature
  axes gives it back;
- ``(B, C, H, W)`` pixels of a ViT: each patch token's score spread evenly over the patch's pixels
  (the [CLS] token has no pixels and is left out).
"""

from __future__ import annotations

import math

import torch

from captum_effattn.models import ModelArchitecture


def _spread_over_patches(
    scores: torch.Tensor,
    pixels: torch.Tensor,
    arch: ModelArchitecture,
    patch_size: tuple[int, int],
) -> torch.Tensor:
    patch_h, patch_w = patch_size
    batch, channels, height, width = pixels.shape
    grid_h, grid_w = height // patch_h, width // patch_w
    patches = scores[:, 1:] if arch.spec.prepends_cls_token else scores
    if patches.shape[1] != grid_h * grid_w:
        raise ValueError(
            f"{arch.model_class} saw {patches.shape[1]} patch tokens but the pixel input of shape "
            f"{tuple(pixels.shape)} makes {grid_h} x {grid_w} patches of {patch_h} x {patch_w}"
        )
    per_pixel = patches.reshape(batch, grid_h, grid_w) / (channels * patch_h * patch_w)
    per_pixel = per_pixel.repeat_interleave(patch_h, 1).repeat_interleave(patch_w, 2)
    return per_pixel[:, None].expand(batch, channels, height, width).to(_float(pixels, scores))


def _float(tensor: torch.Tensor, scores: torch.Tensor) -> torch.dtype:
    return tensor.dtype if tensor.is_floating_point() else scores.dtype


def spread_to_input(
    scores: torch.Tensor, tensor: torch.Tensor, index: int, arch: ModelArchitecture
) -> torch.Tensor:
    """Scores ``(B, S)`` onto one input tensor's shape.

    Args:
        scores: ``(B, S)`` one score per token the model saw.
        tensor: the user's input tensor number ``index`` (for messages).
        index: its position in the inputs tuple.
        arch: the model's architecture (patch geometry for ViT).

    Raises:
        ValueError: the tensor is not aligned with the model's sequence.
    """
    batch, length = scores.shape
    if arch.patch_size is not None and tensor.dim() == 4:
        return _spread_over_patches(scores, tensor, arch, arch.patch_size)
    if tensor.dim() < 2 or tuple(tensor.shape[:2]) != (batch, length):
        pixels = " or (B, C, H, W) pixels" if arch.patch_size is not None else ""
        raise ValueError(
            f"input {index} has shape {tuple(tensor.shape)}, but {arch.model_class} ran "
            f"{batch} example(s) of {length} tokens: attributions need inputs of shape "
            f"(B, S) = ({batch}, {length}) or (B, S, ...) = ({batch}, {length}, ...){pixels}"
        )
    features = math.prod(tensor.shape[2:])
    spread = scores.reshape(batch, length, *([1] * (tensor.dim() - 2))) / features
    return spread.expand(tensor.shape).to(_float(tensor, scores))
