"""Evaluation of the OAP universal segmenter (OAP Sec. 5.2, "Test Metrics").

* :mod:`hiseg_oap.evaluation.cluster_mapping`: K x C confusion matrices and the prototype-cluster ->
  dataset-class mapping, ``"hungarian"`` (one-to-one, STEGO) or ``"majority"`` (many-to-one,
  U2Seg); unmatched clusters map to -1.
* :mod:`hiseg_oap.evaluation.cluster_evaluators`: detectron2 evaluators that compute the mapping from the
  predictions of the same run and then score with detectron2's standard evaluators:

  ========================== =================================== ===============================
  evaluator_type             evaluator                           results
  ========================== =================================== ===============================
  coco_class_agnostic        :class:`ClassAgnosticCOCOEvaluator` ``bbox``/``segm``: AP, AP50, AR100
  coco_cluster               :class:`ClusterCOCOEvaluator`       ``bbox``/``segm``: AP, AP50, AR100
  coco_panoptic_seg_cluster  :class:`ClusterPanopticEvaluator`   ``panoptic_seg``: PQ, SQ, RQ
  sem_seg_cluster            :class:`ClusterSemSegEvaluator`     ``sem_seg``: pACC, mIoU
  ========================== =================================== ===============================

  (the cluster evaluators add ``"<evaluator_type>_mapping"``, a summary of the mapping).

Importing this package registers the four factories in ``hiseg.evaluation.registry``,
so ``TEST.EVALUATORS`` or a dataset's ``evaluator_type`` can name them. The cluster evaluators
read K from ``MODEL.OAP.HEAD.OUT_DIM`` and the method from ``MODEL.OAP.TEST.CLUSTER_MAPPING``.
"""
from .cluster_evaluators import (
    EVALUATOR_TYPES,
    FACTORIES,
    ClassAgnosticCOCOEvaluator,
    ClusterCOCOEvaluator,
    ClusterPanopticEvaluator,
    ClusterSemSegEvaluator,
    COCOEvaluatorWithAR,
    class_agnostic_coco_dict,
)
from .cluster_mapping import (
    MAPPING_METHODS,
    UNMAPPED,
    apply_mapping,
    compute_cluster_mapping,
    confusion_from_labels,
    hungarian_mapping,
    majority_mapping,
    mapping_summary,
)

__all__ = [
    "EVALUATOR_TYPES",
    "MAPPING_METHODS",
    "UNMAPPED",
    "ClassAgnosticCOCOEvaluator",
    "ClusterCOCOEvaluator",
    "ClusterPanopticEvaluator",
    "ClusterSemSegEvaluator",
    "COCOEvaluatorWithAR",
    "apply_mapping",
    "class_agnostic_coco_dict",
    "compute_cluster_mapping",
    "confusion_from_labels",
    "hungarian_mapping",
    "majority_mapping",
    "mapping_summary",
    "register_evaluator_factories",
]


def register_evaluator_factories() -> None:
    """Register this package's factories in :mod:`hiseg.evaluation.registry` (idempotent; done on
    import). A different factory already registered under one of the names is an error."""
    from hiseg.evaluation.registry import register_evaluator_factory

    for name, factory in FACTORIES.items():
        register_evaluator_factory(name)(factory)


register_evaluator_factories()
