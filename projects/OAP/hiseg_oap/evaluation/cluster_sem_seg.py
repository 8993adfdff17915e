"""Unsupervised semantic segmentation from cluster ids: pixel accuracy and mIoU after mapping
clusters to classes (STEGO's protocol; ``evaluator_type`` ``"sem_seg_cluster"``; see :mod:`.base`)."""
from collections import OrderedDict
from typing import Optional

import numpy as np
import torch
from PIL import Image

from detectron2.data import MetadataCatalog
from detectron2.evaluation import SemSegEvaluator
from detectron2.utils.file_io import PathManager

from hiseg.evaluation.registry import register_evaluator_factory

from .base import (
    ClusterMappingEvaluator,
    _as_numpy,
    _check_clusters,
    _cluster_dtype,
    _pack,
    _subdir,
    _unpack,
    oap_cluster_args,
)
from .cluster_mapping import apply_mapping, confusion_from_labels

__all__ = ["ClusterSemSegEvaluator", "UNMAPPED_CLASS_NAME", "dataset_class_miou", "sem_seg_cluster_factory"]


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


class ClusterSemSegEvaluator(ClusterMappingEvaluator):
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


@register_evaluator_factory("sem_seg_cluster")
def sem_seg_cluster_factory(cfg, dataset_name, output_folder):
    k, method = oap_cluster_args(cfg, "sem_seg_cluster")
    return [ClusterSemSegEvaluator(dataset_name, k, method, output_dir=output_folder)]
