"""The common part of OAP's cluster evaluators: a detectron2 evaluator base that maps prototype
clusters to dataset classes, and the helpers the evaluators share.

The model (see ``hiseg_oap.modeling``) outputs, per image and at the original image size:

* ``"instances"``: ``pred_masks`` (N, H, W) bool, ``pred_boxes``, ``scores``, ``pred_classes``
  (all 0: class-agnostic) and ``pred_clusters`` (N,) in ``[0, K)``;
* ``"sem_seg_clusters"``: (H, W) long, a cluster id per pixel;
* ``"panoptic_seg"``: ``(ids (H, W) int32, segments_info)``, 0 = void, each segment's
  ``category_id`` a cluster id.

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

Each evaluator lives in its own module (:mod:`~hiseg_oap.evaluation.cluster_coco`,
:mod:`~hiseg_oap.evaluation.cluster_panoptic`, :mod:`~hiseg_oap.evaluation.cluster_sem_seg`) beside
its factory, registered in ``hiseg.evaluation.registry``; the factories read K from
``MODEL.OAP.HEAD.OUT_DIM`` and the method from ``MODEL.OAP.TEST.CLUSTER_MAPPING``
(:func:`oap_cluster_args`).
"""
import logging
import os
import zlib
from collections import OrderedDict
from typing import Dict, List, Optional

import numpy as np
import torch

from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from hiseg.utils.atomic_io import atomic_write_json

from .cluster_mapping import MAPPING_METHODS, compute_cluster_mapping, mapping_record, mapping_summary

__all__ = ["ClusterMappingEvaluator", "oap_cluster_args", "INSTANCE_TASKS"]

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


# ---------------------------------------------------------------------------------------------
# for the factories
# ---------------------------------------------------------------------------------------------

#: The OAP segmenter always predicts masks: report both, also when a run has no prediction (COCO
#: evaluators otherwise infer the tasks from the predictions and would drop "segm").
INSTANCE_TASKS = ("bbox", "segm")


def oap_cluster_args(cfg, evaluator_type):
    """``(K, mapping method)`` of a cluster evaluator from ``MODEL.OAP.HEAD.OUT_DIM`` and
    ``MODEL.OAP.TEST.CLUSTER_MAPPING``."""
    try:
        num_clusters = int(cfg.MODEL.OAP.HEAD.OUT_DIM)
        method = str(cfg.MODEL.OAP.TEST.CLUSTER_MAPPING)
    except AttributeError:
        raise ValueError(
            f"evaluator_type {evaluator_type!r} needs MODEL.OAP.HEAD.OUT_DIM and "
            "MODEL.OAP.TEST.CLUSTER_MAPPING in the config (call hiseg_oap.add_oap_config(cfg))"
        ) from None
    return num_clusters, _check_method(method)


# ---------------------------------------------------------------------------------------------
# common part of the cluster evaluators
# ---------------------------------------------------------------------------------------------


class ClusterMappingEvaluator(DatasetEvaluator):
    """Confusion accumulation, gathering, mapping and the mapping file (see the module doc).

    A subclass sets ``evaluator_type`` and ``evidence`` (a line for the mapping file), fills
    ``self._class_names`` (the C dataset classes), ``self._inner`` (the standard detectron2
    evaluator that scores the relabelled predictions) and optionally ``self._extra_record``, then
    calls :meth:`reset`. Its ``process`` adds to ``self._confusion`` (K x C) and buffers what it
    needs in ``self._records``; its ``evaluate`` calls :meth:`_compute_mapping`, replays the
    records, relabelled, into ``self._inner`` and returns :meth:`_finish` of the inner results.
    """

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
