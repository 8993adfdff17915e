"""Drawing shared by every project: palettes, segment fills, boundaries, panel grids, pictures
of a segmentation hierarchy (CAST's Fig. 5 style) and label-map files.

Everything here works on numpy arrays: an HxWx3 uint8 RGB image and int label maps (HxW, labels
>= 0; -1 = no segment, drawn black). Usable on any hierarchy (CAST's, the ViT + K-means read-out's)
and any set of masks (OAP's pseudo-masks); projects add their own panels on top of these.
"""
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["count_segments", "mean_color_image", "palette_image", "draw_boundaries", "boundary_thickness",
           "superpixel_panel", "segment_panel", "hierarchy_panels", "compose_panel_grid", "save_panel_grid",
           "save_label_maps", "load_label_maps", "is_nested", "PALETTE_SEED"]

PALETTE_SEED = 0


def count_segments(labels: np.ndarray) -> int:
    """Number of distinct segments present (label -1 is not a segment)."""
    lab = np.asarray(labels)
    return int(np.unique(lab[lab >= 0]).size)


def _dense(labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray, int]:
    """Labels renumbered 0..n-1 (for bincount), the valid mask and n."""
    lab = np.asarray(labels).astype(np.int64)
    valid = lab >= 0
    uniq, inv = np.unique(np.where(valid, lab, -1), return_inverse=True)
    inv = inv.reshape(lab.shape)
    if uniq.size and uniq[0] == -1:  # -1 present: shift so it does not count
        inv = inv - 1
        n = uniq.size - 1
    else:
        n = uniq.size
    return inv, valid, n


