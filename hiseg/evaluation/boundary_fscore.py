"""Boundary F-score of semantic segmentation (CAST Table 3, "F-score" columns).

CAST reports, next to mIoU, a boundary F-score of the predicted class map against the ground
truth class map without spelling out the protocol. The one implemented here reuses the BSDS500
boundary benchmark (:mod:`hiseg.evaluation.bsds`; Martin et al. 2004, Arbelaez et al.
2011):

1. class boundaries: ``thin_boundaries(seg2bdry(label_map))`` of the predicted labels (argmax of
   ``sem_seg``) and of the ground truth;
2. ignored pixels (label ``ignore_label``, 255 on VOC) first take the label of the nearest
   labelled pixel (Euclidean distance transform), so VOC's 5-pixel "border" bands collapse to
   one boundary along their middle; ignored pixels farther than the matching radius from every
   labelled pixel (large void regions) are excluded: boundary pixels there, predicted or ground
   truth, are not counted;
3. one-to-one matching of predicted and ground-truth boundary pixels within
   ``max_dist x image diagonal`` (BSDS default 0.0075, i.e. 4.7 pixels on a 500x375 VOC image),
   :func:`~hiseg.evaluation.bsds.match_boundaries`;
4. dataset F-score from the summed counts: ``R = sum(matched GT) / sum(GT)``, ``P = sum(matched
   predicted) / sum(predicted)``, ``F = 2PR / (P + R)`` (as the benchmark's ODS at a single
   threshold). The mean of the per-image F-scores is reported too.

Ground truth per input, in this order (:class:`~hiseg.evaluation.label_maps.SemSegGroundTruth`):
the ``sem_seg_file_name`` of the input's ``file_name`` in the dataset (read at the original
resolution, as detectron2's ``SemSegEvaluator``), else the input's ``"sem_seg"`` tensor (resized
to the prediction, nearest, when sizes differ).

Per-image counts are computed in :meth:`process` and gathered with ``comm.gather``.
"""
import json
import logging
import os
from collections import OrderedDict
from typing import Optional, Tuple

import numpy as np
from detectron2.evaluation import DatasetEvaluator
from scipy import ndimage

from . import bsds as M
from .distributed import gather_records
from .label_maps import SemSegGroundTruth, resize_nearest, to_numpy
from .registry import register_evaluator_factory

__all__ = ["BoundaryFScoreEvaluator", "semantic_boundary_counts", "fill_ignored", "boundary_fscore_factory"]

logger = logging.getLogger(__name__)


