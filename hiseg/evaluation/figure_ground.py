"""Attention-based figure-ground segmentation (CAST Table 5, DINO's procedure).

CAST Table 5 compares how object-centric the class token's attention is: the [CLASS] token's
self-attention to the other tokens, thresholded to keep 60% of its mass (Caron et al. 2021,
"DINO"; CAST Appx. F.4), is a binary foreground mask, scored by its IoU with the true
foreground of PASCAL VOC.

Pipeline and choices:

* **Class attention.** ``softmax(q_cls k^T / sqrt(d))`` per head, recomputed from the chosen
  block's ``attn.qkv`` output (a forward hook; the models are not changed), with the block's
  ``q_norm`` / ``k_norm`` and scale, and the key-padding mask of CAST's padded token sets. As in
  DINO the softmax runs over all tokens including the class token itself; the class (and any
  register) columns are then dropped and the rest renormalised to sum to 1 per head. DINO
  renormalises the same way inside its threshold, so the 60% mask is identical.
* **Which block.** Default: the last block (``block=-1``). For CAST its tokens are the segment
  tokens of the last block group, i.e. hierarchy level ``g`` of the encoder output (with graph
  pooling; level 0 without). CAST Appx. F.4 reads CAST-S's 9th block (32 tokens); pass
  ``block=8`` for that. Each pixel takes its token's attention (padding pixels get 0).
  For the ViT each pixel takes its patch's attention (nearest upsampling by the patch size,
  cropped to the image where timm padded bottom / right).
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
from ..modeling.attention_taps import tap_qkv
from .distributed import gather_records
from .label_maps import to_numpy
from .registry import register_evaluator_factory

__all__ = [
    "class_attention_from_qkv", "cast_class_attention", "class_attention_maps_cast",
    "vit_class_attention", "class_attention_maps_vit", "figure_ground_mask",
    "voc_foreground", "FigureGroundEvaluator",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# class-token attention
def class_attention_from_qkv(attn_module, qkv: torch.Tensor, key_valid: Optional[torch.Tensor] = None,
                             num_prefix: int = 1) -> torch.Tensor:
    """Class token (token 0) attention of a timm ``Attention`` from its ``qkv`` output.

    Args:
        attn_module: the block's ``attn`` (gives ``num_heads``, ``q_norm``, ``k_norm``, ``scale``).
        qkv: (B, N, 3 * heads * head_dim), the output of ``attn.qkv``.
        key_valid: (B, N) bool, False for padded keys (excluded), or None.
        num_prefix: class + register tokens; their columns are dropped.
    Returns:
        (B, heads, N - num_prefix) attention, renormalised to sum to 1 per head.
    """
    b, n, c3 = qkv.shape
    heads = attn_module.num_heads
    hd = c3 // (3 * heads)
    q, k, _ = qkv.reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn_module.q_norm(q), attn_module.k_norm(k)
    logits = (q[:, :, :1] * attn_module.scale) @ k.transpose(-2, -1)  # (B, heads, 1, N)
    logits = logits[:, :, 0].float()
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid[:, None, :].bool(), float("-inf"))
    attn = logits.softmax(-1)[:, :, num_prefix:]
    return attn / attn.sum(-1, keepdim=True).clamp_min(1e-12)


def _capture_qkv(block, run: Callable[[], object]):
    with tap_qkv(block, detach=True) as tap:
        out = run()
    return out, tap.qkv


def _block_group(depths, block: int) -> int:
    total = sum(depths)
    idx = block % total if -total <= block < total else None
    if idx is None:
        raise IndexError(f"block {block} out of range for {total} blocks")
    return int(np.searchsorted(np.cumsum(depths), idx, side="right"))


@torch.no_grad()
def cast_class_attention(encoder, images: torch.Tensor, superpixels: torch.Tensor,
                         block: int = -1) -> Dict[str, torch.Tensor]:
    """The class token's attention over CAST's segment tokens in one block (default the last).

    Returns a dict: ``attn`` (B, heads, M) (sums to 1 over the tokens the block attended to, 0 on the rest),
    ``labels`` (B, H, W) the hierarchy level whose labels index those tokens (-1 = padding),
    ``valid`` (B, M), ``level`` (int) and ``output`` (the encoder's output dict).
    """
    group = _block_group(encoder.depths, block)
    blk = encoder.blocks[block]
    out, qkv = _capture_qkv(blk, lambda: encoder(images, superpixels))
    valid = out["levels"][group]["valid"]
    level = group if encoder.pooling else 0
    # the keys the block attended to (CAST's "members": with the released behaviour these include
    # the all-zero tokens of segments that vanished on the grid)
    keys = out["levels"][group].get("members", valid)
    key_valid = torch.cat([keys.new_ones(keys.shape[0], 1), keys], 1)
    attn = class_attention_from_qkv(blk.attn, qkv, key_valid, num_prefix=1)
    return {"attn": attn, "labels": out["hierarchy"][:, level], "valid": valid, "level": level,
            "output": out}


def _scatter(token_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
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


def class_attention_maps_cast(encoder, images: torch.Tensor, superpixels: torch.Tensor,
                              block: int = -1, reduce: str = "mean") -> torch.Tensor:
    """Class-token attention of CAST scattered to pixels: (B, H, W) (heads averaged) or
    (B, heads, H, W) with ``reduce="none"``. Each pixel holds its segment token's attention."""
    res = cast_class_attention(encoder, images, superpixels, block)
    return _reduce(_scatter(res["attn"], res["labels"]), reduce)


@torch.no_grad()
def vit_class_attention(vit_backbone, images: torch.Tensor, block: int = -1) -> Dict[str, object]:
    """The class token's attention over a ViT's patch tokens: ``attn`` (B, heads, h*w), ``grid``."""
    vit = vit_backbone.vit
    if getattr(vit, "cls_token", None) is None:
        raise ValueError("the ViT has no class token")
    blk = vit.blocks[block]
    (_, fmap), qkv = _capture_qkv(blk, lambda: vit_backbone.forward_tokens(images))
    attn = class_attention_from_qkv(blk.attn, qkv, None, num_prefix=int(vit.num_prefix_tokens))
    h, w = fmap.shape[-2:]
    if attn.shape[-1] != h * w:
        raise RuntimeError(f"{attn.shape[-1]} patch tokens for a {h}x{w} grid")
    return {"attn": attn, "grid": (h, w)}


def class_attention_maps_vit(vit_backbone, images: torch.Tensor, block: int = -1,
                             reduce: str = "mean") -> torch.Tensor:
    """Class-token attention of a :class:`~hiseg.modeling.vit.ViTBackbone` at pixel resolution
    (nearest upsampling by the patch size, cropped to the image): (B, H, W) or (B, heads, H, W)."""
    res = vit_class_attention(vit_backbone, images, block)
    h, w = res["grid"]
    p = vit_backbone.patch_size
    maps = res["attn"].view(*res["attn"].shape[:2], h, w)
    maps = maps.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)
    maps = maps[..., :images.shape[-2], :images.shape[-1]]
    return _reduce(maps, reduce)


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
