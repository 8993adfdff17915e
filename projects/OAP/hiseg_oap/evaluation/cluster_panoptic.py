"""Panoptic segmentation from cluster ids: PQ / SQ / RQ after mapping segment clusters to panoptic
categories (``evaluator_type`` ``"coco_panoptic_seg_cluster"``; see :mod:`.base`)."""
import json
import os
from typing import Optional

import numpy as np
import torch
from PIL import Image

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOPanopticEvaluator
from detectron2.utils.file_io import PathManager

from hiseg.evaluation.registry import register_evaluator_factory

from .base import ClusterMappingEvaluator, _as_numpy, _pack, _subdir, _unpack, oap_cluster_args
from .cluster_mapping import confusion_from_labels

__all__ = ["ClusterPanopticEvaluator", "coco_panoptic_cluster_factory"]


class ClusterPanopticEvaluator(ClusterMappingEvaluator):
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


@register_evaluator_factory("coco_panoptic_seg_cluster")
def coco_panoptic_cluster_factory(cfg, dataset_name, output_folder):
    k, method = oap_cluster_args(cfg, "coco_panoptic_seg_cluster")
    return [ClusterPanopticEvaluator(dataset_name, k, method, output_dir=output_folder)]
