"""CAST as a Detectron2 backbone (Fig. 12 dense read-out), and the public face of the CAST encoder.

``CASTBackbone.forward(x, superpixels=None, features=None)`` returns a dict. Dense maps, for any
Detectron2 head (``output_shape()``; computed for the names in ``features``, default
``MODEL.CAST.OUT_FEATURES``):

  * ``res2`` (stride 4): the fused multi-level segment tokens of Alg. 2,
    f_seg = FC(Z_0 (+) Unpool(Z_1) (+) ... (+) Unpool(Z_L)), scattered to pixels;
  * ``res3`` / ``res4`` / ``res5`` (strides 8 / 16 / 32): level-1 / 2 / 3 tokens unpooled to
    the superpixels (Eq. 4) and scattered to pixels, so coarser maps carry coarser segments.
  Scattering a segment feature map to a stride-s grid averages it over each s x s cell (exact
  area weights, no lost small segments); every map goes through a LayerNorm first.

Token-level outputs, for CAST's own meta-architectures (not in ``output_shape()``):

  * always: ``cls`` (B, D) the class token after the final LayerNorm (the recognition output);
    ``hierarchy`` (B, L+1, H, W) int64 the segmentation hierarchy (Eq. 2; level 0 = S_0, -1 =
    padding) and ``num_segments`` (B, L+1) the segments each level has per image;
    ``superpixels`` (B, H, W) int64 the S_0 the encoder ran on; ``segment_valid`` (B, M_0) bool:
    the superpixel token has pixels on the feature grid (False for batch padding);
  * ``segment_tokens`` (B, M_0, D) when ``features`` names it: f_seg, one fused token per
    superpixel (what the ``res2`` map scatters to pixels), for heads that work on tokens.

``features=()`` runs the encoder alone (no unpooling, fusion or scattering): what a class-token
meta-architecture asks for. Segment counts: ``MODEL.CAST.NUM_SEGMENTS`` in training,
``MODEL.CAST.TEST_NUM_SEGMENTS`` (when set) in eval mode (Table 6d).

Superpixels: pass them (``forward(x, superpixels=...)``, computed by a data mapper after
augmentation); when they are missing, the backbone de-normalises the batch and computes them
itself (:meth:`CASTBackbone.superpixels_from_images`): on the CPU, or on the model's device with
``METHOD: slic_torch``; square cells for patch tokens. Which of the two places computes S_0 is
decided in :mod:`hiseg_cast.superpixels.policy`.

Attention taps (:mod:`hiseg.modeling.attention_taps`): ``attention_blocks()`` and
``class_attention(images, block, superpixels=None, features=())``, the class token's attention
over the segment tokens of one block with the pixel labels of those tokens (CAST Table 5,
:mod:`hiseg.evaluation.figure_ground`).

State-dict keys: ``encoder.*`` (:class:`~hiseg_cast.modeling.encoder.CASTEncoder`), ``fuse.*``
and ``out_norms.*``; released checkpoints and converters rely on them.
"""
import logging
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, build_backbone
from torch import nn

from hiseg.compat import shape_spec
from hiseg.modeling.attention_taps import tap_qkv

from ..superpixels import SuperpixelConfig, compute_superpixels_batch, patch_superpixels
from .encoder import CASTEncoder
from .segment_ops import segment_to_grid_matrix

logger = logging.getLogger(__name__)

__all__ = ["CASTBackbone", "build_cast_backbone", "build_cast_fpn_backbone", "build_cast_token_backbone",
           "encoder_from_cfg"]

_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
#: the token-level output computed only when ``features`` names it
SEGMENT_TOKENS = "segment_tokens"


