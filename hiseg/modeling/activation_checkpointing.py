"""Activation checkpointing (``torch.utils.checkpoint``) for the transformer blocks of every
backbone: the plain ViT (``MODEL.VIT.ACTIVATION_CHECKPOINTING``, also the ViT inside OAP's
ViT-Adapter) and CAST (``MODEL.CAST.ACTIVATION_CHECKPOINTING``).

A checkpointed call keeps only its inputs during the forward pass and runs the module again in
the backward pass to get the activations it needs: memory falls with the number of blocks (only
one block's activations are alive at a time in the backward pass), for about one more forward
pass of those blocks (~30% more step time; detectron2's ViTDet ``use_act_checkpoint`` and timm's
``set_grad_checkpointing`` do the same).

Choices:
* The non-reentrant implementation (``use_reentrant=False``): it takes keyword arguments (CAST's
  attention mask), works with DistributedDataParallel without ``find_unused_parameters`` and with
  inputs that need no gradient (the first block after a frozen patch embedding).
* The RNG state is saved and restored around the recomputation (torch's default), so dropout and
  stochastic depth draw the same masks twice: the loss and the gradients are those of the plain
  step (``tests/hiseg/modeling/test_activation_checkpointing.py``).
* Only when gradients are being recorded: under ``torch.no_grad`` (evaluation, the OAP teacher, the
  MoCo momentum encoder) a checkpoint would save nothing, and the module is called directly.
"""
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["maybe_checkpoint"]


def maybe_checkpoint(fn: Callable, *args, enabled: bool = True, **kwargs):
    """``fn(*args, **kwargs)``, through ``torch.utils.checkpoint`` when ``enabled`` and gradients
    are being recorded."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)
