"""Boundary maps of the BSDS500 benchmark (Arbelaez et al. 2011): label map -> boundaries
(``seg2bdry``), MATLAB's thinning, ultrametric contour maps, a hierarchy's soft boundary map and
the benchmark's thresholds."""
from typing import Sequence, Tuple

import numpy as np
from scipy import ndimage

__all__ = [
    "DEFAULT_NTHRESH",
    "seg2bdry",
    "thin_boundaries",
    "ucm2_to_boundary_map",
    "ucm2_to_segmentation",
    "hierarchy_to_boundary_map",
    "boundary_thresholds",
]

#: Number of thresholds for soft boundary maps (benchmark default ``nthresh``).
DEFAULT_NTHRESH = 99


def seg2bdry(seg: np.ndarray, fmt: str = "imageSize") -> np.ndarray:
    """Boundaries of a label map, as the benchmark's ``seg2bdry.m`` (Arbelaez et al. 2011).

    Boundaries live on the "double size" grid of shape ``(2H+1, 2W+1)``: pixel ``(i, j)`` sits
    at ``(2i+1, 2j+1)``, the edge between vertically adjacent pixels at ``(2i+2, 2j+1)``, between
    horizontally adjacent pixels at ``(2i+1, 2j+2)`` and the junction of four pixels at
    ``(2i+2, 2j+2)``. ``fmt="imageSize"`` returns the junction lattice ``[2::2, 2::2]`` (one value
    per pixel); ``fmt="doubleSize"`` the full grid. The ground truth ``Boundaries`` of BSDS500
    are ``thin_boundaries(seg2bdry(Segmentation))``.
    """
    seg = np.asarray(seg)
    if seg.ndim != 2:
        raise ValueError(f"seg2bdry expects a 2-D label map, got shape {seg.shape}")
    h, w = seg.shape
    edge_v = np.zeros((h, w), dtype=bool)  # label changes between rows i and i+1
    edge_v[:-1, :] = seg[:-1, :] != seg[1:, :]
    edge_h = np.zeros((h, w), dtype=bool)  # label changes between columns j and j+1
    edge_h[:, :-1] = seg[:, :-1] != seg[:, 1:]

    bdry = np.zeros((2 * h + 1, 2 * w + 1), dtype=bool)
    bdry[2::2, 1::2] = edge_v
    bdry[1::2, 2::2] = edge_h
    junction = (edge_h[:-1, :-1] | edge_h[1:, :-1]) | (edge_v[:-1, :-1] | edge_v[:-1, 1:])
    bdry[2:-1:2, 2:-1:2] = junction
    # the benchmark copies the second/penultimate rows and columns onto the frame
    bdry[0, :] = bdry[1, :]
    bdry[:, 0] = bdry[:, 1]
    bdry[-1, :] = bdry[-2, :]
    bdry[:, -1] = bdry[:, -2]
    if fmt == "imageSize":
        return bdry[2::2, 2::2].copy()
    if fmt == "doubleSize":
        return bdry
    raise ValueError(f"unknown format {fmt!r} (expected 'imageSize' or 'doubleSize')")


def _thinning_luts() -> Tuple[np.ndarray, np.ndarray]:
    """Deletion tables of the two sub-iterations of Lam, Lee & Suen (1992), section 4 (the
    algorithm of MATLAB ``bwmorph(..., 'thin')`` and ``skimage.morphology.thin``).

    A 3x3 neighbourhood is coded with bit ``k-1`` for neighbour ``x_k``, numbered
    counter-clockwise from the east: E, NE, N, NW, W, SW, S, SE.
    """
    lut1 = np.zeros(256, dtype=bool)
    lut2 = np.zeros(256, dtype=bool)
    for code in range(256):
        x = [(code >> k) & 1 for k in range(8)]  # x[0] = x_1 (E), ..., x[7] = x_8 (SE)

        def xn(k):  # 1-based, cyclic
            return x[(k - 1) % 8]

        # G1: the crossing number X_H(p) is 1
        xh = sum(1 for i in range(1, 5) if not xn(2 * i - 1) and (xn(2 * i) or xn(2 * i + 1)))
        # G2: 2 <= min(n1, n2) <= 3
        n1 = sum(1 for k in range(1, 5) if xn(2 * k - 1) or xn(2 * k))
        n2 = sum(1 for k in range(1, 5) if xn(2 * k) or xn(2 * k + 1))
        g12 = xh == 1 and 2 <= min(n1, n2) <= 3
        # G3 (first sub-iteration) / G3' (second): the orientation conditions
        g3 = not ((xn(2) or xn(3) or not xn(8)) and xn(1))
        g3p = not ((xn(6) or xn(7) or not xn(4)) and xn(5))
        lut1[code] = g12 and g3
        lut2[code] = g12 and g3p
    return lut1, lut2


