"""Attention-based figure-ground segmentation (CAST Table 5, DINO's procedure).

CAST Table 5 compares how object-centric the class token's attention is: the [CLASS] token's
self-attention to the other tokens, thresholded to keep 60% of its mass (Caron et al. 2021,
"DINO"; CAST Appx. F.4), is a binary foreground mask, scored by its IoU with the true
foreground of PASCAL VOC.

Pipeline and choices:

* **Class attention.** Read through the backbone's attention-taps interface
  (:mod:`hiseg.modeling.attention_taps`: ``class_attention(images, block, ...)``), which gives the
  attention over the block's tokens and each pixel's token; this module knows no backbone's
  internals. ``softmax(q_cls k^T / sqrt(d))`` per head, recomputed from the chosen block's
  ``attn.qkv`` output (a forward hook; the models are not changed), with the block's
  ``q_norm`` / ``k_norm`` and scale, and the key-padding mask of CAST's padded token sets. As in
  DINO the softmax runs over all tokens including the class token itself; the class (and any
  register) columns are then dropped and the rest renormalised to sum to 1 per head. DINO
  renormalises the same way inside its threshold, so the 60% mask is identical.
* **Which block.** Default: the last block (``block=-1``). For CAST its tokens are the segment
  tokens of the block's group, i.e. hierarchy level ``g`` of the encoder output (with graph
  pooling; level 0 without). CAST Appx. F.4 reads CAST-S's 9th block (32 tokens); pass
  ``block=8`` for that. Each pixel takes its token's attention (padding pixels get 0).
  For the ViT each pixel takes its patch's attention (the patch grid covers the image; timm
  pads bottom / right).
* **Heads.** ``reduce="mean"`` (default) averages the heads' attention into one map per image,
  which the evaluator thresholds; ``reduce="none"`` keeps (B, heads, H, W) so that per-head
  masks (as DINO displays them) can be made with :func:`figure_ground_mask`.
* **60% rule at pixel level.** :func:`figure_ground_mask` ranks elements by attention and keeps
  the smallest top set whose mass reaches ``mass`` of the total. On a pixel map each pixel
  carries its token's attention, so a token's mass is its attention times its pixel area. For
  the ViT (equal patches) this is exactly DINO's per-patch rule; for CAST it weights each
  segment token by its area. The unweighted token-level rule is
  ``figure_ground_mask(token_attn)`` on the (B, heads, M) token attention followed by scattering.
"""
import logging
from collections import OrderedDict
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.evaluation import DatasetEvaluator

from ..image_io import read_image
from .distributed import gather_records
from .label_maps import to_numpy
from .registry import register_evaluator_factory

