"""Attention taps: read what a transformer block's self-attention computed during a forward pass,
without changing the forward. One home for the hook every key-feature and attention-map reader
uses (OAP's teacher keys, the ViT key features, the figure-ground class attention).

A block is any module with ``attn.qkv``, a linear layer whose output is ``[q | k | v]`` along the
last dimension, each part head-major (heads x head_dim), as in timm's ``Attention`` and CAST's
blocks. Backbones that expose attention document which blocks they give (``attention_blocks``).
"""
import contextlib
from typing import Iterator, Tuple

import torch
from torch import nn

__all__ = ["QKVTap", "tap_qkv", "split_qkv"]


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
