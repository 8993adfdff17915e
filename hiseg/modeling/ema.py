"""The momentum (EMA) teacher shared by CAST's MoCo-v3 pre-training and OAP's teacher-student
training: the cosine momentum schedule, the one-time copy of the online weights into the target,
and the exponential moving average of the parameters.

The modules keep their own ``*_synced`` buffer (saved in checkpoints, so a resumed run keeps its
teacher); these functions read and set it.
"""
import math
from typing import Sequence, Tuple

import torch
from torch import nn

__all__ = ["cosine_momentum", "copy_once_", "ema_update_"]

Pairs = Sequence[Tuple[nn.Module, nn.Module]]


def cosine_momentum(base: float, it: int, max_iter: int, end: float = 1.0) -> float:
    """Cosine schedule of the momentum from ``base`` (``it = 0``) to ``end`` (``it = max_iter``;
    ``it`` is clamped to ``[0, max_iter]``): DINO's form, and MoCo-v3's ``adjust_moco_momentum``
    with ``end = 1``. OAP Sec. 5.1: "a cosine momentum schedule from 0.996 to 1"."""
    t = min(max(it, 0), max(max_iter, 1)) / max(max_iter, 1)
    return end - (end - base) * 0.5 * (1.0 + math.cos(math.pi * t))


@torch.no_grad()
def copy_once_(synced: torch.Tensor, pairs: Pairs) -> bool:
    """Before the first update (``synced == 0``) load each online module's state dict into its
    target and set ``synced`` to 1; returns whether it copied. Done at the first step, not at
    construction, so that weights loaded after construction (converted checkpoints) reach the
    target instead of being averaged into a random one."""
    if int(synced) != 0:
        return False
    for online, target in pairs:
        target.load_state_dict(online.state_dict())
    synced.fill_(1)
    return True


@torch.no_grad()
def ema_update_(pairs: Pairs, momentum: float, copy_buffers: bool = False) -> None:
    """``target = m * target + (1 - m) * online`` for every parameter of each (online, target)
    pair; ``copy_buffers`` also copies the buffers (OAP's teacher), otherwise they are left
    alone (MoCo-v3's momentum encoder keeps its own BatchNorm statistics)."""
    for online, target in pairs:
        for p, tp in zip(online.parameters(), target.parameters()):
            tp.mul_(momentum).add_(p.detach(), alpha=1.0 - momentum)
        if copy_buffers:
            for b, tb in zip(online.buffers(), target.buffers()):
                tb.copy_(b)