__all__ = [
    "scatter_token_values", "attention_maps", "class_attention_maps", "figure_ground_mask",
    "voc_foreground", "FigureGroundEvaluator", "figure_ground_factory",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# class-token attention at pixel resolution
def scatter_token_values(token_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, K, M) token values -> (B, K, H, W) pixel maps through (B, H, W) labels (-1 -> 0)."""
    b, kdim, _ = token_values.shape
    flat = labels.flatten(1)
    idx = flat.clamp(min=0)[:, None, :].expand(b, kdim, -1)
    px = token_values.gather(2, idx) * (flat >= 0)[:, None, :].to(token_values.dtype)
    return px.view(b, kdim, *labels.shape[-2:])


def _reduce(maps: torch.Tensor, reduce: str) -> torch.Tensor:
    if reduce == "mean":
        return maps.mean(1)
    if reduce == "none":
        return maps
    raise ValueError(f"reduce must be 'mean' or 'none', got {reduce!r}")


def attention_maps(res: Dict[str, torch.Tensor], reduce: str = "mean") -> torch.Tensor:
    """A ``class_attention`` result (:mod:`hiseg.modeling.attention_taps`) at pixel resolution:
    each pixel holds its token's attention (0 where it has none): (B, H, W) with the heads
    averaged, or (B, heads, H, W) with ``reduce="none"``."""
    return _reduce(scatter_token_values(res["attn"], res["labels"]), reduce)


def class_attention_maps(backbone, images: torch.Tensor, block: int = -1, reduce: str = "mean",
                         **inputs) -> torch.Tensor:
    """The class token's attention in block ``block`` of ``backbone`` at pixel resolution (see
    :func:`attention_maps`), through the backbone's attention-taps interface
    (``backbone.class_attention(images, block=block, **inputs)``; CAST takes ``superpixels``)."""
    return attention_maps(backbone.class_attention(images, block=block, **inputs), reduce)


# ---------------------------------------------------------------------------------------------
# the 60% rule
def figure_ground_mask(attn_map, mass: float = 0.6, weights=None):
    """DINO's threshold: the smallest set of highest-attention elements holding ``mass`` of it.

    Elements are ranked by attention (descending); an element is kept while the mass before it
    is below ``mass`` of the total (so the element that crosses the threshold is kept, exactly
    DINO's ``cumsum(sorted ascending) > 1 - mass``). Ties are broken by sort order.

    Args:
        attn_map: (..., H, W) or (..., M) non-negative array / tensor; every leading index
            (image, head) is thresholded on its own over the last two dims, or over the last
            dim when it is 1-D per item (pass ``weights`` of the same shape for that case too).
        mass: fraction of the total to keep, in (0, 1].
        weights: optional non-negative mass multipliers of the same shape (e.g. token areas):
            ranking is by attention, mass is attention * weight.
    Returns:
        bool mask of the input's shape (numpy for numpy input, tensor for tensor input).
    """
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    is_np = not torch.is_tensor(attn_map)
    a = torch.as_tensor(np.asarray(attn_map) if is_np else attn_map).double()
    if a.dim() == 0:
        raise ValueError("attention map must have at least one dimension")
    if bool((a < 0).any()):
        raise ValueError("attention must be non-negative")
    shape = a.shape
    flat_dims = 2 if a.dim() >= 2 else 1
    a = a.reshape(-1, int(np.prod(shape[-flat_dims:])))
    wts = None
    if weights is not None:
        wts = torch.as_tensor(np.asarray(weights) if not torch.is_tensor(weights) else weights).double()
        wts = wts.to(a.device).expand(shape).reshape_as(a)
    val, idx = torch.sort(a, dim=1, descending=True)
    m = val if wts is None else val * wts.gather(1, idx)
    total = m.sum(1, keepdim=True)
    before = torch.cumsum(m, 1) - m
    keep_sorted = (before < mass * total) & (total > 0)
    keep = torch.zeros_like(keep_sorted).scatter(1, idx, keep_sorted).reshape(shape)
    return keep.cpu().numpy() if is_np else keep


# ---------------------------------------------------------------------------------------------
# evaluation
def voc_foreground(label_map: np.ndarray, ignore_label: int = 255):
    """VOC class labels -> (foreground bool, considered bool): foreground = any object class
    (label > 0); ``ignore_label`` pixels (VOC's object borders) are not considered."""
    lab = np.asarray(label_map)
    considered = lab != ignore_label
    return (lab > 0) & considered, considered


def _resize_nearest(mask: np.ndarray, shape) -> np.ndarray:
    if mask.shape == tuple(shape):
        return mask
    t = torch.from_numpy(mask.astype(np.uint8))[None, None].float()
    return F.interpolate(t, size=tuple(shape), mode="nearest")[0, 0].numpy() > 0.5


class FigureGroundEvaluator(DatasetEvaluator):
    """IoU of the predicted foreground with the true foreground (CAST Table 5's "mIoU").

    ``process(inputs, outputs)``: each output holds ``"figure_ground"``, an (H, W) bool mask
    (resized nearest to the ground truth if needed). The ground truth comes from the input's
    ``"sem_seg"`` (tensor / array of class labels) or ``"sem_seg_file_name"`` (a label PNG), or
    from ``gt_loader(input) -> label map``. Foreground = label > 0, ``ignore_label`` excluded.

    Reported (percent): ``mIoU`` = per-image Jaccard |P & G| / |P | G| over the considered
    pixels, averaged over images (DINO's per-image Jaccard, averaged); an image where both P and
    G are empty counts as 100. Also ``IoU_pooled`` = summed intersections / summed unions over
    the dataset, and ``num_images``.
    """

    def __init__(self, distributed: bool = True, ignore_label: int = 255,
                 gt_loader: Optional[Callable[[dict], np.ndarray]] = None):
        self._distributed = distributed
        self._ignore = ignore_label
        self._gt_loader = gt_loader
        self.reset()

    def reset(self):
        self._records: List[dict] = []

    def _ground_truth(self, inp: dict) -> np.ndarray:
        if self._gt_loader is not None:
            return to_numpy(self._gt_loader(inp))
        if "sem_seg" in inp:
            return to_numpy(inp["sem_seg"])
        if "sem_seg_file_name" in inp:
            return read_image(inp["sem_seg_file_name"], format=None)  # the label map as stored
        raise KeyError("input has no 'sem_seg' / 'sem_seg_file_name' and no gt_loader was given")

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            gt = self._ground_truth(inp)
            fg, considered = voc_foreground(gt, self._ignore)
            pred = to_numpy(out["figure_ground"]).astype(bool)
            if pred.ndim != 2:
                raise ValueError(f"figure_ground must be (H, W), got shape {pred.shape}")
            pred = _resize_nearest(pred, fg.shape) & considered
            inter = int((pred & fg).sum())
            union = int((pred | fg).sum())
            self._records.append({"image_id": inp.get("image_id", inp.get("file_name")),
                                  "intersection": inter, "union": union})

    def evaluate(self):
        records = gather_records(self._records, self._distributed)
        if records is None:
            return None
        if not records:
            logger.warning("FigureGroundEvaluator received no images")
            return {}
        ious = [r["intersection"] / r["union"] if r["union"] else 1.0 for r in records]
        inter = sum(r["intersection"] for r in records)
        union = sum(r["union"] for r in records)
        res = OrderedDict(
            mIoU=100.0 * float(np.mean(ious)),
            IoU_pooled=100.0 * inter / union if union else 100.0,
            num_images=len(records))
        return OrderedDict(figure_ground=res)


@register_evaluator_factory("figure_ground")
def figure_ground_factory(cfg, name, out):
    """Evaluator factory of ``evaluator_type="figure_ground"`` (CAST Table 5): IoU of the model's
    ``"figure_ground"`` mask with the true foreground, scored on the dataset's original label
    maps (the test mapper's ``"sem_seg"`` is resized)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    gt_files = {d["file_name"]: d["sem_seg_file_name"] for d in DatasetCatalog.get(name) if "sem_seg_file_name" in d}

    def gt_loader(inp):
        path = gt_files.get(inp.get("file_name")) or inp.get("sem_seg_file_name")
        if path:
            return read_image(path, format=None)  # the label map as stored
        if "sem_seg" in inp:
            return inp["sem_seg"]
        raise ValueError(f"figure_ground: no label map for {inp.get('file_name')!r} in dataset {name!r}")

    ignore = getattr(MetadataCatalog.get(name), "ignore_label", 255)
    return [FigureGroundEvaluator(distributed=True, ignore_label=ignore, gt_loader=gt_loader)]
