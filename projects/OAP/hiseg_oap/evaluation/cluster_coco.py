"""Zero-shot class-aware instance segmentation from cluster ids: box / mask AP, AP50, AR100 after
mapping clusters to classes (``evaluator_type`` ``"coco_cluster"``; see :mod:`.base`)."""
from typing import Optional

import numpy as np
import pycocotools.mask as mask_util
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances

from hiseg.evaluation.registry import register_evaluator_factory

from .base import INSTANCE_TASKS, ClusterMappingEvaluator, _as_numpy, _check_clusters, _subdir, oap_cluster_args
from .cluster_mapping import apply_mapping
from .coco_with_ar import COCOEvaluatorWithAR

__all__ = ["ClusterCOCOEvaluator", "coco_cluster_factory"]


class ClusterCOCOEvaluator(ClusterMappingEvaluator):
    """Zero-shot class-aware instance segmentation from cluster ids: box / mask AP, AP50, AR100.

    Evidence for the mapping (OAP and U2Seg do not spell it out; U2Seg's released evaluator lets
    every prediction with score >= 0.6 vote for the class of each GT box it overlaps with box
    IoU > 0.7): every non-crowd GT instance votes once, for (cluster of its best-IoU prediction,
    its class), if that IoU is at least ``iou_threshold`` (0.5, the loosest IoU at which COCO
    counts a detection as a true positive). Masks are compared (box IoU when the predictions
    have no masks). Votes per GT rather than per prediction keep duplicate detections from
    outvoting, and no score threshold is needed.

    Predictions whose cluster is unmapped are dropped, as U2Seg does (``mapping == -1``:
    ``continue``); the rest get their class and are scored by :class:`COCOEvaluatorWithAR`
    (detectron2's ``COCOEvaluator``). The dataset needs COCO-format metadata (``json_file``, and
    ``thing_dataset_id_to_contiguous_id``, which loading the dataset fills in).
    """

    evaluator_type = "coco_cluster"

    def __init__(
        self,
        dataset_name: str,
        num_clusters: int,
        mapping: str = "hungarian",
        output_dir: Optional[str] = None,
        distributed: bool = True,
        *,
        tasks=None,
        iou_threshold: float = 0.5,
        max_dets_per_image: Optional[int] = None,
        use_fast_impl: Optional[bool] = None,
    ):
        super().__init__(dataset_name, num_clusters, mapping, output_dir, distributed)
        if not 0.0 < float(iou_threshold) <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        self._iou_threshold = float(iou_threshold)
        meta = MetadataCatalog.get(dataset_name)
        has_ids = hasattr(meta, "thing_dataset_id_to_contiguous_id")
        if not has_ids and dataset_name in DatasetCatalog.list():
            DatasetCatalog.get(dataset_name)  # load_coco_json fills the id map in
        if not hasattr(meta, "thing_dataset_id_to_contiguous_id"):
            raise ValueError(
                f"dataset {dataset_name!r} has no thing_dataset_id_to_contiguous_id metadata "
                "(coco_cluster needs a COCO-format instance dataset)"
            )
        self._tasks = tuple(tasks) if tasks else ()
        self._inner = COCOEvaluatorWithAR(
            dataset_name,
            tasks=self._tasks or None,  # None: inferred from the predictions, as COCOEvaluator
            distributed=distributed,
            output_dir=_subdir(output_dir, self.evaluator_type),
            max_dets_per_image=max_dets_per_image,
            use_fast_impl=use_fast_impl,
        )
        self._coco = self._inner._coco_api  # the ground truth the inner evaluator scores against
        id_map = {int(k): int(v) for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
        self._category_to_class = id_map
        n = len(id_map)
        if sorted(id_map.values()) != list(range(n)):
            raise ValueError(f"dataset {dataset_name!r}: contiguous ids are not 0..{n - 1}")
        names = list(meta.get("thing_classes", []) or [])
        if len(names) != n:
            by_id = {int(c["id"]): c["name"] for c in self._coco.dataset.get("categories", [])}
            inverse = {v: k for k, v in id_map.items()}
            names = [by_id.get(inverse[i], str(inverse[i])) for i in range(n)]
        self._class_names = names
        self._extra_record = {
            "class_dataset_ids": [k for k, _ in sorted(id_map.items(), key=lambda kv: kv[1])],
            "iou_threshold": self._iou_threshold,
        }
        self.evidence = (
            "instances: each non-crowd GT instance votes for (cluster of its best-IoU prediction, "
            f"its class) when that mask IoU is >= {self._iou_threshold}"
        )
        self.reset()

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            if "instances" not in out:
                raise ValueError(f"{self.evaluator_type}: the model output has no 'instances'")
            image_id = inp["image_id"]
            if image_id not in self._coco.imgs:
                raise ValueError(
                    f"{self.evaluator_type}: image_id {image_id!r} is not in the COCO json of "
                    f"{self._dataset_name!r}"
                )
            info = self._coco.imgs[image_id]
            inst = out["instances"].to("cpu")
            for field in ("pred_clusters", "scores", "pred_boxes"):
                if not inst.has(field):
                    raise ValueError(f"{self.evaluator_type}: instances have no '{field}' field")
            clusters = _check_clusters(
                _as_numpy(inst.pred_clusters).reshape(-1), self._num_clusters, "pred_clusters"
            )
            boxes = inst.pred_boxes.tensor.numpy().astype(np.float64).reshape(-1, 4)
            scores = _as_numpy(inst.scores).astype(np.float64).reshape(-1)
            rles = None
            if inst.has("pred_masks"):
                masks = _as_numpy(inst.pred_masks)
                if masks.dtype.kind == "f":
                    raise ValueError(
                        f"{self.evaluator_type}: pred_masks must be boolean, got {masks.dtype} "
                        "(threshold the mask probabilities first)"
                    )
                if masks.ndim != 3 or masks.shape[1:] != (info["height"], info["width"]):
                    raise ValueError(
                        f"{self.evaluator_type}: pred_masks of image {image_id} have shape "
                        f"{masks.shape}, expected (N, {info['height']}, {info['width']}) "
                        "(the original image size)"
                    )
                rles = mask_util.encode(
                    np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))
                )
            elif "segm" in self._tasks:
                raise ValueError(f"{self.evaluator_type}: 'segm' needs pred_masks in the instances")
            self._vote(image_id, clusters, boxes, rles)
            self._records.append(
                {
                    "image_id": image_id,
                    "image_size": tuple(inst.image_size),
                    "boxes": boxes,
                    "scores": scores,
                    "clusters": clusters,
                    "rles": rles,
                }
            )

    def _vote(self, image_id, clusters, boxes, rles):
        gts = [a for a in self._coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        if not gts or not len(clusters):
            return
        try:
            classes = np.array([self._category_to_class[int(a["category_id"])] for a in gts])
        except KeyError as e:
            raise ValueError(
                f"GT category id {e.args[0]} of image {image_id} is not in the metadata"
            ) from None
        crowd = [0] * len(gts)
        if rles is not None:
            ious = mask_util.iou(list(rles), [self._coco.annToRLE(a) for a in gts], crowd)
        else:
            xywh = BoxMode.convert(boxes, BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)
            ious = mask_util.iou(xywh.tolist(), [list(a["bbox"]) for a in gts], crowd)
        ious = np.asarray(ious, dtype=np.float64).reshape(len(clusters), len(gts))
        best = ious.argmax(axis=0)
        ok = ious[best, np.arange(len(gts))] >= self._iou_threshold
        np.add.at(self._confusion, (clusters[best[ok]], classes[ok]), 1)

    def evaluate(self):
        mapping = self._compute_mapping()
        self._inner.reset()
        for rec in self._records:
            classes = apply_mapping(rec["clusters"], mapping)
            keep = classes >= 0
            h, w = rec["image_size"]
            inst = Instances((h, w))
            inst.pred_boxes = Boxes(torch.from_numpy(rec["boxes"][keep]))
            inst.scores = torch.from_numpy(rec["scores"][keep])
            inst.pred_classes = torch.from_numpy(classes[keep])
            if rec["rles"] is not None:
                kept = [r for r, k in zip(rec["rles"], keep) if k]
                if kept:
                    masks = mask_util.decode(kept).transpose(2, 0, 1)
                else:
                    masks = np.zeros((0, h, w), dtype=np.uint8)
                inst.pred_masks = torch.from_numpy(np.ascontiguousarray(masks)).bool()
            self._inner.process([{"image_id": rec["image_id"]}], [{"instances": inst}])
        return self._finish(self._inner.evaluate())


@register_evaluator_factory("coco_cluster")
def coco_cluster_factory(cfg, dataset_name, output_folder):
    k, method = oap_cluster_args(cfg, "coco_cluster")
    return [ClusterCOCOEvaluator(dataset_name, k, method, tasks=INSTANCE_TASKS, output_dir=output_folder)]
