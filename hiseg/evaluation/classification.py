"""Detectron2 evaluator for image classification (ImageNet-style datasets).

Model outputs: one dict per image with ``"logits"``, a (num_classes,) tensor or array (scores of
any monotone kind: logits, probabilities, cosine similarities). Inputs: the dataset dicts, whose
``"label"`` is the ground-truth class index (``hiseg.data.datasets.imagenet``). Inputs without a
label (``None`` or negative) are skipped, with one warning.

Measures, in percent as detectron2 reports AP: ``top1``, ``top5`` (generally ``top{k}`` for each
k in ``topk``; for k at least the number of classes every valid label counts as correct, as
timm's ``accuracy`` does with ``min(k, num_classes)``), ``mean_class_top1`` (top-1 averaged over the
classes present) and ``num_images``. Ties between equal scores are broken by class index (the
lower index ranks first), so results are deterministic.

Per image only the label and the indices of the ``max(topk)`` best classes are kept, so the
memory per image is tiny; :meth:`evaluate` gathers them from all workers with ``comm.gather``.
"""
import logging
import os
from collections import OrderedDict
from typing import List, Optional, Sequence

import numpy as np
import torch
from detectron2.evaluation import DatasetEvaluator

from ..utils.atomic_io import atomic_write_json
from .distributed import gather_records
from .registry import register_evaluator_factory

__all__ = ["ClassificationEvaluator", "topk_indices", "build_classification_evaluators"]

logger = logging.getLogger(__name__)


def topk_indices(scores, k: int) -> np.ndarray:
    """Indices of the ``min(k, C)`` highest scores, best first; ties go to the lower index."""
    if isinstance(scores, torch.Tensor):
        s = scores.detach().float().cpu().flatten()
    else:
        s = torch.as_tensor(np.asarray(scores, dtype=np.float32)).flatten()
    if s.numel() == 0:
        raise ValueError("empty score vector")
    if not bool(torch.isfinite(s).all()):
        # NaN would make the ranking arbitrary: rank non-finite scores last (counted as wrong)
        s = torch.where(torch.isfinite(s), s, torch.full_like(s, -float("inf")))
    k = min(int(k), s.numel())
    # stable descending sort = ties broken by the lower index
    order = torch.sort(s, descending=True, stable=True).indices[:k]
    return order.numpy().astype(np.int64)


class ClassificationEvaluator(DatasetEvaluator):
    """Top-k accuracy of ``outputs[i]["logits"]`` against ``inputs[i]["label"]``.

    Args:
        dataset_name: only used for logging / metadata (``num_classes``); may be None.
        distributed: gather the per-image results from all workers in :meth:`evaluate`.
        output_dir: if given, per-image predictions are written to
            ``classification_predictions.json`` there (label and the top-k classes).
        topk: the k of the reported top-k accuracies.
    """

    def __init__(self, dataset_name: Optional[str] = None, distributed: bool = True,
                 output_dir: Optional[str] = None, topk: Sequence[int] = (1, 5)):
        topk = tuple(int(k) for k in topk)
        if not topk or min(topk) < 1:
            raise ValueError(f"topk must be positive integers, got {topk}")
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        self._topk = topk
        self._maxk = max(topk)
        self._records: List[dict] = []
        self._warned = False

    def reset(self):
        self._records = []
        self._warned = False

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            if "logits" not in out:
                raise KeyError("ClassificationEvaluator expects outputs with a 'logits' entry")
            label = inp.get("label", None)
            if isinstance(label, torch.Tensor):
                label = int(label.item())
            if label is None or int(label) < 0:
                if not self._warned:
                    logger.warning("[ClassificationEvaluator] inputs without a 'label' are skipped")
                    self._warned = True
                continue
            logits = out["logits"]
            num_classes = int(np.prod(logits.shape))
            self._records.append({
                "image_id": str(inp.get("image_id", len(self._records))),
                "label": int(label),
                "pred": topk_indices(logits, self._maxk).tolist(),
                "num_classes": num_classes,
            })

    def evaluate(self):
        records = gather_records(self._records, self._distributed)
        if records is None:  # not the main process
            return {}
        if not records:
            logger.warning("[ClassificationEvaluator] did not receive valid predictions.")
            return {}
        results = self.summarize(records)
        if self._output_dir:
            self._dump(records)
        name = f" on {self._dataset_name}" if self._dataset_name else ""
        logger.info("Classification%s: %s", name, ", ".join(f"{k} {v:.2f}" for k, v in results.items()))
        return OrderedDict({"classification": results})

    def summarize(self, records: Sequence[dict]) -> "OrderedDict[str, float]":
        labels = np.array([r["label"] for r in records], dtype=np.int64)
        results = OrderedDict()
        for k in self._topk:
            hit = np.array([r["label"] in r["pred"][:k] for r in records], dtype=bool)
            results[f"top{k}"] = 100.0 * float(hit.mean())
            if k == 1:
                per_class = [hit[labels == c].mean() for c in np.unique(labels)]
                results["mean_class_top1"] = 100.0 * float(np.mean(per_class))
        results["num_images"] = len(records)
        return results

    def _dump(self, records):
        atomic_write_json(os.path.join(self._output_dir, "classification_predictions.json"),
                          [{k: r[k] for k in ("image_id", "label", "pred")} for r in records])


@register_evaluator_factory("classification")
def build_classification_evaluators(cfg, dataset_name: str, output_folder: Optional[str] = None):
    """Evaluator factory of ``evaluator_type="classification"`` (top-1 / top-5)."""
    return [ClassificationEvaluator(dataset_name, distributed=True, output_dir=output_folder)]
