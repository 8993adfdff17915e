"""Detectron2 evaluators for a self-supervised segmenter whose labels are prototype clusters.

OAP (Sec. 5.2, "Test Metrics"): "We use the same evaluation protocol with U2Seg. We use AP, AP50,
AR100 to evaluate the unsupervised instance segmentation. We use Pixel Accuracy and mIoU to evaluate
the unsupervised semantic segmentation. The clustering labels are mapped using Hungarian matching
to class labels in the dataset." Panoptic segmentation is scored by PQ / SQ / RQ (Table 2, 3).

The model (see ``hiseg_oap.modeling``) outputs, per image and at the original image size:

* ``"instances"``: ``pred_masks`` (N, H, W) bool, ``pred_boxes``, ``scores``, ``pred_classes``
  (all 0: class-agnostic) and ``pred_clusters`` (N,) in ``[0, K)``;
* ``"sem_seg_clusters"``: (H, W) long, a cluster id per pixel;
* ``"panoptic_seg"``: ``(ids (H, W) int32, segments_info)``, 0 = void, each segment's
  ``category_id`` a cluster id.

Evaluators (and their ``evaluator_type`` in ``hiseg.evaluation.registry``):

* :class:`ClassAgnosticCOCOEvaluator` (``"coco_class_agnostic"``): Table 2's "Agn Instance Seg.",
  class-agnostic box and mask AP / AP50 / AR100. On a one-category set (CutLER's
  ``cls_agnostic_*``) it is detectron2's ``COCOEvaluator`` as is; on a class-aware COCO-format set
  it scores against a class-agnostic copy of the ground truth (every category -> ``fg``, made by
  :func:`hiseg.data.datasets.cls_agnostic.class_agnostic_coco`, the rewrite of
  ``datasets/prepare_cls_agnostic_coco.py``, and written to the output
  folder) with every prediction in that category.
* :class:`ClusterCOCOEvaluator` (``"coco_cluster"``): zero-shot class-aware instance segmentation.
* :class:`ClusterPanopticEvaluator` (``"coco_panoptic_seg_cluster"``): PQ / SQ / RQ.
* :class:`ClusterSemSegEvaluator` (``"sem_seg_cluster"``): STEGO's unsupervised semantic
  segmentation protocol, pixel accuracy and mIoU.

The three cluster evaluators work alike, in one pass over the data (U2Seg computes its mapping in
a second pass and edits the mapping file by hand; here nothing is edited):

1. ``process`` adds each image's evidence to a K x C confusion matrix (cluster x dataset
   class): pixel counts, or for instances the votes derived from that image's GT-to-prediction
   mask IoUs (counted at once, so the overlaps need not be kept), and buffers the predictions
   compactly (RLE masks, zlib-compressed id maps);
2. ``evaluate`` sums the confusion over all processes (``all_gather``, so every rank holds the
   same matrix), maps clusters to classes (:mod:`hiseg_oap.evaluation.cluster_mapping`, Hungarian or
   majority), writes ``cluster_mapping_<evaluator_type>.json`` (mapping + confusion) to the
   output folder, replays each rank's own predictions, relabelled, into detectron2's standard
   evaluator (``COCOEvaluator``, ``COCOPanopticEvaluator``, ``SemSegEvaluator``) and returns its
   results, which that evaluator gathers itself, plus ``"<evaluator_type>_mapping"``: a summary of
   the mapping (mapped clusters, % of the evidence agreeing with it, % in unmapped clusters).

The standard evaluators' own dumps go to ``<output_dir>/<evaluator_type>/`` so that evaluators
sharing a folder do not overwrite each other's ``coco_instances_results.json`` etc.
"""
import contextlib
import io
import json
import logging
import os
import zlib
from collections import OrderedDict
from typing import Dict, List, Optional

import numpy as np
import pycocotools.mask as mask_util
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.evaluation import (
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluator,
    SemSegEvaluator,
)
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from hiseg.compat import coco_evaluator_kwargs
from hiseg.data.datasets.cls_agnostic import class_agnostic_coco
from hiseg.utils.atomic_io import atomic_write_json

