"""CAST's evaluator factories (registered in :mod:`hiseg.evaluation.registry` when imported).

``sem_seg_retrieval``: segment retrieval, the unsupervised semantic segmentation protocol of
CAST Appx. E.5 (SegSort, Hwang et al. 2019), on the ``"segments"`` / ``"segment_features"``
outputs of ``CASTSemanticSegmentor`` (``MODEL.CAST_SEM_SEG.RETRIEVAL_OUTPUT``). The evaluator is
the shared core's :class:`~hiseg.evaluation.segment_retrieval.SegmentRetrievalEvaluator`; its
number of voting neighbours is CAST's key ``MODEL.CAST_SEM_SEG.RETRIEVAL_K`` (20 in the paper).
"""
from hiseg.evaluation.registry import register_evaluator_factory
from hiseg.evaluation.segment_retrieval import SegmentRetrievalEvaluator

__all__ = ["segment_retrieval_factory"]


@register_evaluator_factory("sem_seg_retrieval")
def segment_retrieval_factory(cfg, dataset_name, output_dir):
    """Evaluator factory of ``evaluator_type="sem_seg_retrieval"``: leave-one-image-out on the
    evaluated set, ``MODEL.CAST_SEM_SEG.RETRIEVAL_K`` neighbours (an evaluator factory has no
    model to fill a reference memory; use :func:`hiseg.evaluation.segment_retrieval.collect_reference`
    for the train-set memory)."""
    k = cfg.MODEL.CAST_SEM_SEG.RETRIEVAL_K if "CAST_SEM_SEG" in cfg.MODEL else 20
    return [SegmentRetrievalEvaluator(dataset_name, distributed=True, output_dir=output_dir, k=k)]
