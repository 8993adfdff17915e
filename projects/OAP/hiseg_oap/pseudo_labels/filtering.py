"""The export filters: masks covering most of their image dropped, a maximum per image
(:func:`filter_results`)."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

from pycocotools import mask as mask_util

from .encoding import rle_for_api

__all__ = ["DEFAULT_MAX_AREA_FRACTION", "DEFAULT_MAX_PER_IMAGE", "mask_area_fraction", "filter_results"]

#: defaults of :func:`filter_results` and of ``tools/generate_pseudo_masks.py``, chosen by the
#: class-agnostic AP of the exported masks on COCO val (docs/your_data.md, "Export defaults")
DEFAULT_MAX_AREA_FRACTION = 0.9
DEFAULT_MAX_PER_IMAGE = 100


def mask_area_fraction(result: Mapping) -> float:
    """The fraction of its image that a result's mask covers (the RLE's size is the image's)."""
    rle = rle_for_api(result["segmentation"])
    h, w = rle["size"]
    return float(mask_util.area(rle)) / max(1, int(h) * int(w))


def filter_results(results: Sequence[Mapping], max_area_fraction: Optional[float] = DEFAULT_MAX_AREA_FRACTION,
                   max_per_image: Optional[int] = DEFAULT_MAX_PER_IMAGE) -> List[dict]:
    """The results a user exports to train on, in their original order:

    * ``max_area_fraction``: masks covering more than this fraction of their image are dropped
      (a mask of nearly the whole image is background or "everything", not an object, and a
      detector trained on it learns to box the whole image); None or 1 keeps all;
    * ``max_per_image``: at most this many masks per image, the highest ``score`` first (ties:
      the earlier mask); None or 0 keeps all.
    """
    if max_area_fraction is not None and not 0 < max_area_fraction <= 1:
        raise ValueError(f"max_area_fraction must be in (0, 1], got {max_area_fraction}")
    if max_per_image is not None and max_per_image < 0:
        raise ValueError(f"max_per_image must be >= 0, got {max_per_image}")
    keep = list(range(len(results)))
    if max_area_fraction is not None and max_area_fraction < 1:
        keep = [i for i in keep if mask_area_fraction(results[i]) <= max_area_fraction]
    if max_per_image:
        by_image: Dict = {}
        for i in keep:
            by_image.setdefault(results[i]["image_id"], []).append(i)
        chosen = set()
        for idx in by_image.values():
            chosen.update(sorted(idx, key=lambda i: (-float(results[i]["score"]), i))[:max_per_image])
        keep = [i for i in keep if i in chosen]
    return [dict(results[i]) for i in keep]
