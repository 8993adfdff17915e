"""Boundary precision / recall of the BSDS500 benchmark: per-image counts at each threshold
(``evaluation_bdry_image.m``) and the dataset's ODS, OIS and AP (``collect_eval_bdry.m``),
Arbelaez et al. 2011; Martin et al. 2004."""
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

from .boundary_maps import DEFAULT_NTHRESH, boundary_thresholds, seg2bdry, thin_boundaries
from .correspondence import DEFAULT_MAX_DIST, DEFAULT_OUTLIER_COST, _correspond, _HumanBoundary, _match_radius
from .fmeasure import _ratio, fmeasure

__all__ = [
    "match_boundaries",
    "evaluate_boundaries_image",
    "evaluate_boundaries_image_fast",
    "evaluate_segs_boundaries_image",
    "max_f_interpolated",
    "collect_boundary_scores",
]


def _counts_for_bmap(bmap, humans: Sequence[_HumanBoundary], radius, outlier_cost, matching):
    ys1, xs1 = np.nonzero(bmap)
    matched_machine = np.zeros(ys1.size, dtype=bool)
    cnt_r = 0
    sum_r = 0
    for human in humans:
        i1, i2 = _correspond(ys1, xs1, human, radius, outlier_cost, matching)
        matched_machine[i1] = True
        cnt_r += int(i2.size)
        sum_r += human.count
    return cnt_r, sum_r, int(matched_machine.sum()), int(ys1.size)


def match_boundaries(
    bmap: np.ndarray,
    gt_boundaries: Sequence[np.ndarray],
    max_dist: float = DEFAULT_MAX_DIST,
    thin: bool = True,
    outlier_cost: float = DEFAULT_OUTLIER_COST,
    matching: str = "optimal",
) -> Tuple[int, int, int, int]:
    """Counts ``(cntR, sumR, cntP, sumP)`` of one binary boundary map against all humans.

    As in ``evaluation_bdry_image.m`` (Arbelaez et al. 2011): the map is thinned and matched
    one-to-one against each human map in turn (:func:`correspond_pixels`); recall counts the
    human pixels matched, summed over humans; precision counts the machine pixels matched to at
    least one human.
    """
    bmap = np.asarray(bmap, dtype=bool)
    _check_gt(gt_boundaries, bmap.shape)
    if thin:
        bmap = thin_boundaries(bmap)
    radius = _match_radius(bmap.shape, max_dist)
    humans = [_HumanBoundary(g, radius) for g in gt_boundaries]
    return _counts_for_bmap(bmap, humans, radius, outlier_cost, matching)


def _check_gt(gt_boundaries, shape):
    if len(gt_boundaries) == 0:
        raise ValueError("no ground truth boundary maps")
    for g in gt_boundaries:
        if np.shape(g) != tuple(shape):
            raise ValueError(
                f"ground truth shape {np.shape(g)} differs from prediction {tuple(shape)}"
            )


def _as_thresholds(thresholds) -> np.ndarray:
    if np.isscalar(thresholds):
        return boundary_thresholds(int(thresholds))
    return np.asarray(thresholds, dtype=np.float64).ravel()


def evaluate_boundaries_image(
    pb: np.ndarray,
    gt_boundaries: Sequence[np.ndarray],
    thresholds: Union[int, Sequence[float]] = DEFAULT_NTHRESH,
    max_dist: float = DEFAULT_MAX_DIST,
    thin: bool = True,
    outlier_cost: float = DEFAULT_OUTLIER_COST,
    matching: str = "optimal",
) -> np.ndarray:
    """Per-threshold boundary counts of a soft boundary map (``evaluation_bdry_image.m``,
    Arbelaez et al. 2011; Martin et al. 2004).

    ``pb`` is a soft boundary map in [0, 1] (a PNG divided by 255, a UCM ``ucm2[2::2, 2::2]``, or
    :func:`hierarchy_to_boundary_map`); at each threshold ``t`` the machine map is ``pb >= t``,
    thinned, and scored with :func:`match_boundaries`. ``thresholds``: a number ``n`` for the
    benchmark's ``linspace(1/(n+1), 1-1/(n+1), n)`` or explicit values. Thresholds that give the
    same binary map are evaluated once.

    Returns an array of shape ``(T, 5)`` with columns ``thresh, cntR, sumR, cntP, sumP`` (the
    layout of the benchmark's ``<id>_ev1.txt``).
    """
    pb = np.asarray(pb, dtype=np.float64)
    _check_gt(gt_boundaries, pb.shape)
    thresh = _as_thresholds(thresholds)
    radius = _match_radius(pb.shape, max_dist)
    humans = [_HumanBoundary(g, radius) for g in gt_boundaries]

    return _sweep_thresholds(pb, thresh, thin,
                             lambda bmap: _counts_for_bmap(bmap, humans, radius, outlier_cost, matching))