def encoder_from_cfg(cfg) -> CASTEncoder:
    c = cfg.MODEL.CAST
    return CASTEncoder(
        embed_dim=c.EMBED_DIM, depths=c.DEPTHS, num_heads=c.NUM_HEADS, num_segments=c.NUM_SEGMENTS,
        mlp_ratio=c.MLP_RATIO, drop_path_rate=c.DROP_PATH_RATE, pool_dropout=c.POOL_DROPOUT,
        kappa=c.KAPPA, pooling=c.POOLING, token_pool_mode=c.TOKEN_POOL_MODE, pos_embed=c.POS_EMBED,
        pos_grid=c.POS_GRID, pos_row_first=c.POS_ROW_FIRST, empty_tokens=c.EMPTY_TOKENS,
        pos_resize=c.POS_RESIZE, activation_checkpointing=c.ACTIVATION_CHECKPOINTING)


class CASTBackbone(Backbone):
    """The CAST encoder with its dense read-out; outputs and interfaces: see the module docstring."""

    #: state-dict prefixes (below the backbone) of the dense read-out, which only ``res2``..``res5``
    #: and ``segment_tokens`` read
    DENSE_READOUT = ("fuse", "out_norms")

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

    @property
    def embed_dim(self) -> int:
        """D, the width of every token output."""
        return self.encoder.embed_dim

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

    def freeze_unread_by_class_token(self):
        """Freeze what a loss on the class token (``cls``) never reaches: the dense read-out
        (``DENSE_READOUT``) and the last graph pooling (used only for the hierarchy's coarsest
        level). For MoCo and classification, so that DistributedDataParallel without
        ``find_unused_parameters`` (detectron2's) does not stop and the optimizer skips them."""
        unread = [getattr(self, name) for name in self.DENSE_READOUT]
        if self.encoder.pooling and len(self.encoder.pools):
            unread.append(self.encoder.pools[-1])
        for module in unread:
            for p in module.parameters():
                p.requires_grad_(False)

    def output_shape(self):
        return {k: shape_spec(channels=self._out_feature_channels[k], stride=self._out_feature_strides[k])
                for k in self._out_features}

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def superpixels_from_images(self, x: torch.Tensor, image_sizes: Optional[Sequence] = None) -> torch.Tensor:
        """S_0 of a batch of normalised images, (B, H, W) int64 on ``x.device``: the backbone's
        superpixel settings on the de-normalised uint8 images, per image on the CPU or for the
        whole batch on ``x.device`` with ``MODEL.CAST.SUPERPIXEL.METHOD: slic_torch``; square
        cells for patch tokens. ``image_sizes``: each image's (h, w) in the padded batch; S_0 is
        then computed on that part alone and the rest is -1 (padding)."""
        h, w = x.shape[-2:]
        if image_sizes is not None and any(tuple(s) != (h, w) for s in image_sizes):
            maps = [self.superpixels_from_images(x[i:i + 1, :, :hi, :wi])[0]
                    for i, (hi, wi) in enumerate(image_sizes)]
            return torch.stack([F.pad(m, (0, w - m.shape[1], 0, h - m.shape[0]), value=-1) for m in maps])
        if self.tokens == "patch":
            sp = torch.from_numpy(patch_superpixels(h, w, self.patch_size))
            return sp.to(x.device).expand(x.shape[0], -1, -1).contiguous()
        img = (x * self.pixel_std + self.pixel_mean).clamp(0, 255).round().byte()
        if self.input_format == "BGR":
            img = img.flip(1)
        # METHOD slic_torch: the whole batch in one call on x.device; others: per image on the CPU
        return compute_superpixels_batch(img, self.superpixel_cfg)

    def forward(self, x: torch.Tensor, superpixels: Optional[torch.Tensor] = None,
                features: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
        """Run CAST on normalised images ``x`` (B, 3, H, W) with their superpixels (B, H, W)
        (None: computed here). ``features``: the dense maps and ``"segment_tokens"`` to compute
        (default: ``out_features``). Returns those and the token-level outputs (module
        docstring)."""
        return self._forward(x, superpixels, features)[1]

    def _forward(self, x, superpixels, features):
        """(encoder output, backbone outputs) of one pass."""
        names = self._out_features if features is None else list(features)
        unknown = [n for n in names if n not in _STRIDES and n != SEGMENT_TOKENS]
        if unknown:
            raise ValueError(f"unknown CAST features {unknown}; choose from {sorted(_STRIDES)} or {SEGMENT_TOKENS!r}")
        missing_norms = [n for n in names if n in _STRIDES and n not in self.out_norms]
        if missing_norms:
            raise ValueError(f"{missing_norms} are not among this backbone's out_features {self._out_features}")
        if superpixels is None:
            superpixels = self.superpixels_from_images(x)
        superpixels = superpixels.long()
        counts = None if self.training else self.test_num_segments
        out = self.encoder(x, superpixels, num_segments=counts)
        results = {}
        if names:
            per_level = self.encoder.unpool_to_superpixels(out)
            results.update(self._dense_outputs(names, per_level, superpixels, x))
        results["hierarchy"] = out["hierarchy"]
        results["num_segments"] = out["num_segments"]
        results["cls"] = out["cls"]
        results["superpixels"] = superpixels
        results["segment_valid"] = out["levels"][0]["valid"]
        return out, results

    def _dense_outputs(self, names: List[str], per_level, superpixels, x) -> Dict[str, torch.Tensor]:
        n = per_level[0].shape[1]
        fused = self.fuse(torch.cat(per_level, dim=-1))
        maps = {
            "res2": fused,
            "res3": per_level[min(1, len(per_level) - 1)],
            "res4": per_level[min(2, len(per_level) - 1)],
            "res5": per_level[min(3, len(per_level) - 1)],
        }
        b, _, h, w = x.shape
        results = {}
        for name in names:
            if name == SEGMENT_TOKENS:
                results[name] = fused
                continue
            s = _STRIDES[name]
            scatter = segment_to_grid_matrix(superpixels, n, s).to(x.dtype)
            feat = torch.bmm(scatter, self.out_norms[name](maps[name]))
            results[name] = feat.transpose(1, 2).reshape(b, -1, -(-h // s), -(-w // s))
        return results

    # ------------------------------------------------------------------------------------------
    # attention taps (hiseg.modeling.attention_taps)
    def attention_blocks(self) -> List[nn.Module]:
        """The encoder's ViT blocks, numbered flat over the block groups (as the released code)."""
        return self.encoder.attention_blocks()

    @torch.no_grad()
    def class_attention(self, images: torch.Tensor, block: int = -1, superpixels: Optional[torch.Tensor] = None,
                        features: Sequence[str] = ()) -> Dict[str, object]:
        """The class token's attention over the segment tokens of block ``block`` (python index
        into :meth:`attention_blocks`), from one forward pass.

        Returns ``attn`` (B, heads, M), summing to 1 over the tokens the block attended to;
        ``labels`` (B, H, W) int64, the token of each pixel (the hierarchy level whose segments
        are those tokens; -1 = padding); ``valid`` (B, M); ``level`` (int); ``output``: the
        backbone's outputs of that pass (``forward(images, superpixels, features)``)."""
        self.encoder.block_group(block)  # range check first
        with tap_qkv(self.attention_blocks()[block], detach=True) as tap:
            out, results = self._forward(images, superpixels, features)
        res = self.encoder.class_attention_of_pass(block, tap.qkv, out)
        res["output"] = results
        return res


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


def build_cast_token_backbone(cfg) -> CASTBackbone:
    """The CAST backbone (``MODEL.BACKBONE.NAME``) for a meta-architecture that reads its
    token-level outputs (``segment_tokens``): built without the res2..res5 maps (their
    LayerNorms would be parameters without gradients)."""
    bb_cfg = cfg.clone()
    bb_cfg.defrost()
    bb_cfg.MODEL.CAST.OUT_FEATURES = []
    return build_backbone(bb_cfg)
