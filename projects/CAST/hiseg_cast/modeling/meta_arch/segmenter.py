"""CAST with Segmenter's mask-transformer decoder, for ADE20K and Pascal Context (CAST Table 3b/c).

CAST Sec. 4.2: "We use CAST and ViT supervisely trained on ImageNet, and finetune them with
Segmenter (Strudel et al., 2021) on each dataset"; Appx. E.3: "We follow the same setup as
(Strudel et al., 2021) for experiments on ADE20K and Pascal Context" (512x512 windows with stride
512 on ADE20K, 480x480 windows with stride 320 on Pascal Context), "and adjust the granularity of
superpixels to match the number of input tokens as ViT baselines" (H*W / 16^2 superpixels).

``CASTSegmenter`` (``MODEL.META_ARCHITECTURE: CASTSegmenter``, keys ``MODEL.CAST_SEGMENTER.*``
from :func:`add_cast_segmenter_config`):

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
   (:func:`hiseg_cast.semantic.superpixel_cross_entropy`, label ``IGNORE_VALUE`` ignored).
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

``CASTSegmenterMapper`` (``INPUT.DATASET_MAPPER_NAME: CASTSegmenterMapper``) is
``CASTDatasetMapper`` with Segmenter's (mmsegmentation's) training pipeline: resize (short side
drawn from ``INPUT.MIN_SIZE_TRAIN``, range sampling for the 0.5-2.0 ratio), random crop of
``INPUT.CROP.SIZE`` in which one class covers at most
``MODEL.CAST_SEGMENTER.CROP_SINGLE_CATEGORY_MAX_AREA`` (mmseg's ``cat_max_ratio`` 0.75),
horizontal flip, photometric distortion (``MODEL.CAST_SEGMENTER.COLOR_AUG``), then the
superpixels. detectron2's own mapper crops *before* resizing, which would not give fixed-size
training crops.

Differences from Segmenter that we chose: the poly schedule decays to 0 (Segmenter: to 1e-5);
mmseg scales the long-side cap with the resize ratio, ``ResizeShortestEdge`` keeps
``MAX_SIZE_TRAIN`` fixed (equal unless an image is more than 4:1 / 8:1); Pascal Context is the
59-class ``pascal_context_59_sem_seg_*`` registered here (background ignored), Segmenter trains and
scores 60 classes (background included).
"""
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.data import transforms as T
from detectron2.modeling import META_ARCH_REGISTRY
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from hiseg.data.mapper_registry import MAPPER_REGISTRY

from .data_mapper import CASTDatasetMapper
from .modeling.graph_pool import key_padding_bias
from .semantic import CASTSemanticSegmentor, build_token_backbone

__all__ = [
    "CASTSegmenter",
    "MaskTransformerDecoder",
    "LinearDecoder",
    "CASTSegmenterMapper",
    "PhotometricDistortion",
    "window_grid",
    "add_cast_segmenter_config",
]


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------
def add_cast_segmenter_config(cfg):
    """Add ``MODEL.CAST_SEGMENTER.*`` (defaults: Segmenter's mask transformer on CAST-S, ADE20K).

    Needs ``add_cast_config`` (``MODEL.CAST.*``) for the backbone.
    """
    cfg.MODEL.CAST_SEGMENTER = CN()
    c = cfg.MODEL.CAST_SEGMENTER
    c.NUM_CLASSES = 150  # ADE20K-150 (Table 3b)
    c.IGNORE_VALUE = 255
    c.LOSS_WEIGHT = 1.0
    c.DECODER = "mask"  # "mask": Segmenter's mask transformer; "linear": Segmenter-Linear
    # Segmenter's mask transformer on a ViT encoder: 2 layers, width = encoder width,
    # heads = width / 64, MLP ratio 4, dropout 0.1, drop-path 0.
    c.NUM_LAYERS = 2
    c.HIDDEN_DIM = 0  # 0: the encoder width (MODEL.CAST.EMBED_DIM)
    c.NUM_HEADS = 0  # 0: HIDDEN_DIM // 64 (at least 1)
    c.MLP_RATIO = 4.0
    c.DROPOUT = 0.1
    c.DROP_PATH_RATE = 0.0
    # Sliding-window inference (Appx. E.3): ADE20K 512 / 512, Pascal Context 480 / 320.
    # 0: the whole image at once. Stride 0: the window size.
    c.TEST_WINDOW_SIZE = 0
    c.TEST_WINDOW_STRIDE = 0
    c.TEST_WINDOW_BATCH_SIZE = 4  # windows encoded together (memory only, results unchanged)
    # CASTSegmenterMapper (training): a random crop in which one class covers at most this
    # fraction of the labelled pixels (mmseg's cat_max_ratio 0.75; 10 tries, then any crop;
    # 1.0 = plain random crop), and mmseg's PhotoMetricDistortion.
    c.CROP_SINGLE_CATEGORY_MAX_AREA = 0.75
    c.COLOR_AUG = True
    return cfg


