"""Evaluation of the OAP universal segmenter (OAP Sec. 5.2, "Test Metrics").

OAP: "We use the same evaluation protocol with U2Seg. We use AP, AP50, AR100 to evaluate the
unsupervised instance segmentation. We use Pixel Accuracy and mIoU to evaluate the unsupervised
semantic segmentation. The clustering labels are mapped using Hungarian matching to class labels
in the dataset." Panoptic segmentation is scored by PQ / SQ / RQ (Table 2, 3).

* :mod:`hiseg_oap.evaluation.cluster_mapping`: K x C confusion matrices and the prototype-cluster ->
  dataset-class mapping, ``"hungarian"`` (one-to-one, STEGO) or ``"majority"`` (many-to-one,
  U2Seg); unmatched clusters map to -1.
* :mod:`hiseg_oap.evaluation.base`: :class:`ClusterMappingEvaluator`, the base of the cluster
  evaluators, which compute the mapping from the predictions of the same run and then score with
  detectron2's standard evaluators;
* :mod:`hiseg_oap.evaluation.coco_with_ar`: :class:`COCOEvaluatorWithAR`, detectron2's
  ``COCOEvaluator`` that also reports average recall;
* one module per evaluator, each beside its factory:

  ========================== =================================== ===============================
  evaluator_type             evaluator (module)                  results
  ========================== =================================== ===============================
  coco_class_agnostic        :class:`ClassAgnosticCOCOEvaluator` ``bbox``/``segm``: AP, AP50, AR100
                             (``class_agnostic_coco``)
  coco_cluster               :class:`ClusterCOCOEvaluator`       ``bbox``/``segm``: AP, AP50, AR100
                             (``cluster_coco``)
  coco_panoptic_seg_cluster  :class:`ClusterPanopticEvaluator`   ``panoptic_seg``: PQ, SQ, RQ
                             (``cluster_panoptic``)
  sem_seg_cluster            :class:`ClusterSemSegEvaluator`     ``sem_seg``: pACC, mIoU
                             (``cluster_sem_seg``)
  ========================== =================================== ===============================

  (the cluster evaluators add ``"<evaluator_type>_mapping"``, a summary of the mapping).

Importing this package registers the four factories in ``hiseg.evaluation.registry`` (each with
``@register_evaluator_factory`` in its evaluator's module), so ``TEST.EVALUATORS`` or a dataset's
``evaluator_type`` can name them. The cluster evaluators read K from ``MODEL.OAP.HEAD.OUT_DIM``
and the method from ``MODEL.OAP.TEST.CLUSTER_MAPPING``.
"""
from .base import ClusterMappingEvaluator
from .class_agnostic_coco import ClassAgnosticCOCOEvaluator, class_agnostic_coco_dict
from .cluster_coco import ClusterCOCOEvaluator
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
from .cluster_panoptic import ClusterPanopticEvaluator
from .cluster_sem_seg import ClusterSemSegEvaluator
from .coco_with_ar import COCOEvaluatorWithAR

#: The evaluator types this package registers.
EVALUATOR_TYPES = ("coco_class_agnostic", "coco_cluster", "coco_panoptic_seg_cluster", "sem_seg_cluster")

__all__ = [
    "EVALUATOR_TYPES",
    "MAPPING_METHODS",
    "UNMAPPED",
    "ClassAgnosticCOCOEvaluator",
    "ClusterCOCOEvaluator",
    "ClusterMappingEvaluator",
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
]
