"""SLIC superpixels (Achanta et al., TPAMI 2012) in PyTorch, batched, on the images' device.

This is the "GPU superpixel path": the backbone can compute S_0 for a whole batch where the
images already are, instead of looping over images with OpenCV SEEDS on the CPU. The algorithm:

1. sRGB -> CIELAB (D65), :func:`rgb_to_lab` (checked against OpenCV and scikit-image);
2. a regular grid of ``rows x cols ~ K`` centres (step ``S = sqrt(HW / K)``), each optionally
   moved to the lowest-gradient position of its 3x3 neighbourhood;
3. one assignment, then ``iterations`` rounds of update and assignment. A pixel only compares
   itself with the centres born in the 3x3 grid cells around its own cell (9 candidates; the
   standard GPU formulation of SLIC's local search), and among those with the centres whose
   2S x 2S window contains it (if none does, the nearest of the 9 is taken). The distance is
   SLIC's ``d_lab^2 + (m / S)^2 d_xy^2``. Pixels are stored cell by cell (B, R, ch, C, cw), so
   the 9 candidates are the centre grid shifted by one cell and broadcast: no gathers in the
   loop. Centres are updated with ``index_add_`` means;
4. connectivity: 4-connected components of the label map (union-find over tensors: horizontal
   runs by a cumulative max, then hooking and pointer jumping), then every component smaller than
   ``min_size_factor`` (1/4, as in SLIC) of the mean superpixel size, and every stray piece of a
   cluster (not its largest component) smaller than ``fragment_factor`` (1/2) of it, is merged
   into the adjacent component with which it shares the longest border (repeated until none is
   left); labels are renumbered ``0..n-1`` per image in raster order of their first pixel.

No step loops in Python over pixels, centres or segments; the few Python loops run over the 9
neighbour offsets, the iterations and the (logarithmically many) union-find rounds.

Determinism: LAB values are rounded to multiples of 1/1024 (exact in float32) and the centre sums
are float64 sums of integers (exact, so their order, e.g. of CUDA atomics, does not matter);
all other steps are element-wise, gathers, integer min/max scatters, sorts and cumulative sums.
The result is the same on every run, and an image gives the same labels alone as in a batch.
"""
import math
from typing import Optional, Tuple

import torch

__all__ = ["rgb_to_lab", "slic_torch", "connected_components", "grid_shape"]

# sRGB (D65) primaries -> XYZ, and the D65 reference white (2 degree observer); the values used by
# scikit-image's rgb2lab and OpenCV's cvtColor.
_XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423),
                 (0.212671, 0.715160, 0.072169),
                 (0.019334, 0.119193, 0.950227))
_WHITE_D65 = (0.95047, 1.0, 1.08883)
_LAB_EPS = (6.0 / 29.0) ** 3  # 0.008856
_LAB_SLOPE = 841.0 / 108.0  # (29/6)^2 / 3 = 7.787
_LAB_QUANT = 1024.0  # LAB values are kept as multiples of 1/1024 (exact in float32)


