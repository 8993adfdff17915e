"""CAST for semantic segmentation by transfer learning (Appx. E.5, Fig. 12).

``CASTSemanticSegmentor`` (``MODEL.META_ARCHITECTURE: CASTSemanticSegmentor``, keys
``MODEL.CAST_SEM_SEG.*``), the per-superpixel head: every superpixel token gets class logits,
every pixel those of its superpixel:

1. CAST encodes the image on its superpixels S_0 (given by ``CASTDatasetMapper`` as
   ``"superpixels"``, or computed by the backbone on the unpadded image when absent:
   :func:`hiseg_cast.superpixels.input_superpixels`);
2. the tokens of every block group are unpooled to the superpixels (Eq. 4), concatenated and
   fused by the backbone's fully connected layer: ``f_seg = fuse(Z_0 (+) ... (+) Unpool(Z_L))``
   (Alg. 2), one D-vector per superpixel: the backbone's ``segment_tokens`` output;
3. a 2-layer 1x1-convolution head (conv - BN - ReLU - conv; "we replace the 3-layer MLP head
   with 2-layer 1x1 convolutional layers") gives per-pixel class logits, trained with per-pixel
   softmax cross-entropy (label ``IGNORE_VALUE`` ignored).

How f_seg reaches the pixels (``FEATURE_STRIDE``):

* ``1`` (default, the paper's "scatter segment tokens to per-pixel features using superpixel
  indices"): every pixel carries its superpixel's token. A 1x1 convolution and a ReLU act on each
  pixel alone, so the head is evaluated once per token, and the pixel logits are the token
  logits gathered by superpixel index. BatchNorm statistics are those of the pixels (each token
  weighted by its pixel count), the loss is the mean over labelled pixels (computed from
  per-superpixel label histograms), so this equals running the head on the full-resolution
  feature map, at a fraction of its memory. At test time the superpixel map is resized (nearest)
  to the original height x width and the token logits are gathered there, so predictions keep
  the superpixel boundaries at the original resolution.
* ``s > 1``: tokens averaged over s x s cells (``segment_to_grid_matrix``, exact area weights),
  the head runs on the stride-s map and the logits are upsampled bilinearly, as the ViT
  baseline's patch tokens.

Inference returns ``{"sem_seg": (C, height, width) logits}`` per image (detectron2's
``SemSegEvaluator`` and our ``BoundaryFScoreEvaluator`` read it). With
``RETRIEVAL_OUTPUT: True`` it adds, for the segment-retrieval protocol (Appx. E.5, Fig. 12b),
``"segments"`` (height, width) int64 labels 0..K-1 of one level of CAST's hierarchy (by default
the level whose segment count is nearest ``RETRIEVAL_NUM_SEGMENTS`` = 40, i.e. the additional
graph pooling's coarse segmentation) and ``"segment_features"`` (K, D): f_seg averaged over the
pixels of each segment and L2-normalised (``SegmentRetrievalEvaluator`` reads them).

Parameters that can never receive a gradient here are frozen so that DistributedDataParallel
needs no ``find_unused_parameters``: the encoder's final class-token LayerNorm (the class token
output is not used) and the last graph pooling (it only produces the hierarchy read-out by
argmax).
"""
import logging
from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList
from torch import nn

from ...superpixels import input_superpixels
from ..backbone import CASTBackbone, build_cast_token_backbone
from ..heads.pixel_head import PixelHead, superpixel_cross_entropy
from ..segment_ops import segment_to_grid_matrix

logger = logging.getLogger(__name__)

__all__ = ["CASTSemanticSegmentor", "segment_features", "nearest_level"]


def nearest_level(num_segments: torch.Tensor, target: int) -> int:
    """Index of the level whose segment count is nearest ``target`` (the finer one on ties)."""
    diff = (num_segments.long() - int(target)).abs()
    return int(torch.nonzero(diff == diff.min())[0, 0])