_THIN_LUTS = _thinning_luts()
# (dy, dx, bit) of the 8 neighbours in the coding above
_THIN_NEIGHBOURS = (
    (0, 1, 1), (-1, 1, 2), (-1, 0, 4), (-1, -1, 8),
    (0, -1, 16), (1, -1, 32), (1, 0, 64), (1, 1, 128),
)  # fmt: skip


def thin_boundaries(bmap: np.ndarray) -> np.ndarray:
    """Morphological thinning to 1-pixel wide curves, MATLAB ``bwmorph(bmap, 'thin', inf)``.

    The two-sub-iteration algorithm of Lam, Lee & Suen (1992), applied until nothing changes,
    with the image surrounded by background. This is the algorithm of ``bwmorph`` and of
    ``skimage.morphology.thin`` (the test suite checks equality with the latter); it is computed
    here on the list of foreground pixels only, which is much faster for sparse boundary maps. On
    the benchmark sample it reproduces the MATLAB pixel counts exactly.
    """
    bmap = np.asarray(bmap, dtype=bool)
    if bmap.ndim != 2:
        raise ValueError(f"thinning expects a 2-D map, got shape {bmap.shape}")
    h, w = bmap.shape
    skel = np.zeros((h + 2, w + 2), dtype=np.uint8)
    skel[1:-1, 1:-1] = bmap
    ys, xs = np.nonzero(skel)
    while True:
        changed = False
        for lut in _THIN_LUTS:
            if ys.size == 0:
                break
            code = np.zeros(ys.size, dtype=np.int64)
            for dy, dx, bit in _THIN_NEIGHBOURS:
                code += skel[ys + dy, xs + dx] * bit
            delete = lut[code]
            if delete.any():
                # all decisions of a sub-iteration are taken before any deletion (parallel)
                skel[ys[delete], xs[delete]] = 0
                keep = ~delete
                ys, xs = ys[keep], xs[keep]
                changed = True
        if not changed:
            break
    return skel[1:-1, 1:-1].astype(bool)


def ucm2_to_boundary_map(ucm2: np.ndarray) -> np.ndarray:
    """Soft boundary map of a double-size ultrametric contour map (Arbelaez et al. 2011): the
    benchmark's ``ucm2(3:2:end, 3:2:end)``."""
    return np.asarray(ucm2, dtype=np.float64)[2::2, 2::2]


def ucm2_to_segmentation(ucm2: np.ndarray, thresh: float) -> np.ndarray:
    """Regions of a double-size UCM at a threshold (Arbelaez et al. 2011): the benchmark's
    ``bwlabel(ucm2 <= t)`` (8-connected) sampled at the pixels, ``(2:2:end, 2:2:end)``."""
    labels, _ = ndimage.label(np.asarray(ucm2) <= thresh, structure=np.ones((3, 3), dtype=bool))
    return labels[1::2, 1::2]


def hierarchy_to_boundary_map(levels: Sequence[np.ndarray]) -> np.ndarray:
    """UCM-like soft boundary map of a hierarchy (cf. the ultrametric contour maps of Arbelaez et
    al. 2011): the fraction of levels in which a pixel is a boundary.

    ``levels`` are label maps (fine to coarse, any order works). Each level is converted with
    :func:`seg2bdry` (``imageSize``) and the boolean maps are averaged, so a contour that survives
    in all levels has strength 1 and a contour present only in the finest of ``L`` levels has
    strength ``1/L``. For a nested hierarchy this is the ultrametric contour map whose level sets
    are the hierarchy's levels; thresholding it at ``t`` keeps the contours present in at least
    ``ceil(t * L)`` levels.
    """
    if len(levels) == 0:
        raise ValueError("empty hierarchy")
    acc = None
    for seg in levels:
        b = seg2bdry(seg).astype(np.float64)
        acc = b if acc is None else acc + b
    return acc / float(len(levels))


def boundary_thresholds(nthresh: int = DEFAULT_NTHRESH) -> np.ndarray:
    """The thresholds of ``evaluation_bdry_image.m`` (Arbelaez et al. 2011):
    ``linspace(1/(n+1), 1-1/(n+1), n)``."""
    return np.linspace(1.0 / (nthresh + 1), 1.0 - 1.0 / (nthresh + 1), nthresh)
