"""OAP's pixel decoder: Mask2Former's multi-scale deformable-attention pixel decoder.

OAP (Sec. 4.1) feeds the student's multi-scale encoder features to "a mask decoder (Cheng et
al. (2022))", and Sec. 5.1 says "for the mask decoder, we use the official setting of
Mask2Former". The pixel decoder is the first half of that mask decoder:

1. **Input projections**: every deformable level (``DEFORM_IN_FEATURES``, res3..res5 by default)
   goes through a 1x1 conv to ``conv_dim`` channels and a GroupNorm.
2. **Deformable transformer encoder**: ``enc_layers`` post-norm layers of multi-scale deformable
   self-attention (:class:`~hiseg_oap.modeling.ms_deform_attn.MSDeformAttn` over all deformable levels)
   and a ReLU FFN. The attention query is the token plus its position code: a 2-D sine embedding
   (:func:`sine_position_embedding`) plus a learned per-level embedding.
3. **FPN top-down path**: each finer input (``res2``) gets a 1x1 lateral conv + norm, the
   bilinearly upsampled coarser output is added, and a 3x3 conv + norm + ReLU follows.
4. **Mask features**: a 1x1 conv of the finest output to ``mask_dim`` channels, at stride
   ``common_stride``.

Choices where neither paper pins things down (the decoder is trained from scratch in OAP, so
nothing has to match a released checkpoint bit for bit):

* **Reference points** of the encoder: a query cell's centre in image pixels, normalised by the
  extent ``(W_l * s_l, H_l * s_l)`` of each value level ``l`` (the same geometry as our
  ViT-Adapter). For sizes divisible by the coarsest stride this is exactly Mask2Former's
  ``(i + 0.5) / H_l`` on every level; for other sizes (e.g. 72 x 104, whose stride-32 map is
  rounded up) the levels stay aligned in the image instead of drifting by a fraction of a cell.
* **"GN"** is GroupNorm with ``gcd(32, C)`` groups (32 for C = 256, as in Mask2Former) so that
  small test widths also work; GroupNorm is per sample, so batch 1 is fine.
* The forward pass runs in float32 with autocast off, as Mask2Former does for its deformable
  encoder.
* Inputs in ``input_shape`` that are neither deformable levels nor between ``common_stride`` and
  the finest deformable stride are ignored.
"""
import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from fvcore.nn import weight_init
from torch import nn

from hiseg.modeling.vit import ChannelLayerNorm

from .ms_deform_attn import MSDeformAttn, level_start_index, spatial_shapes_tensor

__all__ = ["MSDeformAttnPixelDecoder", "DeformableEncoderLayer", "DeformableEncoder", "sine_position_embedding",
           "NUM_MULTI_SCALE_LEVELS"]

#: The masked-attention decoder attends to this many scales (Mask2Former: "always use 3 scales").
NUM_MULTI_SCALE_LEVELS = 3


def _norm2d(norm: str, channels: int) -> nn.Module:
    """"GN": GroupNorm with gcd(32, C) groups; "LN": channel LayerNorm; "": none; else detectron2's."""
    if not norm:
        return None
    if norm == "GN":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if norm == "LN":
        return ChannelLayerNorm(channels)
    return get_norm(norm, channels)


