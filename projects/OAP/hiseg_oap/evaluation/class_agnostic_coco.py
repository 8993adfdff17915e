"""Class-agnostic instance segmentation: box / mask AP, AP50, AR100 with every instance in one
category (OAP Table 2, "Agn Instance Seg."; ``evaluator_type`` ``"coco_class_agnostic"``).

On a one-category set (CutLER's ``cls_agnostic_*``) it is detectron2's ``COCOEvaluator`` as is;
on a class-aware COCO-format set it scores against a class-agnostic copy of the ground truth
(every category -> ``fg``, made by :func:`hiseg.data.datasets.cls_agnostic.class_agnostic_coco`,
the rewrite of ``datasets/prepare_cls_agnostic_coco.py``, and written to the output folder) with
every prediction in that category.
"""
import contextlib
import io
import os
from collections import OrderedDict

import torch

from detectron2.data.catalog import Metadata
from detectron2.structures import Instances
from detectron2.utils import comm

from hiseg.data.datasets.cls_agnostic import class_agnostic_coco
from hiseg.utils.atomic_io import atomic_write_json
from hiseg.evaluation.registry import evaluator_types, register_evaluator_factory

from .base import INSTANCE_TASKS
from .coco_with_ar import COCOEvaluatorWithAR

__all__ = ["ClassAgnosticCOCOEvaluator", "class_agnostic_coco_dict", "coco_class_agnostic_factory"]


def class_agnostic_coco_dict(coco: dict) -> dict:
    """The class-agnostic copy of a COCO instances dict: one category ``{"id": 1, "name": "fg"}``
    and every annotation in it, everything else unchanged (the input is not modified): CutLER's
    ``cls_agnostic_*`` files, as ``datasets/prepare_cls_agnostic_coco.py`` writes them, made by
    the same function (:func:`hiseg.data.datasets.cls_agnostic.class_agnostic_coco`).
    """
    if not isinstance(coco, dict) or "annotations" not in coco or "images" not in coco:
        raise ValueError("expected a COCO instances dict with 'images' and 'annotations'")
    return class_agnostic_coco(coco)


def _quiet_coco(dataset: dict):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        api = COCO()
        api.dataset = dataset
        api.createIndex()
    return api


class ClassAgnosticCOCOEvaluator(COCOEvaluatorWithAR):
    """Class-agnostic box / mask AP, AP50, AR100 (OAP Table 2, "Agn Instance Seg."; CutLER's and
    U2Seg's class-agnostic protocol).

    * A dataset whose COCO json has one category (CutLER's ``cls_agnostic_coco`` / ``_voc`` /
      ``_uvo``, written by ``datasets/prepare_cls_agnostic_coco.py``) is scored against it as it is.
    * A class-aware COCO-format dataset is scored against its class-agnostic copy (every category
      -> ``fg``, id 1; crowd flags kept), built in memory with the prepare script's conversion and,
      when ``output_dir`` is given, written there as ``<dataset_name>_cls_agnostic.json`` by the
      main process.

    Every prediction is put in the one category (``pred_classes`` is overwritten with 0), so
    class-aware outputs can be scored class-agnostically too. ``result_suffix`` is appended to the
    result keys (``"bbox" + suffix``), for running it next to a class-aware COCO evaluator on the
    same dataset, whose keys would otherwise collide in ``DatasetEvaluators``.
    """

    def __init__(
        self,
        dataset_name,
        tasks=None,
        distributed=True,
        output_dir=None,
        *,
        result_suffix: str = "",
        **kwargs,
    ):
        super().__init__(dataset_name, tasks, distributed, output_dir, **kwargs)
        cats = self._coco_api.dataset.get("categories") or []
        if not cats:
            raise ValueError(
                f"dataset {dataset_name!r}: its COCO json {self._metadata.json_file} has no "
                "categories"
            )
        json_file = self._metadata.json_file
        if len(cats) > 1:
            agnostic = class_agnostic_coco_dict(self._coco_api.dataset)
            self._coco_api = _quiet_coco(agnostic)
            if output_dir:
                json_file = os.path.join(output_dir, f"{dataset_name}_cls_agnostic.json")
                if comm.is_main_process():
                    atomic_write_json(json_file, agnostic)
            cats = agnostic["categories"]
        self.class_agnostic_json = json_file
        # A private metadata object: the registered one keeps describing the class-aware set.
        self._metadata = Metadata(
            name=f"{dataset_name} (class-agnostic)",
            json_file=json_file,
            thing_classes=[cats[0]["name"]],
            thing_dataset_id_to_contiguous_id={int(cats[0]["id"]): 0},
        )
        self._result_suffix = str(result_suffix)

    def process(self, inputs, outputs):
        agnostic = []
        for output in outputs:
            if "instances" in output:
                inst = output["instances"]
                fields = dict(inst.get_fields())
                fields["pred_classes"] = torch.zeros(len(inst), dtype=torch.int64)
                output = dict(output, instances=Instances(inst.image_size, **fields))
            agnostic.append(output)
        super().process(inputs, agnostic)

    def evaluate(self, img_ids=None):
        res = super().evaluate(img_ids)
        if not res or not self._result_suffix:
            return res
        return OrderedDict((k + self._result_suffix, v) for k, v in res.items())


def _requested(cfg, dataset_name) -> set:
    """The evaluator types that will run on ``dataset_name`` (``TEST.EVALUATORS`` entries that
    apply to it, or its metadata's type)."""
    try:
        return set(evaluator_types(cfg, dataset_name))
    except AttributeError:
        return set()


@register_evaluator_factory("coco_class_agnostic")
def coco_class_agnostic_factory(cfg, dataset_name, output_folder):
    # Keys "bbox"/"segm" unless a class-aware COCO evaluator runs on the same dataset too.
    clash = _requested(cfg, dataset_name) & {"coco", "coco_cluster", "coco_panoptic_seg"}
    suffix = "_agnostic" if clash else ""
    return [
        ClassAgnosticCOCOEvaluator(dataset_name, tasks=INSTANCE_TASKS, output_dir=output_folder,
                                   result_suffix=suffix)
    ]
