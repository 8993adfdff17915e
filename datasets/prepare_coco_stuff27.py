#!/usr/bin/env python
"""Write COCO-Stuff-27 label maps (STEGO / U2Seg's 27 classes) from COCO panoptic annotations.

Every panoptic category maps to the index (0..26) of its supercategory in the fixed order of
``hiseg.data.datasets.coco_stuff27.STUFF27_CLASSES``: the 12 thing supercategories
(electronic, appliance, food, furniture, indoor, kitchen, accessory, animal, outdoor, person,
sports, vehicle), then the 15 stuff supercategories (ceiling, floor, food-stuff,
furniture-stuff, raw-material, textile, wall, window, building, ground, plant, sky, solid,
structural, water), the order of STEGO's ``cocostuff27`` labels. Void pixels (panoptic id 0) and
pixels of segments missing from the JSON become 255. Outputs are 8-bit grayscale PNGs named
like the panoptic PNGs, written atomically; existing outputs are kept unless ``--overwrite``.

Input layout (the COCO 2017 panoptic release, under $DETECTRON2_DATASETS)::

    coco/annotations/panoptic_{split}2017.json
    coco/panoptic_{split}2017/*.png

Output: ``coco/stuff27_{split}2017/*.png`` (registered as ``coco_2017_{split}_stuff27``).

A missing or invalid input (JSON, folder) or a JSON without annotations is one ``error:`` line
(exit status 2); an unreadable panoptic PNG is a warning, is skipped and counted (exit status 1).
"""
import argparse
import os
from multiprocessing import Pool

import numpy as np
from tqdm import tqdm

from hiseg.data.datasets.coco_stuff27 import IGNORE_LABEL, category_to_label  # noqa: E402
from hiseg.cli import Skipped, script_main  # noqa: E402
from hiseg.utils.atomic_io import atomic_save_png  # noqa: E402
from hiseg.dataset_checks import read_json, require_files, require_input  # noqa: E402
from hiseg.image_io import InputError, read_image  # noqa: E402

LAYOUT = "<root>/coco/annotations/panoptic_<split>2017.json and <root>/coco/panoptic_<split>2017/*.png"
HOW = ("download panoptic_annotations_trainval2017.zip from https://cocodataset.org and unzip it "
       "(and the PNG zip inside it) under <root>/coco, or pass --panoptic-json / --panoptic-root")


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """Panoptic segment ids from an RGB PNG: R + 256 G + 256^2 B (COCO panoptic format)."""
    rgb = rgb.astype(np.uint32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def stuff27_label_map(pan_ids: np.ndarray, segments_info, cat_to_label) -> np.ndarray:
    """uint8 label map: each segment's supercategory label, 255 for void / unlisted segments."""
    seg_to_label = {int(s["id"]): cat_to_label[int(s["category_id"])] for s in segments_info}
    uniq, inverse = np.unique(pan_ids, return_inverse=True)
    lut = np.array([seg_to_label.get(int(u), IGNORE_LABEL) for u in uniq], dtype=np.uint8)
    return lut[inverse.reshape(-1)].reshape(pan_ids.shape)


def _convert_one(job):
    png_in, png_out, segments_info, cat_to_label, overwrite = job
    if not overwrite and os.path.isfile(png_out):
        return png_out
    try:
        pan = rgb_to_id(read_image(png_in, format="RGB"))
    except InputError as e:
        return ("skipped", png_in, str(e))
    atomic_save_png(png_out, stuff27_label_map(pan, segments_info, cat_to_label))
    return png_out


def parse_args(argv=None):
    root = os.environ.get("DETECTRON2_DATASETS", "datasets")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", choices=["train", "val"], default="val")
    p.add_argument("--root", default=root, help="datasets root (default: $DETECTRON2_DATASETS)")
    p.add_argument(
        "--panoptic-json", help="default: <root>/coco/annotations/panoptic_<split>2017.json"
    )
    p.add_argument("--panoptic-root", help="default: <root>/coco/panoptic_<split>2017")
    p.add_argument("--output", help="default: <root>/coco/stuff27_<split>2017")
    p.add_argument(
        "--categories",
        help="panoptic_coco_categories.json to take supercategories from "
        "(default: the 'categories' of --panoptic-json)",
    )
    p.add_argument("--workers", type=int, default=0, help="worker processes (0: none)")
    p.add_argument("--overwrite", action="store_true", help="rewrite existing label maps")
    args = p.parse_args(argv)
    coco = os.path.join(args.root, "coco")
    args.panoptic_json = args.panoptic_json or os.path.join(
        coco, "annotations", f"panoptic_{args.split}2017.json"
    )
    args.panoptic_root = args.panoptic_root or os.path.join(coco, f"panoptic_{args.split}2017")
    args.output = args.output or os.path.join(coco, f"stuff27_{args.split}2017")
    return args


def main(argv=None):
    args = parse_args(argv)
    require_input(args.panoptic_json, LAYOUT, HOW, kind="file")
    require_input(args.panoptic_root, LAYOUT, HOW)
    panoptic = read_json(args.panoptic_json, "COCO panoptic JSON")
    if not isinstance(panoptic, dict) or "annotations" not in panoptic:
        raise InputError(f"{args.panoptic_json}: not a COCO panoptic JSON (no 'annotations'); {HOW}")
    require_files(panoptic["annotations"], args.panoptic_json, "'annotations'", HOW)
    if args.categories:
        categories = read_json(args.categories, "categories JSON")
    else:
        categories = panoptic["categories"]
    cat_to_label = category_to_label(categories)
    os.makedirs(args.output, exist_ok=True)
    jobs = [
        (
            os.path.join(args.panoptic_root, ann["file_name"]),
            os.path.join(args.output, os.path.splitext(ann["file_name"])[0] + ".png"),
            ann["segments_info"],
            cat_to_label,
            args.overwrite,
        )
        for ann in panoptic["annotations"]
    ]
    if args.workers > 0:
        with Pool(args.workers) as pool:
            outputs = list(
                tqdm(pool.imap_unordered(_convert_one, jobs, chunksize=16), total=len(jobs))
            )
    else:
        outputs = [_convert_one(j) for j in tqdm(jobs, desc=f"stuff27 {args.split}")]
    skipped = Skipped("panoptic PNG")
    for o in outputs:
        if isinstance(o, tuple):
            skipped.add(o[1], o[2])
    outputs = [o for o in outputs if not isinstance(o, tuple)]
    print(f"wrote {len(outputs)} label maps to {args.output}")
    skipped.finish(len(jobs))
    return sorted(outputs)


if __name__ == "__main__":
    script_main(main, result_is_status=False)
