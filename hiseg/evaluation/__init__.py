"""Evaluation for the CAST and OAP projects.

* :mod:`hiseg.evaluation.bsds`: BSDS500 boundary (ODS/OIS/AP) and region (covering,
  PRI, VI) measures and the region F-score, in numpy/scipy only;
* :class:`HierarchicalSegEvaluator` (:mod:`hiseg.evaluation.hierarchical_evaluator`): the
  detectron2 evaluator for hierarchical segmentation on BSDS500-style datasets
  (``evaluator_type="bsds_hierarchical"``);
* :class:`BoundaryFScoreEvaluator`, :class:`SegmentRetrievalEvaluator`: CAST Table 3's boundary
  F-score of semantic segmentation and the SegSort segment-retrieval protocol (Appx. E.5);
* :class:`FigureGroundEvaluator` (+ class-attention extraction for CAST and ViT): Table 5's
  figure-ground mIoU from class-token attention (DINO's 60% mass rule).

The evaluator is imported on first access, so ``hiseg.evaluation.bsds`` can be used
without importing detectron2 and torch.
"""
import importlib

__all__ = ["HierarchicalSegEvaluator", "BoundaryFScoreEvaluator", "SegmentRetrievalEvaluator",
           "ClassificationEvaluator", "FigureGroundEvaluator"]

_LAZY = {
    "HierarchicalSegEvaluator": ".hierarchical_evaluator",
    "BoundaryFScoreEvaluator": ".boundary_fscore",
    "SegmentRetrievalEvaluator": ".segment_retrieval",
    "ClassificationEvaluator": ".classification",
    "FigureGroundEvaluator": ".figure_ground",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