def sine_position_embedding(height: int, width: int, channels: int, device=None, dtype=torch.float32,
                            temperature: float = 10000.0) -> torch.Tensor:
    """2-D sine position code (DETR / Mask2Former ``PositionEmbeddingSine(normalize=True)``), (channels, H, W).

    Row ``i`` and column ``j`` are mapped to ``2 pi (i + 1) / H`` and ``2 pi (j + 1) / W``; the
    first ``channels / 2`` channels encode the row, the rest the column, each alternating
    ``sin(p / T^(2k / (C/2)))`` (even channels) and ``cos`` (odd channels), ``T = temperature``.
    No padding mask is needed: every input here is a full map.
    """
    if channels % 2:
        raise ValueError(f"the sine position embedding needs an even number of channels, got {channels}")
    if height < 1 or width < 1:
        raise ValueError(f"the sine position embedding needs a non-empty map, got {height} x {width}")
    half = channels // 2
    scale = 2.0 * math.pi
    ys = torch.arange(1, height + 1, device=device, dtype=torch.float32) * (scale / height)
    xs = torch.arange(1, width + 1, device=device, dtype=torch.float32) * (scale / width)
    k = torch.arange(half, device=device, dtype=torch.float32)
    freq = temperature ** (2.0 * torch.div(k, 2, rounding_mode="floor") / half)
    even = (torch.arange(half, device=device) % 2) == 0

    def encode(p: torch.Tensor) -> torch.Tensor:  # (N,) -> (half, N)
        angle = p[None, :] / freq[:, None]
        return torch.where(even[:, None], angle.sin(), angle.cos())

    pos_y = encode(ys)[:, :, None].expand(half, height, width)
    pos_x = encode(xs)[:, None, :].expand(half, height, width)
    return torch.cat([pos_y, pos_x], 0).to(dtype)


def _encoder_reference_points(shapes: Sequence[Tuple[int, int]], strides: Sequence[int], device,
                              dtype) -> torch.Tensor:
    """(1, sum h*w, L, 2): every cell's centre in image pixels, normalised by each level's extent."""
    centres = []
    for (h, w), s in zip(shapes, strides):
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) * s
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) * s
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        centres.append(torch.stack([gx.flatten(), gy.flatten()], -1))
    centres = torch.cat(centres)  # (S, 2) as (x, y)
    extent = torch.tensor([[w * s, h * s] for (h, w), s in zip(shapes, strides)], device=device, dtype=dtype)
    return (centres[:, None, :] / extent[None]).unsqueeze(0)


