"""Feature maps for the pseudo-mask generators.

Any ``(B, C, h, w)`` feature map works (:func:`flatten_normalized`). For a timm
``VisionTransformer`` the "key" features of the last self-attention block are the ones OAP and
MaskCut use (OAP Sec. 4.2, "Graph Initialization"): :func:`vit_key_features` hooks the output of
the last block's ``attn.qkv`` projection and keeps its key third, head-major (the same layout as
concatenating the heads), without the prefix (class / register) tokens. Build the ViT with
:func:`hiseg.modeling.vit.make_timm_vit`; a pretrained CNN source is
:func:`hiseg.modeling.efficientnet_lite0.build_efficientnet_lite0_features`.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hiseg.modeling.attention_taps import split_qkv, tap_qkv

__all__ = ["flatten_normalized", "vit_key_features"]


def flatten_normalized(features: torch.Tensor, dtype=None) -> Tuple[torch.Tensor, int, int]:
    """``(B, C, h, w)`` -> (``(B, h*w, C)`` L2-normalised per token, h, w); raster token order."""
    if features.dim() != 4:
        raise ValueError(f"expected a (B, C, h, w) feature map, got shape {tuple(features.shape)}")
    b, c, h, w = features.shape
    x = features.flatten(2).transpose(1, 2)
    if dtype is not None:
        x = x.to(dtype)
    elif not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return F.normalize(x, p=2.0, dim=-1, eps=1e-12), h, w


def _grid_size(model: nn.Module, img_size: Tuple[int, int]) -> Tuple[int, int]:
    pe = model.patch_embed
    if hasattr(pe, "dynamic_feat_size"):
        return tuple(int(v) for v in pe.dynamic_feat_size(img_size))
    ph, pw = pe.patch_size
    return img_size[0] // ph, img_size[1] // pw


@torch.no_grad()
def vit_key_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Key features of the last block of a timm ``VisionTransformer``, ``(B, D, h, w)``.

    The model should be built with ``dynamic_img_size=True`` to accept any image size (the
    position embedding is then interpolated by timm); any patch size works. The model's mode
    (train / eval) is left as it is.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise TypeError("model has no 'blocks' (expected a timm VisionTransformer)")
    with tap_qkv(blocks[-1]) as tap:
        model.forward_features(images)
    k = split_qkv(tap.qkv)[1]  # (B, T, D): the keys, each head-major (heads, head_dim)
    b, d = k.shape[0], k.shape[-1]
    k = k[:, int(getattr(model, "num_prefix_tokens", 1)):]
    gh, gw = _grid_size(model, (int(images.shape[-2]), int(images.shape[-1])))
    if gh * gw != k.shape[1]:
        raise RuntimeError(f"token count {k.shape[1]} does not match the grid {gh}x{gw}")
    return k.transpose(1, 2).reshape(b, d, gh, gw)
