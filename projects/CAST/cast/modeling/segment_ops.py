"""Moving features between pixels, the stride-s feature grid and segments.

CAST averages stem features and position encodings inside each superpixel (Sec. 3.1). The
released segmentation code upsamples the stride-8 features bilinearly to the label map and then
averages per superpixel; the classification code resizes the label map to the feature grid
(nearest) instead. Both are linear maps from the grid to the segments, so we build that map as a
(B, N, h*w) matrix and apply it with one batched matmul: for the bilinear mode this is exactly
``segment_mean(interpolate(F, (H, W)))`` without ever materialising the (B, D, H, W) upsampled
features. The tests compare against that direct formula.

Label maps use ``-1`` for pixels outside the image (padding); such pixels belong to no segment.
"""
from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["grid_to_segment_matrix", "segment_to_grid_matrix", "segment_mean_direct", "count_segments"]


def count_segments(labels: torch.Tensor) -> torch.Tensor:
    """(B,) number of segments per label map (max label + 1; labels are 0..n-1)."""
    return labels.flatten(1).amax(dim=1).clamp(min=-1) + 1


def _bilinear_taps(out_size: int, in_size: int, device):
    """Source indices and weights of ``F.interpolate(mode='bilinear', align_corners=False)``."""
    scale = in_size / out_size
    src = ((torch.arange(out_size, device=device, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    w1 = src - i0.to(src.dtype)
    return i0, i1, 1.0 - w1, w1


def grid_to_segment_matrix(labels: torch.Tensor, num_segments: int, grid: Tuple[int, int],
                           mode: str = "bilinear") -> Tuple[torch.Tensor, torch.Tensor]:
    """Averaging matrix from a (h, w) feature grid to segments.

    Args:
        labels: (B, H, W) int64 label maps, -1 = padding.
        num_segments: N, the padded number of segments.
        grid: (h, w) of the feature grid.
        mode: "bilinear" (features upsampled to the label map, then averaged; any size) or
            "nearest" (label map resized to the grid, then averaged; a segment that vanishes gets
            an all-zero row, as in the released classification code).
    Returns:
        matrix (B, N, h*w) float32 and ``valid`` (B, N) bool (segment has support).
    """
    b, height, width = labels.shape
    h, w = grid
    dev = labels.device
    if mode == "nearest":
        small = F.interpolate(labels[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
        seg = small.flatten(1)  # (B, h*w)
        keep = seg >= 0
        idx = (torch.arange(b, device=dev)[:, None] * num_segments + seg.clamp(min=0)) * (h * w) \
            + torch.arange(h * w, device=dev)[None]
        mat = torch.zeros(b * num_segments * h * w, dtype=torch.float32, device=dev)
        mat.index_add_(0, idx[keep], torch.ones_like(idx[keep], dtype=torch.float32))
    elif mode == "bilinear":
        y0, y1, wy0, wy1 = _bilinear_taps(height, h, dev)
        x0, x1, wx0, wx1 = _bilinear_taps(width, w, dev)
        keep = labels >= 0  # (B, H, W)
        base = (torch.arange(b, device=dev)[:, None, None] * num_segments + labels.clamp(min=0)) * (h * w)
        base = base[keep]
        yy, xx = keep.nonzero(as_tuple=True)[1:]
        mat = torch.zeros(b * num_segments * h * w, dtype=torch.float32, device=dev)
        for ys, wy in ((y0, wy0), (y1, wy1)):
            for xs, wx in ((x0, wx0), (x1, wx1)):
                mat.index_add_(0, base + ys[yy] * w + xs[xx], wy[yy] * wx[xx])
    else:
        raise ValueError(f"unknown token pooling mode {mode!r}: use 'bilinear' or 'nearest'")
    mat = mat.view(b, num_segments, h * w)
    mass = mat.sum(-1, keepdim=True)
    valid = mass[..., 0] > 0  # bilinear: mass = pixel count; nearest: grid cells it keeps
    mat = mat / mass.clamp(min=1e-12)
    return mat, valid


def segment_to_grid_matrix(labels: torch.Tensor, num_segments: int, stride: int) -> torch.Tensor:
    """(B, h_s*w_s, N) matrix that scatters segment features to pixels and average-pools them to
    a stride-``stride`` grid (h_s = ceil(H / stride)): entry = fraction of the cell's in-image
    pixels that belong to the segment. Cells entirely in padding get zero rows."""
    b, height, width = labels.shape
    hs, ws = -(-height // stride), -(-width // stride)
    dev = labels.device
    keep = labels >= 0
    bb, yy, xx = keep.nonzero(as_tuple=True)
    cell = (bb * (hs * ws) + (yy // stride) * ws + (xx // stride))
    idx = cell * num_segments + labels[keep]
    mat = torch.zeros(b * hs * ws * num_segments, dtype=torch.float32, device=dev)
    mat.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float32))
    mat = mat.view(b, hs * ws, num_segments)
    return mat / mat.sum(-1, keepdim=True).clamp(min=1.0)


def segment_mean_direct(features: torch.Tensor, labels: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Reference: mean of (B, D, H, W) features over each segment of (B, H, W) labels."""
    b, d = features.shape[:2]
    out = torch.zeros(b, num_segments, d, dtype=features.dtype, device=features.device)
    cnt = torch.zeros(b, num_segments, 1, dtype=features.dtype, device=features.device)
    for i in range(b):
        lab = labels[i].flatten()
        keep = lab >= 0
        f = features[i].flatten(1).t()[keep]
        out[i].index_add_(0, lab[keep], f)
        cnt[i].index_add_(0, lab[keep], torch.ones_like(f[:, :1]))
    return out / cnt.clamp(min=1)
