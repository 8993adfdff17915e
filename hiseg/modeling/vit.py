"""A plain ViT (timm ``VisionTransformer``) as a Detectron2 backbone, shared by CAST and OAP.

* The transformer is timm's (qkv bias, LayerNorm eps 1e-6) built with ``dynamic_img_size`` and
  ``dynamic_img_pad``: any image size and aspect ratio works, the learned position embedding is
  interpolated from its ``img_size / patch_size`` grid, and sizes that are not multiples of the
  patch size are zero-padded on the bottom / right. Its parameters live under ``vit.*`` with
  timm's (= DINO's) names, so DINO / timm weights load after a prefix change
  (``tools/convert_cast_checkpoint.py --model vit``).
* The last block's patch-token map (stride = patch size) feeds a simple feature pyramid in the
  style of ViTDet (Li et al. 2022): stride-2 transposed convolutions for finer levels, identity
  for the patch stride, max pooling for coarser ones, then a 1x1 and a 3x3 convolution, each
  followed by a channel LayerNorm. Outputs are named ``p2..p6`` or ``res2..res5`` (stride
  ``2**k``). A patch size that is not a power of two (e.g. 14) is first resampled (bilinear) to
  the nearest power-of-two stride.
* ``forward(x, features=None)`` returns the pyramid maps named in ``features`` (default: the
  backbone's ``out_features``) and the token-level outputs of the same pass: ``cls`` (B, D), the
  class token after the final norm (absent when the ViT has none), ``prefix_tokens`` (B, P, D)
  (class and register tokens) and ``patch_tokens`` (B, D, h, w). ``features=()`` skips the
  pyramid (a meta-architecture that reads only tokens, e.g. CAST's MoCo / classification
  baselines); :meth:`ViTBackbone.freeze_unread_by_class_token` then freezes it.
* :meth:`ViTBackbone.key_features` returns the last block's attention keys (hooked on
  ``blocks[-1].attn.qkv``), the features MaskCut and OAP build their affinity graphs from.
* Attention taps (:mod:`hiseg.modeling.attention_taps`): ``attention_blocks()`` and
  ``class_attention(images, block)``, the class token's attention over the patch tokens of one
  block with each pixel's patch index (CAST Table 5, :mod:`hiseg.evaluation.figure_ground`).
* ``activation_checkpointing=True`` (``MODEL.VIT.ACTIVATION_CHECKPOINTING``) recomputes each
  block's activations in the backward pass instead of keeping them (timm's
  ``set_grad_checkpointing`` flag, honoured by :meth:`ViTBackbone.forward_tokens`; see
  :mod:`hiseg.modeling.activation_checkpointing`).
"""
import math
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.layers import get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from fvcore.nn import weight_init
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from hiseg.compat import shape_spec

from .activation_checkpointing import maybe_checkpoint
from .attention_taps import class_attention_from_qkv, split_qkv, tap_qkv

__all__ = [
    "vit_kwargs_from_cfg",
    "ChannelLayerNorm", "SimpleFeaturePyramid", "ViTBackbone", "build_vit_backbone",
    "feature_stride", "make_timm_vit", "VIT_PRESETS", "vit_small", "vit_base", "run_vit_blocks",
]

#: the two ViT sizes of DINO's released backbones: ``vit_small`` = ViT-S (``dino_deitsmall{8,16}``),
#: ``vit_base`` = ViT-B (``dino_vitbase{8,16}``); the patch size is chosen separately
VIT_PRESETS = {
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
}


def feature_stride(name: str) -> int:
    """``p2`` / ``res2`` -> 4, ..., ``p6`` -> 64."""
    for prefix, levels in (("res", range(2, 6)), ("p", range(2, 7))):
        if name.startswith(prefix) and name[len(prefix):].isdigit() and int(name[len(prefix):]) in levels:
            return 2 ** int(name[len(prefix):])
    raise ValueError(f"unknown ViT output feature {name!r}: use p2..p6 or res2..res5 (strides 4..64)")


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) map (each pixel normalised on its own).
    A subclass of ``nn.LayerNorm`` so optimizers treat it as a norm layer (no weight decay)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _norm(norm: str, channels: int) -> nn.Module:
    if norm == "LN":
        return ChannelLayerNorm(channels)
    if not norm:
        return nn.Identity()
    return get_norm(norm, channels)