def mean_color_image(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each segment filled with its mean colour (uint8 RGB; -1 pixels black)."""
    img = np.asarray(image)
    inv, valid, n = _dense(labels)
    out = np.zeros_like(img, dtype=np.uint8)
    if n == 0:
        return out
    idx = inv[valid]
    cnt = np.bincount(idx, minlength=n).astype(np.float64)
    means = np.stack([np.bincount(idx, weights=img[..., c][valid].astype(np.float64), minlength=n)
                      for c in range(3)], axis=1) / np.maximum(cnt, 1)[:, None]
    out[valid] = np.clip(np.round(means[idx]), 0, 255).astype(np.uint8)
    return out


def _palette(n: int, seed: int = PALETTE_SEED) -> np.ndarray:
    """n distinct-ish bright colours (golden-ratio hues, shuffled), uint8 (n, 3)."""
    import colorsys

    rng = np.random.RandomState(seed)
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    sats = 0.55 + 0.35 * rng.rand(n)
    vals = 0.75 + 0.25 * rng.rand(n)
    cols = np.array([colorsys.hsv_to_rgb(h, s, v) for h, s, v in zip(hues, sats, vals)]).reshape(n, 3)
    return np.clip(np.round(cols * 255), 0, 255).astype(np.uint8)


def palette_image(labels: np.ndarray, seed: int = PALETTE_SEED) -> np.ndarray:
    """Each segment in a palette colour keyed by its label value (same label = same colour)."""
    lab = np.asarray(labels).astype(np.int64)
    valid = lab >= 0
    out = np.zeros(lab.shape + (3,), np.uint8)
    if valid.any():
        pal = _palette(int(lab.max()) + 1, seed)
        out[valid] = pal[lab[valid]]
    return out


def draw_boundaries(image: np.ndarray, labels: np.ndarray, color=(255, 255, 0),
                    thickness: int = 1) -> np.ndarray:
    """``image`` with the segment boundaries of ``labels`` drawn in ``color`` (uint8 RGB)."""
    from skimage.segmentation import find_boundaries

    out = np.array(image, dtype=np.uint8, copy=True)
    edges = find_boundaries(np.asarray(labels), mode="inner" if thickness <= 1 else "thick")
    if thickness > 2:
        import cv2

        k = np.ones((thickness - 1, thickness - 1), np.uint8)
        edges = cv2.dilate(edges.astype(np.uint8), k).astype(bool)
    out[edges] = np.asarray(color, np.uint8)
    return out


def boundary_thickness(shape) -> int:
    """Boundary line width for a picture of ``shape``: 1 pixel up to 400 pixels on the long side, else 2."""
    return 1 if max(shape[:2]) <= 400 else 2


def superpixel_panel(image: np.ndarray, superpixels: np.ndarray) -> np.ndarray:
    """The input with the superpixel contours (white)."""
    return draw_boundaries(image, superpixels, (255, 255, 255), boundary_thickness(image.shape))


def segment_panel(image: np.ndarray, labels: np.ndarray, mode: str = "mean", alpha: float = 1.0) -> np.ndarray:
    """A level's segments: filled with their mean colour (``mode="mean"``) or a palette colour
    (``"palette"``), optionally blended with the image (``alpha`` < 1), with boundaries."""
    if mode == "mean":
        fill = mean_color_image(image, labels)
        edge = (255, 255, 255)
    elif mode == "palette":
        fill = palette_image(labels)
        edge = (0, 0, 0)
    else:
        raise ValueError(f"unknown colour mode {mode!r}: 'mean' or 'palette'")
    if alpha < 1.0:
        fill = np.clip(alpha * fill.astype(np.float32) + (1 - alpha) * np.asarray(image, np.float32),
                       0, 255).astype(np.uint8)
    return draw_boundaries(fill, labels, edge, boundary_thickness(image.shape))


def hierarchy_panels(image: np.ndarray, levels: Sequence[np.ndarray], mode: str = "mean",
                     alpha: float = 1.0, asked: Optional[Sequence[int]] = None,
                     min_display: int = 256) -> List[Tuple[str, np.ndarray]]:
    """(title, picture) for the input, the superpixels (level 0) and every coarser level.

    ``levels``: level-0 superpixels first, then levels 1..L (all HxW). ``asked``: the segment
    count each level 1..L was asked for (shown when a level has fewer).
    Pictures smaller than ``min_display`` on their long side are enlarged by an integer factor
    (nearest neighbour) before the boundaries are drawn, so that the lines stay thin.
    """
    image = np.asarray(image, np.uint8)
    title0 = f"input {image.shape[1]}x{image.shape[0]}"
    k = max(1, -(-min_display // max(image.shape[:2]))) if min_display > 0 else 1
    if k > 1:
        image = np.repeat(np.repeat(image, k, 0), k, 1)
        levels = [np.repeat(np.repeat(np.asarray(l), k, 0), k, 1) for l in levels]
    panels = [(title0, image)]
    panels.append((f"superpixels: {count_segments(levels[0])}", superpixel_panel(image, levels[0])))
    for lvl in range(1, len(levels)):
        n = count_segments(levels[lvl])
        title = f"level {lvl}: {n} segment{'s' if n != 1 else ''}"
        if asked is not None and lvl - 1 < len(asked) and n < asked[lvl - 1]:
            title += f" (asked {asked[lvl - 1]})"
        panels.append((title, segment_panel(image, levels[lvl], mode, alpha)))
    return panels


def _text_block(text: str, width: int, height: int, max_scale: float = 0.6) -> np.ndarray:
    """A white strip ``height`` x ``width`` with ``text`` centred in black (OpenCV Hershey font,
    shrunk to fit)."""
    import cv2

    strip = np.full((height, width, 3), 255, np.uint8)
    font, thick = cv2.FONT_HERSHEY_SIMPLEX, 1
    scale = max_scale
    (tw, th), base = cv2.getTextSize(text, font, scale, thick)
    while tw > width - 4 and scale > 0.25:
        scale *= 0.9
        (tw, th), base = cv2.getTextSize(text, font, scale, thick)
    org = (max(2, (width - tw) // 2), (height + th) // 2)
    cv2.putText(strip, text, org, font, scale, (0, 0, 0), thick, cv2.LINE_AA)
    return strip


def compose_panel_grid(panels: Sequence[Tuple[str, np.ndarray]], ncols: int = 3,
                       suptitle: Optional[str] = None, gap: int = 6, title_h: int = 26) -> np.ndarray:
    """The panels (all HxWx3 uint8, same size) as one RGB picture: ``ncols`` per row, each with its
    title above it, optional ``suptitle`` on top, white background."""
    ncols = max(1, min(ncols, len(panels)))
    nrows = -(-len(panels) // ncols)
    h, w = panels[0][1].shape[:2]
    top = title_h + 4 if suptitle else 0
    width = ncols * w + (ncols + 1) * gap
    height = top + nrows * (title_h + h + gap) + gap
    canvas = np.full((height, width, 3), 255, np.uint8)
    if suptitle:
        canvas[:title_h, :] = _text_block(suptitle, width, title_h, 0.65)
    for i, (title, pic) in enumerate(panels):
        if pic.shape[:2] != (h, w):
            raise ValueError(f"panel {i} is {pic.shape[:2]}, expected {(h, w)}")
        r, c = divmod(i, ncols)
        y = top + gap + r * (title_h + h + gap)
        x = gap + c * (w + gap)
        canvas[y:y + title_h, x:x + w] = _text_block(title, w, title_h)
        canvas[y + title_h:y + title_h + h, x:x + w] = pic[..., :3]
    return canvas


def save_panel_grid(path: str, panels: Sequence[Tuple[str, np.ndarray]], ncols: int = 3,
                    suptitle: Optional[str] = None) -> str:
    """Write :func:`compose_panel_grid` as a PNG; returns ``path``."""
    import cv2

    grid = compose_panel_grid(panels, ncols, suptitle)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not cv2.imwrite(path, grid[:, :, ::-1]):
        raise OSError(f"could not write {path}")
    return path


def save_label_maps(prefix: str, levels: Sequence[np.ndarray], image: Optional[np.ndarray] = None,
                    extra: Optional[dict] = None) -> List[str]:
    """Write ``{prefix}_level{l}.png`` (16-bit PNG, label + 1, so 0 = no segment) per level and
    ``{prefix}_levels.npz`` with ``levels`` (L+1, H, W) int32 (-1 = no segment), ``num_segments``
    (present per level), ``image`` (if given) and ``extra`` entries. Returns the paths."""
    import cv2

    stack = np.stack([np.asarray(l) for l in levels]).astype(np.int32)
    if stack.max(initial=-1) >= 65535:
        raise ValueError(f"label {int(stack.max())} does not fit a 16-bit PNG")
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    paths = []
    for lvl, lab in enumerate(stack):
        p = f"{prefix}_level{lvl}.png"
        if not cv2.imwrite(p, (lab + 1).astype(np.uint16)):
            raise OSError(f"could not write {p}")
        paths.append(p)
    data = {"levels": stack, "num_segments": np.array([count_segments(l) for l in stack], np.int64)}
    if image is not None:
        data["image"] = np.asarray(image, np.uint8)
    data.update(extra or {})
    p = f"{prefix}_levels.npz"
    np.savez_compressed(p, **data)
    paths.append(p)
    return paths


def load_label_maps(path: str) -> np.ndarray:
    """Levels (L+1, H, W) int from an NPZ or a 16-bit PNG written by :func:`save_label_maps`
    (read by :func:`hiseg.image_io.read_image` as stored: a missing or damaged PNG is an
    ``InputError`` naming it)."""
    if path.endswith(".npz"):
        with np.load(path) as z:
            return z["levels"]
    from .image_io import read_image

    return (read_image(path, format=None).astype(np.int32) - 1)[None]


def is_nested(levels: Sequence[np.ndarray]) -> bool:
    """True when every level-l segment lies inside exactly one level-(l+1) segment."""
    for fine, coarse in zip(levels[:-1], levels[1:]):
        f = np.asarray(fine).ravel().astype(np.int64)
        c = np.asarray(coarse).ravel().astype(np.int64)
        keep = f >= 0
        if (c[keep] < 0).any():
            return False
        pairs = np.unique(np.stack([f[keep], c[keep]], 1), axis=0)
        if np.unique(pairs[:, 0]).size != pairs.shape[0]:
            return False
    return True
