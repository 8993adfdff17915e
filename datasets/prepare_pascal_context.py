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
``--overwrite``.
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from hiseg.data.datasets.common import atomic_save_png, reduce_zero_label  # noqa: E402


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
    written = {}
    for split in args.split:
        list_file = os.path.join(args.voc_root, "ImageSets", "SegmentationContext", f"{split}.txt")
        for path in (src, list_file):
            if not os.path.exists(path):
                raise SystemExit(
                    f"not found: {path} (run mmsegmentation's pascal_context converter first)"
                )
        with open(list_file) as f:
            ids = [line.strip() for line in f if line.strip()]
        out_dir = os.path.join(args.voc_root, "annotations_detectron2", f"pc59_{split}")
        for image_id in tqdm(ids, desc=f"pc59 {split}"):
            out = os.path.join(out_dir, image_id + ".png")
            if os.path.isfile(out) and not args.overwrite:
                continue
            label = np.asarray(Image.open(os.path.join(src, image_id + ".png")))
            atomic_save_png(out, pc59_labels(label))
        written[split] = len(ids)
        print(f"{split}: {len(ids)} label maps in {out_dir}")
    return written


if __name__ == "__main__":
    main()
