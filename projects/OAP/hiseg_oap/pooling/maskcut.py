"""MaskCut baseline (CutLER, Wang et al. 2023a) behind the same interface as OAP.

Per image, on the CPU with NumPy / SciPy (as CutLER runs it), on the same L2-normalised
features as OAP (ViT key features of the last block):

1. affinity ``A_ij = 1`` if ``cos(f_i, f_j) > tau`` (0.15), else ``eps`` (1e-5);
2. ``D = diag(A 1)``; the second smallest generalised eigenvector ``x`` of ``(D - A) x = l D x``
   (``scipy.linalg.eigh(D - A, D, subset_by_index=[1, 1])``);
3. bipartition ``x > mean(x)``; seed = ``argmax |x|``; the side is flipped if it holds 2 or more of
   the 4 grid corners or does not hold the seed; after a flip the seed becomes ``argmax(-x)``,
   otherwise ``argmax(x)``;
4. the mask is the 4-connected component of the foreground side that contains the seed
   (``scipy.ndimage.label``);
5. up to ``num_masks`` (3) rounds; before each later round the features of the tokens already
   covered are set to zero (they keep only ``eps`` edges), and the emitted mask excludes those
   tokens; a later mask whose IoU with an earlier kept mask exceeds 0.5, or whose area is at
   most 1 % of the grid, is dropped.

Deliberate differences from CutLER's script:

* No CRF post-processing (it needs the image and ``pydensecrf``; the masks stay on the feature
  grid, and :meth:`MaskLevel.upsample` gives image-size masks).
* CutLER compares a new mask with the previous round's mask only, and after dropping a mask it
  repeats the identical cut in the next round (same features) which then passes the IoU test
  against the now-empty previous mask. We compare with every earlier kept mask and stop after a
  drop, since the next rounds would cut the same graph again.
* As in CutLER, the first mask is always kept (the drop rule applies from the second one on).
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch
from scipy import ndimage
from scipy.linalg import eigh

from .features import flatten_normalized
from .types import MaskCutConfig, MaskLevel, OAPLayer, PseudoMasks

__all__ = ["maskcut", "normalized_cut"]


def normalized_cut(feats: np.ndarray, h: int, w: int, cfg: MaskCutConfig) -> np.ndarray:
    """One MaskCut bipartition of ``(N, d)`` unit (or zero) features: ``(h, w)`` bool mask."""
    aff = feats @ feats.T
    aff = np.where(aff > cfg.tau, 1.0, cfg.eps)
    deg = aff.sum(axis=1)
    _, vecs = eigh(np.diag(deg) - aff, np.diag(deg), subset_by_index=[1, 1])
    x = vecs[:, 0]
    fg = x > x.mean()
    seed = int(np.argmax(np.abs(x)))
    grid = fg.reshape(h, w)
    corners = int(grid[0, 0]) + int(grid[0, -1]) + int(grid[-1, 0]) + int(grid[-1, -1])
    if corners >= 2 or not fg[seed]:
        x = -x
        fg = ~fg
    seed = int(np.argmax(x))
    labels, _ = ndimage.label(fg.reshape(h, w))
    return labels == labels.flat[seed]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _maskcut_single(feats: np.ndarray, h: int, w: int, cfg: MaskCutConfig):
    n = h * w
    covered = np.zeros(n, dtype=bool)
    raw, masks = [], []
    for i in range(cfg.num_masks):
        f = feats * (~covered)[:, None]
        cut = normalized_cut(f, h, w, cfg)
        if i >= 1 and (
            cut.sum() / n <= cfg.min_area_ratio or any(_iou(cut, r) > cfg.iou_thresh for r in raw)
        ):
            break
        mask = cut & ~covered.reshape(h, w)
        raw.append(cut)
        covered |= cut.ravel()
        if mask.any():
            masks.append(mask)
    return masks


@torch.no_grad()
def maskcut(features: torch.Tensor, config: Optional[MaskCutConfig] = None) -> List[PseudoMasks]:
    """MaskCut on a ``(B, C, h, w)`` feature map; one :class:`PseudoMasks` per image.

    Each result has one layer (threshold = ``tau``) whose instance level holds the masks (in
    cut order, pairwise disjoint) with their L2-normalised mean features; the semantic level is
    empty. Tensors are returned on the input's device.
    """
    cfg = config or MaskCutConfig()
    fb, h, w = flatten_normalized(features, torch.float64)
    dev = features.device
    out = []
    for f in fb.cpu().numpy():
        masks = _maskcut_single(f, h, w, cfg)
        k = len(masks)
        m = torch.from_numpy(np.stack(masks)) if k else torch.zeros((0, h, w), dtype=torch.bool)
        flat = m.reshape(k, -1).double()
        emb = flat @ torch.from_numpy(f)
        emb = torch.nn.functional.normalize(emb, dim=1).to(dtype=features.dtype
                                                         if features.is_floating_point()
                                                         else torch.float32)
        labels = torch.full((h * w,), -1, dtype=torch.long)
        for j in range(k):
            labels[m[j].reshape(-1)] = j
        inst = MaskLevel(
            masks=m, features=emb, parents=torch.full((k,), -1, dtype=torch.long),
            nested=torch.zeros((k,), dtype=torch.bool), partition=labels.view(h, w),
            supernode_ids=torch.arange(k),
        )
        sem = MaskLevel.empty(h, w, f.shape[1], dtype=emb.dtype)
        layer = OAPLayer(threshold=cfg.tau, instance=inst, semantic=sem,
                         instance_to_semantic=torch.full((k,), -1, dtype=torch.long))
        out.append(PseudoMasks(feature_size=(h, w), layers=[layer], method="maskcut").to(dev))
    return out
