"""Cropped bipartite matching of OAP (Sec. 4.3): one-to-one, Dice similarity, one level at a time.

OAP Sec. 4.3 "Cropped Bipartite Matching": the teacher's pseudo-masks (global view) are cropped
to each student local view (the caller does that and drops the ones that leave the view), then
"we employ the Dice similarity coefficient as the matching criterion", and "the matching is
conducted separately within each segmentation level": semantic queries only ever compete for
semantic pseudo-masks, instance queries for instance pseudo-masks. :class:`DiceMatcher` solves
one such problem (one view, one level); :class:`hiseg_oap.modeling.criterion.OAPCriterion` calls it per
view and per level.

Choices where the paper is silent:

* The Dice is Mask2Former's soft Dice with +1 smoothing on ``sigmoid(logits)``:
  ``dice(p, t) = (2 sum p t + 1) / (sum p + sum t + 1)`` and the cost is ``1 - dice``. The
  smoothing keeps the cost defined (and < 1) for empty masks.
* Like Mask2Former's matcher, the cost is computed on ``num_points`` random points shared by all
  predictions and targets (bilinear sampling, see :func:`point_sample`), which bounds the memory
  of the ``(Q, T)`` cost; when the grid has at most ``num_points`` pixels every pixel is used
  instead (exact, and no randomness).
* No class / objectness or BCE term in the cost: the paper names Dice as *the* criterion.
* The assignment is solved by ``scipy.optimize.linear_sum_assignment`` (Hungarian); it returns
  ``min(Q, T)`` pairs: extra targets stay unmatched, extra queries become "no object".
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = ["DiceMatcher", "point_sample", "batch_dice_cost"]


def point_sample(inputs: Tensor, coords: Tensor) -> Tensor:
    """Bilinearly sample ``inputs`` at normalised points (torch ``grid_sample``, ``align_corners=False``).

    Args:
        inputs: ``(N, C, H, W)`` maps.
        coords: ``(N, P, 2)`` points in ``[0, 1]^2`` as ``(x, y)`` (x along W, y along H), one set
            per map; ``(1, P, 2)`` is shared by all N maps.

    Returns:
        ``(N, C, P)`` sampled values.

    Padding is ``"border"`` (Mask2Former's ``point_sample`` keeps ``grid_sample``'s ``"zeros"``):
    with ``align_corners=False`` the points within half a pixel of the image edge interpolate with
    the padding, and zero padding would pull a full target mask below 1 there and pull logits
    towards 0 (which makes the edge look "uncertain" to the importance sampling). Border padding
    reads the edge pixel instead, so a constant map samples as that constant everywhere.
    """
    if inputs.dim() != 4:
        raise ValueError(f"point_sample: inputs must be (N, C, H, W), got shape {tuple(inputs.shape)}")
    if coords.dim() != 3 or coords.shape[-1] != 2:
        raise ValueError(f"point_sample: coords must be (N, P, 2), got shape {tuple(coords.shape)}")
    if coords.shape[0] != inputs.shape[0]:
        if coords.shape[0] != 1:
            raise ValueError(f"point_sample: coords batch {coords.shape[0]} != inputs batch {inputs.shape[0]}")
        coords = coords.expand(inputs.shape[0], -1, -1)
    grid = (2.0 * coords - 1.0).unsqueeze(2).to(inputs.dtype)  # (N, P, 1, 2) in [-1, 1]
    out = F.grid_sample(inputs, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.squeeze(3)


def batch_dice_cost(pred_probs: Tensor, tgt: Tensor) -> Tensor:
    """All-pairs ``1 - soft Dice`` with +1 smoothing: ``(Q, P)`` probabilities x ``(T, P)`` targets -> ``(Q, T)``."""
    numerator = 2.0 * pred_probs @ tgt.t()
    denominator = pred_probs.sum(-1)[:, None] + tgt.sum(-1)[None, :]
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


class DiceMatcher:
    """Hungarian matching of predicted masks to target masks with the Dice cost (OAP Sec. 4.3).

    Args:
        num_points: number of random points the Dice is computed on (shared by all masks); when
            the mask grid has ``h * w <= num_points`` pixels, all pixels are used instead.
    """

    def __init__(self, num_points: int = 12544):
        if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
            raise ValueError(f"DiceMatcher: num_points must be a positive int, got {num_points!r}")
        self.num_points = num_points

    def __repr__(self) -> str:
        return f"DiceMatcher(num_points={self.num_points})"

    @staticmethod
    def _check(pred_masks: Tensor, tgt_masks: Tensor) -> None:
        def describe(x):
            return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__

        if not isinstance(pred_masks, Tensor) or pred_masks.dim() != 3:
            raise ValueError(f"DiceMatcher: pred_masks must be a (Q, h, w) tensor of logits, "
                             f"got {describe(pred_masks)}")
        if not isinstance(tgt_masks, Tensor) or tgt_masks.dim() != 3:
            raise ValueError(f"DiceMatcher: tgt_masks must be a (T, h, w) bool tensor, got {describe(tgt_masks)}")
        if tgt_masks.dtype != torch.bool:
            raise ValueError(f"DiceMatcher: tgt_masks must be bool, got dtype {tgt_masks.dtype}")
        if not pred_masks.is_floating_point():
            raise ValueError(f"DiceMatcher: pred_masks must be floating-point logits, got dtype {pred_masks.dtype}")
        if pred_masks.shape[-2:] != tgt_masks.shape[-2:]:
            raise ValueError(f"DiceMatcher: target mask grid {tuple(tgt_masks.shape[-2:])} != predicted mask grid "
                             f"{tuple(pred_masks.shape[-2:])}")

    @torch.no_grad()
    def cost(self, pred_masks: Tensor, tgt_masks: Tensor) -> Tensor:
        """``(Q, T)`` float32 matrix of ``1 - Dice(sigmoid(pred_masks[q]), tgt_masks[t])``."""
        self._check(pred_masks, tgt_masks)
        q, h, w = pred_masks.shape
        t = tgt_masks.shape[0]
        with torch.autocast(device_type=pred_masks.device.type, enabled=False):
            pred = pred_masks.float()
            tgt = tgt_masks.to(device=pred.device, dtype=torch.float32)
            if q == 0 or t == 0:
                return pred.new_zeros((q, t))
            if h * w <= self.num_points:
                pred_pts = pred.reshape(q, h * w)
                tgt_pts = tgt.reshape(t, h * w)
            else:
                coords = torch.rand(1, self.num_points, 2, device=pred.device)
                pred_pts = point_sample(pred[:, None], coords)[:, 0]
                tgt_pts = point_sample(tgt[:, None], coords)[:, 0]
            return batch_dice_cost(pred_pts.sigmoid(), tgt_pts)

    @torch.no_grad()
    def __call__(self, pred_masks: Tensor, tgt_masks: Tensor) -> Tuple[Tensor, Tensor]:
        """Match ``pred_masks`` (Q, h, w) logits to ``tgt_masks`` (T, h, w) bool on the same grid.

        Returns:
            ``(pred_idx, tgt_idx)``: two int64 CPU tensors of ``min(Q, T)`` pairs, sorted by
            ``pred_idx``, minimising the total ``1 - Dice`` cost. ``T == 0`` or ``Q == 0`` gives two
            empty tensors.
        """
        cost = self.cost(pred_masks, tgt_masks)
        if cost.numel() == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return empty, empty.clone()
        if not torch.isfinite(cost).all():
            raise ValueError("DiceMatcher: the Dice cost has non-finite entries (NaN / inf in pred_masks?)")
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        pred_idx = torch.as_tensor(rows, dtype=torch.int64)
        tgt_idx = torch.as_tensor(cols, dtype=torch.int64)
        order = torch.argsort(pred_idx)
        return pred_idx[order], tgt_idx[order]
