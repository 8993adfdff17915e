"""Label maps as the core evaluators read them: arrays from tensors, nearest-neighbour resizing,
and the ground truth of an evaluator input.

Kept apart from the evaluator modules on purpose: each of those imports the evaluator registry,
which imports every core evaluator, so an evaluator that took these from another evaluator
could not be imported first.
"""
from typing import Dict, Optional, Tuple

import numpy as np

__all__ = ["to_numpy", "resize_nearest", "SemSegGroundTruth"]


def to_numpy(x) -> np.ndarray:
    """``x`` (a torch tensor, on any device, or array-like) as a numpy array."""
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def resize_nearest(label_map: np.ndarray, shape) -> np.ndarray:
    """Nearest-neighbour resize of a label map to ``shape`` (pixel centres aligned)."""
    h, w = label_map.shape
    H, W = shape
    if (h, w) == (H, W):
        return label_map
    rows = np.minimum(((np.arange(H) + 0.5) * h / H).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(W) + 0.5) * w / W).astype(np.int64), w - 1)
    return label_map[np.ix_(rows, cols)]


class SemSegGroundTruth:
    """Ground-truth label maps for evaluator inputs, in this order: the ``sem_seg_file_name`` of
    the input's ``file_name`` in the dataset (read at the original resolution through detectron2's
    ``PathManager``, as its ``SemSegEvaluator``), else the input's ``"sem_seg"`` tensor (resized
    to ``shape``, nearest, when sizes differ)."""

    def __init__(self, dataset_name: Optional[str]):
        self.file_to_gt: Dict[str, str] = {}
        self.meta = None
        if dataset_name is not None:
            from detectron2.data import DatasetCatalog, MetadataCatalog

            self.file_to_gt = {d["file_name"]: d["sem_seg_file_name"] for d in DatasetCatalog.get(dataset_name)
                               if "sem_seg_file_name" in d}
            self.meta = MetadataCatalog.get(dataset_name)

    def __call__(self, inp: dict, shape: Tuple[int, int]) -> np.ndarray:
        f = inp.get("file_name")
        if f is not None and f in self.file_to_gt:
            from detectron2.utils.file_io import PathManager
            from PIL import Image

            with PathManager.open(self.file_to_gt[f], "rb") as fh:
                return np.array(Image.open(fh), dtype=np.int64)
        if "sem_seg" in inp:
            return resize_nearest(to_numpy(inp["sem_seg"]).astype(np.int64), shape)
        raise KeyError("no ground truth: the input has neither a file_name of the dataset (with "
                       "sem_seg_file_name) nor a 'sem_seg' tensor")