def _sweep_thresholds(pb: np.ndarray, thresh: np.ndarray, thin: bool, counts_fn) -> np.ndarray:
    """(T, 5) rows ``thresh, counts_fn(thinned pb >= t)``; thresholds that give the same binary
    map are evaluated once (``pb >= t`` only depends on the smallest value of pb that is >= t)."""
    values = np.unique(pb)
    keys = np.searchsorted(values, thresh, side="left")
    cache: Dict[int, Tuple[int, int, int, int]] = {}
    out = np.zeros((thresh.size, 5), dtype=np.float64)
    out[:, 0] = thresh
    for k, key in enumerate(keys):
        key = int(key)
        if key not in cache:
            bmap = pb >= values[key] if key < values.size else np.zeros(pb.shape, dtype=bool)
            if thin:
                bmap = thin_boundaries(bmap)
            cache[key] = counts_fn(bmap)
        out[k, 1:] = cache[key]
    return out


def evaluate_segs_boundaries_image(
    segs: Sequence[np.ndarray],
    gt_boundaries: Sequence[np.ndarray],
    max_dist: float = DEFAULT_MAX_DIST,
    thin: bool = True,
    outlier_cost: float = DEFAULT_OUTLIER_COST,
    matching: str = "optimal",
) -> np.ndarray:
    """Boundary counts for a list of segmentations (the benchmark's ``segs`` input,
    ``evaluation_bdry_image.m``, Arbelaez et al. 2011).

    One "threshold" per segmentation (thresholds ``1..L``); each machine map is
    ``seg2bdry(segs[t], 'imageSize')``, thinned. Same output layout as
    :func:`evaluate_boundaries_image`.
    """
    if len(segs) == 0:
        raise ValueError("empty list of segmentations")
    shape = np.shape(segs[0])
    _check_gt(gt_boundaries, shape)
    radius = _match_radius(shape, max_dist)
    humans = [_HumanBoundary(g, radius) for g in gt_boundaries]
    out = np.zeros((len(segs), 5), dtype=np.float64)
    for t, seg in enumerate(segs):
        bmap = seg2bdry(seg)
        if thin:
            bmap = thin_boundaries(bmap)
        out[t, 0] = t + 1
        out[t, 1:] = _counts_for_bmap(bmap, humans, radius, outlier_cost, matching)
    return out


def evaluate_boundaries_image_fast(
    pb: np.ndarray,
    gt_boundaries: Sequence[np.ndarray],
    thresholds: Union[int, Sequence[float]] = DEFAULT_NTHRESH,
    radius: Optional[float] = None,
    max_dist: float = DEFAULT_MAX_DIST,
    thin: bool = True,
) -> np.ndarray:
    """Approximate boundary counts without the one-to-one constraint (a "fast" benchmark).

    A human pixel counts as recalled when a machine pixel lies within ``radius`` and a machine
    pixel as precise when a pixel of some human lies within ``radius`` (distance transforms
    only), which over-counts compared with :func:`evaluate_boundaries_image`. ``radius``
    defaults to ``max_dist * hypot(H, W)``. The ``png-fasteval-99`` reference of the benchmark
    sample is reproduced exactly with ``radius = max_dist * max(H, W)``.
    """
    pb = np.asarray(pb, dtype=np.float64)
    _check_gt(gt_boundaries, pb.shape)
    if radius is None:
        radius = _match_radius(pb.shape, max_dist)
    thresh = _as_thresholds(thresholds)
    gts = [np.asarray(g, dtype=bool) for g in gt_boundaries]

    def near(mask):
        if not mask.any():
            return np.zeros(mask.shape, dtype=bool)
        return ndimage.distance_transform_edt(~mask) <= radius

    near_gt = [near(g) for g in gts]

    def counts(bmap):
        near_machine = near(bmap)
        acc = np.zeros(pb.shape, dtype=bool)
        cnt_r = sum_r = 0
        for g, ng in zip(gts, near_gt):
            acc |= bmap & ng
            cnt_r += int((g & near_machine).sum())
            sum_r += int(g.sum())
        return cnt_r, sum_r, int(acc.sum()), int(bmap.sum())

    return _sweep_thresholds(pb, thresh, thin, counts)


# ---------------------------------------------------------------------------------------------
# Dataset-level boundary scores (collect_eval_bdry.m)
# ---------------------------------------------------------------------------------------------
_INTERP = np.linspace(0.0, 1.0, 100)  # MATLAB linspace(0, 1) has 100 points


