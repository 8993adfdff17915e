"""Region F-score (CAST Table 2, "F-score for overlapping regions"), and the two region steps the
benchmark's region measures share with it: dense relabelling and the one-to-one region matching
of maximum summed IoU."""
from typing import Optional, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from .fmeasure import fmeasure

__all__ = ["region_fscore"]


def _dense_labels(labels: np.ndarray) -> Tuple[np.ndarray, int]:
    """Labels renumbered ``0..K-1`` (in increasing order of the original values) and ``K``."""
    flat = np.asarray(labels).ravel()
    if flat.size and flat.dtype.kind in "iub":
        lo = int(flat.min())
        span = int(flat.max()) - lo + 1
        if span <= 4 * flat.size + 4096:  # small label range: counting instead of sorting
            shifted = flat.astype(np.int64) - lo
            present = np.bincount(shifted, minlength=span) > 0
            lut = np.cumsum(present) - 1
            return lut[shifted], int(lut[-1] + 1)
    uniq, inv = np.unique(flat, return_inverse=True)
    return inv.ravel().astype(np.int64), int(uniq.size)


def _matched_overlap(inter: np.ndarray, iou: np.ndarray, min_iou: float = 0.0) -> float:
    """Pixels shared by the one-to-one matching of regions that maximises the summed IoU."""
    rows, cols = linear_sum_assignment(iou, maximize=True)
    keep = (inter[rows, cols] > 0) & (iou[rows, cols] >= min_iou)
    return float(inter[rows[keep], cols[keep]].sum())


def region_fscore(
    pred: np.ndarray,
    gt: np.ndarray,
    ignore_label: Optional[int] = None,
    min_iou: float = 0.0,
) -> Tuple[float, float, float]:
    """Region F-score of a segmentation against one ground truth labelling.

    CAST (Table 2, "F-score for overlapping regions") does not spell out the measure; this is
    the choice made here:

    1. predicted regions and ground-truth regions are matched one-to-one by the Hungarian
       algorithm maximising the summed IoU (``scipy.optimize.linear_sum_assignment``); pairs with
       no overlap (or IoU below ``min_iou``) are dropped;
    2. ``precision = sum of |P ∩ G| over matched pairs / number of predicted pixels`` (all pixels
       of the predicted segmentation);
       ``recall = sum of |P ∩ G| over matched pairs / number of labelled ground-truth pixels``;
    3. ``F = 2PR / (P + R)``.

    Why: a one-to-one assignment is what makes the score depend on the number of regions (64 /
    32 / 16 in CAST) - an over-segmentation leaves most predicted regions unmatched and an
    under-segmentation leaves ground-truth regions unmatched - and weighting by pixels (rather
    than counting regions above an IoU threshold) keeps the measure continuous. Pixels with
    ``ignore_label`` in the ground truth (e.g. unlabelled background of part datasets) are not
    ground truth, but still count as predicted pixels, so predicted regions that spill into them
    lower the precision. With a complete ground truth (BSDS) both denominators are the image
    area and ``P = R = F``.

    Returns ``(precision, recall, f)``.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    a, na = _dense_labels(pred)
    area_pred = np.bincount(a, minlength=na).astype(np.float64)
    gflat = gt.ravel()
    valid = np.ones(gflat.shape, dtype=bool) if ignore_label is None else gflat != ignore_label
    n_pred = float(a.size)
    if not valid.any():
        return 0.0, 0.0, 0.0
    g, ng = _dense_labels(gflat[valid])
    area_gt = np.bincount(g, minlength=ng).astype(np.float64)
    inter = np.bincount(a[valid] * ng + g, minlength=na * ng).reshape(na, ng).astype(np.float64)
    iou = inter / np.maximum(area_pred[:, None] + area_gt[None, :] - inter, 1.0)
    matched = _matched_overlap(inter, iou, min_iou)
    precision = matched / n_pred
    recall = matched / float(area_gt.sum())
    return precision, recall, float(fmeasure(recall, precision))
