#!/usr/bin/env python
"""Write DensePose-COCO coarse body-part label maps (0 background, 1..14 parts, 255 ignore).

Input (under $DETECTRON2_DATASETS)::

    coco/annotations/densepose_{split}.json       DensePose-COCO release (Güler et al., CVPR 2018)

Output (registered as ``densepose_coco_parts_{train,minival}``)::

    coco/densepose_parts_{split}/<image stem>.png

Each person's ``dp_masks`` (14 RLE masks on a 256x256 grid over its box) is pasted into the image
as in the official DensePose-COCO notebook; people without ``dp_masks`` are ignored (255) over
their COCO segmentation. See ``hiseg.data.datasets.densepose.render_part_map``. Files are written
atomically; existing ones are kept unless ``--overwrite``. A missing, invalid or empty JSON is
one ``error:`` line, exit status 2.
"""
import argparse
import os
from collections import defaultdict

from tqdm import tqdm

from hiseg.cli import script_main  # noqa: E402
from hiseg.utils.atomic_io import atomic_save_png  # noqa: E402
from hiseg.dataset_checks import read_json, require_files, require_input  # noqa: E402
from hiseg.errors import InputError  # noqa: E402
from hiseg.data.datasets.densepose import render_part_map  # noqa: E402


def parse_args(argv=None):
    root = os.environ.get("DETECTRON2_DATASETS", "datasets")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--split", default="minival2014",
        help="train2014, minival2014 or valminusminival2014 (default: minival2014)",
    )
    p.add_argument("--root", default=root)
    p.add_argument("--json", help="default: <root>/coco/annotations/densepose_<split>.json")
    p.add_argument("--output", help="default: <root>/coco/densepose_parts_<split>")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    args.json = args.json or os.path.join(
        args.root, "coco", "annotations", f"densepose_{args.split}.json"
    )
    args.output = args.output or os.path.join(args.root, "coco", f"densepose_parts_{args.split}")
    return args


def main(argv=None):
    args = parse_args(argv)
    how = ("download densepose_<split>.json of the DensePose-COCO release "
           "(https://github.com/facebookresearch/DensePose) into <root>/coco/annotations, or pass --json")
    require_input(args.json, "<root>/coco/annotations/densepose_<split>.json", how, kind="file")
    data = read_json(args.json, "DensePose-COCO JSON")
    if not isinstance(data, dict) or not {"images", "annotations"} <= set(data):
        raise InputError(f"{args.json}: not a DensePose-COCO JSON (needs 'images' and 'annotations'); {how}")
    require_files(data["images"], args.json, "'images'", how)
    by_image = defaultdict(list)
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(ann)
    n = 0
    for image in tqdm(data["images"], desc=f"densepose parts {args.split}"):
        out = os.path.join(args.output, os.path.splitext(image["file_name"])[0] + ".png")
        if os.path.isfile(out) and not args.overwrite:
            continue
        label = render_part_map(by_image[image["id"]], int(image["height"]), int(image["width"]))
        atomic_save_png(out, label)
        n += 1
    print(f"wrote {n} label maps to {args.output}")
    return n


if __name__ == "__main__":
    script_main(main, result_is_status=False)
