"""Region measures of the BSDS500 benchmark (Arbelaez et al. 2011): segmentation covering,
probabilistic Rand index and variation of information, per image (``evaluation_reg_image.m``,
``compare_segmentations.m``) and over the dataset (``collect_eval_reg.m``)."""
from typing import Dict, Sequence

import numpy as np

from .fmeasure import _ratio
from .region_fscore import _dense_labels, _matched_overlap

__all__ = [
    "contingency_table",
    "rand_index",
    "variation_of_information",
    "evaluate_regions_image",
    "collect_region_scores",
]


def contingency_table(seg1: np.ndarray, seg2: np.ndarray) -> np.ndarray:
    """Joint histogram ``n[u, v]`` of two label maps over their present labels (the count matrix
    of the benchmark's ``compare_segmentations.m``, Arbelaez et al. 2011)."""
    seg1 = np.asarray(seg1)
    seg2 = np.asarray(seg2)
    if seg1.shape != seg2.shape:
        raise ValueError(f"label maps differ in shape: {seg1.shape} vs {seg2.shape}")
    a, na = _dense_labels(seg1)
    b, nb = _dense_labels(seg2)
    return np.bincount(a * nb + b, minlength=na * nb).reshape(na, nb).astype(np.float64)


def rand_index(n: np.ndarray) -> float:
    """Rand index from a contingency table (Rand 1971; ``compare_segmentations.m``, Arbelaez et
    al. 2011): the fraction of pixel pairs on which both labellings agree (same region in both,
    or different in both). Averaged over the humans it is the benchmark's probabilistic Rand
    index (PRI, Unnikrishnan et al. 2007)."""
    n = np.asarray(n, dtype=np.float64)
    total = n.sum()
    pairs = total * (total - 1) / 2.0
    if pairs <= 0:
        return 1.0
    nu = n.sum(axis=1)
    nv = n.sum(axis=0)
    disagree = (nu @ nu) / 2.0 + (nv @ nv) / 2.0 - (n * n).sum()
    return float(1.0 - disagree / pairs)


def variation_of_information(n: np.ndarray) -> float:
    """Variation of information ``H(A) + H(B) - 2 I(A; B)`` in bits (Meila 2005, as in the
    benchmark's ``compare_segmentations.m``)."""
    n = np.asarray(n, dtype=np.float64)
    joint = n / n.sum()
    m1 = joint.sum(axis=1)
    m2 = joint.sum(axis=0)

    def entropy(p):
        p = p[p > 0]
        return float(-(p * np.log2(p)).sum())

    nz = joint > 0
    outer = np.outer(m1, m2)
    mi = float((joint[nz] * np.log2(joint[nz] / outer[nz])).sum())
    return entropy(m1) + entropy(m2) - 2.0 * mi


def _covering_and_indices(seg: np.ndarray, gt_prepared):
    """Covering counts, RI, VOI and region F of one machine segmentation against all humans."""
    a, na = _dense_labels(seg)
    area_seg = np.bincount(a, minlength=na).astype(np.float64)
    npix = float(a.size)
    best_seg = np.zeros(na)  # best IoU of each machine region with any human region
    best_gt = []  # best IoU of each human region with a machine region, per human
    ri = voi = rf = 0.0
    for g, ng, area_gt in gt_prepared:
        n = np.bincount(a * ng + g, minlength=na * ng).reshape(na, ng).astype(np.float64)
        union = area_seg[:, None] + area_gt[None, :] - n
        iou = n / np.maximum(union, 1.0)
        best_seg = np.maximum(best_seg, iou.max(axis=1))
        best_gt.append(iou.max(axis=0))
        ri += rand_index(n)
        voi += variation_of_information(n)
        rf += _matched_overlap(n, iou) / npix  # region_fscore with complete ground truth: P = R = F
    k = len(gt_prepared)
    return area_seg, best_seg, best_gt, ri / k, voi / k, rf / k


def _gt_covering(prepared, best_iou) -> float:
    """Sum over the regions of all humans of area x best IoU."""
    return float(sum((area * best).sum() for (_, _, area), best in zip(prepared, best_iou)))


def _prepare_gt_regions(gt_segs):
    prepared = []
    for gt in gt_segs:
        g, ng = _dense_labels(gt)
        prepared.append((g, ng, np.bincount(g, minlength=ng).astype(np.float64)))
    return prepared


