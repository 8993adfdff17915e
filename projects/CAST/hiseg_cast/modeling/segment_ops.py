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
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from hiseg.modeling.interpolation_taps import interpolation_taps

__all__ = ["grid_to_segment_matrix", "image_extents", "segment_to_grid_matrix", "segment_mean_direct", "count_segments"]


def count_segments(labels: torch.Tensor) -> torch.Tensor:
    """(B,) number of segments per label map (max label + 1; labels are 0..n-1)."""
    return labels.flatten(1).amax(dim=1).clamp(min=-1) + 1


def image_extents(labels: torch.Tensor) -> torch.Tensor:
    """(B, 2) each image's own (height, width) inside a padded batch: up to its last row /
    column that holds a labelled pixel (padding is -1 and sits at the bottom / right)."""
    b, height, width = labels.shape
    keep = labels >= 0
    rows = (keep.any(2) * torch.arange(1, height + 1, device=labels.device)).amax(1)
    cols = (keep.any(1) * torch.arange(1, width + 1, device=labels.device)).amax(1)
    return torch.stack([rows, cols], dim=1)


def grid_to_segment_matrix(labels: torch.Tensor, num_segments: int, grid: Tuple[int, int],
                           mode: str = "bilinear", extents: Optional[torch.Tensor] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Averaging matrix from a (h, w) grid to segments.

    Args:
        labels: (B, H, W) int64 label maps, -1 = padding.
        num_segments: N, the padded number of segments.
        grid: (h, w) of the grid.
        mode: "bilinear" / "bicubic" (the grid resized to the label map with
            ``F.interpolate(mode, align_corners=False)``, then averaged per segment; any size) or
            "nearest" (label map resized to the grid, then averaged; a segment that vanishes gets
            an all-zero row, as in the released classification code).
        extents: bilinear / bicubic only: (B, 2) the (height, width) each image's grid is resized
            to (default: the whole label map). The released segmentation code stretches the
            position table over the image; in a padded batch that is the image's own extent.
    Returns:
        matrix (B, N, h*w) float32 and ``valid`` (B, N) bool (the segment has support: pixels
        for bilinear / bicubic, grid cells for nearest).
    """
    b, height, width = labels.shape
    h, w = grid
    dev = labels.device
    mat = torch.zeros(b * num_segments * h * w, dtype=torch.float32, device=dev)
    if mode == "nearest":
        small = F.interpolate(labels[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
        seg = small.flatten(1)  # (B, h*w)
        keep = seg >= 0
        idx = (torch.arange(b, device=dev)[:, None] * num_segments + seg.clamp(min=0)) * (h * w) \
            + torch.arange(h * w, device=dev)[None]
        mat.index_add_(0, idx[keep], torch.ones_like(idx[keep], dtype=torch.float32))
        mat = mat.view(b, num_segments, h * w)
        mass = mat.sum(-1, keepdim=True)  # grid cells each segment keeps
    elif mode in ("bilinear", "bicubic"):
        if extents is None:
            extents = torch.tensor([[height, width]], device=dev).expand(b, 2)
        keep = labels >= 0
        count = torch.zeros(b * num_segments, dtype=torch.float32, device=dev)
        for eh, ew in torch.unique(extents, dim=0).tolist():
            imgs = ((extents[:, 0] == eh) & (extents[:, 1] == ew)).nonzero().flatten()
            bb, yy, xx = keep[imgs].nonzero(as_tuple=True)
            if not bool((yy < eh).all() and (xx < ew).all()):
                raise ValueError(f"labelled pixels outside the image extent {eh}x{ew}")
            seg = imgs[bb] * num_segments + labels[imgs[bb], yy, xx]
            count.index_add_(0, seg, torch.ones_like(seg, dtype=torch.float32))
            iy, wy = interpolation_taps(mode, int(eh), h, dev, torch.float32)
            ix, wx = interpolation_taps(mode, int(ew), w, dev, torch.float32)
            for ky in range(iy.shape[0]):
                for kx in range(ix.shape[0]):
                    mat.index_add_(0, seg * (h * w) + iy[ky, yy] * w + ix[kx, xx], wy[ky, yy] * wx[kx, xx])
        mat = mat.view(b, num_segments, h * w)
        mass = count.view(b, num_segments, 1)  # pixels of each segment (the taps sum to 1)
    else:
        raise ValueError(f"unknown token pooling mode {mode!r}: use 'bilinear', 'bicubic' or 'nearest'")
    valid = mass[..., 0] > 0
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