from .cluster_mapping import (
    MAPPING_METHODS,
    apply_mapping,
    compute_cluster_mapping,
    confusion_from_labels,
    mapping_record,
    mapping_summary,
)

__all__ = [
    "COCOEvaluatorWithAR",
    "ClassAgnosticCOCOEvaluator",
    "ClusterCOCOEvaluator",
    "ClusterPanopticEvaluator",
    "ClusterSemSegEvaluator",
    "class_agnostic_coco_dict",
    "EVALUATOR_TYPES",
    "FACTORIES",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _pack(array: np.ndarray):
    """A compact copy of an id map (zlib level 1: label maps compress 20-100x, quickly)."""
    array = np.ascontiguousarray(array)
    return zlib.compress(array.tobytes(), 1), array.shape, array.dtype.str


def _unpack(packed) -> np.ndarray:
    data, shape, dtype = packed
    return np.frombuffer(zlib.decompress(data), dtype=np.dtype(dtype)).reshape(shape)


def _cluster_dtype(num_clusters: int):
    return np.uint16 if num_clusters <= np.iinfo(np.uint16).max + 1 else np.int32


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _check_clusters(clusters: np.ndarray, num_clusters: int, what: str) -> np.ndarray:
    if clusters.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integer cluster ids, got dtype {clusters.dtype}")
    clusters = clusters.astype(np.int64, copy=False)
    if clusters.size and (clusters.min() < 0 or clusters.max() >= num_clusters):
        raise ValueError(
            f"{what} must lie in [0, {num_clusters}) (num_clusters = MODEL.OAP.HEAD.OUT_DIM), "
            f"got values in [{clusters.min()}, {clusters.max()}]"
        )
    return clusters


def _check_method(method: str) -> str:
    m = str(method).lower()
    if m not in MAPPING_METHODS:
        raise ValueError(f"unknown cluster mapping {method!r}; expected one of {MAPPING_METHODS}")
    return m


def _check_num_clusters(num_clusters) -> int:
    if isinstance(num_clusters, bool) or int(num_clusters) != num_clusters or num_clusters <= 0:
        raise ValueError(f"num_clusters must be a positive integer, got {num_clusters!r}")
    return int(num_clusters)


def _subdir(output_dir: Optional[str], name: str) -> Optional[str]:
    return os.path.join(output_dir, name) if output_dir else None


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


# ---------------------------------------------------------------------------------------------
# class-agnostic instance segmentation
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# common part of the cluster evaluators
# ---------------------------------------------------------------------------------------------


class _ClusterMappingEvaluator(DatasetEvaluator):
    """Confusion accumulation, gathering, mapping and the mapping file (see the module doc)."""

    evaluator_type = ""
    evidence = ""

    def __init__(self, dataset_name, num_clusters, mapping, output_dir, distributed):
        self._dataset_name = dataset_name
        self._num_clusters = _check_num_clusters(num_clusters)
        self._method = _check_method(mapping)
        self._output_dir = output_dir
        self._distributed = bool(distributed)
        self._class_names: List[str] = []
        self._extra_record: Dict = {}
        self.mapping = None
        self.confusion = None

    @property
    def num_classes(self) -> int:
        """C, the number of dataset classes clusters are mapped to."""
        return len(self._class_names)

    @property
    def num_clusters(self) -> int:
        """K, the number of prototype clusters."""
        return self._num_clusters

    @property
    def method(self) -> str:
        """``"hungarian"`` or ``"majority"``."""
        return self._method

    @property
    def class_names(self) -> List[str]:
        return list(self._class_names)

    def reset(self):
        """Clears the evidence, the buffered predictions and the wrapped standard evaluator
        (``self._inner``, set by each subclass before its first ``reset()``)."""
        self._confusion = np.zeros((self._num_clusters, self.num_classes), dtype=np.int64)
        self._records = []
        self.mapping = None
        self.confusion = None
        self._inner.reset()

    def _total_confusion(self) -> np.ndarray:
        if self._distributed and comm.get_world_size() > 1:
            return np.sum(np.stack(comm.all_gather(self._confusion)), axis=0)
        return self._confusion.copy()

    def _compute_mapping(self) -> np.ndarray:
        """Same mapping on every rank, from the confusion summed over all of them; saved by the
        main process as ``cluster_mapping_<evaluator_type>.json``."""
        conf = self._total_confusion()
        mapping = compute_cluster_mapping(conf, self._method)
        self.mapping, self.confusion = mapping, conf
        summary = mapping_summary(conf, mapping)
        logger.info(
            f"{self.evaluator_type} on {self._dataset_name}: {self._method} mapping of "
            f"{self._num_clusters} clusters to {self.num_classes} classes: {summary}"
        )
        if self._output_dir and comm.is_main_process():
            record = mapping_record(
                conf,
                mapping,
                self._method,
                self._class_names,
                evidence=self.evidence,
                evaluator=self.evaluator_type,
                dataset=self._dataset_name,
                **self._extra_record,
            )
            atomic_write_json(
                os.path.join(self._output_dir, f"cluster_mapping_{self.evaluator_type}.json"),
                record,
            )
        return mapping

    def _finish(self, results) -> OrderedDict:
        if not results:  # non-main ranks: the inner evaluator returned None / {}
            return OrderedDict()
        out = OrderedDict(results)
        out[f"{self.evaluator_type}_mapping"] = mapping_summary(self.confusion, self.mapping)
        return out


# ---------------------------------------------------------------------------------------------
# class-aware instance segmentation
# ---------------------------------------------------------------------------------------------


class ClusterCOCOEvaluator(_ClusterMappingEvaluator):
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


# ---------------------------------------------------------------------------------------------
# panoptic segmentation
# ---------------------------------------------------------------------------------------------


class ClusterPanopticEvaluator(_ClusterMappingEvaluator):
    """PQ / SQ / RQ after mapping segment clusters to panoptic categories (U2Seg's panoptic
    protocol on COCO / Cityscapes, OAP Tables 2-3).

    Evidence: pixels. Each pixel of a predicted segment counts for (segment's cluster, category of
    the GT segment under it), over thing and stuff categories alike (crowd GT regions included:
    they carry their category); void pixels of either side are left out. After mapping, every
    segment takes its cluster's category (``category_id`` -> the dataset's contiguous id and
    ``isthing`` from the category; the model's own ``isthing`` is not used) and the result is
    scored by detectron2's ``COCOPanopticEvaluator`` (panopticapi). Choices where the papers are
    silent:

    * segments of unmapped clusters become void (id 0): their GT segments count as missed;
    * with ``merge_stuff`` (default), segments of one image mapped to the same stuff category are
      merged into one, as Mask2Former's and detectron2's panoptic inference keep one segment per
      stuff class (a many-to-one mapping would otherwise split a stuff region into false positives).

    The dataset needs detectron2's COCO-panoptic metadata (``panoptic_json``, ``panoptic_root``,
    ``thing_dataset_id_to_contiguous_id``, ``stuff_dataset_id_to_contiguous_id``); the ground
    truth is read from those files, as panopticapi does.
    """

    evaluator_type = "coco_panoptic_seg_cluster"
    evidence = "pixels: (cluster of the predicted segment, category of the GT segment) per pixel"

    def __init__(
        self,
        dataset_name: str,
        num_clusters: int,
        mapping: str = "hungarian",
        output_dir: Optional[str] = None,
        distributed: bool = True,
        *,
        merge_stuff: bool = True,
    ):
        super().__init__(dataset_name, num_clusters, mapping, output_dir, distributed)
        meta = MetadataCatalog.get(dataset_name)
        need = ("panoptic_json", "panoptic_root", "thing_dataset_id_to_contiguous_id",
                "stuff_dataset_id_to_contiguous_id")  # fmt: skip
        missing = [k for k in need if not hasattr(meta, k)]
        if missing:
            raise ValueError(
                f"dataset {dataset_name!r} lacks the panoptic metadata {missing} "
                f"({self.evaluator_type} needs a COCO-panoptic-format dataset)"
            )
        self._merge_stuff = bool(merge_stuff)
        self._thing_map = {
            int(k): int(v) for k, v in meta.thing_dataset_id_to_contiguous_id.items()
        }
        self._stuff_map = {
            int(k): int(v) for k, v in meta.stuff_dataset_id_to_contiguous_id.items()
        }
        with PathManager.open(meta.panoptic_json) as f:
            gt_json = json.load(f)
        self._gt_root = PathManager.get_local_path(meta.panoptic_root)
        self._gt = {
            a["image_id"]: (
                a["file_name"],
                {int(s["id"]): int(s["category_id"]) for s in a["segments_info"]},
            )
            for a in gt_json["annotations"]
        }
        names = {int(c["id"]): c["name"] for c in gt_json.get("categories", [])}
        # classes: the panoptic categories by dataset id (a category in both maps is a thing)
        self._class_ids = sorted(set(self._thing_map) | set(self._stuff_map))
        self._class_index = {cid: i for i, cid in enumerate(self._class_ids)}
        self._class_isthing = [cid in self._thing_map for cid in self._class_ids]
        self._class_names = [names.get(cid, str(cid)) for cid in self._class_ids]
        self._extra_record = {
            "class_dataset_ids": list(self._class_ids),
            "class_isthing": list(self._class_isthing),
            "merge_stuff": self._merge_stuff,
        }
        self._inner = COCOPanopticEvaluator(dataset_name, _subdir(output_dir, self.evaluator_type))
        self.reset()

    def _read_gt(self, image_id, shape):
        from panopticapi.utils import rgb2id

        file_name, seg_to_cat = self._gt[image_id]
        with PathManager.open(os.path.join(self._gt_root, file_name), "rb") as f:
            gt = rgb2id(np.asarray(Image.open(f).convert("RGB")))
        if gt.shape != shape:
            raise ValueError(
                f"{self.evaluator_type}: panoptic prediction of image {image_id} has shape "
                f"{shape}, its ground truth {gt.shape} (predict at the original image size)"
            )
        uniq, inverse = np.unique(gt, return_inverse=True)
        lut = np.array(
            [self._class_index.get(seg_to_cat.get(int(u), -1), -1) for u in uniq], dtype=np.int64
        )
        return lut[inverse.reshape(-1)]

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            if "panoptic_seg" not in out:
                raise ValueError(f"{self.evaluator_type}: the model output has no 'panoptic_seg'")
            image_id = inp["image_id"]
            if image_id not in self._gt:
                raise ValueError(
                    f"{self.evaluator_type}: image_id {image_id!r} has no annotation in "
                    f"{self._dataset_name!r}'s panoptic json"
                )
            pan, segments = out["panoptic_seg"]
            pan = _as_numpy(pan)
            if pan.ndim != 2 or pan.dtype.kind not in "iu":
                raise ValueError(
                    f"{self.evaluator_type}: panoptic ids must be a 2-D integer map, got "
                    f"{pan.dtype} {pan.shape}"
                )
            if segments is None:
                raise ValueError(
                    f"{self.evaluator_type}: segments_info is required (category_id = cluster id)"
                )
            seg_cluster = {}
            for s in segments:
                sid = int(s["id"])
                if sid <= 0 or sid in seg_cluster:
                    raise ValueError(f"{self.evaluator_type}: bad or repeated segment id {sid}")
                c = int(s["category_id"])
                if not 0 <= c < self._num_clusters:
                    raise ValueError(
                        f"{self.evaluator_type}: segment {sid} has cluster {c}, outside "
                        f"[0, {self._num_clusters})"
                    )
                seg_cluster[sid] = c
            uniq, inverse = np.unique(pan, return_inverse=True)
            unknown = [int(u) for u in uniq if u != 0 and int(u) not in seg_cluster]
            if unknown:
                raise ValueError(
                    f"{self.evaluator_type}: segment ids {unknown[:5]} of image {image_id} are in "
                    "the panoptic map but not in segments_info"
                )
            pred = np.array([seg_cluster.get(int(u), -1) for u in uniq], dtype=np.int64)
            pred = pred[inverse.reshape(-1)]
            gt = self._read_gt(image_id, pan.shape)
            valid = (pred >= 0) & (gt >= 0)
            self._confusion += confusion_from_labels(
                pred[valid], gt[valid], self._num_clusters, self.num_classes
            )
            file_name = inp.get("file_name") or self._gt[image_id][0]
            self._records.append(
                {
                    "image_id": image_id,
                    "file_name": file_name,
                    "pan": _pack(pan.astype(np.int32)),
                    "segments": sorted(seg_cluster.items()),
                }
            )

    def _relabel(self, pan: np.ndarray, segments, mapping):
        new_id, infos, stuff_segment = {}, [], {}
        for sid, cluster in segments:
            cls = int(mapping[cluster])
            if cls < 0:
                new_id[sid] = 0
                continue
            cid, isthing = self._class_ids[cls], self._class_isthing[cls]
            if not isthing and self._merge_stuff and cid in stuff_segment:
                new_id[sid] = stuff_segment[cid]
                continue
            new_id[sid] = sid
            contiguous = self._thing_map[cid] if isthing else self._stuff_map[cid]
            infos.append({"id": sid, "category_id": contiguous, "isthing": bool(isthing)})
            if not isthing:
                stuff_segment[cid] = sid
        uniq, inverse = np.unique(pan, return_inverse=True)
        lut = np.array([new_id.get(int(u), 0) for u in uniq], dtype=np.int32)
        return lut[inverse.reshape(-1)].reshape(pan.shape), infos

    def evaluate(self):
        mapping = self._compute_mapping()
        self._inner.reset()
        for rec in self._records:
            pan, infos = self._relabel(_unpack(rec["pan"]), rec["segments"], mapping)
            self._inner.process(
                [{"image_id": rec["image_id"], "file_name": rec["file_name"]}],
                [{"panoptic_seg": (torch.from_numpy(pan), infos)}],
            )
        return self._finish(self._inner.evaluate())


# ---------------------------------------------------------------------------------------------
# semantic segmentation
# ---------------------------------------------------------------------------------------------

#: Name of the extra class that unmapped clusters predict (see :class:`ClusterSemSegEvaluator`).
UNMAPPED_CLASS_NAME = "__unmapped__"


class _SemSegEvaluatorWithUnmapped(SemSegEvaluator):
    """detectron2's ``SemSegEvaluator`` with one class appended after the dataset's, for pixels of
    unmapped clusters. Its label is C; ignored GT pixels move to C + 1. It never occurs in the
    ground truth, so its pixels are errors (in pACC and in the IoU of the GT class under them)."""

    def __init__(self, dataset_name, distributed=True, output_dir=None):
        super().__init__(dataset_name, distributed=distributed, output_dir=output_dir)
        self.unmapped_label = self._num_classes
        self._class_names = list(self._class_names) + [UNMAPPED_CLASS_NAME]
        self._num_classes += 1
        if self._contiguous_id_to_dataset_id is not None:
            self._contiguous_id_to_dataset_id = dict(self._contiguous_id_to_dataset_id)
            self._contiguous_id_to_dataset_id[self.unmapped_label] = -1  # in the RLE dump only


def dataset_class_miou(conf_matrix: np.ndarray, num_classes: int) -> float:
    """mIoU (%) over the first ``num_classes`` classes of a detectron2 ``SemSegEvaluator``
    confusion matrix (rows: prediction, columns: GT, last row / column: ignore) that may hold
    more predicted labels (e.g. "unmapped"): pixels of those count as misses of their GT class.
    detectron2's rule: a class enters the mean when it occurs in the GT or the prediction."""
    m = np.asarray(conf_matrix, dtype=np.float64)[:-1, :-1]
    c = int(num_classes)
    tp = np.diag(m)[:c]
    pos_gt = m[:, :c].sum(0)
    pos_pred = m[:c, :].sum(1)
    valid = (pos_gt + pos_pred) > 0
    if not valid.any():
        return float("nan")
    union = np.maximum(pos_gt + pos_pred - tp, 1)
    iou = np.where(pos_gt > 0, tp / union, 0.0)
    return float(100.0 * iou[valid].sum() / valid.sum())


class ClusterSemSegEvaluator(_ClusterMappingEvaluator):
    """Unsupervised semantic segmentation (STEGO's protocol, used by U2Seg and OAP on
    COCO-Stuff-27): pixel accuracy and mIoU after mapping clusters to classes.

    Evidence: pixels, the confusion of ``sem_seg_clusters`` with the GT label map (pixels with the
    dataset's ``ignore_label`` left out). The mapped labels are fed to detectron2's
    ``SemSegEvaluator`` as one-hot scores. Pixels of unmapped clusters (Hungarian with K > C)
    count as errors, not as ignored: they get an extra label, "unmapped", that is never right
    (a miss for the GT class under it, and in the pixel accuracy's denominator). The mIoU is the
    mean over the dataset's classes only, with detectron2's rule (a class counts when it is in
    the GT or predicted): the extra label is not a class of the dataset, so it does not enter the
    mean itself. Its own ``IoU-``/``ACC-`` entries (always NaN: it has no GT) are removed.

    Evaluated at the original resolution of the label maps (STEGO evaluates 320 x 320 center
    crops; OAP does not say). The dataset needs ``sem_seg_file_name`` records and the
    ``stuff_classes`` / ``ignore_label`` metadata (what ``SemSegEvaluator`` needs).
    """

    evaluator_type = "sem_seg_cluster"
    evidence = "pixels: (predicted cluster, GT class) per pixel, ignore_label left out"

    def __init__(
        self,
        dataset_name: str,
        num_clusters: int,
        mapping: str = "hungarian",
        output_dir: Optional[str] = None,
        distributed: bool = True,
    ):
        super().__init__(dataset_name, num_clusters, mapping, output_dir, distributed)
        meta = MetadataCatalog.get(dataset_name)
        missing = [k for k in ("stuff_classes", "ignore_label") if not hasattr(meta, k)]
        if missing:
            raise ValueError(
                f"dataset {dataset_name!r} lacks the metadata {missing} ({self.evaluator_type})"
            )
        self._inner = _SemSegEvaluatorWithUnmapped(
            dataset_name,
            distributed=distributed,
            output_dir=_subdir(output_dir, self.evaluator_type),
        )
        self._class_names = list(meta.stuff_classes)
        self._ignore_label = int(meta.ignore_label)
        self._gt_files = self._inner.input_file_to_gt_file
        self._extra_record = {"ignore_label": self._ignore_label}
        self.reset()

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            if "sem_seg_clusters" not in out:
                raise ValueError(
                    f"{self.evaluator_type}: the model output has no 'sem_seg_clusters'"
                )
            pred = _as_numpy(out["sem_seg_clusters"])
            if pred.ndim != 2:
                raise ValueError(
                    f"{self.evaluator_type}: sem_seg_clusters must be (H, W), got shape "
                    f"{pred.shape}"
                )
            pred = _check_clusters(pred, self._num_clusters, "sem_seg_clusters")
            file_name = inp.get("file_name")
            if file_name not in self._gt_files:
                raise ValueError(
                    f"{self.evaluator_type}: input file_name {file_name!r} is not an image of "
                    f"{self._dataset_name!r}"
                )
            with PathManager.open(self._gt_files[file_name], "rb") as f:
                gt = np.array(Image.open(f), dtype=np.int64)
            if gt.shape != pred.shape:
                raise ValueError(
                    f"{self.evaluator_type}: sem_seg_clusters of {file_name} have shape "
                    f"{pred.shape}, its label map {gt.shape} (predict at the original image size)"
                )
            try:
                conf = confusion_from_labels(
                    pred, gt, self._num_clusters, self.num_classes, ignore_label=self._ignore_label
                )
            except ValueError as e:
                raise ValueError(f"{self.evaluator_type}: label map of {file_name}: {e}") from None
            self._confusion += conf
            packed = _pack(pred.astype(_cluster_dtype(self._num_clusters)))
            self._records.append((file_name, packed))

    def evaluate(self):
        mapping = self._compute_mapping()
        unmapped = self._inner.unmapped_label
        lut = apply_mapping(np.arange(self._num_clusters), mapping, unmapped_value=unmapped)
        self._inner.reset()
        for file_name, packed in self._records:
            labels = torch.from_numpy(lut[_unpack(packed).astype(np.int64)])
            scores = torch.zeros((unmapped + 1,) + tuple(labels.shape), dtype=torch.uint8)
            scores.scatter_(0, labels[None], 1)
            self._inner.process([{"file_name": file_name}], [{"sem_seg": scores}])
        results = self._inner.evaluate()
        if results:
            sem = OrderedDict(results["sem_seg"])
            for key in (f"IoU-{UNMAPPED_CLASS_NAME}", f"ACC-{UNMAPPED_CLASS_NAME}"):
                sem.pop(key, None)
            sem["mIoU"] = dataset_class_miou(self._inner._conf_matrix, self.num_classes)
            results = OrderedDict(results, sem_seg=sem)
        return self._finish(results)


# ---------------------------------------------------------------------------------------------
# factories for hiseg.evaluation.registry
# ---------------------------------------------------------------------------------------------


def _oap_cluster_args(cfg, evaluator_type):
    try:
        num_clusters = int(cfg.MODEL.OAP.HEAD.OUT_DIM)
        method = str(cfg.MODEL.OAP.TEST.CLUSTER_MAPPING)
    except AttributeError:
        raise ValueError(
            f"evaluator_type {evaluator_type!r} needs MODEL.OAP.HEAD.OUT_DIM and "
            "MODEL.OAP.TEST.CLUSTER_MAPPING in the config (call hiseg_oap.add_oap_config(cfg))"
        ) from None
    return num_clusters, _check_method(method)


def _requested(cfg, dataset_name) -> set:
    """The evaluator types that will run on ``dataset_name`` (``TEST.EVALUATORS`` entries that
    apply to it, or its metadata's type)."""
    from hiseg.evaluation.registry import evaluator_types

    try:
        return set(evaluator_types(cfg, dataset_name))
    except AttributeError:
        return set()


#: The OAP segmenter always predicts masks: report both, also when a run has no prediction (COCO
#: evaluators otherwise infer the tasks from the predictions and would drop "segm").
_INSTANCE_TASKS = ("bbox", "segm")


def coco_class_agnostic_factory(cfg, dataset_name, output_folder):
    # Keys "bbox"/"segm" unless a class-aware COCO evaluator runs on the same dataset too.
    clash = _requested(cfg, dataset_name) & {"coco", "coco_cluster", "coco_panoptic_seg"}
    suffix = "_agnostic" if clash else ""
    return [
        ClassAgnosticCOCOEvaluator(dataset_name, tasks=_INSTANCE_TASKS, output_dir=output_folder,
                                   result_suffix=suffix)
    ]


def coco_cluster_factory(cfg, dataset_name, output_folder):
    k, method = _oap_cluster_args(cfg, "coco_cluster")
    return [ClusterCOCOEvaluator(dataset_name, k, method, tasks=_INSTANCE_TASKS, output_dir=output_folder)]


def coco_panoptic_cluster_factory(cfg, dataset_name, output_folder):
    k, method = _oap_cluster_args(cfg, "coco_panoptic_seg_cluster")
    return [ClusterPanopticEvaluator(dataset_name, k, method, output_dir=output_folder)]


def sem_seg_cluster_factory(cfg, dataset_name, output_folder):
    k, method = _oap_cluster_args(cfg, "sem_seg_cluster")
    return [ClusterSemSegEvaluator(dataset_name, k, method, output_dir=output_folder)]


#: evaluator_type -> factory(cfg, dataset_name, output_folder) -> [evaluator]
FACTORIES = {
    "coco_class_agnostic": coco_class_agnostic_factory,
    "coco_cluster": coco_cluster_factory,
    "coco_panoptic_seg_cluster": coco_panoptic_cluster_factory,
    "sem_seg_cluster": sem_seg_cluster_factory,
}
EVALUATOR_TYPES = tuple(FACTORIES)
