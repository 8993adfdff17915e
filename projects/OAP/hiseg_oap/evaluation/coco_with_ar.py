"""detectron2's COCO evaluator with average recall (OAP reports AR100, Sec. 5.2, Table 2)."""
from detectron2.evaluation import COCOEvaluator

from hiseg.compat import coco_evaluator_kwargs

__all__ = ["COCOEvaluatorWithAR"]


class COCOEvaluatorWithAR(COCOEvaluator):
    """detectron2's ``COCOEvaluator`` whose box / mask results also hold average recall.

    OAP reports AR100 (Sec. 5.2, Table 2); detectron2 reports only the AP numbers of COCOeval's
    summary. This adds ``AR1``, ``AR10``, ``AR100`` (named after COCOeval's ``maxDets``),
    ``ARs``, ``ARm``, ``ARl`` from the same ``COCOeval.stats`` (entries 6-11). Nothing else changes.
    ``use_fast_impl`` defaults to whatever works here (:func:`hiseg.compat.coco_evaluator_kwargs`).
    """

    def __init__(self, dataset_name, tasks=None, distributed=True, output_dir=None, **kwargs):
        if kwargs.get("use_fast_impl") is None:
            kwargs["use_fast_impl"] = coco_evaluator_kwargs()["use_fast_impl"]
        super().__init__(dataset_name, tasks, distributed, output_dir, **kwargs)

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        res = super()._derive_coco_results(coco_eval, iou_type, class_names=class_names)
        if iou_type not in ("bbox", "segm"):
            return res
        dets = list(getattr(self, "_max_dets_per_image", None) or [1, 10, 100])
        names = [f"AR{d}" for d in dets[:3]] + ["ARs", "ARm", "ARl"]
        for idx, name in enumerate(names, start=6):
            if coco_eval is None:
                res[name] = float("nan")
            else:
                v = coco_eval.stats[idx]
                res[name] = float(v * 100 if v >= 0 else float("nan"))
        return res