class SimpleFeaturePyramid(nn.Module):
    """Maps one (B, C, h, w) feature map of stride ``in_stride`` to several strides.

    Args:
        in_channels: C.
        in_stride: stride of the input map (the ViT patch size).
        out_features: names (``p2``..``p6`` or ``res2``..``res5``).
        out_channels: channels of every output.
        norm: "LN" (channel LayerNorm), "" or a detectron2 norm name.
    """

    def __init__(self, in_channels: int, in_stride: int, out_features: Sequence[str],
                 out_channels: int = 256, norm: str = "LN"):
        super().__init__()
        if not out_features:
            raise ValueError("the feature pyramid needs at least one output feature")
        self.out_features = list(out_features)
        self.strides = {k: feature_stride(k) for k in self.out_features}
        if len(set(self.strides.values())) != len(self.strides):
            raise ValueError(f"two output features share a stride: {self.out_features}")
        self.in_stride = int(in_stride)
        # the map is first brought to a power-of-two stride (identity for patch 8, 16, ...)
        self.base_stride = 2 ** max(0, round(math.log2(self.in_stride)))
        self.stages = nn.ModuleDict()
        for name, stride in self.strides.items():
            layers: List[nn.Module] = []
            c = in_channels
            if stride < self.base_stride:
                n = int(math.log2(self.base_stride // stride))
                if in_channels % (2 ** n):
                    raise ValueError(f"{name} (stride {stride}) from stride {self.base_stride} needs "
                                     f"{n} deconvolutions halving {in_channels} channels each time")
                for i in range(n):
                    layers.append(nn.ConvTranspose2d(c, c // 2, kernel_size=2, stride=2))
                    c //= 2
                    if i < n - 1:
                        layers += [_norm(norm, c), nn.GELU()]
            elif stride > self.base_stride:
                k = stride // self.base_stride
                layers.append(nn.MaxPool2d(kernel_size=k, stride=k, ceil_mode=True))
            lateral = nn.Conv2d(c, out_channels, 1, bias=not norm)
            output = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=not norm)
            for conv in (lateral, output):
                weight_init.c2_xavier_fill(conv)
            layers += [lateral, _norm(norm, out_channels), output, _norm(norm, out_channels)]
            self.stages[name] = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, image_size: Optional[Tuple[int, int]] = None) -> Dict[str, torch.Tensor]:
        if self.base_stride != self.in_stride:
            if image_size is None:
                size = tuple(max(1, round(s * self.in_stride / self.base_stride)) for s in x.shape[-2:])
            else:
                size = tuple(-(-int(s) // self.base_stride) for s in image_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return {name: self.stages[name](x) for name in self.out_features}


def make_timm_vit(embed_dim: int, depth: int, num_heads: int, patch_size: int, mlp_ratio: float = 4.0,
                  drop_path_rate: float = 0.0, img_size: Union[int, Sequence[int]] = 224,
                  class_token: bool = True, reg_tokens: int = 0, no_embed_class: bool = False,
                  layer_scale: Optional[float] = None, in_chans: int = 3, **kwargs) -> VisionTransformer:
    """The one builder of a timm ViT: the one inside :class:`ViTBackbone` and OAP's ViT-Adapter, and
    the ViT whose attention keys feed the pseudo-mask generators.

    No head, qkv bias, LayerNorm eps 1e-6 (timm's defaults), any input size: the position
    embedding is interpolated from its ``img_size / patch_size`` grid (``dynamic_img_size``) and
    sides that are not multiples of the patch size are zero-padded on the bottom / right
    (``dynamic_img_pad``). ``forward_features`` returns every token; ``forward`` does no pooling.
    Its ``state_dict`` names are timm's = DINO's: ``cls_token``, ``pos_embed``,
    ``patch_embed.proj``, ``blocks.i.*``, ``norm``, so DINO's released backbones load with
    ``load_state_dict`` (e.g. ``dino_vitbase8_pretrain.pth`` into
    ``make_timm_vit(**VIT_PRESETS["vit_base"], patch_size=8)``)."""
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    return VisionTransformer(
        img_size=tuple(img_size), patch_size=patch_size, in_chans=in_chans, num_classes=0,
        global_pool="", embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        mlp_ratio=mlp_ratio, qkv_bias=True, init_values=layer_scale or None,
        class_token=class_token, reg_tokens=reg_tokens, no_embed_class=no_embed_class,
        dynamic_img_size=True, dynamic_img_pad=True, drop_path_rate=drop_path_rate,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


class ViTBackbone(Backbone):
    """Plain ViT + simple feature pyramid. Inputs are normalised images (B, 3, H, W); outputs
    and interfaces: see the module docstring."""

    #: state-dict prefixes (below the backbone) of the dense read-out, which only the pyramid
    #: outputs read
    DENSE_READOUT = ("pyramid",)

    def __init__(
        self,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        patch_size: int = 16,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        img_size: Union[int, Sequence[int]] = 224,
        class_token: bool = True,
        reg_tokens: int = 0,
        no_embed_class: bool = False,
        layer_scale: Optional[float] = None,
        final_norm: bool = True,
        out_features: Sequence[str] = ("p2", "p3", "p4", "p5"),
        out_channels: int = 256,
        norm: str = "LN",
        frozen: bool = False,
        in_chans: int = 3,
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        img_size = (int(img_size), int(img_size)) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
        if len(img_size) != 2:
            raise ValueError(f"img_size must be an int or (height, width), got {img_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.patch_size = int(patch_size)
        self.final_norm = final_norm
        self.vit = make_timm_vit(
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=self.patch_size,
            mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate, img_size=img_size,
            class_token=class_token, reg_tokens=reg_tokens, no_embed_class=no_embed_class,
            layer_scale=layer_scale, in_chans=in_chans)
        self.vit.set_grad_checkpointing(bool(activation_checkpointing))
        self.embed_dim = embed_dim
        self.pyramid = SimpleFeaturePyramid(embed_dim, self.patch_size, out_features, out_channels, norm)
        self._out_features = list(out_features)
        self._out_feature_strides = dict(self.pyramid.strides)
        self._out_feature_channels = {k: out_channels for k in self._out_features}
        if frozen:
            for p in self.vit.parameters():
                p.requires_grad_(False)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.vit.num_prefix_tokens)

    @property
    def size_divisibility(self) -> int:
        # patch grid and every pyramid level line up exactly on padded batches
        return math.lcm(self.patch_size, max(self._out_feature_strides.values()))

    def output_shape(self):
        return {k: shape_spec(channels=self._out_feature_channels[k], stride=self._out_feature_strides[k])
                for k in self._out_features}

    # ------------------------------------------------------------------------------------------
    def forward_tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Run the transformer. Returns (prefix tokens (B, P, D), patch map (B, D, h, w))."""
        if x.dim() != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        vit = self.vit
        t = vit.patch_embed(x)  # (B, h, w, D): dynamic_img_size keeps the grid
        b, h, w, d = t.shape
        t = vit._pos_embed(t)
        t = vit.patch_drop(t)
        t = vit.norm_pre(t)
        t = run_vit_blocks(vit.blocks, t, vit.grad_checkpointing)
        if self.final_norm:
            t = vit.norm(t)
        p = vit.num_prefix_tokens
        return t[:, :p], t[:, p:].transpose(1, 2).reshape(b, d, h, w)

    def forward(self, x: torch.Tensor, features: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
        """Without ``features``: the pyramid maps ``out_features``, as every detectron2 backbone.
        With ``features`` (pyramid names; ``()``: none): those maps and the token-level outputs
        ``cls`` (with a class token), ``prefix_tokens``, ``patch_tokens``."""
        if features is None:
            return self.pyramid(self.forward_tokens(x)[1], image_size=x.shape[-2:])
        names = list(features)
        unknown = [n for n in names if n not in self._out_features]
        if unknown:
            raise ValueError(f"{unknown} are not among this ViT's out_features {self._out_features}")
        prefix, fmap = self.forward_tokens(x)
        out = {}
        if names:
            maps = self.pyramid(fmap, image_size=x.shape[-2:])
            out.update((n, maps[n]) for n in names)
        if self.vit.cls_token is not None:
            out["cls"] = prefix[:, 0]
        out["prefix_tokens"] = prefix
        out["patch_tokens"] = fmap
        return out

    def freeze_unread_by_class_token(self):
        """Freeze the feature pyramid (``DENSE_READOUT``), which a meta-architecture that reads
        only the token outputs never reaches (DistributedDataParallel without
        ``find_unused_parameters``, detectron2's default, would stop)."""
        for name in self.DENSE_READOUT:
            for p in getattr(self, name).parameters():
                p.requires_grad_(False)

    # ---------------------------------------------------------------------------------------------
    # attention taps (hiseg.modeling.attention_taps)
    def attention_blocks(self) -> List[nn.Module]:
        """The transformer's blocks."""
        return list(self.vit.blocks)

    @torch.no_grad()
    def class_attention(self, images: torch.Tensor, block: int = -1,
                        features: Sequence[str] = ()) -> Dict[str, object]:
        """The class token's attention over the patch tokens of block ``block`` from one forward
        pass: ``attn`` (B, heads, h*w), ``labels`` (B, H, W) int64 each pixel's patch (raster
        order; the patch grid covers the image, timm pads bottom / right), ``grid`` (h, w) and
        ``output`` (``forward(images, features)`` of that pass)."""
        if self.vit.cls_token is None:
            raise ValueError("the ViT has no class token (MODEL.VIT.CLASS_TOKEN is False): no class attention")
        blk = self.attention_blocks()[block]
        with tap_qkv(blk, detach=True) as tap:
            out = self(images, features)
        attn = class_attention_from_qkv(blk.attn, tap.qkv, None, num_prefix=self.num_prefix_tokens)
        h, w = out["patch_tokens"].shape[-2:]
        if attn.shape[-1] != h * w:
            raise RuntimeError(f"{attn.shape[-1]} patch tokens for a {h}x{w} grid")
        height, width = images.shape[-2:]
        p = self.patch_size
        rows = torch.arange(height, device=images.device) // p
        cols = torch.arange(width, device=images.device) // p
        labels = (rows[:, None] * w + cols[None, :]).expand(images.shape[0], -1, -1)
        return {"attn": attn, "labels": labels, "grid": (h, w), "output": out}

    def key_features(self, x: torch.Tensor, return_grid: bool = False):
        """Keys of the last block's self-attention for the patch tokens, (B, h*w, D).

        Hooked on ``blocks[-1].attn.qkv`` (output ``[q | k | v]``, each head-major, so the key
        part equals the heads' keys concatenated); class / register tokens are removed; raster
        order over the (h, w) patch grid. ``return_grid=True`` also returns (h, w). Runs under
        the caller's grad mode and leaves the train / eval mode as it is.
        """
        with tap_qkv(self.vit.blocks[-1]) as tap:
            _, fmap = self.forward_tokens(x)
        k = split_qkv(tap.qkv)[1][:, self.num_prefix_tokens:]
        h, w = fmap.shape[-2:]
        if k.shape[1] != h * w:
            raise RuntimeError(f"{k.shape[1]} key tokens for a {h}x{w} patch grid")
        return (k, (h, w)) if return_grid else k


def run_vit_blocks(blocks, tokens: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
    """``tokens`` through the timm blocks in order, each through ``torch.utils.checkpoint`` when
    ``checkpointed`` and gradients are recorded (``hiseg.modeling.activation_checkpointing``)."""
    for blk in blocks:
        tokens = maybe_checkpoint(blk, tokens, enabled=checkpointed)
    return tokens


def _preset(name: str, **kwargs) -> ViTBackbone:
    return ViTBackbone(**{**VIT_PRESETS[name], "patch_size": 16, **kwargs})


def vit_small(**kwargs) -> ViTBackbone:
    """ViT-S: 384-d, 6 heads, 12 blocks (DINO ``dino_deitsmall{8,16}``), patch 16; kwargs override."""
    return _preset("vit_small", **kwargs)


def vit_base(**kwargs) -> ViTBackbone:
    """ViT-B: 768-d, 12 heads, 12 blocks (DINO ``dino_vitbase{8,16}``), patch 16; kwargs override."""
    return _preset("vit_base", **kwargs)


def vit_kwargs_from_cfg(cfg, input_shape=None) -> dict:
    """The ViT's constructor arguments from ``MODEL.VIT`` (shared by every ViT-based backbone:
    this one and OAP's ViT-Adapter); the pyramid keys are left to the caller."""
    if "VIT" not in cfg.MODEL:
        raise KeyError("MODEL.VIT is missing: call hiseg.modeling.add_vit_config(cfg) before merging")
    v = cfg.MODEL.VIT
    in_chans = input_shape.channels if input_shape is not None and input_shape.channels else len(cfg.MODEL.PIXEL_MEAN)
    return dict(
        embed_dim=v.EMBED_DIM, depth=v.DEPTH, num_heads=v.NUM_HEADS, patch_size=v.PATCH_SIZE,
        mlp_ratio=v.MLP_RATIO, drop_path_rate=v.DROP_PATH_RATE,
        img_size=v.IMG_SIZE if isinstance(v.IMG_SIZE, int) else tuple(v.IMG_SIZE),
        class_token=v.CLASS_TOKEN, reg_tokens=v.REG_TOKENS, no_embed_class=v.NO_EMBED_CLASS,
        layer_scale=v.LAYER_SCALE or None, final_norm=v.FINAL_NORM, frozen=v.FROZEN, in_chans=in_chans,
        activation_checkpointing=v.ACTIVATION_CHECKPOINTING)


@BACKBONE_REGISTRY.register()
def build_vit_backbone(cfg, input_shape=None) -> ViTBackbone:
    """Registered as ``MODEL.BACKBONE.NAME: build_vit_backbone`` (needs ``add_vit_config``)."""
    kwargs = vit_kwargs_from_cfg(cfg, input_shape)
    v = cfg.MODEL.VIT
    return ViTBackbone(out_features=v.OUT_FEATURES, out_channels=v.OUT_CHANNELS, norm=v.NORM, **kwargs)
