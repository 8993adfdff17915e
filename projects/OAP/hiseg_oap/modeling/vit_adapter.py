"""ViT-Adapter (Chen et al. 2023) on our timm ViT: OAP's multi-scale encoder (Sec. 4.3, 5.1).

Structure (ViT-Adapter's, generalised to any patch size and image size):

* **Spatial prior module** (:class:`SpatialPriorModule`): a conv stem (three 3x3 convs, the
  first of stride 2, then a stride-2 max pool: stride 4) and three stride-2 3x3 convs (strides
  8, 16, 32), every conv followed by a norm (GroupNorm by default) and ReLU; 1x1 convs project
  each of the four maps to the ViT width D. The stride 8/16/32 maps, plus a per-level
  embedding, are flattened and concatenated into the spatial token sequence ``c``.
* **Interactions** (:class:`InteractionBlock`): the ViT blocks are split into 4 contiguous,
  evenly spaced stages. Before a stage the **injector** updates the ViT patch tokens,
  ``x <- x + gamma * MSDeformAttn(LN(x) -> LN(c))`` (queries: patch tokens; values: the 3
  spatial levels; gamma a learnable per-channel scale); after the stage the **extractor**
  updates the spatial tokens, ``c <- c + MSDeformAttn(LN(c) -> LN(x))`` (queries: the spatial
  tokens; values: the patch-token map) followed by ``c <- c + ConvFFN(LN(c))`` (Linear ->
  3x3 depthwise conv per level -> GELU -> Linear). The last stage has two extra extractors.
  Prefix tokens (class / register) go through the ViT blocks but are neither injected into nor
  read by the extractors.
* **Outputs**: ``res3/res4/res5`` (strides 8/16/32) are the spatial tokens as maps; ``res2``
  (stride 4) is a stride-2 transposed conv of the stride-8 map plus the stem's stride-4 map.
  Each level adds the patch-token map at the end of stage i (i = 1..4 for res2..res5) resampled
  from the patch stride (bilinear upsampling, or average pooling for integer downsampling),
  and is normalised (channel LayerNorm by default; no SyncBatchNorm needed).

Deformable-attention reference points are the query cells' centres in image pixels, normalised
by the extent of each value level, so every level lines up exactly for any patch size and any
image size (ViT-Adapter assumes patch 16 and sizes divisible by 32).

**Zero initialisation** (``zero_init=True``, OAP Sec. 4.3): the adapter starts as an exact
no-op on the pretrained ViT, so OAP's pseudo-masks are meaningful from the first step:

* injector ``gamma = 0``: the ViT tokens after every block equal the plain ViT's;
* the spatial prior module's four 1x1 output projections (weights and biases), the level
  embedding, and the bias of the stride-4 transposed conv are zero, and so are the output
  projections of every extractor (MSDeformAttn ``output_proj`` and ConvFFN ``fc2``, weights
  and biases): the spatial tokens ``c`` are exactly zero and stay zero through the extractors,
  so each output level is ``norm(resample(ViT tokens of stage i))``, the pretrained features.

Everything else (stem convs, deformable-attention projections and offsets, ConvFFN ``fc1`` and
depthwise conv, the transposed conv's weight, norms) keeps its usual random / Deformable-DETR
initialisation, so gradients flow once the zeros move: at the first step the zeroed tensors
(and the ViT) get gradients; the extractors' attention and the injector's gamma follow at the
second step, the injectors' attention once gamma is non-zero. With ``zero_init=False`` the
initialisation is ViT-Adapter's (gamma = ``init_values``, normal level embedding).

**Activation checkpointing** (``MODEL.VIT.ACTIVATION_CHECKPOINTING``, the key of the ViT it
wraps): every ViT block, injector and extractor is recomputed in the backward pass instead of
keeping its activations (ViT-Adapter's ``with_cp`` covers the same modules;
:mod:`hiseg.modeling.activation_checkpointing`). The spatial prior module (GroupNorm by default, but any
detectron2 norm may be configured, BatchNorm included) and the output norms are not recomputed.

Parameters: the ViT under ``vit.*`` with timm (= DINO) names, exactly as in
:class:`hiseg.modeling.ViTBackbone`, so the same checkpoints load; the adapter under ``spm``,
``level_embed``, ``interactions``, ``up`` and ``out_norms``.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.layers import get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from timm.layers import DropPath
from torch import nn

from hiseg.compat import shape_spec
from hiseg.modeling.attention_taps import split_qkv, tap_qkv
from hiseg.modeling.activation_checkpointing import maybe_checkpoint
from hiseg.modeling.vit import ChannelLayerNorm, make_timm_vit, vit_kwargs_from_cfg

from .ms_deform_attn import MSDeformAttn, level_start_index, spatial_shapes_tensor

__all__ = [
    "ConvFFN", "Extractor", "Injector", "InteractionBlock", "SpatialPriorModule", "ViTAdapterBackbone",
    "build_vit_adapter_backbone", "even_interaction_indexes", "resample_stride",
]

_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
_SPATIAL_STRIDES = (8, 16, 32)  # the levels of the spatial token sequence c


def _norm2d(norm: str, channels: int) -> nn.Module:
    """"GN": GroupNorm with gcd(32, C) groups; "LN": channel LayerNorm; "": none; else detectron2's."""
    if not norm:
        return nn.Identity()
    if norm == "GN":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if norm == "LN":
        return ChannelLayerNorm(channels)
    return get_norm(norm, channels)


