"""CAST with Segmenter's mask-transformer decoder, for ADE20K and Pascal Context (CAST Table 3b/c).

CAST Sec. 4.2: "We use CAST and ViT supervisely trained on ImageNet, and finetune them with
Segmenter (Strudel et al., 2021) on each dataset"; Appx. E.3: "We follow the same setup as
(Strudel et al., 2021) for experiments on ADE20K and Pascal Context" (512x512 windows with stride
512 on ADE20K, 480x480 windows with stride 320 on Pascal Context), "and adjust the granularity of
superpixels to match the number of input tokens as ViT baselines" (H*W / 16^2 superpixels).

``CASTSegmenter`` (``MODEL.META_ARCHITECTURE: CASTSegmenter``, keys ``MODEL.CAST_SEGMENTER.*``):
Segmenter's mask-transformer decoder (:mod:`hiseg_cast.modeling.heads.segmenter_decoders`) on
CAST's superpixel tokens, with Segmenter's sliding-window inference.

1. **Tokens.** The paper does not say which CAST tokens feed the decoder. We take the fused
   multi-level tokens of Alg. 2 / Fig. 12, ``f_seg = fuse(Z_0 (+) Unpool(Z_1) (+) ...)``, one
   token per superpixel, exactly as ``CASTSemanticSegmentor`` (Appx. E.5) does, and reuse its
   encoder path (:meth:`CASTSemanticSegmentor.encode`). This is also what the authors' released
   Segmenter code does (its encoder returns the block-fusion output, one token per superpixel,
   and its decoder scatters the masks back by superpixel index). The alternative, the final-level
   tokens alone, would give only ``NUM_SEGMENTS[-2]`` coarse regions, whose masks could not follow
   the superpixel boundaries that Table 3's boundary F-score rewards.
2. **Mask transformer** (Segmenter Sec. 3.2, "Mask Transformer"): the tokens are projected to the
   decoder width, ``K`` learnable class embeddings are appended, and ``NUM_LAYERS`` transformer
   blocks process them jointly (Segmenter uses 2; timm ``Block``, so dropout 0.1 on the attention
   map, attention projection and MLP as Segmenter's blocks, drop-path 0). After a LayerNorm, token
   and class embeddings go through their own linear maps, are L2-normalised, and their scalar
   products ``s(z_i, c_k)`` give one score per (token, class), which a LayerNorm over the ``K``
   classes ("mask norm") turns into the class logits. Width, heads and MLP follow Segmenter's code
   for a ViT encoder: width = encoder width (384 for CAST-S), heads = width / 64, MLP 4x.
   ``DECODER: "linear"`` gives Segmenter's linear decoder (one linear layer per token) instead.
3. **Tokens to pixels.** Every pixel takes its superpixel token's class logits (the patch-grid
   reshape + bilinear upsampling of Segmenter becomes a gather by superpixel index, as in the
   authors' code); the loss is the per-pixel softmax cross-entropy over labelled pixels
   (:func:`hiseg_cast.modeling.heads.pixel_head.superpixel_cross_entropy`, label ``IGNORE_VALUE``
   ignored).
4. **Inference.** ``TEST_WINDOW_SIZE: 0``: the whole (resized) test image in one pass, token
   logits gathered at the original resolution by the nearest-resized superpixel map
   (``CASTSemanticSegmentor.inference``). ``TEST_WINDOW_SIZE: s > 0``: Segmenter's sliding
   window: windows of s x s pixels at stride ``TEST_WINDOW_STRIDE`` (the last window of each
   axis flush with the image end), the logits of overlapping windows averaged per pixel, then
   resized bilinearly to the original height x width. Each window gets its crop of the image's
   superpixel map (relabelled 0..k-1) when the input carries ``"superpixels"``, otherwise
   superpixels are computed on the window (the authors' code always recomputes them per window,
   with H*W / 16^2 segments; cropping the test mapper's map keeps one SEEDS run per image and the
   same boundaries in overlapping windows). A window wider than the image is clipped to it; the
   test resize (short side 512 / 520 >= window) makes this rare in the paper's configs, where
   Segmenter would upsample the image instead. The windows of one image share one size and are
   encoded without padding between them, so each image's result is independent of its batch.

The training data come from ``CASTSegmenterMapper``
(:mod:`hiseg_cast.data.dataset_mappers.segmenter_dataset_mapper`: Segmenter's augmentations, then
the superpixels).

Differences from Segmenter that we chose: the poly schedule decays to 0 (Segmenter: to 1e-5);
mmseg scales the long-side cap with the resize ratio, ``ResizeShortestEdge`` keeps
``MAX_SIZE_TRAIN`` fixed (equal unless an image is more than 4:1 / 8:1); Pascal Context is the
59-class ``pascal_context_59_sem_seg_*`` registered here (background ignored), Segmenter trains and
scores 60 classes (background included).
"""
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY

