"""Attention taps: read what a transformer block's self-attention computed during a forward pass,
without changing the forward. One home for the hook every key-feature and attention-map reader
uses (OAP's teacher keys, the ViT key features, the figure-ground class attention).

A block is any module with ``attn.qkv``, a linear layer whose output is ``[q | k | v]`` along the
last dimension, each part head-major (heads x head_dim), as in timm's ``Attention`` and CAST's
blocks.

The attention-taps interface of a backbone (what :mod:`hiseg.evaluation.figure_ground` calls; the
shared core knows no backbone's internals):

* ``attention_blocks() -> list of blocks``: the blocks whose attention can be read, in order;
* ``class_attention(images, block=-1, **inputs) -> dict``: the class token's attention in block
  ``block`` (python index into ``attention_blocks()``) from one forward pass, with at least
  ``attn`` (B, heads, M), renormalised to sum to 1 over the M non-prefix tokens the block
  attended to (0 on the others), ``labels`` (B, H, W) int64, the token (0..M-1) each pixel of
  ``images`` belongs to (-1: none), and ``output``, what the backbone's forward returned in that
  pass. ``inputs`` are the backbone's other forward inputs (CAST: ``superpixels``).

:class:`hiseg.modeling.vit.ViTBackbone` implements it (tokens = patches) and so does CAST's
backbone (tokens = the segments of the block's hierarchy level). :func:`class_attention_from_qkv`
is the shared computation from a tapped block.
"""
import contextlib
from typing import Iterator, Optional, Tuple

import torch
from torch import nn

__all__ = ["QKVTap", "tap_qkv", "split_qkv", "class_attention_from_qkv"]


class QKVTap:
    """What :func:`tap_qkv` recorded: ``qkv``, the last output of the tapped projection."""

    def __init__(self, detach: bool):
        self._detach = detach
        self._qkv = None

    def _hook(self, _module, _inputs, output):
        self._qkv = output.detach() if self._detach else output

    @property
    def qkv(self) -> torch.Tensor:
        if self._qkv is None:
            raise RuntimeError("the tapped block did not run in the forward pass")
        return self._qkv


def _qkv_module(block: nn.Module) -> nn.Module:
    qkv = getattr(getattr(block, "attn", None), "qkv", None)
    if not isinstance(qkv, nn.Module):
        raise TypeError(f"{type(block).__name__} has no 'attn.qkv' projection to tap")
    return qkv


@contextlib.contextmanager
def tap_qkv(block: nn.Module, detach: bool = False) -> Iterator[QKVTap]:
    """Record the output of ``block.attn.qkv`` while the ``with`` body runs; the hook is removed
    on leaving, also on an exception. ``detach=True`` keeps it out of autograd."""
    tap = QKVTap(detach)
    handle = _qkv_module(block).register_forward_hook(tap._hook)
    try:
        yield tap
    finally:
        handle.remove()


def split_qkv(qkv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(..., 3 * D)`` -> ``q, k, v``, each ``(..., D)`` (the heads concatenated)."""
    d = qkv.shape[-1] // 3
    return qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]


def class_attention_from_qkv(attn_module: nn.Module, qkv: torch.Tensor, key_valid: Optional[torch.Tensor] = None,
                             num_prefix: int = 1) -> torch.Tensor:
    """Class token (token 0) attention of a timm ``Attention`` from its ``qkv`` output.

    ``softmax(q_cls k^T / sqrt(d))`` per head, with the block's ``q_norm`` / ``k_norm`` and scale,
    over all tokens including the class token itself (as DINO); the prefix (class and register)
    columns are then dropped and the rest renormalised to sum to 1 per head.

    Args:
        attn_module: the block's ``attn`` (gives ``num_heads``, ``q_norm``, ``k_norm``, ``scale``).
        qkv: (B, N, 3 * heads * head_dim), the output of ``attn.qkv``.
        key_valid: (B, N) bool, False for padded keys (excluded), or None.
        num_prefix: class + register tokens; their columns are dropped.
    Returns:
        (B, heads, N - num_prefix) attention, renormalised to sum to 1 per head.
    """
    b, n, c3 = qkv.shape
    heads = attn_module.num_heads
    hd = c3 // (3 * heads)
    q, k, _ = qkv.reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn_module.q_norm(q), attn_module.k_norm(k)
    logits = (q[:, :, :1] * attn_module.scale) @ k.transpose(-2, -1)  # (B, heads, 1, N)
    logits = logits[:, :, 0].float()
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid[:, None, :].bool(), float("-inf"))
    attn = logits.softmax(-1)[:, :, num_prefix:]
    return attn / attn.sum(-1, keepdim=True).clamp_min(1e-12)
