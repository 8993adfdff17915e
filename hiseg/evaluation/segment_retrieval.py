"""Unsupervised semantic segmentation by segment retrieval (SegSort protocol; CAST Appx. E.5).

"We partition an image into several segments and conduct nearest neighbor search to predict
the label for each segment. We assign the majority labels from the 20 retrieved segments."
(Hwang et al. 2019; Van Gansbeke et al. 2021; Ke et al. 2022.)

Model outputs, one dict per image: ``"segments"`` (H, W) integer labels 0..K-1 (a level of
CAST's hierarchy, or K-means segments for a ViT baseline) and ``"segment_features"`` (K, D),
one feature per segment (cosine similarity is used; features are L2-normalised here again).

Protocol implemented by :class:`SegmentRetrievalEvaluator`:

1. every segment gets the majority ground-truth label of its pixels (``ignore_label`` pixels
   skipped; a segment with no labelled pixel has no label);
2. memory: the segments added with :meth:`~SegmentRetrievalEvaluator.add_reference` (the
   paper's setting: segments of the training images, e.g. ``voc_2012_sem_seg_train_aug``, see
   :func:`collect_reference`); without a reference set, *leave-one-image-out* on the evaluated
   set: a segment retrieves among the segments of all other evaluated images. Only labelled
   segments are kept in memory;
3. each evaluated segment retrieves its ``k`` = 20 nearest memory segments (cosine) and takes
   their majority label (ties: the label whose best-ranked neighbour ranks highest);
4. the predicted label is painted on the segment's pixels and a confusion matrix against the
   ground truth accumulates over the dataset; mIoU (classes with a non-empty union), pixel and
   mean class accuracy are reported in percent, as detectron2's ``SemSegEvaluator``.

Ground truth is read as in :mod:`hiseg.evaluation.boundary_fscore` (the dataset's
``sem_seg_file_name`` at the original resolution, else the input's ``"sem_seg"``); a segment
map at another size is resized to it (nearest). Per-image summaries (segment features as
float16, labels and per-segment label histograms) are gathered with ``comm.gather``.
"""
import logging
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.evaluation import DatasetEvaluator

from .distributed import gather_records
from .label_maps import SemSegGroundTruth, resize_nearest, to_numpy

__all__ = ["SegmentRetrievalEvaluator", "retrieve_labels", "collect_reference"]

logger = logging.getLogger(__name__)


def retrieve_labels(queries: np.ndarray, memory: np.ndarray, memory_labels: np.ndarray, num_classes: int,
                    k: int = 20, query_groups: Optional[np.ndarray] = None,
                    memory_groups: Optional[np.ndarray] = None, chunk_size: int = 2048) -> np.ndarray:
    """Majority label of the ``k`` most cosine-similar memory rows, per query row.

    ``query_groups`` / ``memory_groups``: when given, a query never retrieves a memory row of
    its own group (leave-one-image-out). Ties between labels go to the one whose first
    occurrence among the neighbours is the most similar. Returns (Q,) int64; -1 for a query
    that has no admissible neighbour.
    """
    q_all = torch.nn.functional.normalize(torch.as_tensor(queries, dtype=torch.float32), dim=1)
    mem = torch.nn.functional.normalize(torch.as_tensor(memory, dtype=torch.float32), dim=1)
    labels = torch.as_tensor(memory_labels, dtype=torch.int64)
    n_mem = mem.shape[0]
    out = np.full(q_all.shape[0], -1, dtype=np.int64)
    if n_mem == 0 or q_all.shape[0] == 0:
        return out
    kk = min(int(k), n_mem)
    loo = query_groups is not None and memory_groups is not None
    if loo:
        qg_all = torch.as_tensor(query_groups, dtype=torch.int64)
        mg = torch.as_tensor(memory_groups, dtype=torch.int64)
    for s in range(0, q_all.shape[0], chunk_size):
        q = q_all[s:s + chunk_size]
        sims = q @ mem.t()
        if loo:
            sims.masked_fill_(qg_all[s:s + chunk_size, None] == mg[None, :], float("-inf"))
        top, idx = sims.topk(kk, dim=1)
        ok = torch.isfinite(top)
        nb = torch.where(ok, labels[idx], torch.full_like(idx, num_classes))  # num_classes = "no vote"
        votes = torch.zeros(q.shape[0], num_classes + 1, dtype=torch.int64)
        votes.scatter_add_(1, nb, ok.to(torch.int64))
        rank = torch.arange(kk).expand_as(nb).contiguous()
        first = torch.full((q.shape[0], num_classes + 1), kk, dtype=torch.int64)
        first.scatter_reduce_(1, nb, rank, reduce="amin", include_self=True)
        score = votes[:, :num_classes] * (kk + 1) + (kk - first[:, :num_classes])
        best = score.argmax(1)
        has = ok.any(1)
        out[s:s + q.shape[0]] = torch.where(has, best, torch.full_like(best, -1)).numpy()
    return out