from ..backbone import build_cast_token_backbone
from ..heads.segmenter_decoders import LinearDecoder, MaskTransformerDecoder
from .per_superpixel_semantic import CASTSemanticSegmentor

__all__ = ["CASTSegmenter", "window_grid"]


# ----------------------------------------------------------------------------------------------
# sliding windows
# ----------------------------------------------------------------------------------------------
def _anchors(length: int, size: int, stride: int) -> List[int]:
    if length <= size:
        return [0]
    return list(range(0, length - size, stride)) + [length - size]


def window_grid(height: int, width: int, size: int, stride: int) -> List[Tuple[int, int, int, int]]:
    """Segmenter's sliding windows ``(y0, x0, y1, x1)``: starts 0, stride, 2*stride, ... below
    ``length - size``, plus one window flush with the end; an axis shorter than ``size`` gets one
    window covering it. Every pixel is covered (stride <= size)."""
    if size < 1 or not 1 <= stride <= size:
        raise ValueError(f"need window size >= 1 and 1 <= stride <= size, got size {size}, stride {stride}")
    if height < 1 or width < 1:
        raise ValueError(f"empty image {height}x{width}")
    return [(y, x, min(y + size, height), min(x + size, width))
            for y in _anchors(height, size, stride) for x in _anchors(width, size, stride)]