def fill_ignored(gt: np.ndarray, ignore_label: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
    """Ignored pixels take the label of the nearest labelled pixel. Returns the filled map and
    each pixel's distance to the nearest labelled pixel (0 on labelled pixels); with no labelled
    pixel at all, the map is returned as is with infinite distances."""
    gt = np.asarray(gt)
    if ignore_label is None:
        return gt, np.zeros(gt.shape)
    ignored = gt == ignore_label
    if not ignored.any():
        return gt, np.zeros(gt.shape)
    if ignored.all():
        return gt, np.full(gt.shape, np.inf)
    dist, (iy, ix) = ndimage.distance_transform_edt(ignored, return_indices=True)
    return gt[iy, ix], dist


def semantic_boundary_counts(
    pred: np.ndarray,
    gt: np.ndarray,
    ignore_label: Optional[int] = 255,
    max_dist: float = M.DEFAULT_MAX_DIST,
    matching: str = "greedy",
) -> Tuple[int, int, int, int]:
    """``(cntR, sumR, cntP, sumP)`` of the class boundaries of ``pred`` against those of ``gt``
    (both (H, W) label maps), following steps 1-3 of the module docstring."""
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    filled, dist = fill_ignored(gt, ignore_label)
    radius = max_dist * float(np.hypot(*gt.shape))
    keep = dist <= radius
    gt_b = M.thin_boundaries(M.seg2bdry(filled)) & keep
    pred_b = M.thin_boundaries(M.seg2bdry(pred)) & keep
    return M.match_boundaries(pred_b, [gt_b], max_dist=max_dist, thin=False, matching=matching)


def _prf(cnt_r, sum_r, cnt_p, sum_p):
    r = cnt_r / sum_r if sum_r > 0 else 0.0
    p = cnt_p / sum_p if sum_p > 0 else 0.0
    return p, r, float(M.fmeasure(r, p))


class BoundaryFScoreEvaluator(DatasetEvaluator):
    """Boundary precision / recall / F-score of ``sem_seg`` predictions (CAST Table 3).

    Args:
        dataset_name: a registered semantic segmentation dataset (ground truth files, and
            ``ignore_label`` from its metadata); may be ``None`` when inputs carry ``"sem_seg"``.
        distributed: gather the per-image counts of all workers in :meth:`evaluate`.
        output_dir: if given, per-image counts are written to ``boundary_fscore_per_image.json``.
        ignore_label: overrides the metadata's (default 255).
        max_dist: matching tolerance as a fraction of the image diagonal (BSDS: 0.0075).
        matching: ``"greedy"`` (default) or ``"optimal"``, see
            :func:`~hiseg.evaluation.bsds.correspond_pixels`.
    """

    def __init__(self, dataset_name: Optional[str] = None, distributed: bool = True,
                 output_dir: Optional[str] = None, *, ignore_label: Optional[int] = None,
                 max_dist: float = M.DEFAULT_MAX_DIST, matching: str = "greedy"):
        if matching not in M.MATCHING_METHODS:
            raise ValueError(f"matching must be one of {M.MATCHING_METHODS}, got {matching!r}")
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        self._gt = SemSegGroundTruth(dataset_name)
        if ignore_label is None:
            ignore_label = getattr(self._gt.meta, "ignore_label", 255) if self._gt.meta is not None else 255
        self._ignore_label = ignore_label
        self._max_dist = float(max_dist)
        self._matching = matching
        self._records = []

    def reset(self):
        self._records = []

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            sem = out["sem_seg"] if isinstance(out, dict) else out
            sem = to_numpy(sem)
            pred = sem.argmax(axis=0) if sem.ndim == 3 else sem
            pred = pred.astype(np.int64)
            gt = self._gt(inp, pred.shape)
            pred = resize_nearest(pred, gt.shape)
            counts = semantic_boundary_counts(pred, gt, self._ignore_label, self._max_dist, self._matching)
            name = inp.get("file_name", inp.get("image_id", len(self._records)))
            self._records.append({"file_name": str(name), "counts": [int(c) for c in counts]})

    def evaluate(self):
        records = gather_records(self._records, self._distributed)
        if records is None:  # not the main process
            return {}
        if not records:
            logger.warning("BoundaryFScoreEvaluator received no predictions")
            return {}
        counts = np.array([r["counts"] for r in records], dtype=np.float64)
        p, r, f = _prf(*counts.sum(0))
        per_image = [_prf(*c)[2] for c in counts]
        if self._output_dir:
            os.makedirs(self._output_dir, exist_ok=True)
            with open(os.path.join(self._output_dir, "boundary_fscore_per_image.json"), "w") as fh:
                json.dump(records, fh)
        res = {"F-score": 100 * f, "precision": 100 * p, "recall": 100 * r,
               "mean_image_F": 100 * float(np.mean(per_image)), "num_images": len(records)}
        logger.info("Boundary F-score (tolerance %.4f x diagonal): %s", self._max_dist, res)
        return OrderedDict({"sem_seg_boundary": res})


@register_evaluator_factory("sem_seg_boundary")
def boundary_fscore_factory(cfg, dataset_name, output_dir):
    """Evaluator factory of ``evaluator_type="sem_seg_boundary"`` (Table 3 boundary F-score)."""
    return [BoundaryFScoreEvaluator(dataset_name, distributed=True, output_dir=output_dir)]
