#!/usr/bin/env python
"""Write PASCAL-Context-59 label maps for detectron2 from mmsegmentation-format labels.

Input (under $DETECTRON2_DATASETS/VOCdevkit/VOC2010)::

    SegmentationClassContext/<id>.png             0 = background, 1..59 the PC-59 classes
    ImageSets/SegmentationContext/{train,val}.txt

``SegmentationClassContext`` is written by mmsegmentation's ``tools/dataset_converters/
pascal_context.py`` from the PASCAL-Context ``trainval_merged.json`` (Detail API); it is not
redistributed here. This script shifts the classes to 0..58 and maps background to 255
(ignored), mmsegmentation's ``reduce_zero_label`` for PC-59, and writes
``annotations_detectron2/pc59_{split}/<id>.png`` (registered as ``pascal_context_59_sem_seg_*``).
Values above 59 are rejected. Files are written atomically; existing ones are kept unless
``--overwrite``. A missing input folder / list or an empty list is one ``error:`` line (exit
status 2); an unreadable label map is a warning, is skipped and counted (exit status 1).
"""
import argparse
import os

import numpy as np

from hiseg.cli import Skipped, script_main  # noqa: E402
from hiseg.data.datasets.common import convert_label_maps, reduce_zero_label  # noqa: E402
from hiseg.dataset_checks import require_files, require_input  # noqa: E402

LAYOUT = ("<voc-root>/SegmentationClassContext/<id>.png and "
          "<voc-root>/ImageSets/SegmentationContext/{train,val}.txt")
HOW = "run mmsegmentation's tools/dataset_converters/pascal_context.py first, or pass --voc-root"


def pc59_labels(label: np.ndarray) -> np.ndarray:
    """0 -> 255 and k -> k - 1 for k in 1..59 (uint8)."""
    return reduce_zero_label(label, 59, "PC-59")


def parse_args(argv=None):
    root = os.environ.get("DETECTRON2_DATASETS", "datasets")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--voc-root", default=os.path.join(root, "VOCdevkit", "VOC2010"))
    p.add_argument("--split", choices=["train", "val"], nargs="+", default=["train", "val"])
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    src = os.path.join(args.voc_root, "SegmentationClassContext")
    written, skipped, total = {}, Skipped("label map"), 0
    for split in args.split:
        list_file = os.path.join(args.voc_root, "ImageSets", "SegmentationContext", f"{split}.txt")
        require_input(src, LAYOUT, HOW)
        require_input(list_file, LAYOUT, HOW, kind="file")
        with open(list_file) as f:
            ids = require_files([line.strip() for line in f if line.strip()], list_file, "image ids", HOW)
        total += len(ids)
        out_dir = os.path.join(args.voc_root, "annotations_detectron2", f"pc59_{split}")
        items = ((i, os.path.join(src, i + ".png"), os.path.join(out_dir, i + ".png")) for i in ids)
        written[split] = convert_label_maps(items, pc59_labels, skipped, args.overwrite, desc=f"pc59 {split}")
        print(f"{split}: {written[split]} label maps in {out_dir}")
    skipped.finish(total)
    return written


if __name__ == "__main__":
    script_main(main, result_is_status=False)