# ----------------------------------------------------------------------------------------------
# decoders: (B, N, D_in) tokens + (B, N) valid mask -> (B, N, K) class logits
# ----------------------------------------------------------------------------------------------
def _segmenter_init(m: nn.Module):
    """Segmenter's initialisation: truncated normal (std 0.02) linear weights, zero biases."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class MaskTransformerDecoder(nn.Module):
    """Segmenter's mask transformer (Strudel et al. 2021, Sec. 3.2) on CAST's segment tokens.

    ``forward(tokens, valid)``: tokens (B, N, in_dim), valid (B, N) bool (padded token slots are
    masked out of the attention and get zero logits). Returns (B, N, num_classes) logits:
    ``mask_norm(<l2n(z_i W_p), l2n(c_k W_c)>)`` after ``num_layers`` joint blocks.
    The class embeddings live in an ``nn.Embedding`` (the project's convention for learnable
    queries: ``SOLVER.WEIGHT_DECAY_EMBED`` applies, as Segmenter exempts ``cls_emb`` from decay).
    """

    def __init__(self, in_dim: int, num_classes: int, dim: int = 0, num_layers: int = 2, num_heads: int = 0,
                 mlp_ratio: float = 4.0, dropout: float = 0.1, drop_path_rate: float = 0.0):
        super().__init__()
        dim = int(dim) or int(in_dim)
        num_heads = int(num_heads) or max(1, dim // 64)
        if num_classes < 1:
            raise ValueError(f"MODEL.CAST_SEGMENTER.NUM_CLASSES must be >= 1, got {num_classes}")
        if num_layers < 1:
            raise ValueError(f"MODEL.CAST_SEGMENTER.NUM_LAYERS must be >= 1 for the mask transformer, got {num_layers}")
        if dim % num_heads:
            raise ValueError(f"MODEL.CAST_SEGMENTER.HIDDEN_DIM {dim} is not divisible by NUM_HEADS {num_heads}")
        if not (0.0 <= dropout < 1.0 and 0.0 <= drop_path_rate < 1.0):
            raise ValueError(f"MODEL.CAST_SEGMENTER.DROPOUT / DROP_PATH_RATE must be in [0, 1), got "
                             f"{dropout} / {drop_path_rate}")
        self.num_classes = int(num_classes)
        self.dim = dim
        self.proj_dec = nn.Linear(in_dim, dim)
        dpr = torch.linspace(0, drop_path_rate, num_layers).tolist()
        self.blocks = nn.ModuleList([
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, proj_drop=dropout, attn_drop=dropout,
                  drop_path=dpr[i], norm_layer=nn.LayerNorm)
            for i in range(num_layers)])
        self.decoder_norm = nn.LayerNorm(dim)
        self.class_embed = nn.Embedding(num_classes, dim)
        scale = dim ** -0.5
        self.proj_patch = nn.Parameter(scale * torch.randn(dim, dim))
        self.proj_classes = nn.Parameter(scale * torch.randn(dim, dim))
        self.mask_norm = nn.LayerNorm(num_classes)
        self.apply(_segmenter_init)
        trunc_normal_(self.class_embed.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 3 or valid.shape != tokens.shape[:2]:
            raise ValueError(f"expected tokens (B, N, D) and valid (B, N); got {tuple(tokens.shape)} and "
                             f"{tuple(valid.shape)}")
        b, n, _ = tokens.shape
        k = self.num_classes
        x = torch.cat([self.proj_dec(tokens), self.class_embed.weight[None].expand(b, -1, -1)], dim=1)
        mask = None
        if not bool(valid.all()):
            keys = torch.cat([valid, valid.new_ones(b, k)], dim=1)
            mask = key_padding_bias(keys, x.dtype)
        for blk in self.blocks:
            x = blk(x, attn_mask=mask)
        x = self.decoder_norm(x)
        patches = F.normalize(x[:, :n] @ self.proj_patch, dim=-1)
        classes = F.normalize(x[:, n:] @ self.proj_classes, dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))
        return torch.where(valid[..., None], masks, torch.zeros_like(masks))


class LinearDecoder(nn.Module):
    """Segmenter-Linear (Strudel et al. 2021, Sec. 3.2 "Linear decoder"): one linear layer per token."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"MODEL.CAST_SEGMENTER.NUM_CLASSES must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.head = nn.Linear(in_dim, num_classes)
        self.apply(_segmenter_init)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        logits = self.head(tokens)
        return torch.where(valid[..., None], logits, torch.zeros_like(logits))


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
        in_dim = backbone.encoder.embed_dim
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
            "backbone": build_token_backbone(cfg),
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
        """(B, M_0, K) class logits of the superpixel tokens from the decoder."""
        if out is not None:
            valid = out["levels"][0]["valid"]
        else:  # a token is real when it has pixels
            valid = self._pixel_counts(sp, fused.shape[1]) > 0
        return self.head(fused, valid)

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


