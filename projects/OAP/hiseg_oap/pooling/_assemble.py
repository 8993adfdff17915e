"""Book-keeping shared by the reference and the fast OAP: from per-layer token partitions and
supernode features to :class:`PseudoMasks` (area filter, parent indices). No pooling maths here.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .types import MaskLevel, OAPLayer, PseudoMasks

__all__ = ["assemble_result", "overlap_parents"]


def _kept_index(area: torch.Tensor, phi: int) -> Tuple[torch.Tensor, torch.Tensor]:
    keep_ids = torch.nonzero(area >= phi).flatten()
    kidx = torch.full_like(area, -1, dtype=torch.long)
    kidx[keep_ids] = torch.arange(keep_ids.numel(), device=area.device)
    return keep_ids, kidx


def overlap_parents(
    kidx: torch.Tensor, part: torch.Tensor, kidx_next: torch.Tensor, part_next: torch.Tensor,
    num: int, num_next: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """For every kept mask of a partition, the kept mask of another partition it overlaps most.

    Args:
        kidx, kidx_next: supernode -> kept-mask index (or -1) of the two partitions.
        part, part_next: ``(N,)`` token -> supernode of the two partitions.
        num, num_next: number of kept masks in each.
    Returns:
        ``parents`` ``(num,)`` long (-1 where no overlap) and ``nested`` ``(num,)`` bool
        (the parent contains the whole mask). Ties go to the lowest parent index.
    """
    dev = part.device
    parents = torch.full((num,), -1, dtype=torch.long, device=dev)
    nested = torch.zeros((num,), dtype=torch.bool, device=dev)
    if num == 0 or num_next == 0:
        return parents, nested
    a = kidx[part]
    b = kidx_next[part_next]
    area = torch.bincount(a[a >= 0], minlength=num)
    valid = (a >= 0) & (b >= 0)
    key = a[valid] * num_next + b[valid]
    if key.numel() == 0:
        return parents, nested
    uk, cnt = torch.unique(key, return_counts=True)
    ua, ub = uk // num_next, uk % num_next
    maxc = torch.zeros(num, dtype=cnt.dtype, device=dev).scatter_reduce(0, ua, cnt, "amax")
    best = cnt == maxc[ua]
    big = torch.full((num,), num_next, dtype=torch.long, device=dev)
    big.scatter_reduce_(0, ua[best], ub[best], "amin")
    parents = torch.where(big < num_next, big, parents)
    nested = (maxc == area) & (parents >= 0)
    return parents, nested


def _level(part, feats, phi, h, w, eligible=None):
    s = feats.shape[0]
    area = torch.bincount(part, minlength=s)
    if eligible is not None:  # supernodes that may not be emitted whatever their area
        area = torch.where(eligible, area, torch.zeros_like(area))
    keep_ids, kidx = _kept_index(area, phi)
    grid = part.view(h, w)
    masks = grid[None] == keep_ids.view(-1, 1, 1)
    return dict(part=part, kidx=kidx, keep_ids=keep_ids, masks=masks, feats=feats[keep_ids], s=s)


def assemble_result(
    h: int, w: int, thresholds: Sequence[float], phi: int,
    inst_parts: List[torch.Tensor], inst_feats: List[torch.Tensor],
    sem_parts: List[torch.Tensor], sem_feats: List[torch.Tensor],
    inst_eligible: Optional[List[torch.Tensor]] = None, sem_eligible: Optional[List[torch.Tensor]] = None,
    method: str = "oap",
) -> PseudoMasks:
    """Builds the result of one image.

    ``inst_parts[t]`` / ``sem_parts[t]``: ``(h*w,)`` long, canonical supernode id of every token
    after instance / semantic pooling of layer ``t``; ``inst_feats[t]`` / ``sem_feats[t]``:
    ``(s, d)`` features of all those supernodes. A supernode is emitted when its area is at
    least ``phi`` and, where ``inst_eligible[t]`` / ``sem_eligible[t]`` (``(s,)`` bool) is given,
    it is eligible.
    """
    levels = {"instance": [], "semantic": []}
    for t in range(len(thresholds)):
        levels["instance"].append(_level(inst_parts[t], inst_feats[t], phi, h, w,
                                         None if inst_eligible is None else inst_eligible[t]))
        levels["semantic"].append(_level(sem_parts[t], sem_feats[t], phi, h, w,
                                         None if sem_eligible is None else sem_eligible[t]))
    out = {"instance": [], "semantic": []}
    for name, lvls in levels.items():
        for t, lv in enumerate(lvls):
            k = lv["keep_ids"].numel()
            if t + 1 < len(lvls):
                nx = lvls[t + 1]
                parents, nested = overlap_parents(
                    lv["kidx"], lv["part"], nx["kidx"], nx["part"], k, nx["keep_ids"].numel()
                )
            else:
                parents = torch.full((k,), -1, dtype=torch.long, device=lv["part"].device)
                nested = torch.zeros((k,), dtype=torch.bool, device=lv["part"].device)
            out[name].append(
                MaskLevel(
                    masks=lv["masks"], features=lv["feats"], parents=parents, nested=nested,
                    partition=lv["part"].view(h, w), supernode_ids=lv["keep_ids"],
                )
            )
    layers = []
    for t, tau in enumerate(thresholds):
        ins, sem = levels["instance"][t], levels["semantic"][t]
        i2s, _ = overlap_parents(
            ins["kidx"], ins["part"], sem["kidx"], sem["part"],
            ins["keep_ids"].numel(), sem["keep_ids"].numel(),
        )
        layers.append(
            OAPLayer(
                threshold=float(tau), instance=out["instance"][t], semantic=out["semantic"][t],
                instance_to_semantic=i2s,
            )
        )
    return PseudoMasks(feature_size=(h, w), layers=layers, method=method)