# ----------------------------------------------------------------------------------------------
# the meta-architecture
# ----------------------------------------------------------------------------------------------
@META_ARCH_REGISTRY.register()
class CASTSegmenter(CASTSemanticSegmentor):
    """CAST encoder + Segmenter decoder; see the module docstring. Inherits the encoder path,
    superpixel batching, loss and whole-image inference of ``CASTSemanticSegmentor`` and
    replaces its 1x1-conv head by ``MaskTransformerDecoder`` / ``LinearDecoder``."""

    @configurable
    def __init__(self, *, backbone, num_classes: int, decoder: str = "mask", hidden_dim: int = 0,
                 num_layers: int = 2, num_heads: int = 0, mlp_ratio: float = 4.0, dropout: float = 0.1,
                 drop_path_rate: float = 0.0, ignore_value: int = 255, loss_weight: float = 1.0,
                 test_window_size: int = 0, test_window_stride: int = 0, test_window_batch_size: int = 4,
                 pixel_mean, pixel_std):
        if num_classes < 1:
            raise ValueError(f"MODEL.CAST_SEGMENTER.NUM_CLASSES must be >= 1, got {num_classes}")
        if decoder not in ("mask", "linear"):
            raise ValueError(f"MODEL.CAST_SEGMENTER.DECODER must be 'mask' or 'linear', got {decoder!r}")
        if test_window_size < 0 or test_window_stride < 0:
            raise ValueError(f"MODEL.CAST_SEGMENTER.TEST_WINDOW_SIZE / _STRIDE must be >= 0, got "
                             f"{test_window_size} / {test_window_stride}")
        if test_window_size and test_window_stride > test_window_size:
            raise ValueError(f"MODEL.CAST_SEGMENTER.TEST_WINDOW_STRIDE {test_window_stride} > TEST_WINDOW_SIZE "
                             f"{test_window_size} would leave pixels without a prediction")
        if test_window_batch_size < 1:
            raise ValueError(f"MODEL.CAST_SEGMENTER.TEST_WINDOW_BATCH_SIZE must be >= 1, got {test_window_batch_size}")
        # the parent builds a 1x1-conv head that is replaced below; no retrieval output here
        super().__init__(backbone=backbone, num_classes=num_classes, head_dim=1, head_norm="",
                         feature_stride=1, ignore_value=ignore_value, loss_weight=loss_weight,
                         retrieval_output=False, pixel_mean=pixel_mean, pixel_std=pixel_std)
        in_dim = backbone.embed_dim
        if decoder == "mask":
            self.head = MaskTransformerDecoder(in_dim, num_classes, hidden_dim, num_layers, num_heads, mlp_ratio,
                                               dropout, drop_path_rate)
        else:
            self.head = LinearDecoder(in_dim, num_classes)
        self.window_size = int(test_window_size)
        self.window_stride = int(test_window_stride) or self.window_size
        self.window_batch_size = int(test_window_batch_size)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.CAST_SEGMENTER
        return {
            "backbone": build_cast_token_backbone(cfg),
            "num_classes": c.NUM_CLASSES,
            "decoder": c.DECODER,
            "hidden_dim": c.HIDDEN_DIM,
            "num_layers": c.NUM_LAYERS,
            "num_heads": c.NUM_HEADS,
            "mlp_ratio": c.MLP_RATIO,
            "dropout": c.DROPOUT,
            "drop_path_rate": c.DROP_PATH_RATE,
            "ignore_value": c.IGNORE_VALUE,
            "loss_weight": c.LOSS_WEIGHT,
            "test_window_size": c.TEST_WINDOW_SIZE,
            "test_window_stride": c.TEST_WINDOW_STRIDE,
            "test_window_batch_size": c.TEST_WINDOW_BATCH_SIZE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    def token_logits(self, fused: torch.Tensor, sp: torch.Tensor, out) -> torch.Tensor:
        """(B, M_0, K) class logits of the superpixel tokens from the decoder; the tokens it attends
        to are the backbone's ``segment_valid`` ones."""
        return self.head(fused, out["segment_valid"])

    def forward(self, batched_inputs: List[Dict]):
        if self.training:
            missing = [i for i, d in enumerate(batched_inputs) if "sem_seg" not in d]
            if missing:
                raise ValueError(f"CASTSegmenter training needs 'sem_seg' in every input; inputs {missing} lack it")
        return super().forward(batched_inputs)

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def inference(self, batched_inputs: List[Dict]):
        if self.window_size <= 0:
            return super().inference(batched_inputs)
        return [{"sem_seg": self.sliding_window_logits(d)} for d in batched_inputs]

    @torch.no_grad()
    def sliding_window_logits(self, d: Dict) -> torch.Tensor:
        """(K, height, width) logits of one input by Segmenter's sliding-window inference."""
        image = d["image"]
        if image.dim() != 3:
            raise ValueError(f"'image' must be (C, H, W), got {tuple(image.shape)}")
        h, w = image.shape[-2:]
        sp = d.get("superpixels")
        if sp is not None and tuple(sp.shape) != (h, w):
            raise ValueError(f"superpixels {tuple(sp.shape)} do not match the image {(h, w)}")
        windows = window_grid(h, w, self.window_size, self.window_stride)
        total = torch.zeros(self.num_classes, h, w, device=self.device)
        count = torch.zeros(1, h, w, device=self.device)
        for start in range(0, len(windows), self.window_batch_size):
            chunk = windows[start:start + self.window_batch_size]
            crops = []
            for y0, x0, y1, x1 in chunk:
                crop = {"image": image[:, y0:y1, x0:x1]}
                if sp is not None:  # the window's part of the image's superpixels, relabelled 0..k-1
                    crop["superpixels"] = torch.unique(sp[y0:y1, x0:x1], return_inverse=True)[1]
                crops.append(crop)
            _, csp, fused, out = self.encode(crops)
            logits = self.token_logits(fused, csp, out)
            for i, (y0, x0, y1, x1) in enumerate(chunk):
                labels = csp[i, :y1 - y0, :x1 - x0]
                total[:, y0:y1, x0:x1] += logits[i][labels].permute(2, 0, 1)
                count[:, y0:y1, x0:x1] += 1
        total = total / count
        height, width = d.get("height", h), d.get("width", w)
        if (height, width) != (h, w):
            total = F.interpolate(total[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        return total
