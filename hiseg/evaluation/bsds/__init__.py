"""BSDS500 boundary and region measures in pure numpy/scipy.

Everything here follows the official BSDS500 MATLAB benchmark (``BSR/bench/benchmarks``), which
is described in

* P. Arbelaez, M. Maire, C. Fowlkes, J. Malik. "Contour Detection and Hierarchical Image
  Segmentation". IEEE TPAMI 33(5), 2011 (boundary P/R with ODS/OIS/AP, segmentation covering,
  probabilistic Rand index, variation of information);
* D. Martin, C. Fowlkes, J. Malik. "Learning to Detect Natural Image Boundaries Using Local
  Brightness, Color, and Texture Cues". IEEE TPAMI 26(5), 2004 (the boundary benchmark:
  thinning, one-to-one pixel correspondence within a distance tolerance, precision/recall).

The layout of the per-image counts is the benchmark's own (``<id>_ev1.txt``: ``thresh cntR sumR
cntP sumP``), so results can be compared line by line with the MATLAB output files.

Differences from the MATLAB code (measured against the reference outputs shipped with the
benchmark's 5-image sample, see ``tests/hiseg/evaluation/test_bsds.py``):

* ``correspondPixels`` solves its min-cost assignment with Goldberg's CSA on a graph whose
  outlier edges are drawn at random, so it is slightly sub-optimal and two MATLAB runs on the
  same map differ by a few pixels. :func:`correspond_pixels` offers two deterministic solvers:
  ``matching="optimal"`` minimises the same cost exactly (scipy's sparse Jonker-Volgenant), and
  ``matching="greedy"`` (3-5x faster; used by the evaluator) finds a matching of exactly
  the same (maximum) size whose choice of pixels is close to the minimum-cost one. Both match
  a few more pixels than MATLAB (at most 0.3% of the recall counts) and agree with the MATLAB
  ODS/OIS/AP to within 0.001.
* Thinning (:func:`thin_boundaries`) and ``seg2bdry`` reproduce MATLAB's pixel counts exactly.
* Region F-score (:func:`region_fscore`) is not part of the BSDS benchmark; it implements the
  "F-score for overlapping regions" of CAST (Table 2) as documented there.

Modules (numpy/scipy only: importable without torch or detectron2):

* :mod:`~hiseg.evaluation.bsds.boundary_maps`: ``seg2bdry``, thinning, UCMs, a hierarchy's soft
  boundary map, the thresholds;
* :mod:`~hiseg.evaluation.bsds.correspondence`: the one-to-one pixel correspondence
  (``correspondPixels``);
* :mod:`~hiseg.evaluation.bsds.boundary_scores`: per-image boundary counts and the dataset's
  ODS / OIS / AP;
* :mod:`~hiseg.evaluation.bsds.region_scores`: covering, PRI and VI;
* :mod:`~hiseg.evaluation.bsds.region_fscore`: CAST's region F-score;
* :mod:`~hiseg.evaluation.bsds.fmeasure`: the F-measure they share.
"""
from .boundary_maps import (
    DEFAULT_NTHRESH,
    boundary_thresholds,
    hierarchy_to_boundary_map,
    seg2bdry,
    thin_boundaries,
    ucm2_to_boundary_map,
    ucm2_to_segmentation,
)
from .boundary_scores import (
    collect_boundary_scores,
    evaluate_boundaries_image,
    evaluate_boundaries_image_fast,
    evaluate_segs_boundaries_image,
    match_boundaries,
    max_f_interpolated,
)
from .correspondence import DEFAULT_MAX_DIST, MATCHING_METHODS, correspond_pixels
from .fmeasure import fmeasure
from .region_fscore import region_fscore
from .region_scores import (
    collect_region_scores,
    contingency_table,
    evaluate_regions_image,
    rand_index,
    variation_of_information,
)

__all__ = [
    "DEFAULT_MAX_DIST",
    "DEFAULT_NTHRESH",
    "MATCHING_METHODS",
    "fmeasure",
    "seg2bdry",
    "thin_boundaries",
    "ucm2_to_boundary_map",
    "ucm2_to_segmentation",
    "hierarchy_to_boundary_map",
    "boundary_thresholds",
    "correspond_pixels",
    "match_boundaries",
    "evaluate_boundaries_image",
    "evaluate_boundaries_image_fast",
    "evaluate_segs_boundaries_image",
    "max_f_interpolated",
    "collect_boundary_scores",
    "contingency_table",
    "rand_index",
    "variation_of_information",
    "evaluate_regions_image",
    "collect_region_scores",
    "region_fscore",
]
