#!/usr/bin/env python
"""Write Cityscapes panoptic ground truth (COCO panoptic format) for detectron2's built-ins.

detectron2 registers ``cityscapes_fine_panoptic_{train,val}``, reading (under
$DETECTRON2_DATASETS)::

    cityscapes/leftImg8bit/<split>/<city>/*_leftImg8bit.png
    cityscapes/gtFine/<split>/<city>/*_gtFine_labelTrainIds.png      (sem_seg_file_name)
    cityscapes/gtFine/cityscapes_panoptic_<split>.json
    cityscapes/gtFine/cityscapes_panoptic_<split>/<image_id>_gtFine_panoptic.png

This script writes the last two from the official ``gtFine/<split>/<city>/*_gtFine_labelIds.png``
and ``*_gtFine_instanceIds.png``, in the layout of cityscapesScripts'
``preparation/createPanopticImgs.py`` (no cityscapesScripts needed):

* categories: the 19 evaluated classes of detectron2's ``CITYSCAPES_CATEGORIES``, by Cityscapes
  label id (``id``, ``name``, ``color``, ``isthing``, ``supercategory``); pixels of any other
  label (``ignoreInEval`` ones, e.g. ego vehicle, caravan, trailer) are void (segment id 0);
* segment ids: the ``instanceIds`` value, i.e. ``label_id * 1000 + k`` for a thing instance and
  ``label_id`` for a stuff region or for a thing region without instance ids (a group label such
  as "cars"), which gets ``iscrowd: 1``; stuff segments have ``iscrowd: 0``;
* per image a PNG with segment id = R + 256 G + 256^2 B, and one JSON per split with ``images``
  (``id`` = ``<city>_<seq>_<frame>``), ``annotations`` (``image_id``, ``file_name``,
  ``segments_info`` with ``id``, ``category_id``, ``iscrowd``, ``area``, ``bbox`` = [x, y, w, h])
  and ``categories``.

``labelIds`` and ``instanceIds`` must agree (an instance ``l * 1000 + k`` lies on label ``l``,
every other pixel carries its label); a disagreement is an error. The JSON's ``images`` name the
real ``*_leftImg8bit.png`` files (createPanopticImgs writes ``*_gtFine_leftImg8bit.png``, which
no reader uses). Every file is written atomically. Existing PNGs are kept unless
``--overwrite``; the JSON is always rebuilt from the PNGs on disk, so it describes them exactly.

A missing ``gtFine/<split>`` folder or one without label maps is one ``error:`` line (exit
status 2); a frame whose label maps cannot be read (truncated, empty, not a PNG) is a warning, is
left out of the JSON and counted, and the exit status is 1.
"""
import argparse
import glob
import json
import os
from multiprocessing import Pool

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from hiseg.cli import Skipped, script_main  # noqa: E402
from hiseg.utils.atomic_io import atomic_write  # noqa: E402
from hiseg.dataset_checks import require_files, require_input  # noqa: E402
from hiseg.image_io import InputError, read_image  # noqa: E402

LAYOUT = "<cityscapes-root>/gtFine/<split>/<city>/*_gtFine_{labelIds,instanceIds}.png"
HOW = ("download gtFine_trainvaltest.zip from https://www.cityscapes-dataset.com and unzip it in "
       "<root>/cityscapes, or pass --cityscapes-root")

LABEL_DIVISOR = 1000  # instanceIds: label_id * 1000 + instance index for thing instances

# Cityscapes' label "category" of each evaluated class (cityscapesScripts' labels.py).
SUPERCATEGORY = {
    "road": "flat", "sidewalk": "flat",
    "building": "construction", "wall": "construction", "fence": "construction",
    "pole": "object", "traffic light": "object", "traffic sign": "object",
    "vegetation": "nature", "terrain": "nature", "sky": "sky",
    "person": "human", "rider": "human",
    "car": "vehicle", "truck": "vehicle", "bus": "vehicle", "train": "vehicle",
    "motorcycle": "vehicle", "bicycle": "vehicle",
}  # fmt: skip