# ----------------------------------------------------------------------------------------------
# the training data pipeline of Segmenter (mmsegmentation)
# ----------------------------------------------------------------------------------------------
def _photometric(img: np.ndarray, brightness, contrast, contrast_first: bool, saturation, hue,
                 image_format: str) -> np.ndarray:
    import cv2

    x = img
    if brightness is not None:
        x = np.clip(x.astype(np.float32) + brightness, 0, 255).astype(np.uint8)
    if contrast is not None and contrast_first:
        x = np.clip(x.astype(np.float32) * contrast, 0, 255).astype(np.uint8)
    if saturation is not None or hue is not None:
        to_hsv, from_hsv = ((cv2.COLOR_BGR2HSV, cv2.COLOR_HSV2BGR) if image_format == "BGR"
                            else (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB))
        hsv = cv2.cvtColor(np.ascontiguousarray(x), to_hsv)
        if saturation is not None:
            hsv[..., 1] = np.clip(hsv[..., 1].astype(np.float32) * saturation, 0, 255).astype(np.uint8)
        if hue is not None:  # OpenCV's uint8 hue is in [0, 180)
            hsv[..., 0] = ((hsv[..., 0].astype(np.int64) + hue) % 180).astype(np.uint8)
        x = cv2.cvtColor(hsv, from_hsv)
    if contrast is not None and not contrast_first:
        x = np.clip(x.astype(np.float32) * contrast, 0, 255).astype(np.uint8)
    return x


class PhotometricDistortion(T.Augmentation):
    """mmsegmentation's ``PhotoMetricDistortion`` (Segmenter's training pipeline), each step with
    probability 0.5: brightness + U(-32, 32); contrast x U(0.5, 1.5), before or after the HSV
    steps (a coin flip); saturation x U(0.5, 1.5); hue + U{-18..18} (OpenCV's 0..180 hue).
    uint8 HxWx3 images only; anything else is left unchanged."""

    def __init__(self, brightness_delta: int = 32, contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5),
                 hue_delta: int = 18, image_format: str = "RGB"):
        super().__init__()
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"PhotometricDistortion needs an RGB or BGR image, got INPUT.FORMAT {image_format!r}")
        self._init(locals())

    def get_transform(self, image):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            return T.NoOpTransform()
        rnd = np.random
        brightness = rnd.uniform(-self.brightness_delta, self.brightness_delta) if rnd.rand() < 0.5 else None
        contrast_first = rnd.rand() < 0.5
        contrast = rnd.uniform(*self.contrast_range) if rnd.rand() < 0.5 else None
        saturation = rnd.uniform(*self.saturation_range) if rnd.rand() < 0.5 else None
        hue = int(rnd.randint(-self.hue_delta, self.hue_delta + 1)) if rnd.rand() < 0.5 else None
        fmt = self.image_format
        return T.ColorTransform(lambda img: _photometric(img, brightness, contrast, contrast_first, saturation,
                                                         hue, fmt))


def segmenter_train_augmentations(cfg) -> List[T.Augmentation]:
    """resize -> crop (category-area constrained) -> flip -> photometric, as mmseg's pipeline."""
    augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                                 cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(T.RandomCrop_CategoryAreaConstraint(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE,
                                                        cfg.MODEL.CAST_SEGMENTER.CROP_SINGLE_CATEGORY_MAX_AREA,
                                                        cfg.MODEL.CAST_SEGMENTER.IGNORE_VALUE))
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                                 vertical=cfg.INPUT.RANDOM_FLIP == "vertical"))
    if cfg.MODEL.CAST_SEGMENTER.COLOR_AUG:
        augs.append(PhotometricDistortion(image_format=cfg.INPUT.FORMAT))
    return augs


@MAPPER_REGISTRY.register()
class CASTSegmenterMapper(CASTDatasetMapper):
    """``CASTDatasetMapper`` (superpixels after augmentation) with Segmenter's training
    augmentations; at test time the same as ``CASTDatasetMapper`` (shortest-edge resize)."""

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        if is_train:
            ret["augmentations"] = segmenter_train_augmentations(cfg)
        return ret