def _srgb_to_linear(c: torch.Tensor) -> torch.Tensor:
    """Inverse sRGB companding of values in [0, 1]."""
    return torch.where(c <= 0.04045, c / 12.92, ((c.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4)


def _as_rgb_batch(images: torch.Tensor) -> torch.Tensor:
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, 3, H, W) or (B, 1, H, W), got {tuple(images.shape)}")
    if images.shape[-1] == 0 or images.shape[-2] == 0:
        raise ValueError(f"empty images of shape {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images


def _linear_rgb(images: torch.Tensor, max_value: Optional[float]) -> torch.Tensor:
    """(B, 3, H, W) -> linear RGB in float64."""
    if images.dtype == torch.uint8:
        if max_value not in (None, 255, 255.0):
            raise ValueError("uint8 images are always read on the 0..255 scale")
        lut = _srgb_to_linear(torch.arange(256, dtype=torch.float64, device=images.device) / 255.0)
        return lut[images.long()]
    if images.dtype == torch.bool or not (images.is_floating_point() or images.dtype in (
            torch.int16, torch.int32, torch.int64)):
        raise ValueError(f"unsupported image dtype {images.dtype}")
    if max_value is None:
        max_value = 1.0 if images.is_floating_point() else 255.0
    scale = float(max_value)
    x = images.to(torch.float64) / scale
    if not bool(torch.isfinite(x).all()):
        raise ValueError("images contain NaN or infinite values")
    return _srgb_to_linear(x.clamp(0.0, 1.0))


def rgb_to_lab(images: torch.Tensor, max_value: Optional[float] = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """sRGB -> CIELAB (D65): L in [0, 100], a and b roughly in [-128, 127].

    Args:
        images: (B, 3, H, W) or (3, H, W) RGB (grey (B, 1, H, W) is repeated), on the scale
            ``0..max_value``: default 255 for integer dtypes (uint8 always), 1 for floating
            point (like skimage's float images); values outside are clipped.
        dtype: the result's dtype (the arithmetic is float64).
    """
    squeeze = images.dim() == 3
    lin = _linear_rgb(_as_rgb_batch(images), max_value)
    r, g, b = lin[:, 0], lin[:, 1], lin[:, 2]
    f = []
    for row, white in zip(_XYZ_FROM_RGB, _WHITE_D65):
        # explicit element-wise sums (no matmul): the same bits whatever the batch size
        t = (row[0] / white) * r + (row[1] / white) * g + (row[2] / white) * b
        f.append(torch.where(t > _LAB_EPS, t.clamp_min(_LAB_EPS) ** (1.0 / 3.0), t * _LAB_SLOPE + 4.0 / 29.0))
    fx, fy, fz = f
    lab = torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1).to(dtype)
    return lab[0] if squeeze else lab


def grid_shape(height: int, width: int, num_superpixels: int) -> Tuple[int, int]:
    """Rows and columns of the initial grid: near-square cells, ``rows * cols ~ K``."""
    k = max(1, min(int(num_superpixels), height * width))
    rows = max(1, min(height, int(round(math.sqrt(k * height / width)))))
    cols = max(1, min(width, int(round(k / rows))))
    rows = max(1, min(height, int(round(k / cols))))  # when cols hit a bound (e.g. 50 x 1)
    return rows, cols


# ------------------------------------------------------------------------------------------------
# union-find over tensors
def _compress(parent: torch.Tensor) -> torch.Tensor:
    """Pointer jumping until every node points at its root."""
    while True:
        grand = parent[parent]
        if torch.equal(grand, parent):
            return parent
        parent = grand


def _union(parent: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Merge the sets joined by the edges ``src[i] -- dst[i]``.

    ``parent`` must be compressed (every node points at its root). Roots are hooked onto the
    smallest root they touch (integer ``amin`` scatter: order-independent), then paths are
    compressed; edges already inside one set are dropped. Every set ends up pointing at its
    smallest node. Each round at least halves the number of sets still joined by an edge.
    """
    while src.numel():
        ps, pd = parent[src], parent[dst]
        keep = ps != pd
        if not bool(keep.any()):
            break
        src, dst, ps, pd = src[keep], dst[keep], ps[keep], pd[keep]
        lo, hi = torch.minimum(ps, pd), torch.maximum(ps, pd)
        parent = parent.scatter_reduce(0, hi, lo, reduce="amin")
        parent = _compress(parent)
    return parent


def _neighbour_pairs(batch: int, height: int, width: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of all 4-neighbour pixel pairs (right and down) inside each image."""
    idx = torch.arange(batch * height * width, device=device).view(batch, height, width)
    src = torch.cat([idx[:, :, :-1].reshape(-1), idx[:, :-1, :].reshape(-1)])
    dst = torch.cat([idx[:, :, 1:].reshape(-1), idx[:, 1:, :].reshape(-1)])
    return src, dst


def _components_root(labels: torch.Tensor) -> torch.Tensor:
    """For each pixel of (B, H, W) ``labels``, the flat index of the first (smallest) pixel of its
    4-connected component of equal labels.

    Horizontal runs of equal labels are linked first (a cumulative max gives each pixel its
    run's first pixel), then runs are united across the vertical pairs of equal labels, keeping
    only the first pair of every stretch where two runs touch."""
    b, h, w = labels.shape
    idx = torch.arange(b * h * w, device=labels.device).view(b, h, w)
    same_left = torch.zeros_like(labels, dtype=torch.bool)
    same_left[:, :, 1:] = labels[:, :, 1:] == labels[:, :, :-1]
    run_start = torch.cummax(torch.where(same_left, 0, idx), dim=2).values
    parent = run_start.reshape(-1)
    if h == 1:
        return parent
    down = labels[:, :-1] == labels[:, 1:]  # (B, H-1, W)
    redundant = same_left[:, :-1] & same_left[:, 1:]  # the pair to the left links the same runs
    keep = down & ~redundant
    return _union(parent, run_start[:, :-1][keep], run_start[:, 1:][keep])


def _consecutive_from_roots(root: torch.Tensor, shape) -> torch.Tensor:
    """Root indices -> labels 0..n-1 per image, in raster order of each segment's first pixel."""
    b, h, w = shape
    n = root.numel()
    is_root = (root == torch.arange(n, device=root.device)).view(b, h * w)
    rank = (torch.cumsum(is_root, dim=1) - 1).view(-1)
    return rank[root].view(b, h, w)


def connected_components(labels: torch.Tensor) -> torch.Tensor:
    """4-connected components of equal labels, numbered ``0..n-1`` per image (raster order).

    Args:
        labels: (B, H, W) or (H, W) integer label maps.
    """
    squeeze = labels.dim() == 2
    lab = labels[None] if squeeze else labels
    out = _consecutive_from_roots(_components_root(lab), lab.shape)
    return out[0] if squeeze else out


def _merge_small(root: torch.Tensor, labels: torch.Tensor, bsrc: torch.Tensor, bdst: torch.Tensor,
                 min_size: float, fragment_size: float, max_rounds: int = 64) -> torch.Tensor:
    """Merge small components into an adjacent component.

    ``root``: each pixel's component (its smallest pixel index); ``labels``: each pixel's cluster
    (unique over the batch); ``bsrc``/``bdst``: the pixel pairs that may lie across a component
    border. Merged: components of fewer than ``min_size`` pixels, and the stray pieces of a
    cluster (any component but its cluster's largest) of fewer than ``fragment_size`` pixels. A
    merged component joins the neighbour with which it shares the most border pixel pairs (ties:
    the neighbour whose first pixel comes first). Components that choose each other are united;
    rounds repeat until no segment under ``min_size`` with a neighbour is left (every round removes
    at least one segment). Returns the merged segments' smallest pixel index per pixel.
    """
    n = root.numel()
    device = root.device
    # components as ids 0..m-1, in the order of their first pixels (so "smallest" is kept)
    is_root = root == torch.arange(n, device=device)
    first_pixel = torch.nonzero(is_root).view(-1)  # (m,), sorted
    m = first_pixel.numel()
    comp = (torch.cumsum(is_root, 0) - 1)[root]  # (N,) component id per pixel
    size = torch.bincount(comp, minlength=m)
    # stray pieces: not the largest component of their cluster (ties: the first one)
    cluster = labels.reshape(-1)[first_pixel]
    key = size * m + (m - 1 - torch.arange(m, device=device))
    top = torch.full((int(cluster.max()) + 1,), -1, dtype=torch.long, device=device).scatter_reduce(
        0, cluster, key, reduce="amax")
    force = (top[cluster] != key) & (size < fragment_size)
    e1, e2 = comp[bsrc], comp[bdst]
    across = e1 != e2
    e1, e2 = e1[across], e2[across]
    cur = torch.arange(m, device=device)  # component -> merged segment (its smallest component)
    for _ in range(max_rounds):
        a, c = cur[e1], cur[e2]
        across = a != c
        e1, e2, a, c = e1[across], e2[across], a[across], c[across]  # inside pairs stay inside
        total = torch.zeros(m, dtype=torch.long, device=device).index_add_(0, cur, size)
        first = torch.cat([a, c])
        second = torch.cat([c, a])
        small = total[first] < min_size
        if force is not None:  # first round only: segments are still single components here
            small |= force[first]
            force = None
        if not bool(small.any()):
            break
        first, second = first[small], second[small]
        pair, border = torch.unique(first * m + second, return_counts=True)  # sorted
        first, second = pair // m, pair % m
        score = border * m + (m - 1 - second)  # the longest border, then the first neighbour
        best = torch.full((m,), -1, dtype=torch.long, device=device).scatter_reduce(
            0, first, score, reduce="amax")
        smalls = torch.unique_consecutive(first)
        target = (m - 1) - best[smalls] % m
        cur = _union(cur, smalls, target)
    return first_pixel[cur[comp]]


# ------------------------------------------------------------------------------------------------
def _cell_layout(size: int, cells: int, device):
    """Split ``0..size-1`` into ``cells`` contiguous near-equal cells (pixel p is in cell
    ``p * cells // size``). Returns (cell of each pixel, source pixel of each (cell, slot) with
    slots padded to the largest cell by repeating the cell's last pixel, slot validity, position
    of each pixel in the flattened (cell, slot) axis)."""
    pos = torch.arange(size, device=device)
    cell = (pos * cells) // size
    count = torch.bincount(cell, minlength=cells)
    start = torch.cumsum(count, 0) - count
    width = int(count.max())
    slot = torch.arange(width, device=device)
    source = torch.minimum(start[:, None] + slot[None, :], (start + count - 1)[:, None])  # (cells, width)
    valid = slot[None, :] < count[:, None]
    back = cell * width + (pos - start[cell])
    return cell, source, valid, back


def _lowest_gradient(lab: torch.Tensor, cy0: torch.Tensor, cx0: torch.Tensor):
    """Per image, the lowest-gradient pixel of the 3x3 neighbourhood of every grid centre (first
    in raster order on ties). lab: (B, 3, H, W); cy0: (R,), cx0: (C,) -> two (B, R, C)."""
    b, _, h, w = lab.shape
    rows, cols = cy0.numel(), cx0.numel()
    pad = torch.nn.functional.pad(lab, (1, 1, 1, 1), mode="replicate")
    gx = pad[:, :, 1:-1, 2:] - pad[:, :, 1:-1, :-2]
    gy = pad[:, :, 2:, 1:-1] - pad[:, :, :-2, 1:-1]
    grad = (gx * gx).sum(1) + (gy * gy).sum(1)  # (B, H, W)
    best_g = best_y = best_x = None
    for oy in (-1, 0, 1):
        for ox in (-1, 0, 1):
            qy = (cy0 + oy).clamp(0, h - 1)
            qx = (cx0 + ox).clamp(0, w - 1)
            g = grad.index_select(1, qy).index_select(2, qx)  # (B, R, C)
            qy_b = qy.view(1, rows, 1).expand_as(g)
            qx_b = qx.view(1, 1, cols).expand_as(g)
            if best_g is None:
                best_g, best_y, best_x = g, qy_b, qx_b
                continue
            better = g < best_g
            best_g = torch.where(better, g, best_g)
            best_y = torch.where(better, qy_b, best_y)
            best_x = torch.where(better, qx_b, best_x)
    return best_y, best_x


def slic_torch(images: torch.Tensor, num_superpixels: Optional[int] = None, compactness: float = 10.0,
               iterations: int = 10, enforce_connectivity: bool = True, *,
               pixels_per_superpixel: Optional[int] = None, min_size_factor: float = 0.25,
               fragment_factor: float = 0.5,
               move_to_low_gradient: bool = True, max_value: Optional[float] = None,
               max_batch_pixels: Optional[int] = None) -> torch.Tensor:
    """SLIC superpixels for a batch of images, computed on the images' device.

    Args:
        images: (B, 3, H, W) RGB (or (3, H, W); grey (B, 1, H, W) is repeated), as for
            :func:`rgb_to_lab`: integers on 0..255, floats on 0..1 unless ``max_value`` says.
        num_superpixels: wanted number K per image; ``None`` or ``<= 0``: ``H*W /
            pixels_per_superpixel``. The grid has ``rows x cols ~ K`` cells (at most one per
            pixel); merging fragments usually leaves somewhat fewer than K labels.
        compactness: SLIC's m: weight of the spatial distance (in LAB units per S pixels).
        iterations: update/assignment rounds after the first assignment (SLIC's default: 10).
        enforce_connectivity: make every label 4-connected (SLIC's post-processing): each
            4-connected piece of a cluster becomes a label, then pieces smaller than
            ``min_size_factor * H*W / K`` pixels (SLIC's 1/4 of the mean size), and stray pieces
            (not their cluster's largest) smaller than ``fragment_factor * H*W / K``, are merged
            into the neighbour sharing the longest border with them.
        move_to_low_gradient: move each initial centre to the lowest-gradient pixel of its 3x3
            neighbourhood (SLIC's initialisation).
        max_batch_pixels: images per call are limited to about this many pixels (default 2^18
            on the CPU, where small chunks stay in cache and run faster; 2^23 elsewhere, to bound
            memory); chunking does not change the result.

    Returns:
        (B, H, W) int64 labels on ``images.device``, ``0..n_b-1`` (all present) per image;
        (H, W) for a (3, H, W) input.
    """
    squeeze = images.dim() == 3
    images = _as_rgb_batch(images)
    b, _, h, w = images.shape
    device = images.device
    if num_superpixels is None or int(num_superpixels) <= 0:
        if not pixels_per_superpixel or pixels_per_superpixel <= 0:
            raise ValueError("give num_superpixels > 0 or pixels_per_superpixel > 0")
        num_superpixels = max(1, int(round(h * w / pixels_per_superpixel)))
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if not compactness >= 0:
        raise ValueError(f"compactness must be >= 0, got {compactness}")
    if max_batch_pixels is None:
        max_batch_pixels = 2 ** 18 if device.type == "cpu" else 2 ** 23
    chunk = max(1, int(max_batch_pixels) // (h * w))
    if b > chunk:
        out = torch.cat([slic_torch(images[i:i + chunk], num_superpixels, compactness, iterations,
                                    enforce_connectivity, min_size_factor=min_size_factor,
                                    fragment_factor=fragment_factor, move_to_low_gradient=move_to_low_gradient,
                                    max_value=max_value, max_batch_pixels=max_batch_pixels)
                         for i in range(0, b, chunk)])
        return out[0] if squeeze else out
    rows, cols = grid_shape(h, w, int(num_superpixels))
    k = rows * cols
    step_y, step_x = h / rows, w / cols
    spatial_w = float(compactness) ** 2 / (step_y * step_x)  # (m / S)^2 with S^2 = HW / K

    # LAB, rounded to 1/1024: the float32 copy is exact and centre sums are exact in float64
    lab_q = torch.round(rgb_to_lab(images, max_value, dtype=torch.float64) * _LAB_QUANT)
    lab = (lab_q / _LAB_QUANT).to(torch.float32)  # (B, 3, H, W)

    # Cell-major ("blocked") layout: (B, R, ch, C, cw), pixel slot (i, j) of cell (r, c). A pixel's
    # 9 candidate centres are then the centre grid shifted by one cell: plain broadcasting.
    _, row_src, row_ok, row_back = _cell_layout(h, rows, device)
    _, col_src, col_ok, col_back = _cell_layout(w, cols, device)
    ch, cw = row_src.shape[1], col_src.shape[1]

    def blocked(t: torch.Tensor) -> torch.Tensor:  # (B, X, H, W) -> (B, X, R, ch, C, cw)
        t = t.index_select(2, row_src.reshape(-1)).index_select(3, col_src.reshape(-1))
        return t.reshape(t.shape[0], t.shape[1], rows, ch, cols, cw)

    lab_b = blocked(lab)
    l_b, a_b, b_b = lab_b[:, 0], lab_b[:, 1], lab_b[:, 2]  # (B, R, ch, C, cw)
    y_b = row_src.to(torch.float32).view(1, rows, ch, 1, 1)
    x_b = col_src.to(torch.float32).view(1, 1, 1, cols, cw)
    slot_ok = (row_ok.view(rows, ch, 1, 1) & col_ok.view(1, 1, cols, cw)).to(torch.float64)

    # initial centres: grid cell centres, optionally moved down the gradient
    cy0 = ((torch.arange(rows, device=device, dtype=torch.float64) + 0.5) * step_y).long().clamp_max(h - 1)
    cx0 = ((torch.arange(cols, device=device, dtype=torch.float64) + 0.5) * step_x).long().clamp_max(w - 1)
    if move_to_low_gradient and h > 1 and w > 1:
        py, px = _lowest_gradient(lab, cy0, cx0)
    else:
        py = cy0.view(1, rows, 1).expand(b, rows, cols)
        px = cx0.view(1, 1, cols).expand(b, rows, cols)
    flat_pos = (py * w + px).reshape(b, 1, k).expand(b, 3, k)
    centre_lab = lab.reshape(b, 3, h * w).gather(2, flat_pos).to(torch.float64)
    # centres: (B, 5, R, C) float64 = L, a, b, y, x
    centres = torch.cat([centre_lab.view(b, 3, rows, cols),
                         py.to(torch.float64)[:, None], px.to(torch.float64)[:, None]], dim=1)

    # the 9 candidates: offset j = (oy, ox) of the centre's cell from the pixel's cell
    offsets = [(oy, ox) for oy in (-1, 0, 1) for ox in (-1, 0, 1)]
    delta = [oy * cols + ox for oy, ox in offsets]
    own = (torch.arange(rows, device=device).view(1, rows, 1, 1, 1) * cols
           + torch.arange(cols, device=device).view(1, 1, 1, cols, 1))  # a slot's own cell
    far = 1.0e7  # position of the missing cells around the grid
    inf = torch.tensor(float("inf"), device=device)

    def assign(centres64: torch.Tensor, window: bool = True) -> torch.Tensor:
        """(B, R, ch, C, cw) cluster id (r * C + c) of every slot: the nearest of its 9
        candidates, among those whose 2S x 2S window holds it when ``window``."""
        c32 = centres64.to(torch.float32)
        # the grid padded by one missing cell: infinite colour (never chosen, even when m = 0)
        c32 = torch.cat([torch.nn.functional.pad(c32[:, :3], (1, 1, 1, 1), value=float("inf")),
                         torch.nn.functional.pad(c32[:, 3:], (1, 1, 1, 1), value=-far)], dim=1)
        best = None
        for j, (oy, ox) in enumerate(offsets):
            c = c32[:, :, 1 + oy:1 + oy + rows, 1 + ox:1 + ox + cols]  # (B, 5, R, C)
            cl, ca, cb, cy, cx = (c[:, i].reshape(b, rows, 1, cols, 1) for i in range(5))
            # spatial terms on the small (B, R, ch, C, 1) and (B, R, 1, C, cw) tensors; +inf
            # outside the centre's window
            dy = y_b - cy
            dx = x_b - cx
            sy = spatial_w * (dy * dy)
            sx = spatial_w * (dx * dx)
            if window:
                sy = torch.where(dy.abs() <= step_y, sy, inf)
                sx = torch.where(dx.abs() <= step_x, sx, inf)
            dl, da, db = l_b - cl, a_b - ca, b_b - cb
            d = dl * dl + da * da + db * db + (sy + sx)
            cand = own + delta[j]  # (1, R, 1, C, 1)
            if best is None:
                best, cluster = d, cand.expand(d.shape)
                continue
            better = d < best  # strict: the first candidate wins ties
            best = torch.minimum(best, d)
            cluster = torch.where(better, cand, cluster)
        if window:
            missed = torch.isinf(best)  # no candidate's window holds the slot (rare)
            if bool(missed.any()):
                cluster = torch.where(missed, assign(centres64, window=False), cluster)
        return cluster

    # per-slot sums for the update: L, a, b (integers, x1024), y, x, 1 -- exact in float64;
    # padded slots weigh nothing
    src = torch.cat([blocked(lab_q) * slot_ok,
                     (y_b.to(torch.float64) * slot_ok).expand(b, rows, ch, cols, cw)[:, None],
                     (x_b.to(torch.float64) * slot_ok).expand(b, rows, ch, cols, cw)[:, None],
                     slot_ok.expand(b, rows, ch, cols, cw)[:, None]], dim=1)
    src = src.permute(0, 2, 3, 4, 5, 1).reshape(-1, 6)
    image_offset = (torch.arange(b, device=device) * k).view(b, 1, 1, 1, 1)

    def update(cluster: torch.Tensor, centres64: torch.Tensor) -> torch.Tensor:
        index = (cluster + image_offset).reshape(-1)
        sums = torch.zeros(b * k, 6, dtype=torch.float64, device=device).index_add_(0, index, src)
        count = sums[:, 5:]
        mean = sums[:, :5] / count.clamp_min(1.0)
        mean[:, :3] /= _LAB_QUANT
        mean = mean.reshape(b, rows, cols, 5).permute(0, 3, 1, 2)
        return torch.where(count.reshape(b, 1, rows, cols) > 0, mean, centres64)

    cluster = assign(centres)
    for _ in range(iterations):
        centres = update(cluster, centres)
        cluster = assign(centres)
    # back to the image layout
    assigned = cluster.reshape(b, rows * ch, cols * cw).index_select(1, row_back).index_select(2, col_back)

    if not enforce_connectivity:
        flat = (assigned + image_offset.view(b, 1, 1)).reshape(-1)
        present = torch.zeros(b * k, dtype=torch.long, device=device)
        present[flat] = 1
        rank = (torch.cumsum(present.view(b, k), dim=1) - 1).view(-1)
        out = rank[flat].view(b, h, w)
        return out[0] if squeeze else out

    root = _components_root(assigned)
    mean_size = h * w / k
    min_size = min_size_factor * mean_size
    fragment_size = max(min_size, fragment_factor * mean_size)
    if fragment_size > 1:
        psrc, pdst = _neighbour_pairs(b, h, w, device)
        flat = (assigned + image_offset.view(b, 1, 1)).reshape(-1)  # cluster ids unique in the batch
        border = flat[psrc] != flat[pdst]  # component borders lie on cluster borders
        root = _merge_small(root, flat, psrc[border], pdst[border], min_size, fragment_size)
    out = _consecutive_from_roots(root, (b, h, w))
    return out[0] if squeeze else out
