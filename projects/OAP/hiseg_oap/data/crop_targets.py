"""Cropping the teacher's pseudo-masks to the student's local views (OAP, Sec. 4.3).

OAP, Sec. 4.3, "Cropped Bipartite Matching": "The teacher network processes the original *global*
view of the image, producing pseudo-masks that cover the entire image. [...] we crop the teacher's
pseudo-masks to match the spatial regions of the student's local views. Teacher embeddings and
pseudo-masks that does not overlap with the student local view are dropped."

:func:`crop_masks_to_views` does that for all masks and all local views of one image in a single
``torchvision.ops.roi_align`` call. The paper does not say how the crop is resampled; the choices
made here (and why) are:

* Resampling: ``roi_align`` on the masks as float, ``aligned=True``, then ``>= 0.5``. This is
  what detectron2 does to crop-and-resize ground-truth masks to a box
  (``BitMasks.crop_and_resize``): with ``aligned=True`` the box is read in continuous
  coordinates where cell ``i`` spans ``[i, i + 1)``, the same convention as the mapper's
  ``local_boxes``, so a crop of a mask and the crop of the image it was drawn on stay aligned to
  sub-cell accuracy. ``sampling_ratio=-1`` (adaptive) takes ``ceil(bin / cell)`` samples per output
  bin and axis, so when the student grid is coarser than the teacher's the bin is averaged
  (area-like), and when it is finer it is bilinearly interpolated. The 0.5 threshold makes a
  student cell belong to a mask when at least half of it does.
* "Does not overlap": a mask is dropped from a view when fewer than ``min_area`` cells of the
  student's grid survive the crop (``MODEL.OAP.POOLING.MIN_CROPPED_AREA``, default 1: any
  overlap that is visible on the student's grid). Overlap is measured after resampling because
  that is the target the student is trained on; an empty target would make Dice undefined.
* Flip: a mirrored local view gets its cropped masks mirrored, so targets and student pixels
  coincide.
"""
from typing import List, Tuple

import torch
from torch import Tensor
from torchvision.ops import roi_align

__all__ = ["crop_masks_to_views"]


def _pair(value, name: str) -> Tuple[int, int]:
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of positive ints (h, w), got {value!r}") from None
    if a <= 0 or b <= 0 or (a, b) != tuple(float(v) for v in value):
        raise ValueError(f"{name} must be a pair of positive ints (h, w), got {value!r}")
    return a, b


def crop_masks_to_views(masks: Tensor, image_size: Tuple[int, int], boxes: Tensor, flips: Tensor,
                        out_size: Tuple[int, int], min_area: int = 1) -> List[Tuple[Tensor, Tensor]]:
    """Crop the teacher's masks of the global view to each student local view (Sec. 4.3).

    Args:
        masks: ``(T, h, w)`` bool, the teacher's masks on any grid that covers the whole global
            view (e.g. the 56 x 56 token grid of a 448 x 448 view at patch 8). Cell ``(i, j)``
            covers global-view pixels ``[i H/h, (i+1) H/h) x [j W/w, (j+1) W/w)``.
        image_size: ``(H, W)``, the global view's size in pixels (the coordinate frame of
            ``boxes``).
        boxes: ``(N, 4)`` ``(x0, y0, x1, y1)`` of each local view in global-view pixels,
            continuous (pixel ``i`` spans ``[i, i + 1)``), as the mapper's ``local_boxes``.
        flips: ``(N,)`` bool, whether local view ``n`` was mirrored after cropping.
        out_size: ``(h_s, w_s)`` of the student's mask grid.
        min_area: a mask is kept for a view only if at least this many cells of the
            ``out_size`` grid are inside it after cropping (Sec. 4.3: non-overlapping masks are
            dropped).

    Returns:
        One ``(cropped, keep_idx)`` per view: ``cropped`` ``(T_n, h_s, w_s)`` bool on the
        student's grid, mirrored if the view was, and ``keep_idx`` ``(T_n,)`` long, the indices of
        the kept masks in ``masks`` (use them to select the matching teacher embeddings). All on
        ``masks.device``.

    The computation is one ``roi_align`` over all masks (as channels) and all views (as boxes);
    the only Python loop is over the N views to split the result.
    """
    if not isinstance(masks, Tensor) or masks.dim() != 3:
        raise ValueError(f"masks must be a (T, h, w) tensor, got "
                         f"{tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__}")
    if masks.dtype != torch.bool:
        raise ValueError(f"masks must be a bool tensor, got dtype {masks.dtype}")
    if masks.shape[1] == 0 or masks.shape[2] == 0:
        raise ValueError(f"masks have an empty grid: {tuple(masks.shape)}")
    img_h, img_w = _pair(image_size, "image_size")
    out_h, out_w = _pair(out_size, "out_size")
    if isinstance(min_area, bool) or int(min_area) != min_area or min_area < 0:
        raise ValueError(f"min_area must be an int >= 0, got {min_area!r}")
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be an (N, 4) tensor, got "
                         f"{tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__}")
    if not isinstance(flips, Tensor) or flips.shape != (boxes.shape[0],):
        raise ValueError(f"flips must be an (N,) = ({boxes.shape[0]},) tensor, got "
                         f"{tuple(flips.shape) if isinstance(flips, Tensor) else type(flips).__name__}")
    if flips.dtype != torch.bool:
        raise ValueError(f"flips must be a bool tensor, got dtype {flips.dtype}")

    device = masks.device
    n_views, n_masks = boxes.shape[0], masks.shape[0]
    boxes = boxes.to(device=device, dtype=torch.float32)
    if n_views:
        if not torch.isfinite(boxes).all():
            raise ValueError("boxes contain non-finite values")
        if ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any():
            raise ValueError(f"boxes must have x1 > x0 and y1 > y0, got {boxes.tolist()}")
        tol = 1e-3
        if ((boxes[:, 0] < -tol) | (boxes[:, 1] < -tol) | (boxes[:, 2] > img_w + tol)
                | (boxes[:, 3] > img_h + tol)).any():
            raise ValueError(f"boxes must lie inside the global view [0, {img_w}] x [0, {img_h}] "
                             f"(image_size is (H, W)), got {boxes.tolist()}")
    empty_idx = torch.zeros(0, dtype=torch.long, device=device)
    if n_masks == 0 or n_views == 0:
        return [(torch.zeros(0, out_h, out_w, dtype=torch.bool, device=device), empty_idx)
                for _ in range(n_views)]

    # Global-view pixels -> mask-grid cells, per axis (the grid need not be square nor an exact
    # divisor of the view).
    grid_h, grid_w = masks.shape[1:]
    scale = boxes.new_tensor([grid_w / img_w, grid_h / img_h, grid_w / img_w, grid_h / img_h])
    rois = torch.cat([boxes.new_zeros(n_views, 1), boxes * scale], dim=1)  # batch index 0
    # The masks are the channels of a single "image", so every box crops all of them at once.
    cropped = roi_align(masks[None].float(), rois, output_size=(out_h, out_w), spatial_scale=1.0,
                        sampling_ratio=-1, aligned=True) >= 0.5  # (N, T, out_h, out_w)
    flips = flips.to(device)
    cropped = torch.where(flips[:, None, None, None], cropped.flip(-1), cropped)
    keep = cropped.flatten(2).sum(-1) >= min_area  # (N, T)

    out = []
    for n in range(n_views):
        idx = keep[n].nonzero().squeeze(1)
        out.append((cropped[n, idx], idx))
    return out