class DeformableEncoderLayer(nn.Module):
    """One post-norm encoder layer: deformable self-attention, then a ReLU FFN, each residual + LayerNorm."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float, n_levels: int, n_heads: int,
                 n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        for lin in (self.linear1, self.linear2):  # Mask2Former: xavier on every matrix of the encoder
            nn.init.xavier_uniform_(lin.weight)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes: torch.Tensor, start_index: torch.Tensor) -> torch.Tensor:
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, start_index)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableEncoder(nn.Module):
    """A stack of :class:`DeformableEncoderLayer` over the flattened, concatenated levels."""

    def __init__(self, num_layers: int, **layer_kw):
        super().__init__()
        self.layers = nn.ModuleList([DeformableEncoderLayer(**layer_kw) for _ in range(num_layers)])

    def forward(self, src, pos, reference_points, spatial_shapes, start_index):
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, start_index)
        return src


class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former's pixel decoder (see the module docstring): backbone features -> mask features and
    three multi-scale maps for the masked-attention decoder.

    Args:
        input_shape: name -> ShapeSpec (channels, stride) of the features it reads.
        conv_dim: width of the encoder, the FPN and the multi-scale outputs.
        mask_dim: channels of the mask features.
        norm: norm of the input projections and FPN convs ("GN", "LN", "" or a detectron2 name).
            The input projections always use GroupNorm (Mask2Former's); "" leaves them un-normalised.
        deform_in_features: the features refined by the deformable encoder (at least one).
        enc_layers: deformable encoder layers (0 keeps the projected features).
        dim_feedforward, nheads, n_points, dropout: encoder layer sizes (Deformable DETR's names).
        common_stride: stride of the mask features; it must be the finest stride produced.
    """

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, conv_dim: int = 256, mask_dim: int = 256,
                 norm: str = "GN", deform_in_features: Sequence[str] = ("res3", "res4", "res5"), enc_layers: int = 6,
                 dim_feedforward: int = 1024, nheads: int = 8, n_points: int = 4, dropout: float = 0.0,
                 common_stride: int = 4):
        super().__init__()
        if not isinstance(input_shape, dict) or not input_shape:
            raise ValueError(f"input_shape must be a non-empty dict of name -> ShapeSpec, got {input_shape!r}")
        deform_in_features = list(deform_in_features)
        if not deform_in_features:
            raise ValueError("deform_in_features is empty: the pixel decoder needs at least one deformable level")
        missing = [f for f in deform_in_features if f not in input_shape]
        if missing:
            raise ValueError(f"deform_in_features {missing} are not in the input features {sorted(input_shape)}")
        if len(set(deform_in_features)) != len(deform_in_features):
            raise ValueError(f"deform_in_features has duplicates: {deform_in_features}")
        for name, spec in input_shape.items():
            if not spec.channels or not spec.stride:
                raise ValueError(f"input feature {name!r} needs channels and stride, got {spec}")
        if conv_dim < 2 or conv_dim % 2:
            raise ValueError(f"conv_dim must be even (sine position embedding), got {conv_dim}")
        if conv_dim % nheads:
            raise ValueError(f"conv_dim {conv_dim} is not divisible by nheads {nheads}")
        if enc_layers < 0 or common_stride < 1 or mask_dim < 1:
            raise ValueError(f"bad sizes: enc_layers={enc_layers}, common_stride={common_stride}, mask_dim={mask_dim}")

        # deformable levels, coarsest first (Mask2Former's order: res5, res4, res3)
        deform = sorted(deform_in_features, key=lambda k: -input_shape[k].stride)
        strides = [input_shape[k].stride for k in deform]
        if len(set(strides)) != len(strides):
            raise ValueError(f"deform_in_features {deform} must have distinct strides, got {strides}")
        self.deform_in_features = deform
        self.deform_strides = strides
        finest_deform = min(strides)
        # FPN levels: the other inputs between common_stride and the finest deformable stride, coarsest first
        fpn = [k for k, v in input_shape.items()
               if k not in deform and common_stride <= v.stride < finest_deform]
        fpn.sort(key=lambda k: -input_shape[k].stride)
        if len({input_shape[k].stride for k in fpn}) != len(fpn):
            raise ValueError(f"FPN features {fpn} must have distinct strides")
        self.fpn_in_features = fpn
        out_strides = strides + [input_shape[k].stride for k in fpn]
        if out_strides[-1] != common_stride:
            raise ValueError(f"common_stride {common_stride} is not the finest stride produced {out_strides[-1]} "
                             f"(deformable {deform} + FPN {fpn}); add the stride-{common_stride} feature to "
                             "the input features or change common_stride")
        if len(out_strides) < NUM_MULTI_SCALE_LEVELS:
            raise ValueError(f"the pixel decoder produces {len(out_strides)} levels {out_strides} but the "
                             f"masked-attention decoder needs {NUM_MULTI_SCALE_LEVELS}")
        self.out_strides = out_strides
        self.conv_dim, self.mask_dim, self.common_stride = conv_dim, mask_dim, common_stride

        self.input_proj = nn.ModuleList()
        for k in deform:
            proj = nn.Sequential(nn.Conv2d(input_shape[k].channels, conv_dim, kernel_size=1),
                                 nn.GroupNorm(math.gcd(32, conv_dim), conv_dim) if norm else nn.Identity())
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
            self.input_proj.append(proj)
        self.level_embed = nn.Parameter(torch.empty(len(deform), conv_dim))
        nn.init.normal_(self.level_embed)
        self.encoder = DeformableEncoder(enc_layers, d_model=conv_dim, dim_feedforward=dim_feedforward,
                                         dropout=dropout, n_levels=len(deform), n_heads=nheads, n_points=n_points)

        use_bias = not norm
        self.lateral_convs = nn.ModuleList()
        self.output_convs = nn.ModuleList()
        for k in fpn:
            lateral = Conv2d(input_shape[k].channels, conv_dim, kernel_size=1, bias=use_bias,
                             norm=_norm2d(norm, conv_dim))
            output = Conv2d(conv_dim, conv_dim, kernel_size=3, padding=1, bias=use_bias,
                            norm=_norm2d(norm, conv_dim), activation=F.relu)
            weight_init.c2_xavier_fill(lateral)
            weight_init.c2_xavier_fill(output)
            self.lateral_convs.append(lateral)
            self.output_convs.append(output)
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1)
        weight_init.c2_xavier_fill(self.mask_features)
        self._in_channels = {k: input_shape[k].channels for k in deform + fpn}

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        """``input_shape``: the backbone's ``output_shape()``; only ``PIXEL_DECODER.IN_FEATURES`` are kept."""
        p = cfg.MODEL.OAP.PIXEL_DECODER
        missing = [k for k in p.IN_FEATURES if k not in input_shape]
        if missing:
            raise ValueError(f"MODEL.OAP.PIXEL_DECODER.IN_FEATURES {missing} are not backbone outputs "
                             f"{sorted(input_shape)}")
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in p.IN_FEATURES},
            "conv_dim": p.CONV_DIM,
            "mask_dim": p.MASK_DIM,
            "norm": p.NORM,
            "deform_in_features": list(p.DEFORM_IN_FEATURES),
            "enc_layers": p.ENC_LAYERS,
            "dim_feedforward": p.DIM_FEEDFORWARD,
            "nheads": p.NHEADS,
            "n_points": p.N_POINTS,
            "dropout": p.DROPOUT,
            "common_stride": p.COMMON_STRIDE,
        }

    def _checked_inputs(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if not isinstance(features, dict):
            raise ValueError(f"features must be a dict of name -> (B, C, H, W) tensors, got {type(features)}")
        missing = [k for k in self._in_channels if k not in features]
        if missing:
            raise ValueError(f"the pixel decoder needs features {missing}, got {sorted(features)}")
        batch = None
        for k, c in self._in_channels.items():
            x = features[k]
            if x.dim() != 4 or x.shape[1] != c or x.shape[-1] < 1 or x.shape[-2] < 1:
                raise ValueError(f"feature {k!r} must be (B, {c}, H, W) with H, W >= 1, got {tuple(x.shape)}")
            if batch is None:
                batch = x.shape[0]
            elif x.shape[0] != batch:
                raise ValueError(f"feature {k!r} has batch {x.shape[0]}, others {batch}")
        return {k: features[k].float() for k in self._in_channels}

    def forward_features(self, features: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Returns ``(mask_features, multi_scale_features)``.

        ``mask_features``: (B, mask_dim, h, w) at stride ``common_stride``; ``multi_scale_features``:
        the first three outputs, coarsest first, each (B, conv_dim, h_l, w_l) (strides 32, 16, 8
        for the default res3..res5 deformable levels).
        """
        features = self._checked_inputs(features)
        dev = next(iter(features.values())).device
        with torch.autocast(device_type=dev.type, enabled=False):
            return self._forward(features)

    def forward(self, features: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Same as :meth:`forward_features`."""
        return self.forward_features(features)

    def _forward(self, features: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        srcs, pos, shapes = [], [], []
        for lvl, k in enumerate(self.deform_in_features):
            x = self.input_proj[lvl](features[k])
            b, c, h, w = x.shape
            shapes.append((h, w))
            srcs.append(x.flatten(2).transpose(1, 2))  # (B, hw, C)
            p = sine_position_embedding(h, w, c, device=x.device, dtype=x.dtype).flatten(1).t()
            pos.append((p + self.level_embed[lvl]).unsqueeze(0).expand(b, -1, -1))
        src = torch.cat(srcs, 1)
        pos = torch.cat(pos, 1)
        shapes_t = spatial_shapes_tensor(shapes, device=src.device)
        starts = level_start_index(shapes_t)
        ref = _encoder_reference_points(shapes, self.deform_strides, src.device, src.dtype)
        memory = self.encoder(src, pos, ref, shapes_t, starts)

        out = []
        for part, (h, w) in zip(memory.split([h * w for h, w in shapes], dim=1), shapes):
            out.append(part.transpose(1, 2).reshape(b, c, h, w))
        for k, lateral, output in zip(self.fpn_in_features, self.lateral_convs, self.output_convs):
            y = lateral(features[k])
            y = y + F.interpolate(out[-1], size=y.shape[-2:], mode="bilinear", align_corners=False)
            out.append(output(y))
        return self.mask_features(out[-1]), out[:NUM_MULTI_SCALE_LEVELS]
