"""Teacher pseudo-masks of one image as training targets, one set per segmentation level.

OAP emits an instance level and a semantic level for every layer (Alg. 1); the teacher's targets
of a level are the masks of that level over all layers (Sec. 4.2: "multi-hierarchy masks that can
provide more visual details"), each with its Eq. 6 embedding. A supernode that does not merge in
a layer is emitted again, identical, by the next layer; such repeats are kept once (the first,
finest occurrence), because two identical targets would compete for queries in the bipartite
matching without adding information. The paper does not say how repeats are treated; dropping
them is our choice.
"""
from __future__ import annotations

from typing import Dict, NamedTuple

import torch

from ..pooling.types import PseudoMasks, first_unique_rows

__all__ = ["LevelTargets", "pseudo_mask_targets", "LEVELS"]

#: The two segmentation levels, in the decoder's query order (semantic queries first).
LEVELS = ("semantic", "instance")


class LevelTargets(NamedTuple):
    """masks ``(T, h, w)`` bool on the teacher's feature grid; embeds ``(T, d)``; layer ``(T,)``
    long, the OAP layer that first emitted each mask."""

    masks: torch.Tensor
    embeds: torch.Tensor
    layer: torch.Tensor


def pseudo_mask_targets(pseudo: PseudoMasks, max_targets: int = 0) -> Dict[str, LevelTargets]:
    """``{"semantic": LevelTargets, "instance": LevelTargets}`` for one image.

    Args:
        pseudo: the generator's result for the image.
        max_targets: keep at most this many masks per level, the largest first (0: all).
    """
    if max_targets < 0:
        raise ValueError(f"max_targets must be >= 0, got {max_targets}")
    out = {}
    for name in LEVELS:
        levels = pseudo.level(name)
        if not levels:
            raise ValueError("pseudo-masks have no layers")
        masks = torch.cat([lv.masks for lv in levels])
        embeds = torch.cat([lv.features for lv in levels])
        layer = torch.cat([torch.full((len(lv),), i, dtype=torch.long, device=masks.device)
                           for i, lv in enumerate(levels)])
        keep = first_unique_rows(masks.flatten(1))
        if max_targets and keep.numel() > max_targets:
            areas = masks[keep].flatten(1).sum(1)
            order = torch.argsort(areas, descending=True, stable=True)[:max_targets]
            keep = keep[order.sort().values]
        out[name] = LevelTargets(masks[keep], embeds[keep], layer[keep])
    return out
