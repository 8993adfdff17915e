"""The score given to an exported mask (see :func:`coherence_scores`)."""
from __future__ import annotations

import torch

__all__ = ["SCORES", "coherence_scores"]

#: how a mask is scored: ``coherence`` (:func:`coherence_scores`) or ``one`` (1.0, as CutLER's
#: pseudo-labels)
SCORES = ("coherence", "one")


def coherence_scores(masks: torch.Tensor, token_features: torch.Tensor) -> torch.Tensor:
    """Feature coherence of each mask, in ``[0, 1]``: the length of the mean of its tokens'
    L2-normalised features, ``|| (1/|M|) sum_{i in M} f_i ||``.

    It equals the mean cosine similarity between the tokens and their normalised mean direction
    (1: all tokens point the same way; near 0: unrelated features), is defined the same way for
    every method and level, and needs nothing but the features the masks were cut from.

    Args:
        masks: ``(K, h, w)`` bool on the feature grid.
        token_features: ``(h*w, d)`` L2-normalised token features, raster order.
    """
    k = masks.shape[0]
    if k == 0:
        return torch.zeros(0)
    m = masks.reshape(k, -1).to(token_features.dtype)
    if m.shape[1] != token_features.shape[0]:
        raise ValueError(f"masks have {m.shape[1]} tokens, features {token_features.shape[0]}")
    area = m.sum(1, keepdim=True).clamp_min(1)
    mean = (m @ token_features) / area
    return mean.norm(dim=1).clamp(0, 1).float().cpu()
