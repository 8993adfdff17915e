"""Say why a detection evaluation got no predictions, instead of a bare AP ``nan``.

detectron2's ``COCOEvaluator`` logs "No predictions from the model!" and reports every metric as
``nan`` when the model returned no instance on any test image. With an R-CNN the usual cause is
a briefly trained model whose class scores all sit below ``MODEL.ROI_HEADS.SCORE_THRESH_TEST``
(0.05 by default; a fresh 81-way classifier scores about 1/81 = 0.012 per class). Here:

* :class:`ScoreProbe` (around a model, used by ``HisegTrainer.test``) records the highest
  foreground class probability that any box predictor (``FastRCNNOutputLayers``, every stage of a
  cascade) computed, before the threshold removes boxes;
* :class:`ExplainNoPredictions` wraps an evaluator: it counts the predicted instances, and when
  there were none it logs one line with the number of images, the highest score seen, the key that
  holds the threshold and the value to set it to.
"""
import logging
from typing import List, Optional

import torch

from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

__all__ = ["ScoreProbe", "ExplainNoPredictions", "no_predictions_message", "score_threshold_key"]

logger = logging.getLogger("detectron2")

#: the probes in use (innermost last); an evaluator reads the scores of the current one
_ACTIVE: List["ScoreProbe"] = []


class ScoreProbe:
    """``with ScoreProbe(model):`` records :attr:`max_score`, the highest foreground class
    probability (softmax over the classes, background excluded) of any ``FastRCNNOutputLayers``
    of ``model`` (DDP unwrapped); None while no box was scored. :meth:`take` returns it and
    starts again."""

    def __init__(self, model):
        from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

        model = getattr(model, "module", model)
        self._predictors = [m for m in model.modules() if isinstance(m, FastRCNNOutputLayers)]
        self._handles = []
        self.max_score: Optional[float] = None

    def _hook(self, module, inputs, output):
        logits = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(logits, torch.Tensor) and logits.numel() and logits.dim() == 2 and logits.shape[1] > 1:
            top = float(torch.softmax(logits.detach().float(), dim=1)[:, :-1].max())
            self.max_score = top if self.max_score is None else max(self.max_score, top)

    def take(self) -> Optional[float]:
        value, self.max_score = self.max_score, None
        return value

    def __enter__(self):
        self._handles = [m.register_forward_hook(self._hook) for m in self._predictors]
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        return False


def score_threshold_key(cfg) -> Optional[str]:
    """The config key of the test-time score threshold of ``cfg``'s meta-architecture."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "RetinaNet":
        return "MODEL.RETINANET.SCORE_THRESH_TEST"
    if arch == "GeneralizedRCNN":
        return "MODEL.ROI_HEADS.SCORE_THRESH_TEST"
    return None


def no_predictions_message(dataset_name: str, num_images: int, max_score: Optional[float],
                           key: Optional[str], threshold: Optional[float]) -> str:
    """The one line logged when ``num_images`` images gave no predicted instance."""
    head = f"No predictions on {dataset_name} ({num_images} image{'s' if num_images != 1 else ''}), so its AP is nan"
    if key is None:
        return head + ": the model returned no instance on any image."
    if max_score is None:  # scores not observed (e.g. RetinaNet: only ROI box heads are probed)
        return (f"{head}: no detection passed {key} = {threshold:g} and the filtering after it; a briefly "
                f"trained model scores low: set `{key} 0.0` to evaluate all its detections, or train longer.")
    seen = f"the highest class score seen was {max_score:.4f}"
    if threshold is not None and max_score <= threshold:
        return (f"{head}: every detection scored below {key} = {threshold:g} ({seen}); a briefly "
                f"trained model scores low: set `{key} 0.0` to evaluate all its detections, or train longer.")
    return (f"{head}: {seen} against {key} = {threshold:g}; the boxes were dropped after scoring "
            "(empty boxes, non-maximum suppression, MODEL.ROI_HEADS.NMS_THRESH_TEST, TEST.DETECTIONS_PER_IMAGE); "
            f"set `{key} 0.0` to keep every scored box.")


class ExplainNoPredictions(DatasetEvaluator):
    """An evaluator that forwards to ``inner`` and, when no image got a predicted instance,
    logs :func:`no_predictions_message` (on the main process) before the inner evaluation."""

    def __init__(self, inner: DatasetEvaluator, dataset_name: str, cfg=None):
        self.inner = inner
        self.dataset_name = dataset_name
        self.key = score_threshold_key(cfg) if cfg is not None else None
        self.threshold = None
        if self.key is not None:
            node = cfg
            for part in self.key.split("."):
                node = getattr(node, part)
            self.threshold = float(node)
        self.reset()

    def reset(self):
        self.inner.reset()
        self._images = 0
        self._instances = 0
        self._max_score: Optional[float] = None
        for probe in _ACTIVE[-1:]:
            probe.take()

    def process(self, inputs, outputs):
        self.inner.process(inputs, outputs)
        for out in outputs:
            self._images += 1
            if "instances" in out:
                self._instances += len(out["instances"])
        for probe in _ACTIVE[-1:]:
            s = probe.take()
            if s is not None:
                self._max_score = s if self._max_score is None else max(self._max_score, s)

    def evaluate(self):
        parts = comm.all_gather((self._images, self._instances, self._max_score))
        images = sum(p[0] for p in parts)
        instances = sum(p[1] for p in parts)
        scores = [p[2] for p in parts if p[2] is not None]
        if images and not instances and comm.is_main_process():
            logger.warning(no_predictions_message(self.dataset_name, images, max(scores) if scores else None,
                                                  self.key, self.threshold))
        return self.inner.evaluate()
