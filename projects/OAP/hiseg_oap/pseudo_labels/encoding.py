"""One binary mask <-> one COCO result entry, the format of CutLER's pseudo-labels and of
``COCO.loadRes``: ``image_id``, ``category_id`` 1, RLE ``segmentation`` with ``counts`` as ``str``,
``bbox`` xywh computed from the mask, ``score``, plus any extra fields such as ``level`` / ``layer``.
"""
from __future__ import annotations

from typing import List, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_util

__all__ = ["encode_mask", "rle_for_api", "decode_segmentation", "bbox_from_mask", "mask_to_result",
           "masks_to_results"]


def encode_mask(mask: np.ndarray) -> dict:
    """COCO compressed RLE of an ``(H, W)`` binary mask, ``counts`` decoded to ``str`` (JSON)."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {m.shape}")
    rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_for_api(seg: Mapping) -> dict:
    """A compressed RLE as pycocotools wants it (``counts`` as bytes); accepts uncompressed RLE."""
    if not isinstance(seg, Mapping) or "counts" not in seg or "size" not in seg:
        raise ValueError(f"segmentation is not an RLE dict with 'size' and 'counts': {str(seg)[:80]}")
    h, w = (int(v) for v in seg["size"])
    counts = seg["counts"]
    if isinstance(counts, list):
        return mask_util.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": [h, w], "counts": counts}


def decode_segmentation(seg: Mapping) -> np.ndarray:
    """``(H, W)`` bool mask of a result's RLE ``segmentation`` (compressed or not)."""
    return mask_util.decode(rle_for_api(seg)).astype(bool)


def bbox_from_mask(mask: np.ndarray) -> List[float]:
    """``[x, y, w, h]`` of the tightest box around the mask's pixels (COCO convention: pixel
    ``(x, y)`` spans ``[x, x + 1)``), ``[0, 0, 0, 0]`` for an empty mask."""
    m = np.asarray(mask, dtype=bool)
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    if rows.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


def mask_to_result(mask: np.ndarray, image_id, score: float = 1.0, category_id: int = 1, **extra) -> dict:
    """One COCO result entry for an ``(H, W)`` mask at image size."""
    rle = encode_mask(mask)
    box = mask_util.toBbox(rle_for_api(rle))
    out = {
        "image_id": image_id,
        "category_id": int(category_id),
        "segmentation": rle,
        "bbox": [float(v) for v in box],
        "score": float(score),
    }
    out.update(extra)
    return out


def masks_to_results(masks: np.ndarray, image_id, scores: Sequence[float], category_id: int = 1,
                     **extra) -> List[dict]:
    """:func:`mask_to_result` for a ``(K, H, W)`` stack (one pycocotools call); empty masks are
    skipped. ``extra`` values that are sequences of length K are split per mask."""
    m = np.asarray(masks)
    if m.ndim != 3:
        raise ValueError(f"expected (K, H, W) masks, got shape {m.shape}")
    k = m.shape[0]
    if len(scores) != k:
        raise ValueError(f"{k} masks but {len(scores)} scores")
    if k == 0:
        return []
    rles = mask_util.encode(np.asfortranarray(m.transpose(1, 2, 0).astype(np.uint8)))
    boxes = mask_util.toBbox(rles)
    areas = mask_util.area(rles)
    out = []
    for i, rle in enumerate(rles):
        if areas[i] == 0:
            continue
        entry = {
            "image_id": image_id,
            "category_id": int(category_id),
            "segmentation": {"size": [int(rle["size"][0]), int(rle["size"][1])],
                             "counts": rle["counts"].decode("ascii")},
            "bbox": [float(v) for v in boxes[i]],
            "score": float(scores[i]),
        }
        for key, val in extra.items():
            entry[key] = val[i] if isinstance(val, (list, tuple, np.ndarray)) and len(val) == k else val
        out.append(entry)
    return out
