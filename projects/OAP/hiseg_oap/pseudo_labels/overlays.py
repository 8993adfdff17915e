"""Pictures of the exported pseudo-masks of one image: one overlay per exported level and a grid
of all of them (drawn with :mod:`hiseg_oap.visualize` and :mod:`hiseg.visualization`)."""
from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import numpy as np

__all__ = ["save_overlays"]


def save_overlays(vis_dir: str, name: str, image: np.ndarray, pseudo, levels: Sequence[Tuple[str, int]],
                  method: str, upsample: str, vis_size: int) -> List[str]:
    """``<name>_<method>_<kind>_L<layer>.png`` per level and ``<name>_<method>.png`` (all levels),
    the image scaled to a long side of at most ``vis_size``. Returns the paths written."""
    import cv2

    from hiseg.visualization import save_panel_grid

    from ..visualize import masks_to_labels, overlay

    h, w = image.shape[:2]
    scale = min(1.0, vis_size / max(h, w))
    if scale < 1.0:
        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    os.makedirs(vis_dir, exist_ok=True)
    panels, paths = [(f"input {w}x{h}", image)], []
    for kind, layer in levels:
        lay = pseudo.layers[layer]
        level = lay.level(kind)
        masks = level.upsample(image.shape[:2], mode=upsample).cpu().numpy()
        pic = overlay(image, masks_to_labels(masks))
        path = os.path.join(vis_dir, f"{name}_{method}_{kind}_L{layer}.png")
        if not cv2.imwrite(path, pic[:, :, ::-1]):
            raise OSError(f"could not write {path}")
        paths.append(path)
        n = len(level)
        panels.append((f"{kind} L{layer} (tau {lay.threshold:g}): {n} mask{'s' if n != 1 else ''}", pic))
    grid = os.path.join(vis_dir, f"{name}_{method}.png")
    save_panel_grid(grid, panels, ncols=min(3, len(panels)), suptitle=f"{name}: {method} pseudo-masks")
    return paths + [grid]