def panoptic_categories():
    """The COCO-panoptic ``categories`` list: detectron2's 19 evaluated Cityscapes classes."""
    from detectron2.data.datasets.builtin_meta import CITYSCAPES_CATEGORIES

    return [
        {
            "id": int(c["id"]),
            "name": c["name"],
            "color": [int(v) for v in c["color"]],
            "supercategory": SUPERCATEGORY.get(c["name"], c["name"]),
            "isthing": int(c["isthing"]),
        }
        for c in CITYSCAPES_CATEGORIES
    ]


def panoptic_ids(label_ids: np.ndarray, instance_ids: np.ndarray, categories) -> np.ndarray:
    """(H, W) int32 segment ids from a frame's ``labelIds`` and ``instanceIds`` maps.

    Pixels of a label outside ``categories`` are 0 (void); a thing pixel with an instance id
    (>= 1000) keeps it; every other evaluated pixel gets its label id.
    """
    label = np.asarray(label_ids).astype(np.int64)
    inst = np.asarray(instance_ids).astype(np.int64)
    if label.ndim != 2 or label.shape != inst.shape:
        raise ValueError(f"labelIds {label.shape} and instanceIds {inst.shape} differ in shape")
    has_instance = inst >= LABEL_DIVISOR
    expected = np.where(has_instance, inst // LABEL_DIVISOR, inst)
    bad = expected != label
    if bad.any():
        y, x = np.argwhere(bad)[0]
        raise ValueError(
            f"labelIds and instanceIds disagree at {int(bad.sum())} pixels, e.g. (y={y}, x={x}): "
            f"label {label[y, x]}, instance id {inst[y, x]}"
        )
    lut = np.zeros(max(int(label.max()), 0) + 1, dtype=bool)
    evaluated = [c["id"] for c in categories if 0 <= c["id"] < lut.size]
    lut[evaluated] = True
    keep = (label >= 0) & lut[np.clip(label, 0, None)]
    return np.where(keep, np.where(has_instance, inst, label), 0).astype(np.int32)


def segments_info(pan: np.ndarray, categories):
    """COCO-panoptic ``segments_info`` of a segment-id map made by :func:`panoptic_ids` (ids in
    increasing order; the id says the category and whether it is a crowd region)."""
    isthing = {c["id"]: bool(c["isthing"]) for c in categories}
    uniq, inverse, counts = np.unique(pan, return_inverse=True, return_counts=True)
    boxes = ndimage.find_objects(inverse.reshape(pan.shape).astype(np.int32) + 1)
    infos = []
    for index, (sid, area) in enumerate(zip(uniq.tolist(), counts.tolist())):
        if sid == 0:
            continue
        instance = sid >= LABEL_DIVISOR
        category = sid // LABEL_DIVISOR if instance else sid
        if category not in isthing:
            raise ValueError(f"segment id {sid}: category {category} is not an evaluated class")
        if instance and not isthing[category]:
            raise ValueError(f"segment id {sid}: instance of the stuff class {category}")
        rows, cols = boxes[index]
        infos.append(
            {
                "id": int(sid),
                "category_id": int(category),
                "iscrowd": int(isthing[category] and not instance),
                "area": int(area),
                "bbox": [int(cols.start), int(rows.start),
                         int(cols.stop - cols.start), int(rows.stop - rows.start)],
            }  # fmt: skip
        )
    return infos


def id_to_rgb(pan: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 COCO-panoptic encoding: id = R + 256 G + 256^2 B."""
    pan = np.asarray(pan).astype(np.int64)
    if pan.size and (pan.min() < 0 or pan.max() >= 256**3):
        raise ValueError("segment ids must lie in [0, 256^3)")
    return np.stack([pan % 256, pan // 256 % 256, pan // 256**2], axis=-1).astype(np.uint8)


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb).astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def _convert_one(job):
    """One frame: write (or keep) its panoptic PNG; return its ``images`` / ``annotations``
    entries, computed from the PNG's ids."""
    label_file, out_png, categories, overwrite = job
    stem = os.path.basename(label_file)[: -len("_gtFine_labelIds.png")]
    if overwrite or not os.path.isfile(out_png):
        instance_file = label_file[: -len("labelIds.png")] + "instanceIds.png"
        try:
            label, inst = read_image(label_file, format=None), read_image(instance_file, format=None)
        except InputError as e:
            return ("skipped", label_file, str(e))
        pan = panoptic_ids(label, inst, categories)
        with atomic_write(out_png, "wb") as f:
            Image.fromarray(id_to_rgb(pan)).save(f, format="PNG")
    else:
        try:
            pan = rgb_to_id(read_image(out_png, format="RGB"))
        except InputError as e:
            return ("skipped", out_png, f"{e} (delete it to have it rewritten)")
    image = {
        "id": stem,
        "width": int(pan.shape[1]),
        "height": int(pan.shape[0]),
        "file_name": stem + "_leftImg8bit.png",
    }
    annotation = {
        "image_id": stem,
        "file_name": os.path.basename(out_png),
        "segments_info": segments_info(pan, categories),
    }
    return image, annotation


def convert_split(cityscapes_root, split, overwrite=False, workers=0, show_progress=True):
    """Write ``gtFine/cityscapes_panoptic_<split>{.json,/}``; returns the JSON dict."""
    gt_root = os.path.join(cityscapes_root, "gtFine")
    pattern = os.path.join(gt_root, split, "*", "*_gtFine_labelIds.png")
    require_input(os.path.join(gt_root, split), LAYOUT, HOW)
    label_files = require_files(sorted(glob.glob(pattern)), os.path.join(gt_root, split),
                                "<city>/*_gtFine_labelIds.png", HOW)
    out_dir = os.path.join(gt_root, f"cityscapes_panoptic_{split}")
    categories = panoptic_categories()
    jobs = []
    for label_file in label_files:
        stem = os.path.basename(label_file)[: -len("_gtFine_labelIds.png")]
        jobs.append((label_file, os.path.join(out_dir, stem + "_gtFine_panoptic.png"),
                     categories, overwrite))  # fmt: skip
    os.makedirs(out_dir, exist_ok=True)
    desc = f"cityscapes panoptic {split}"
    if workers > 0:
        with Pool(workers) as pool:
            it = pool.imap(_convert_one, jobs, chunksize=8)
            results = list(tqdm(it, total=len(jobs), desc=desc, disable=not show_progress))
    else:
        results = [_convert_one(j) for j in tqdm(jobs, desc=desc, disable=not show_progress)]
    skipped = Skipped("frame")
    for r in results:
        if r[0] == "skipped":
            skipped.add(r[1], r[2])
    results = [r for r in results if r[0] != "skipped"]
    panoptic = {
        "images": [r[0] for r in results],
        "annotations": [r[1] for r in results],
        "categories": categories,
    }
    out_json = os.path.join(gt_root, f"cityscapes_panoptic_{split}.json")
    with atomic_write(out_json, "w") as f:
        json.dump(panoptic, f)
    print(f"{split}: {len(results)} panoptic PNGs in {out_dir}, annotations in {out_json}")
    skipped.finish(len(jobs))
    return panoptic


def parse_args(argv=None):
    root = os.environ.get("DETECTRON2_DATASETS", "datasets")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=root, help="datasets root (default: $DETECTRON2_DATASETS)")
    p.add_argument("--cityscapes-root", help="default: <root>/cityscapes")
    p.add_argument("--split", nargs="+", choices=["train", "val", "test"], default=["val", "train"])
    p.add_argument("--workers", type=int, default=0, help="worker processes (0: none)")
    p.add_argument("--overwrite", action="store_true", help="rewrite existing panoptic PNGs")
    args = p.parse_args(argv)
    args.cityscapes_root = args.cityscapes_root or os.path.join(args.root, "cityscapes")
    return args


def main(argv=None):
    args = parse_args(argv)
    return {
        split: convert_split(args.cityscapes_root, split, args.overwrite, args.workers)
        for split in args.split
    }


if __name__ == "__main__":
    script_main(main, result_is_status=False)
