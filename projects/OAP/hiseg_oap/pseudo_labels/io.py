"""COCO results files: checked (:func:`validate_results`), written atomically
(:func:`write_results`), read (:func:`load_results`), and turned into a full annotation file to
train on (:func:`results_to_coco_dataset`, as CutLER's ``imagenet_train_fixsize480_tau0.15_N3.json``)."""
from __future__ import annotations

import json
import os
from typing import List, Mapping, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_util

# the single class of class-agnostic sets (CutLER's: id 1, ``fg``)
from hiseg.data.datasets.cls_agnostic import FG_CATEGORY
from hiseg.utils.atomic_io import atomic_write_json

from .encoding import rle_for_api

__all__ = ["validate_results", "write_results", "load_results", "results_to_coco_dataset"]


def validate_results(results: Sequence[Mapping], image_sizes: Optional[Mapping] = None) -> None:
    """Check COCO result entries: required fields and types, a decodable RLE, the ``bbox`` of the
    mask, and (when ``image_sizes`` maps image id -> (H, W)) the mask size. Raises ValueError."""
    if not isinstance(results, (list, tuple)):
        raise ValueError(f"COCO results must be a list, got {type(results).__name__}")
    for i, r in enumerate(results):
        where = f"result {i}"
        if not isinstance(r, Mapping):
            raise ValueError(f"{where}: not a dict")
        for key in ("image_id", "category_id", "segmentation", "bbox", "score"):
            if key not in r:
                raise ValueError(f"{where}: missing {key!r}")
        seg = r["segmentation"]
        if not isinstance(seg, Mapping) or not isinstance(seg.get("counts"), str):
            raise ValueError(f"{where}: segmentation must be an RLE with str 'counts'")
        try:
            rle = rle_for_api(seg)
            box = mask_util.toBbox(rle)
            area = float(mask_util.area(rle))
        except Exception as e:  # pycocotools raises plain exceptions on bad strings
            raise ValueError(f"{where}: RLE cannot be decoded: {e}") from e
        if area <= 0:
            raise ValueError(f"{where}: empty mask")
        if len(r["bbox"]) != 4 or not np.allclose(np.asarray(r["bbox"], float), box, atol=1e-6):
            raise ValueError(f"{where}: bbox {r['bbox']} is not the mask's box {box.tolist()}")
        if not isinstance(r["score"], (int, float)) or not np.isfinite(r["score"]):
            raise ValueError(f"{where}: score must be a finite number, got {r['score']!r}")
        if image_sizes is not None:
            want = image_sizes.get(r["image_id"])
            if want is not None and tuple(int(v) for v in seg["size"]) != tuple(int(v) for v in want):
                raise ValueError(f"{where}: mask size {list(seg['size'])} differs from image "
                                 f"{r['image_id']}'s size {list(want)}")


def write_results(path: str, results: Sequence[Mapping], validate: bool = True) -> str:
    """Write COCO results (a JSON list) atomically (a reader never sees a partial file; an
    interrupted run leaves none), after :func:`validate_results`. Returns ``path``."""
    results = list(results)
    if validate:
        validate_results(results)
    atomic_write_json(path, results)
    return os.fspath(path)


def load_results(path: str) -> List[dict]:
    """Read a COCO results JSON written by :func:`write_results` (validated)."""
    with open(path) as f:
        results = json.load(f)
    validate_results(results)
    return results


def results_to_coco_dataset(results: Sequence[Mapping], images: Sequence[Mapping],
                            info: Optional[dict] = None) -> dict:
    """A full COCO instances dict of the pseudo-masks (CutLER's pseudo-label annotation file):
    ``images`` (``id``, ``file_name``, ``height``, ``width``), one ``fg`` category, and one
    annotation per result with ``id``, ``iscrowd`` 0 and ``area`` (mask pixels) added."""
    anns = []
    for i, r in enumerate(results, start=1):
        a = dict(r)
        a["id"] = i
        a["iscrowd"] = 0
        a["area"] = float(mask_util.area(rle_for_api(r["segmentation"])))
        anns.append(a)
    return {
        "info": dict(info or {"description": "pseudo-masks (tools/generate_pseudo_masks.py)"}),
        "licenses": [],
        "images": [dict(im) for im in images],
        "categories": [dict(FG_CATEGORY)],
        "annotations": anns,
    }