class SegmentRetrievalEvaluator(DatasetEvaluator):
    """Segment retrieval mIoU (see the module docstring).

    Args:
        dataset_name: registered semantic segmentation dataset (ground truth files, class names,
            ``ignore_label``); may be ``None`` when inputs carry ``"sem_seg"`` and ``num_classes``
            is given.
        distributed: gather from all workers in :meth:`evaluate`.
        output_dir: unused (kept for the evaluator-factory signature).
        num_classes, ignore_label, class_names: override the metadata.
        k: neighbours that vote (20 in the paper).
    """

    def __init__(self, dataset_name: Optional[str] = None, distributed: bool = True,
                 output_dir: Optional[str] = None, *, num_classes: Optional[int] = None,
                 ignore_label: Optional[int] = None, class_names: Optional[Sequence[str]] = None,
                 k: int = 20):
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        self._gt = SemSegGroundTruth(dataset_name)
        meta = self._gt.meta
        if class_names is None and meta is not None:
            class_names = getattr(meta, "stuff_classes", None)
        if num_classes is None:
            if class_names is None:
                raise ValueError("SegmentRetrievalEvaluator needs num_classes or a dataset with stuff_classes")
            num_classes = len(class_names)
        self._num_classes = int(num_classes)
        self._class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        if ignore_label is None:
            ignore_label = getattr(meta, "ignore_label", 255) if meta is not None else 255
        self._ignore_label = ignore_label
        self._k = int(k)
        self._queries: List[dict] = []
        self._reference: List[dict] = []

    # -- records ---------------------------------------------------------------------------
    def _summaries(self, inputs, outputs) -> List[dict]:
        if inputs and isinstance(inputs[0], dict) and "segment_features" in inputs[0]:
            inputs, outputs = outputs, inputs  # accept (outputs, inputs) too
        recs = []
        for inp, out in zip(inputs, outputs):
            seg = to_numpy(out["segments"]).astype(np.int64)
            feats = to_numpy(out["segment_features"]).astype(np.float32)
            if seg.ndim != 2 or feats.ndim != 2:
                raise ValueError("expected 'segments' (H, W) and 'segment_features' (K, D)")
            k = feats.shape[0]
            if seg.size and (seg.min() < 0 or seg.max() >= k):
                raise ValueError(f"segment labels must lie in [0, {k}) to index 'segment_features'")
            gt = self._gt(inp, seg.shape)
            seg = resize_nearest(seg, gt.shape)
            valid = (gt != self._ignore_label) & (gt >= 0) & (gt < self._num_classes)
            c = self._num_classes
            hist = np.bincount(seg[valid] * c + gt[valid], minlength=k * c).reshape(k, c)
            labels = np.where(hist.sum(1) > 0, hist.argmax(1), -1)
            feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
            recs.append({"features": feats.astype(np.float16), "labels": labels, "hist": hist})
        return recs

    def reset(self):
        self._queries = []

    def process(self, inputs, outputs):
        self._queries.extend(self._summaries(inputs, outputs))

    def add_reference(self, inputs, outputs):
        """Add segments to the retrieval memory (same arguments as :meth:`process`; the order
        ``(outputs, inputs)`` is accepted too). The memory survives :meth:`reset`."""
        self._reference.extend(self._summaries(inputs, outputs))

    def clear_reference(self):
        self._reference = []

    # -- evaluation ------------------------------------------------------------------------
    def evaluate(self):
        queries = gather_records(self._queries, self._distributed)
        reference = gather_records(self._reference, self._distributed)
        if queries is None:  # not the main process
            return {}
        if not queries:
            logger.warning("SegmentRetrievalEvaluator received no predictions")
            return {}
        c = self._num_classes
        q_feat = np.concatenate([r["features"] for r in queries]).astype(np.float32)
        q_hist = np.concatenate([r["hist"] for r in queries])
        q_group = np.concatenate([np.full(len(r["labels"]), i) for i, r in enumerate(queries)])
        loo = not reference
        mem_recs = queries if loo else reference
        m_feat = np.concatenate([r["features"] for r in mem_recs]).astype(np.float32)
        m_lab = np.concatenate([r["labels"] for r in mem_recs])
        m_group = np.concatenate([np.full(len(r["labels"]), i) for i, r in enumerate(mem_recs)])
        keep = m_lab >= 0
        m_feat, m_lab, m_group = m_feat[keep], m_lab[keep], m_group[keep]
        pred = retrieve_labels(q_feat, m_feat, m_lab, c, self._k,
                               q_group if loo else None, m_group if loo else None)
        conf = np.zeros((c, c), dtype=np.int64)  # rows: predicted, columns: ground truth
        has = pred >= 0
        np.add.at(conf, pred[has], q_hist[has])
        unassigned = int(q_hist[~has].sum())  # pixels of segments without any neighbour
        tp = np.diag(conf).astype(np.float64)
        pos_gt = conf.sum(0).astype(np.float64) + q_hist[~has].sum(0)
        pos_pred = conf.sum(1).astype(np.float64)
        union = pos_gt + pos_pred - tp
        iou = np.full(c, np.nan)
        iou[union > 0] = tp[union > 0] / union[union > 0]
        acc = np.full(c, np.nan)
        acc[pos_gt > 0] = tp[pos_gt > 0] / pos_gt[pos_gt > 0]
        res = {
            "mIoU": 100 * float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
            "pACC": 100 * float(tp.sum() / max(pos_gt.sum(), 1.0)),
            "mACC": 100 * float(np.nanmean(acc)) if np.isfinite(acc).any() else 0.0,
        }
        for i, name in enumerate(self._class_names):
            res[f"IoU-{name}"] = 100 * float(iou[i])
        res.update({"num_query_segments": int(q_feat.shape[0]), "num_memory_segments": int(m_feat.shape[0]),
                    "memory": "leave-one-image-out" if loo else "reference", "k": self._k,
                    "unassigned_pixels": unassigned})
        logger.info("Segment retrieval: %s", {k: v for k, v in res.items() if not k.startswith("IoU-")})
        return OrderedDict({"segment_retrieval": res})


@torch.no_grad()
def collect_reference(evaluator: SegmentRetrievalEvaluator, model, data_loader) -> int:
    """Run ``model`` (in eval mode, producing ``segments`` / ``segment_features``) over
    ``data_loader`` (e.g. the training set) and add every image to the evaluator's memory.
    Returns the number of images added (on this worker)."""
    was_training = model.training
    model.eval()
    n = 0
    try:
        for inputs in data_loader:
            evaluator.add_reference(inputs, model(inputs))
            n += len(inputs)
    finally:
        model.train(was_training)
    return n
