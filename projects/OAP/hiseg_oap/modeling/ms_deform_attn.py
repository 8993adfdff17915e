"""Multi-scale deformable attention (Zhu et al. 2021, "Deformable DETR"), pure PyTorch.

Every query attends to ``n_points`` sampled locations on each of ``n_levels`` feature maps,
per head. The sampled locations are the query's reference point plus learned offsets (in
pixels of the level they sample); the samples are read by bilinear interpolation (outside the
map counts as zero) and averaged with learned weights, softmax-normalised over all levels and
points of a head.

* :func:`ms_deform_attn_pytorch`: the sampling + weighting core, built on
  ``F.grid_sample(align_corners=False, padding_mode="zeros")``. Runs on CPU and GPU, any dtype,
  differentiable in ``value``, ``sampling_locations`` and ``attention_weights``.
* :func:`ms_deform_attn_reference`: the same function written out as explicit bilinear
  interpolation (four corners per sample, indexing only, no ``grid_sample``); slow, for tests.
* :class:`MSDeformAttn`: the attention layer (value / offset / weight / output projections),
  initialised as in Deformable DETR.

Coordinates: ``sampling_locations[..., 0]`` is x (width), ``[..., 1]`` is y (height), both
normalised to [0, 1] over the level's map, with 0 and 1 at the outer edges of the border
pixels (the ``align_corners=False`` convention): pixel ``(i, j)`` has its centre at
``((j + 0.5) / W, (i + 0.5) / H)``.
"""
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MSDeformAttn", "ms_deform_attn_pytorch", "ms_deform_attn_reference", "level_start_index",
           "spatial_shapes_tensor"]

Shapes = Union[torch.Tensor, Sequence[Sequence[int]]]


def _shape_list(spatial_shapes: Shapes) -> List[Tuple[int, int]]:
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def _start_list(start_index, shapes: List[Tuple[int, int]]) -> List[int]:
    """Checked level offsets into the flattened value (computed from ``shapes`` when None)."""
    expected = [0]
    for h, w in shapes[:-1]:
        expected.append(expected[-1] + h * w)
    if start_index is None:
        return expected
    starts = start_index.tolist() if isinstance(start_index, torch.Tensor) else list(start_index)
    starts = [int(s) for s in starts]
    if starts != expected:
        raise ValueError(f"level_start_index {starts} does not match spatial shapes {shapes} (expected {expected})")
    return starts


def spatial_shapes_tensor(shapes: Sequence[Sequence[int]], device=None) -> torch.Tensor:
    """(L, 2) int64 tensor of (H, W) per level."""
    return torch.as_tensor([[int(h), int(w)] for h, w in shapes], dtype=torch.long, device=device).view(-1, 2)


def level_start_index(spatial_shapes: torch.Tensor) -> torch.Tensor:
    """Offsets of each level in the flattened (concatenated, raster-order) value sequence."""
    sizes = spatial_shapes.prod(1)
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def _check_inputs(value, shapes, sampling_locations, attention_weights):
    if value.dim() != 4:
        raise ValueError(f"value must be (N, S, heads, head_dim), got {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError("sampling_locations must be (N, Lq, heads, levels, points, 2), "
                         f"got {tuple(sampling_locations.shape)}")
    n, s, m, _ = value.shape
    if sum(h * w for h, w in shapes) != s:
        raise ValueError(f"value has {s} positions but the spatial shapes {shapes} give {sum(h * w for h, w in shapes)}")
    if sampling_locations.shape[2] != m or sampling_locations.shape[3] != len(shapes):
        raise ValueError(f"sampling_locations {tuple(sampling_locations.shape)} do not match {m} heads "
                         f"and {len(shapes)} levels")
    if tuple(attention_weights.shape) != tuple(sampling_locations.shape[:-1]):
        raise ValueError(f"attention_weights {tuple(attention_weights.shape)} must be "
                         f"{tuple(sampling_locations.shape[:-1])}")


