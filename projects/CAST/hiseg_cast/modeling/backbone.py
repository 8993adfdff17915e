"""CAST as a Detectron2 backbone (Fig. 12 dense read-out).

Outputs, for any Detectron2 meta-architecture:
  * ``res2`` (stride 4): the fused multi-level segment tokens of Alg. 2,
    f_seg = FC(Z_0 (+) Unpool(Z_1) (+) ... (+) Unpool(Z_L)), scattered to pixels;
  * ``res3`` / ``res4`` / ``res5`` (strides 8 / 16 / 32): level-1 / 2 / 3 tokens unpooled to
    the superpixels (Eq. 4) and scattered to pixels, so coarser maps carry coarser segments.
  Scattering a segment feature map to a stride-s grid averages it over each s x s cell (exact
  area weights, no lost small segments); every map goes through a LayerNorm first.
  * ``hierarchy`` (B, L+1, H, W) and ``num_segments`` (B, L+1): the segmentation hierarchy
    (Eq. 2), and ``cls`` (B, D). These extra entries are not in ``output_shape()``.

Superpixels: pass them (``forward(x, superpixels=...)``, computed by ``CASTDatasetMapper`` after
augmentation); when a meta-architecture passes only images, the backbone de-normalises the batch
and computes them itself: on the CPU, or on the model's device with ``METHOD: slic_torch``.
"""
import logging
from typing import Dict, Optional

import torch
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn

from hiseg.compat import shape_spec

from ..superpixels import SuperpixelConfig, compute_superpixels_batch, patch_superpixels
from .encoder import CASTEncoder
from .segment_ops import segment_to_grid_matrix

logger = logging.getLogger(__name__)

__all__ = ["CASTBackbone", "build_cast_backbone", "encoder_from_cfg"]

_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def encoder_from_cfg(cfg) -> CASTEncoder:
    c = cfg.MODEL.CAST
    return CASTEncoder(
        embed_dim=c.EMBED_DIM, depths=c.DEPTHS, num_heads=c.NUM_HEADS, num_segments=c.NUM_SEGMENTS,
        mlp_ratio=c.MLP_RATIO, drop_path_rate=c.DROP_PATH_RATE, pool_dropout=c.POOL_DROPOUT,
        kappa=c.KAPPA, pooling=c.POOLING, token_pool_mode=c.TOKEN_POOL_MODE, pos_embed=c.POS_EMBED,
        pos_grid=c.POS_GRID, pos_row_first=c.POS_ROW_FIRST, empty_tokens=c.EMPTY_TOKENS,
        pos_resize=c.POS_RESIZE, activation_checkpointing=c.ACTIVATION_CHECKPOINTING)


