#!/usr/bin/env python
"""Write a class-agnostic copy of a COCO instances JSON: every category becomes one, ``fg``.

This is the annotation file of CutLER's ``cls_agnostic_coco`` evaluation set
(https://github.com/facebookresearch/CutLER, ``datasets/coco/annotations/
coco_cls_agnostic_instances_val2017.json``). All annotations keep their ``id``, ``image_id``,
``bbox``, ``area``, ``segmentation`` and ``iscrowd``; only ``category_id`` becomes 1 and the
category list becomes ``[{"id": 1, "name": "fg", "supercategory": "fg"}]``. Images, info and
licences are copied unchanged. The same script makes the VOC / UVO files from their COCO-format
annotations (``--input`` / ``--output``).

Example::

    python datasets/prepare_cls_agnostic_coco.py            # COCO val2017, CutLER's path
    python datasets/prepare_cls_agnostic_coco.py --input a.json --output b.json

A missing, invalid (truncated) or empty input JSON, or an ``--output`` that cannot be written
(a folder, a read-only place), is one ``error:`` line, exit status 2.
"""
import argparse
import os

from hiseg.data.datasets.cls_agnostic import FG_CATEGORY, class_agnostic_coco  # noqa: E402
from hiseg.cli import ArgumentParser, check_output_file, script_main  # noqa: E402
from hiseg.utils.atomic_io import atomic_write_json  # noqa: E402
from hiseg.dataset_checks import read_json, require_files, require_input  # noqa: E402
from hiseg.errors import InputError  # noqa: E402

LAYOUT = "<root>/coco/annotations/instances_val2017.json (a COCO instances JSON)"
HOW = ("download annotations_trainval2017.zip from https://cocodataset.org and unzip it under "
       "<root>/coco, or pass --input")


def make_class_agnostic(coco: dict, show_progress: bool = False) -> dict:
    """The class-agnostic version of a COCO instances dict (a new dict; the input is untouched):
    :func:`hiseg.data.datasets.cls_agnostic.class_agnostic_coco`, the one home of the rewrite.
    ``show_progress`` is accepted for old callers and ignored (the rewrite takes milliseconds)."""
    return class_agnostic_coco(coco)


def parse_args(argv=None):
    root = os.environ.get("DETECTRON2_DATASETS", "datasets")
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--input",
        default=os.path.join(root, "coco", "annotations", "instances_val2017.json"),
        help="COCO instances JSON "
        "(default: $DETECTRON2_DATASETS/coco/annotations/instances_val2017.json)",
    )
    p.add_argument(
        "--output",
        default=os.path.join(
            root, "coco", "annotations", "coco_cls_agnostic_instances_val2017.json"
        ),
        help="where to write the class-agnostic JSON (default: CutLER's path)",
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    require_input(args.input, LAYOUT, HOW, kind="file")
    check_output_file(args.output, "--output")  # before reading the input (COCO's is large)
    coco = read_json(args.input, "COCO instances JSON")
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise InputError(f"{args.input}: not a COCO instances JSON (no 'images' list); {HOW}")
    require_files(coco["images"], args.input, "'images'", HOW)
    out = make_class_agnostic(coco)
    atomic_write_json(args.output, out)
    print(
        f"wrote {args.output}: {len(out['images'])} images, {len(out['annotations'])} annotations, "
        f"1 category ('{FG_CATEGORY['name']}') from {len(coco.get('categories', []))}"
    )
    return out


if __name__ == "__main__":
    script_main(main, result_is_status=False)