def ms_deform_attn_pytorch(value: torch.Tensor, spatial_shapes: Shapes, level_start_index: Optional[torch.Tensor],
                           sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Multi-scale deformable attention core.

    Args:
        value: (N, S, M, Dh): M heads of Dh channels for S = sum_l H_l * W_l positions, the levels
            concatenated, each in raster order.
        spatial_shapes: (L, 2) (H_l, W_l), a tensor or a list of pairs.
        level_start_index: (L,) offset of each level in S (checked), or None.
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y), see the module docstring.
        attention_weights: (N, Lq, M, L, P), usually softmax-normalised over (L, P).

    Returns:
        (N, Lq, M * Dh), heads concatenated.
    """
    shapes = _shape_list(spatial_shapes)
    starts = _start_list(level_start_index, shapes)
    _check_inputs(value, shapes, sampling_locations, attention_weights)
    n, _, m, dh = value.shape
    lq, n_points = sampling_locations.shape[1], sampling_locations.shape[4]
    # grid_sample wants [-1, 1] with -1 / +1 on the outer pixel edges when align_corners=False
    grids = sampling_locations * 2.0 - 1.0
    out = None
    for lvl, (h, w) in enumerate(shapes):
        v = value[:, starts[lvl]:starts[lvl] + h * w]  # (N, HW, M, Dh)
        v = v.permute(0, 2, 3, 1).reshape(n * m, dh, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(n * m, lq, n_points, 2)
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # (NM, Dh, Lq, P)
        a = attention_weights[:, :, :, lvl].transpose(1, 2).reshape(n * m, 1, lq, n_points)
        term = (sampled * a).sum(-1)  # (NM, Dh, Lq)
        out = term if out is None else out + term
    return out.view(n, m * dh, lq).transpose(1, 2).contiguous()


def ms_deform_attn_reference(value: torch.Tensor, spatial_shapes: Shapes, level_start_index: Optional[torch.Tensor],
                             sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Slow reference of :func:`ms_deform_attn_pytorch`: explicit bilinear interpolation.

    Loops over levels, points and the four neighbouring pixels of every sample; a neighbour
    outside the map contributes zero. Differentiable (the interpolation weights are affine in the
    location inside a cell).
    """
    shapes = _shape_list(spatial_shapes)
    starts = _start_list(level_start_index, shapes)
    _check_inputs(value, shapes, sampling_locations, attention_weights)
    n, _, m, dh = value.shape
    lq, n_points = sampling_locations.shape[1], sampling_locations.shape[4]
    batch = torch.arange(n, device=value.device).view(n, 1, 1)
    head = torch.arange(m, device=value.device).view(1, 1, m)
    out = value.new_zeros(n, lq, m, dh)
    for lvl, (h, w) in enumerate(shapes):
        v = value[:, starts[lvl]:starts[lvl] + h * w].reshape(n, h, w, m, dh)
        for p in range(n_points):
            loc = sampling_locations[:, :, :, lvl, p]  # (N, Lq, M, 2)
            # continuous pixel coordinates: pixel centres at integers
            px = loc[..., 0] * w - 0.5
            py = loc[..., 1] * h - 0.5
            x0 = torch.floor(px).detach()
            y0 = torch.floor(py).detach()
            fx, fy = px - x0, py - y0
            x0, y0 = x0.long(), y0.long()
            a = attention_weights[:, :, :, lvl, p]
            for dy in (0, 1):
                for dx in (0, 1):
                    wgt = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
                    xi, yi = x0 + dx, y0 + dy
                    inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
                    corner = v[batch, yi.clamp(0, h - 1), xi.clamp(0, w - 1), head]  # (N, Lq, M, Dh)
                    out = out + (a * wgt * inside.to(value.dtype)).unsqueeze(-1) * corner
    return out.reshape(n, lq, m * dh)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention layer.

    Args:
        d_model: channels of the queries and of the input feature sequence.
        n_levels: number of feature levels attended to.
        n_heads: attention heads.
        n_points: sampling points per head and level.
        ratio: the values are projected to ``int(d_model * ratio)`` channels (ViT-Adapter's
            ``deform_ratio``; 1.0 is Deformable DETR), split over the heads.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 ratio: float = 1.0):
        super().__init__()
        d_value = int(d_model * ratio)
        if d_model % n_heads or d_value % n_heads:
            raise ValueError(f"d_model {d_model} (values: {d_value}) must be divisible by n_heads {n_heads}")
        self.d_model, self.d_value = d_model, d_value
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_value)
        self.output_proj = nn.Linear(d_value, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Deformable DETR's initialisation: zero offset weights and a bias that puts head k's
        points on the ray at angle 2 pi k / n_heads, point i at distance i + 1 (in pixels,
        Chebyshev-normalised so the farther coordinate is exactly i + 1), the same for every
        level; zero attention-weight projection (uniform attention); xavier-uniform value and
        output projections with zero bias."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float64) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([angles.cos(), angles.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float64).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.reshape(-1).to(self.sampling_offsets.bias.dtype))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, input_flatten: torch.Tensor,
                input_spatial_shapes: Shapes, input_level_start_index: Optional[torch.Tensor] = None,
                input_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            query: (N, Lq, d_model).
            reference_points: (N or 1, Lq, n_levels, 2) normalised (x, y) per level, or
                (N or 1, Lq, n_levels, 4) boxes (cx, cy, w, h): offsets are then relative to half
                the box size divided by n_points. A (N or 1, Lq, 2 or 4) tensor is used for all
                levels.
            input_flatten: (N, S, d_model), the levels concatenated in raster order.
            input_spatial_shapes: (n_levels, 2) (H, W) per level.
            input_level_start_index: (n_levels,) offsets into S (checked), or None.
            input_padding_mask: (N, S) bool, True at padded positions (their values become 0).

        Returns:
            (N, Lq, d_model).
        """
        n, lq, _ = query.shape
        s = input_flatten.shape[1]
        if isinstance(input_spatial_shapes, torch.Tensor):
            shapes_t = input_spatial_shapes.to(device=query.device, dtype=torch.long)
        else:
            shapes_t = spatial_shapes_tensor(input_spatial_shapes, device=query.device)
        if shapes_t.shape[0] != self.n_levels:
            raise ValueError(f"{shapes_t.shape[0]} levels given to a {self.n_levels}-level MSDeformAttn")
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, self.n_heads, self.d_value // self.n_heads)
        m, lv, p = self.n_heads, self.n_levels, self.n_points
        offsets = self.sampling_offsets(query).view(n, lq, m, lv, p, 2)
        weights = self.attention_weights(query).view(n, lq, m, lv * p).softmax(-1).view(n, lq, m, lv, p)
        ref = reference_points.to(offsets.dtype)
        if ref.dim() == 3:
            ref = ref.unsqueeze(2).expand(-1, -1, lv, -1)
        if ref.dim() != 4 or ref.shape[1] != lq or ref.shape[2] != lv:
            raise ValueError(f"reference_points {tuple(reference_points.shape)} must be (N, {lq}, {lv}, 2 or 4)")
        if ref.shape[-1] == 2:
            normalizer = torch.stack([shapes_t[:, 1], shapes_t[:, 0]], -1).to(offsets.dtype)  # (L, 2) = (W, H)
            locations = ref[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif ref.shape[-1] == 4:
            locations = ref[:, :, None, :, None, :2] + offsets / p * ref[:, :, None, :, None, 2:] * 0.5
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {reference_points.shape[-1]}")
        out = ms_deform_attn_pytorch(value, shapes_t, input_level_start_index, locations, weights)
        return self.output_proj(out)