class CASTBackbone(Backbone):
    def __init__(self, encoder: CASTEncoder, out_features=("res2", "res3", "res4", "res5"),
                 superpixel_cfg: SuperpixelConfig = SuperpixelConfig(), tokens: str = "segment",
                 patch_size: int = 16, pixel_mean=(123.675, 116.28, 103.53),
                 pixel_std=(58.395, 57.12, 57.375), input_format: str = "RGB",
                 test_num_segments=None):
        super().__init__()
        unknown = set(out_features) - set(_STRIDES)
        if unknown:
            raise ValueError(f"unknown CAST output features {sorted(unknown)}; choose from {sorted(_STRIDES)}")
        if tokens not in ("segment", "patch"):
            raise ValueError(f"MODEL.CAST.TOKENS must be 'segment' or 'patch', got {tokens!r}")
        self.encoder = encoder
        self._out_features = list(out_features)
        self.superpixel_cfg = superpixel_cfg
        self.tokens = tokens
        self.patch_size = patch_size
        self.input_format = input_format
        self.test_num_segments = list(test_num_segments) if test_num_segments else None
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, -1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, -1, 1, 1), False)
        d, levels = encoder.embed_dim, len(encoder.depths)
        self.fuse = nn.Linear(d * levels, d)  # Alg. 2: FC over the concatenated levels
        self.out_norms = nn.ModuleDict({k: nn.LayerNorm(d) for k in self._out_features})
        self._out_feature_strides = {k: _STRIDES[k] for k in self._out_features}
        self._out_feature_channels = {k: d for k in self._out_features}

    @property
    def size_divisibility(self) -> int:
        return 32

    def freeze_unread_by_dense_outputs(self):
        """Freeze what the dense outputs (res2..res5) never read: the class-token LayerNorm and
        the last graph pooling (it only gives the hierarchy's coarsest level, by argmax). When
        only the dense outputs feed a loss (FPN / Mask R-CNN, semantic heads, OAP) these never get
        a gradient, and DistributedDataParallel without ``find_unused_parameters`` (detectron2's
        default) would stop. Meta-architectures that read the class token (MoCo, classification)
        must not call this."""
        enc = self.encoder
        frozen = list(enc.norm.parameters())
        if enc.pooling and len(enc.pools):
            frozen += list(enc.pools[-1].parameters())
        for p in frozen:
            p.requires_grad_(False)

    def output_shape(self):
        return {k: shape_spec(channels=self._out_feature_channels[k], stride=self._out_feature_strides[k])
                for k in self._out_features}

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def superpixels_from_images(self, x: torch.Tensor) -> torch.Tensor:
        """De-normalise a batch and compute S_0 ((B, H, W) int64 on ``x.device``): per image on the
        CPU, or for the whole batch on ``x.device`` with ``MODEL.CAST.SUPERPIXEL.METHOD:
        slic_torch``."""
        h, w = x.shape[-2:]
        if self.tokens == "patch":
            sp = torch.from_numpy(patch_superpixels(h, w, self.patch_size))
            return sp.to(x.device).expand(x.shape[0], -1, -1).contiguous()
        img = (x * self.pixel_std + self.pixel_mean).clamp(0, 255).round().byte()
        if self.input_format == "BGR":
            img = img.flip(1)
        # METHOD slic_torch: the whole batch in one call on x.device; others: per image on the CPU
        return compute_superpixels_batch(img, self.superpixel_cfg)

    def forward(self, x: torch.Tensor, superpixels: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        if superpixels is None:
            superpixels = self.superpixels_from_images(x)
        counts = None if self.training else self.test_num_segments
        out = self.encoder(x, superpixels, num_segments=counts)
        per_level = self.encoder.unpool_to_superpixels(out)
        n = per_level[0].shape[1]
        maps = {
            "res2": self.fuse(torch.cat(per_level, dim=-1)),
            "res3": per_level[min(1, len(per_level) - 1)],
            "res4": per_level[min(2, len(per_level) - 1)],
            "res5": per_level[min(3, len(per_level) - 1)],
        }
        b, _, h, w = x.shape
        results = {}
        for name in self._out_features:
            s = _STRIDES[name]
            scatter = segment_to_grid_matrix(superpixels, n, s).to(x.dtype)
            feat = torch.bmm(scatter, self.out_norms[name](maps[name]))
            results[name] = feat.transpose(1, 2).reshape(b, -1, -(-h // s), -(-w // s))
        results["hierarchy"] = out["hierarchy"]
        results["num_segments"] = out["num_segments"]
        results["cls"] = out["cls"]
        return results


@BACKBONE_REGISTRY.register()
def build_cast_backbone(cfg, input_shape=None):
    """Registered as ``MODEL.BACKBONE.NAME: build_cast_backbone``."""
    c = cfg.MODEL.CAST
    backbone = CASTBackbone(
        encoder_from_cfg(cfg), out_features=c.OUT_FEATURES,
        superpixel_cfg=SuperpixelConfig.from_cfg(c.SUPERPIXEL), tokens=c.TOKENS,
        patch_size=c.PATCH_SIZE, pixel_mean=cfg.MODEL.PIXEL_MEAN, pixel_std=cfg.MODEL.PIXEL_STD,
        input_format=cfg.INPUT.FORMAT, test_num_segments=c.TEST_NUM_SEGMENTS)
    if c.FROZEN_STEM_CONV1:
        backbone.encoder.stem.proj[0].weight.requires_grad_(False)
    if c.DENSE_OUTPUTS_ONLY:
        backbone.freeze_unread_by_dense_outputs()
    return backbone


@BACKBONE_REGISTRY.register()
def build_cast_fpn_backbone(cfg, input_shape=None):
    """CAST + detectron2's FPN (``MODEL.FPN.*``), for Mask R-CNN / RetinaNet / Panoptic FPN.

    ``MODEL.FPN.IN_FEATURES`` empty (detectron2's default) means all of CAST's dense outputs,
    ``res2``..``res5`` (strides 4..32), as the Mask R-CNN config sets them."""
    from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool

    bottom_up = build_cast_backbone(cfg, input_shape)
    bottom_up.freeze_unread_by_dense_outputs()  # only res2..res5 reach the FPN
    in_features = list(cfg.MODEL.FPN.IN_FEATURES) or list(bottom_up.output_shape())
    unknown = [f for f in in_features if f not in bottom_up.output_shape()]
    if unknown:
        raise ValueError(f"MODEL.FPN.IN_FEATURES {unknown} are not CAST outputs; use a subset of "
                         f"{list(bottom_up.output_shape())} (empty = all)")
    return FPN(bottom_up=bottom_up, in_features=in_features, out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
               norm=cfg.MODEL.FPN.NORM, top_block=LastLevelMaxPool(), fuse_type=cfg.MODEL.FPN.FUSE_TYPE)