def _fit(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Crop (or replicate-pad) the bottom / right of a (B, C, h, w) map to ``size``."""
    h, w = x.shape[-2:]
    th, tw = size
    x = x[..., :th, :tw]
    if h < th or w < tw:
        x = F.pad(x, (0, max(0, tw - w), 0, max(0, th - h)), mode="replicate")
    return x


def resample_stride(x: torch.Tensor, in_stride: int, out_stride: int, size: Tuple[int, int]) -> torch.Tensor:
    """Resample a (B, C, h, w) map of stride ``in_stride`` to ``out_stride`` and size ``size``.

    Integer upsampling: bilinear (align_corners=False) by the factor; integer downsampling:
    average pooling over factor x factor cells (ceil mode: partial border cells average what
    they have; for a factor 2 this equals ViT-Adapter's bilinear 0.5x); otherwise bilinear
    (antialiased when shrinking) to the nearest size. The result is cropped / padded on the
    bottom / right to ``size`` (both maps start at the image's top-left corner).
    """
    size = (int(size[0]), int(size[1]))
    if in_stride == out_stride:
        y = x
    elif in_stride % out_stride == 0:
        y = F.interpolate(x, scale_factor=in_stride // out_stride, mode="bilinear", align_corners=False)
    elif out_stride % in_stride == 0:
        k = out_stride // in_stride
        y = F.avg_pool2d(x, kernel_size=k, stride=k, ceil_mode=True)
    else:
        h, w = x.shape[-2:]
        target = (max(1, round(h * in_stride / out_stride)), max(1, round(w * in_stride / out_stride)))
        y = F.interpolate(x, size=target, mode="bilinear", align_corners=False, antialias=out_stride > in_stride)
    return _fit(y, size)


def even_interaction_indexes(depth: int, num: int = 4) -> List[Tuple[int, int]]:
    """Split ``depth`` blocks into ``num`` contiguous stages: [(first, last), ...] (inclusive).
    Depth 12 gives ViT-Adapter's [(0, 2), (3, 5), (6, 8), (9, 11)]."""
    if depth < num:
        raise ValueError(f"a ViT of depth {depth} cannot hold {num} interaction stages")
    bounds = [round(i * depth / num) for i in range(num + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(num)]


def _cell_centres(shapes: Sequence[Tuple[int, int]], strides: Sequence[int], device, dtype) -> torch.Tensor:
    """(sum h*w, 2) pixel (x, y) centres of the cells of maps of the given shapes and strides."""
    out = []
    for (h, w), s in zip(shapes, strides):
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) * s
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        out.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], -1))
    return torch.cat(out)


def _reference_points(centres: torch.Tensor, value_shapes: Sequence[Tuple[int, int]],
                      value_strides: Sequence[int]) -> torch.Tensor:
    """(1, Lq, L, 2): query pixel centres normalised by each value level's extent (W_l s_l, H_l s_l)."""
    extent = torch.tensor([[w * s, h * s] for (h, w), s in zip(value_shapes, value_strides)],
                          device=centres.device, dtype=centres.dtype)
    return (centres[:, None, :] / extent[None]).unsqueeze(0)