def evaluate_regions_image(
    segs: Sequence[np.ndarray], gt_segs: Sequence[np.ndarray]
) -> Dict[str, np.ndarray]:
    """Region counts of a list of machine segmentations ("thresholds") against all humans.

    Follows ``evaluation_reg_image.m`` (Arbelaez et al. 2011). For segmentation ``t``:

    * covering of the ground truth by the machine: ``cntR[t] = sum over human regions G (all
      humans) of |G| * max_S IoU(S, G)`` and ``sumR[t]`` = number of pixels times number of humans;
    * covering of the machine by the ground truth: ``cntP[t] = sum over machine regions S of
      |S| * max over G of all humans IoU(S, G)``, ``sumP[t]`` = number of pixels;
    * ``RI[t]`` and ``VOI[t]``: Rand index and variation of information averaged over humans;
    * ``cntR_best``: the covering when every human region takes its best machine region over all
      segmentations;
    * ``num_regions[t]`` and ``region_f[t]``, the :func:`region_fscore` averaged over humans (the
      ground truth is complete, so no label is ignored).

    Every label value is a region (labels need not be consecutive; the benchmark's label 0 is not
    special here).
    """
    if len(segs) == 0:
        raise ValueError("empty list of segmentations")
    if len(gt_segs) == 0:
        raise ValueError("no ground truth segmentations")
    shape = np.shape(segs[0])
    for gt in gt_segs:
        if np.shape(gt) != shape:
            raise ValueError(f"ground truth shape {np.shape(gt)} differs from prediction {shape}")
    prepared = _prepare_gt_regions(gt_segs)
    npix = float(np.prod(shape))
    nt = len(segs)
    out = {
        "thresh": np.arange(1, nt + 1, dtype=np.float64),
        "cntR": np.zeros(nt),
        "sumR": np.zeros(nt),
        "cntP": np.zeros(nt),
        "sumP": np.zeros(nt),
        "RI": np.zeros(nt),
        "VOI": np.zeros(nt),
        "num_regions": np.zeros(nt),
        "region_f": np.zeros(nt),
    }
    best_gt_all = [np.zeros(ng) for _, ng, _ in prepared]
    for t, seg in enumerate(segs):
        if np.shape(seg) != shape:
            raise ValueError("all segmentations must have the same shape")
        area_seg, best_seg, best_gt, ri, voi, rf = _covering_and_indices(seg, prepared)
        out["cntP"][t] = float((area_seg * best_seg).sum())
        out["sumP"][t] = npix
        out["cntR"][t] = _gt_covering(prepared, best_gt)
        out["sumR"][t] = npix * len(prepared)
        out["RI"][t] = ri
        out["VOI"][t] = voi
        out["num_regions"][t] = area_seg.size
        out["region_f"][t] = rf
        for k, bg in enumerate(best_gt):
            best_gt_all[k] = np.maximum(best_gt_all[k], bg)
    out["cntR_best"] = np.array(_gt_covering(prepared, best_gt_all))
    return out


def collect_region_scores(per_image: Sequence[Dict[str, np.ndarray]]) -> Dict[str, float]:
    """Dataset covering, PRI and VI as ``collect_eval_reg.m`` (Arbelaez et al. 2011).

    * ``Covering_ODS``: best over thresholds of the summed covering counts; ``Covering_OIS``: each
      image at its best threshold (last one on ties, as the benchmark), counts summed;
      ``Covering_Best``: every human region at its best threshold;
    * ``PRI_ODS``/``VI_ODS``: best (max / min) over thresholds of the per-image average;
      ``PRI_OIS``/``VI_OIS``: average over images of each image's best.
    """
    if len(per_image) == 0:
        raise ValueError("no images to collect")
    nt = per_image[0]["cntR"].size
    cnt_r = np.zeros(nt)
    sum_r = np.zeros(nt)
    ois_cnt = ois_sum = 0.0
    best_cnt = best_sum = 0.0
    ri_sum = np.zeros(nt)
    voi_sum = np.zeros(nt)
    ri_best = voi_best = 0.0
    for rec in per_image:
        if rec["cntR"].size != nt:
            raise ValueError("all images must be evaluated at the same number of levels")
        cnt_r += rec["cntR"]
        sum_r += rec["sumR"]
        r = _ratio(rec["cntR"], rec["sumR"])
        k = int(np.nonzero(r == r.max())[0][-1])
        ois_cnt += rec["cntR"][k]
        ois_sum += rec["sumR"][k]
        best_cnt += float(rec["cntR_best"])
        best_sum += rec["sumR"][0]
        ri_sum += rec["RI"]
        voi_sum += rec["VOI"]
        ri_best += rec["RI"].max()
        voi_best += rec["VOI"].min()
    n = float(len(per_image))
    cov = _ratio(cnt_r, sum_r)
    k = int(np.argmax(cov))
    ri_mean = ri_sum / n
    voi_mean = voi_sum / n
    return {
        "Covering_ODS": float(cov[k]),
        "Covering_ODS_T": float(per_image[0]["thresh"][k]),
        "Covering_OIS": float(_ratio(ois_cnt, ois_sum)),
        "Covering_Best": float(_ratio(best_cnt, best_sum)),
        "PRI_ODS": float(ri_mean.max()),
        "PRI_OIS": float(ri_best / n),
        "VI_ODS": float(voi_mean.min()),
        "VI_OIS": float(voi_best / n),
    }