def segment_features(tokens: torch.Tensor, superpixels: torch.Tensor, segments: torch.Tensor,
                     num_segments: int) -> torch.Tensor:
    """Mean of per-pixel features over each segment, where pixel p carries ``tokens[sp[p]]``.

    Args:
        tokens: (M, D) one feature per superpixel.
        superpixels, segments: (H, W) int64 maps of the same pixels (-1 = outside the image).
        num_segments: K; ``segments`` holds labels 0..K-1.
    Returns (K, D); a segment without pixels gets zeros.
    """
    keep = (superpixels >= 0) & (segments >= 0)
    sp, seg = superpixels[keep], segments[keep]
    m = tokens.shape[0]
    counts = torch.bincount(seg * m + sp, minlength=num_segments * m).view(num_segments, m).to(tokens.dtype)
    return counts @ tokens / counts.sum(1, keepdim=True).clamp(min=1.0)


@META_ARCH_REGISTRY.register()
class CASTSemanticSegmentor(nn.Module):
    @configurable
    def __init__(self, *, backbone, num_classes: int, head_dim: int = 256, head_norm: str = "BN",
                 feature_stride: int = 1, ignore_value: int = 255, loss_weight: float = 1.0,
                 retrieval_output: bool = False, retrieval_level: int = -1,
                 retrieval_num_segments: int = 40, pixel_mean, pixel_std):
        super().__init__()
        if not isinstance(backbone, CASTBackbone):
            raise TypeError(f"{type(self).__name__} needs a CASTBackbone (MODEL.BACKBONE.NAME: build_cast_backbone)")
        if feature_stride < 1:
            raise ValueError(f"MODEL.CAST_SEM_SEG.FEATURE_STRIDE must be >= 1, got {feature_stride}")
        self.backbone = backbone
        self.head = PixelHead(backbone.embed_dim, head_dim, num_classes, head_norm)
        self.num_classes = num_classes
        self.feature_stride = int(feature_stride)
        self.ignore_value = int(ignore_value)
        self.loss_weight = float(loss_weight)
        self.retrieval_output = bool(retrieval_output)
        self.retrieval_level = int(retrieval_level)
        self.retrieval_num_segments = int(retrieval_num_segments)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.backbone.freeze_unread_by_dense_outputs()

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.CAST_SEM_SEG
        return {
            "backbone": build_cast_token_backbone(cfg),
            "num_classes": c.NUM_CLASSES,
            "head_dim": c.HEAD_DIM,
            "head_norm": c.HEAD_NORM,
            "feature_stride": c.FEATURE_STRIDE,
            "ignore_value": c.IGNORE_VALUE,
            "loss_weight": c.LOSS_WEIGHT,
            "retrieval_output": c.RETRIEVAL_OUTPUT,
            "retrieval_level": c.RETRIEVAL_LEVEL,
            "retrieval_num_segments": c.RETRIEVAL_NUM_SEGMENTS,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    # ------------------------------------------------------------------------------------------
    def encode(self, batched_inputs):
        """Images (``ImageList``), superpixels (B, H, W), fused tokens f_seg (B, M_0, D) and the
        backbone's outputs (``hierarchy``, ``num_segments``, ``segment_valid``, ...)."""
        images = [(d["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std for d in batched_inputs]
        images = ImageList.from_tensors(images, self.backbone.size_divisibility)
        sp = input_superpixels(self.backbone, batched_inputs, images.tensor, images.image_sizes)
        out = self.backbone(images.tensor, sp, features=("segment_tokens",))
        return images, out["superpixels"], out["segment_tokens"], out

    @staticmethod
    def _pixel_counts(sp: torch.Tensor, num_tokens: int) -> torch.Tensor:
        b = sp.shape[0]
        flat = sp.flatten(1)
        keep = flat >= 0
        idx = (torch.arange(b, device=sp.device)[:, None] * num_tokens + flat.clamp(min=0))[keep]
        return torch.bincount(idx, minlength=b * num_tokens).view(b, num_tokens)

    def _grid_logits(self, fused: torch.Tensor, sp: torch.Tensor) -> torch.Tensor:
        """Stride-s path: (B, C, H, W) logits at the padded input size."""
        b, n, d = fused.shape
        h, w = sp.shape[-2:]
        s = self.feature_stride
        scatter = segment_to_grid_matrix(sp, n, s).to(fused.dtype)
        grid = torch.bmm(scatter, fused).transpose(1, 2).reshape(b, d, -(-h // s), -(-w // s))
        logits = self.head.forward_grid(grid)
        return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)

    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.inference(batched_inputs)
        images, sp, fused, out = self.encode(batched_inputs)
        targets = [d["sem_seg"].to(self.device).long() for d in batched_inputs]
        targets = ImageList.from_tensors(targets, self.backbone.size_divisibility, pad_value=self.ignore_value).tensor
        targets = targets.masked_fill(sp < 0, self.ignore_value)
        return {"loss_sem_seg": self.loss_weight * self._loss(fused, sp, targets, out)}

    def token_logits(self, fused: torch.Tensor, sp: torch.Tensor, out) -> torch.Tensor:
        """(B, M_0, C) class logits of the superpixel tokens (the ``FEATURE_STRIDE`` 1 path).
        ``out`` is the backbone's output; subclasses with another head override this."""
        return self.head.forward_tokens(fused, self._pixel_counts(sp, fused.shape[1]))

    def _loss(self, fused, sp, targets, out) -> torch.Tensor:
        if self.feature_stride > 1:
            logits = self._grid_logits(fused, sp)
            return F.cross_entropy(logits, targets, ignore_index=self.ignore_value)
        return superpixel_cross_entropy(self.token_logits(fused, sp, out), sp, targets, self.ignore_value)

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def inference(self, batched_inputs: List[Dict]):
        images, sp, fused, out = self.encode(batched_inputs)
        if self.feature_stride > 1:
            grid_logits = self._grid_logits(fused, sp)
        else:
            token_logits = self.token_logits(fused, sp, out)
        results = []
        for i, d in enumerate(batched_inputs):
            h, w = images.image_sizes[i]
            height, width = d.get("height", h), d.get("width", w)
            sp_i = sp[i, :h, :w]
            if self.feature_stride > 1:
                sem_seg = sem_seg_postprocess(grid_logits[i], (h, w), height, width)
            else:
                sp_out = _resize_labels(sp_i, (height, width)).clamp(min=0)
                sem_seg = token_logits[i][sp_out].permute(2, 0, 1)
            res = {"sem_seg": sem_seg}
            if self.retrieval_output:
                res.update(self._retrieval(fused[i], sp_i, out["hierarchy"][i, :, :h, :w],
                                           out["num_segments"][i], (height, width)))
            results.append(res)
        return results

    def _retrieval(self, tokens, sp, hierarchy, num_segments, out_size) -> Dict[str, torch.Tensor]:
        level = self.retrieval_level
        if level < 0:
            level = nearest_level(num_segments, self.retrieval_num_segments)
        level = min(level, hierarchy.shape[0] - 1)
        seg = hierarchy[level]
        k = int(seg.max()) + 1
        feats = segment_features(tokens, sp, seg, k)
        seg_out = _resize_labels(seg, out_size)
        present, relabelled = torch.unique(seg_out, return_inverse=True)
        return {
            "segments": relabelled.view(out_size),
            "segment_features": F.normalize(feats[present], dim=-1),
            "segment_level": level,
        }


def _resize_labels(labels: torch.Tensor, size) -> torch.Tensor:
    """Nearest (pixel-centre aligned) resize of an (H, W) integer map."""
    if tuple(labels.shape) == tuple(size):
        return labels
    out = F.interpolate(labels[None, None].double(), size=tuple(size), mode="nearest-exact")
    return out[0, 0].round().long()