def max_f_interpolated(thresh, recall, precision) -> Tuple[float, float, float, float]:
    """Best F along the P/R curve with linear interpolation between thresholds (``maxF`` of
    ``collect_eval_bdry.m``, Arbelaez et al. 2011).

    Returns ``(bestT, bestR, bestP, bestF)``. Like the benchmark, consecutive thresholds are
    interpolated at 100 points and the first strict maximum (in threshold order) is kept.
    """
    t = np.asarray(thresh, dtype=np.float64)
    r = np.asarray(recall, dtype=np.float64)
    p = np.asarray(precision, dtype=np.float64)
    best = (float(t[0]), float(r[0]), float(p[0]), float(fmeasure(r[0], p[0])))
    if t.size < 2:
        return best
    d = _INTERP[None, :]
    ti = t[1:, None] * d + t[:-1, None] * (1 - d)
    ri = r[1:, None] * d + r[:-1, None] * (1 - d)
    pi = p[1:, None] * d + p[:-1, None] * (1 - d)
    fi = fmeasure(ri, pi)
    k = int(np.argmax(fi))  # first occurrence in row-major order = scan order of the benchmark
    if fi.flat[k] > best[3]:
        best = (float(ti.flat[k]), float(ri.flat[k]), float(pi.flat[k]), float(fi.flat[k]))
    return best


def _average_precision(recall, precision) -> float:
    """Area under the P/R curve as the benchmark computes it: precision interpolated at recall
    ``0:0.01:1`` over the unique recall values, 0 outside their range, summed times 0.01."""
    r = np.asarray(recall, dtype=np.float64)
    p = np.asarray(precision, dtype=np.float64)
    ru, idx = np.unique(r, return_index=True)
    if ru.size <= 1:
        return 0.0
    pu = p[idx]
    grid = np.linspace(0.0, 1.0, 101)
    pint = np.interp(grid, ru, pu, left=np.nan, right=np.nan)
    pint[np.isnan(pint)] = 0.0
    return float(pint.sum() * 0.01)


def collect_boundary_scores(per_image: Sequence[np.ndarray]) -> Dict[str, object]:
    """ODS, OIS and AP from per-image counts, as ``collect_eval_bdry.m`` (Arbelaez et al. 2011).

    ``per_image``: arrays ``(T, 5)`` (``thresh cntR sumR cntP sumP``) with the same thresholds.

    * ODS: counts summed over the dataset at each threshold, best F with interpolation;
    * OIS: for each image the threshold of its best (non-interpolated) F, counts summed;
    * AP: area under the dataset P/R curve (:func:`_average_precision`).

    Returns a dict with ``ODS`` (F), ``ODS_R``, ``ODS_P``, ``ODS_T``, ``OIS``, ``OIS_R``, ``OIS_P``,
    ``AP``, the dataset curve ``curve`` (``thresh R P F``, shape ``(T, 4)``) and ``per_image``
    (``bestT bestR bestP bestF`` per image, with interpolation, like ``eval_bdry_img.txt``).
    """
    if len(per_image) == 0:
        raise ValueError("no images to collect")
    arrays = [np.asarray(a, dtype=np.float64) for a in per_image]
    thresh = arrays[0][:, 0]
    tot = np.zeros((thresh.size, 4))
    ois = np.zeros(4)
    img_scores = np.zeros((len(arrays), 4))
    for n, a in enumerate(arrays):
        if a.shape != arrays[0].shape:
            raise ValueError("all images must be evaluated at the same thresholds")
        cnt_r, sum_r, cnt_p, sum_p = a[:, 1], a[:, 2], a[:, 3], a[:, 4]
        r = _ratio(cnt_r, sum_r)
        p = _ratio(cnt_p, sum_p)
        f = fmeasure(r, p)
        img_scores[n] = max_f_interpolated(thresh, r, p)
        tot += a[:, 1:]
        k = int(np.nonzero(f == f.max())[0][-1])
        ois += a[k, 1:]
    r = _ratio(tot[:, 0], tot[:, 1])
    p = _ratio(tot[:, 2], tot[:, 3])
    f = fmeasure(r, p)
    best_t, best_r, best_p, best_f = max_f_interpolated(thresh, r, p)
    ois_r = float(_ratio(ois[0], ois[1]))
    ois_p = float(_ratio(ois[2], ois[3]))
    return {
        "ODS": best_f,
        "ODS_R": best_r,
        "ODS_P": best_p,
        "ODS_T": best_t,
        "OIS": float(fmeasure(ois_r, ois_p)),
        "OIS_R": ois_r,
        "OIS_P": ois_p,
        "AP": _average_precision(r, p),
        "curve": np.stack([thresh, r, p, f], axis=1),
        "per_image": img_scores,
    }
