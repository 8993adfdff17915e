"""Factories of detectron2's own evaluators for the evaluator registry: ``coco`` (with a line
saying why when there is no prediction), ``coco_panoptic_seg`` (plus COCO AP when the dataset has
instance annotations) and ``sem_seg``."""
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, SemSegEvaluator

from ..compat import coco_evaluator_kwargs
from .registry import register_evaluator_factory

__all__ = ["coco_factory", "coco_panoptic_factory", "sem_seg_factory"]


@register_evaluator_factory("coco")
def coco_factory(cfg, name, out):
    from .no_predictions import ExplainNoPredictions  # "AP nan": says why

    return [ExplainNoPredictions(COCOEvaluator(name, output_dir=out, **coco_evaluator_kwargs()), name, cfg)]


@register_evaluator_factory("coco_panoptic_seg")
def coco_panoptic_factory(cfg, name, out):
    evs = [COCOPanopticEvaluator(name, out)]
    if getattr(MetadataCatalog.get(name), "json_file", None):
        evs.append(COCOEvaluator(name, output_dir=out, **coco_evaluator_kwargs()))
    return evs


@register_evaluator_factory("sem_seg")
def sem_seg_factory(cfg, name, out):
    return [SemSegEvaluator(name, distributed=True, output_dir=out)]