class SpatialPriorModule(nn.Module):
    """Conv stem giving (stride 4, 8, 16, 32) maps, each projected to ``embed_dim`` by a 1x1 conv."""

    def __init__(self, inplanes: int = 64, embed_dim: int = 384, in_chans: int = 3, norm: str = "GN"):
        super().__init__()

        def conv(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=not norm), _norm2d(norm, cout),
                    nn.ReLU(inplace=True)]

        self.stem = nn.Sequential(*conv(in_chans, inplanes, 2), *conv(inplanes, inplanes, 1),
                                  *conv(inplanes, inplanes, 1), nn.MaxPool2d(3, stride=2, padding=1))
        self.conv2 = nn.Sequential(*conv(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*conv(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*conv(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, 1)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return [self.fc1(c1), self.fc2(c2), self.fc3(c3), self.fc4(c4)]


class ConvFFN(nn.Module):
    """Linear -> 3x3 depthwise conv (on each level's map, shared weights) -> GELU -> Linear."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = nn.Conv2d(hidden_features, hidden_features, 3, padding=1, groups=hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, shapes: Sequence[Tuple[int, int]]) -> torch.Tensor:
        x = self.fc1(x)
        b, _, c = x.shape
        parts, start = [], 0
        for h, w in shapes:
            t = x[:, start:start + h * w].transpose(1, 2).reshape(b, c, h, w)
            parts.append(self.dwconv(t).flatten(2).transpose(1, 2))
            start += h * w
        x = self.drop(self.act(torch.cat(parts, 1)))
        return self.drop(self.fc2(x))


class Injector(nn.Module):
    """ViT patch tokens (queries) attend to the spatial levels: ``x + gamma * attn``."""

    def __init__(self, dim: int, num_heads: int, n_points: int, n_levels: int = 3, ratio: float = 1.0,
                 init_values: float = 0.0):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSDeformAttn(dim, n_levels, num_heads, n_points, ratio)
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, query, reference_points, feat, spatial_shapes, start_index):
        attn = self.attn(self.query_norm(query), reference_points, self.feat_norm(feat), spatial_shapes, start_index)
        return query + self.gamma * attn


class Extractor(nn.Module):
    """Spatial tokens (queries) attend to the ViT patch-token map, then a ConvFFN; both residual."""

    def __init__(self, dim: int, num_heads: int, n_points: int, n_levels: int = 1, ratio: float = 1.0,
                 with_cffn: bool = True, cffn_ratio: float = 0.25, drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSDeformAttn(dim, n_levels, num_heads, n_points, ratio)
        self.with_cffn = with_cffn
        if with_cffn:
            self.ffn = ConvFFN(dim, int(dim * cffn_ratio), drop)
            self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, query, reference_points, feat, spatial_shapes, start_index, query_shapes):
        query = query + self.attn(self.query_norm(query), reference_points, self.feat_norm(feat), spatial_shapes,
                                  start_index)
        if self.with_cffn:
            query = query + self.drop_path(self.ffn(self.ffn_norm(query), query_shapes))
        return query

    def zero_output(self):
        """Zero the residual branches' last layers: the extractor is then the identity on c."""
        for layer in (self.attn.output_proj,) + ((self.ffn.fc2,) if self.with_cffn else ()):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)


class InteractionBlock(nn.Module):
    """Injector, a run of ViT blocks, extractor (and optional extra extractors)."""

    def __init__(self, dim: int, num_heads: int, n_points: int, ratio: float = 1.0, init_values: float = 0.0,
                 with_cffn: bool = True, cffn_ratio: float = 0.25, drop: float = 0.0, drop_path: float = 0.0,
                 extra_extractor: bool = False):
        super().__init__()
        self.injector = Injector(dim, num_heads, n_points, len(_SPATIAL_STRIDES), ratio, init_values)
        kw = dict(num_heads=num_heads, n_points=n_points, n_levels=1, ratio=ratio, with_cffn=with_cffn,
                  cffn_ratio=cffn_ratio, drop=drop)
        self.extractor = Extractor(dim, drop_path=drop_path, **kw)
        self.extra_extractors = nn.ModuleList([Extractor(dim, drop_path=0.0, **kw) for _ in range(2)]
                                              if extra_extractor else [])

    def extractors(self) -> List[Extractor]:
        return [self.extractor, *self.extra_extractors]

    def forward(self, tokens: torch.Tensor, c: torch.Tensor, blocks: Sequence[nn.Module], num_prefix: int,
                geometry: dict, checkpointed: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """``checkpointed``: run the injector, each ViT block and each extractor through
        ``torch.utils.checkpoint`` (when gradients are recorded)."""
        prefix, x = tokens[:, :num_prefix], tokens[:, num_prefix:]
        x = maybe_checkpoint(self.injector, x, geometry["inj_ref"], c, geometry["c_shapes"], geometry["c_start"],
                             enabled=checkpointed)
        tokens = torch.cat([prefix, x], 1) if num_prefix else x
        for blk in blocks:
            tokens = maybe_checkpoint(blk, tokens, enabled=checkpointed)
        x = tokens[:, num_prefix:]
        for ext in self.extractors():
            c = maybe_checkpoint(ext, c, geometry["ext_ref"], x, geometry["x_shapes"], geometry["x_start"],
                                 geometry["c_shape_list"], enabled=checkpointed)
        return tokens, c


class ViTAdapterBackbone(Backbone):
    """timm ViT + ViT-Adapter; outputs ``res2..res5`` (strides 4..32, ``embed_dim`` channels).

    Inputs are normalised images (B, C, H, W) of any size (sizes that are multiples of
    :attr:`size_divisibility` line every level up without padding inside the model).
    """

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
        frozen: bool = False,
        in_chans: int = 3,
        conv_inplanes: int = 64,
        spm_norm: str = "GN",
        deform_num_heads: int = 6,
        n_points: int = 4,
        deform_ratio: float = 0.5,
        init_values: float = 0.0,
        interaction_indexes: Optional[Sequence[Sequence[int]]] = None,
        with_cffn: bool = True,
        cffn_ratio: float = 0.25,
        adapter_drop_path_rate: float = 0.0,
        extra_extractor: bool = True,
        add_vit_feature: bool = True,
        zero_init: bool = True,
        out_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
        out_norm: str = "LN",
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        unknown = [k for k in out_features if k not in _STRIDES]
        if unknown or not out_features:
            raise ValueError(f"ViT-Adapter outputs are res2..res5, got {list(out_features)}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        img_size = (int(img_size), int(img_size)) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
        self.patch_size = int(patch_size)
        self.embed_dim = embed_dim
        self.final_norm = final_norm
        self.add_vit_feature = add_vit_feature
        self.zero_init = zero_init
        self.init_values = float(init_values)
        self.vit = make_timm_vit(
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=self.patch_size,
            mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate, img_size=img_size, class_token=class_token,
            reg_tokens=reg_tokens, no_embed_class=no_embed_class, layer_scale=layer_scale, in_chans=in_chans)
        self.vit.set_grad_checkpointing(bool(activation_checkpointing))
        if interaction_indexes:
            idx = [(int(a), int(b)) for a, b in interaction_indexes]
        else:
            idx = even_interaction_indexes(depth, 4)
        if len(idx) != 4 or idx[0][0] != 0 or idx[-1][1] != depth - 1 or any(
                b < a for a, b in idx) or any(idx[i + 1][0] != idx[i][1] + 1 for i in range(3)):
            raise ValueError(f"interaction indexes {idx} must be 4 contiguous [first, last] runs covering "
                             f"blocks 0..{depth - 1}")
        self.interaction_indexes = idx

        self.spm = SpatialPriorModule(conv_inplanes, embed_dim, in_chans, spm_norm)
        self.level_embed = nn.Parameter(torch.zeros(len(_SPATIAL_STRIDES), embed_dim))
        self.interactions = nn.ModuleList([
            InteractionBlock(embed_dim, deform_num_heads, n_points, deform_ratio, init_values, with_cffn,
                             cffn_ratio, drop=0.0, drop_path=adapter_drop_path_rate,
                             extra_extractor=extra_extractor and i == len(idx) - 1)
            for i in range(len(idx))])
        self.up = nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2)
        self._out_features = list(out_features)
        self.out_norms = nn.ModuleDict({k: _norm2d(out_norm, embed_dim) for k in self._out_features})
        self._out_feature_strides = {k: _STRIDES[k] for k in self._out_features}
        self._out_feature_channels = {k: embed_dim for k in self._out_features}
        self.reset_adapter_parameters()
        if frozen:
            for p in self.vit.parameters():
                p.requires_grad_(False)
        # The ViT's final LayerNorm is not on the path to res2..res5 (it only normalises
        # forward_tokens()): frozen, so that DDP without find_unused_parameters (detectron2's
        # default) does not stop on a parameter that never gets a gradient.
        for p in self.vit.norm.parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------------------------------------
    def adapter_modules(self) -> List[nn.Module]:
        return [self.spm, self.interactions, self.up, self.out_norms]

    @torch.no_grad()
    def reset_adapter_parameters(self):
        """(Re-)initialise the adapter (never the ViT): ViT-Adapter's scheme (truncated-normal
        linears, fan-out normal convs, unit norms, Deformable DETR's MSDeformAttn), then the
        zero initialisation when ``zero_init`` (see the module docstring)."""
        for root in self.adapter_modules():
            for m in root.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                    fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                    nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)):
                    if m.weight is not None:
                        nn.init.ones_(m.weight)
                        nn.init.zeros_(m.bias)
            for m in root.modules():
                if isinstance(m, MSDeformAttn):
                    m.reset_parameters()
        for blk in self.interactions:
            blk.injector.gamma.fill_(0.0 if self.zero_init else self.init_values)
        if self.zero_init:
            for fc in (self.spm.fc1, self.spm.fc2, self.spm.fc3, self.spm.fc4):
                nn.init.zeros_(fc.weight)
                nn.init.zeros_(fc.bias)
            nn.init.zeros_(self.level_embed)
            nn.init.zeros_(self.up.bias)
            for blk in self.interactions:
                for ext in blk.extractors():
                    ext.zero_output()
        else:
            nn.init.normal_(self.level_embed)

    def adapter_named_parameters(self):
        """(name, parameter) of everything outside the ViT."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("vit.")]

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.vit.num_prefix_tokens)

    @property
    def size_divisibility(self) -> int:
        return math.lcm(self.patch_size, 32)

    def output_shape(self):
        return {k: shape_spec(channels=self._out_feature_channels[k], stride=self._out_feature_strides[k])
                for k in self._out_features}

    # ------------------------------------------------------------------------------------------
    def _geometry(self, grid, c_shapes, device, dtype) -> dict:
        """Spatial shapes, level offsets and reference points of the injectors and extractors."""
        p = self.patch_size
        c_t = spatial_shapes_tensor(c_shapes, device)
        x_t = spatial_shapes_tensor([grid], device)
        x_centres = _cell_centres([grid], [p], device, dtype)
        c_centres = _cell_centres(c_shapes, _SPATIAL_STRIDES, device, dtype)
        return {
            "c_shapes": c_t, "c_start": level_start_index(c_t), "c_shape_list": list(c_shapes),
            "x_shapes": x_t, "x_start": level_start_index(x_t),
            "inj_ref": _reference_points(x_centres, c_shapes, _SPATIAL_STRIDES),
            "ext_ref": _reference_points(c_centres, [grid], [p]),
        }

    def forward_features(self, x: torch.Tensor, return_tokens: bool = False):
        """Run ViT + adapter. Returns the res2..res5 dict (only the configured outputs), and with
        ``return_tokens=True`` also (prefix tokens (B, P, D), patch map (B, D, h, w)) after the
        last block (and the ViT's final LayerNorm when ``final_norm``), as
        :meth:`hiseg.modeling.ViTBackbone.forward_tokens` returns them."""
        if x.dim() != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        b = x.shape[0]
        img_h, img_w = x.shape[-2:]
        sizes = {k: (-(-img_h // s), -(-img_w // s)) for k, s in _STRIDES.items()}
        c1, c2, c3, c4 = self.spm(x)
        for name, t in zip(_STRIDES, (c1, c2, c3, c4)):
            if tuple(t.shape[-2:]) != sizes[name]:  # only possible with an unusual stem
                raise RuntimeError(f"spatial prior {name} is {tuple(t.shape[-2:])}, expected {sizes[name]}")
        c_maps = (c2, c3, c4)
        c_shapes = [tuple(t.shape[-2:]) for t in c_maps]
        c = torch.cat([t.flatten(2).transpose(1, 2) + self.level_embed[i] for i, t in enumerate(c_maps)], 1)

        vit = self.vit
        t = vit.patch_embed(x)  # (B, h, w, D)
        grid = (t.shape[1], t.shape[2])
        t = vit._pos_embed(t)
        t = vit.patch_drop(t)
        t = vit.norm_pre(t)
        npre = self.num_prefix_tokens
        geometry = self._geometry(grid, c_shapes, x.device, c.dtype)
        stage_maps = []
        for blk, (first, last) in zip(self.interactions, self.interaction_indexes):
            t, c = blk(t, c, vit.blocks[first:last + 1], npre, geometry, checkpointed=vit.grad_checkpointing)
            stage_maps.append(t[:, npre:].transpose(1, 2).reshape(b, self.embed_dim, *grid))

        d = self.embed_dim
        parts, start = [], 0
        for h, w in c_shapes:
            parts.append(c[:, start:start + h * w].transpose(1, 2).reshape(b, d, h, w))
            start += h * w
        f2, f3, f4 = parts
        f1 = _fit(self.up(f2), sizes["res2"]) + c1
        feats = dict(zip(_STRIDES, (f1, f2, f3, f4)))
        out = {}
        for i, (name, stride) in enumerate(_STRIDES.items()):
            if name not in self._out_features:
                continue
            f = feats[name]
            if self.add_vit_feature:
                f = f + resample_stride(stage_maps[i], self.patch_size, stride, sizes[name])
            out[name] = self.out_norms[name](f)
        if not return_tokens:
            return out
        if self.final_norm:
            t = vit.norm(t)
        return out, (t[:, :npre], t[:, npre:].transpose(1, 2).reshape(b, d, *grid))

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.forward_features(x)

    def forward_tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(prefix tokens, patch map) of the adapted ViT (same contract as ViTBackbone's)."""
        return self.forward_features(x, return_tokens=True)[1]

    def key_features(self, x: torch.Tensor, return_grid: bool = False):
        """Keys of the last ViT block's self-attention for the patch tokens, (B, h*w, D), with the
        adapter's injections in effect (equal to the plain ViT's at zero init). Same contract as
        :meth:`hiseg.modeling.ViTBackbone.key_features`."""
        with tap_qkv(self.vit.blocks[-1]) as tap:
            _, (_, fmap) = self.forward_features(x, return_tokens=True)
        k = split_qkv(tap.qkv)[1][:, self.num_prefix_tokens:]
        h, w = fmap.shape[-2:]
        return (k, (h, w)) if return_grid else k


@BACKBONE_REGISTRY.register()
def build_vit_adapter_backbone(cfg, input_shape=None) -> ViTAdapterBackbone:
    """``MODEL.BACKBONE.NAME: build_vit_adapter_backbone``: the ViT from ``MODEL.VIT.*`` (its
    pyramid keys OUT_FEATURES / OUT_CHANNELS / NORM are not used), the adapter from
    ``MODEL.VIT_ADAPTER.*`` (needs ``add_vit_adapter_config``)."""
    if "VIT" not in cfg.MODEL or "VIT_ADAPTER" not in cfg.MODEL:
        raise KeyError("MODEL.VIT / MODEL.VIT_ADAPTER missing: call hiseg_oap.modeling.add_vit_adapter_config(cfg)")
    a = cfg.MODEL.VIT_ADAPTER
    return ViTAdapterBackbone(
        **vit_kwargs_from_cfg(cfg, input_shape),
        conv_inplanes=a.CONV_INPLANES, spm_norm=a.SPM_NORM, deform_num_heads=a.DEFORM_NUM_HEADS,
        n_points=a.N_POINTS, deform_ratio=a.DEFORM_RATIO, init_values=a.INIT_VALUES,
        interaction_indexes=[tuple(r) for r in a.INTERACTION_INDEXES] or None, with_cffn=a.WITH_CFFN,
        cffn_ratio=a.CFFN_RATIO, adapter_drop_path_rate=a.DROP_PATH_RATE, extra_extractor=a.EXTRA_EXTRACTOR,
        add_vit_feature=a.ADD_VIT_FEATURE, zero_init=a.ZERO_INIT, out_features=a.OUT_FEATURES,
        out_norm=a.OUT_NORM)
