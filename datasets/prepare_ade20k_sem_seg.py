#!/usr/bin/env python
"""Write the label maps of detectron2's built-in ``ade20k_sem_seg_{train,val}`` (SceneParsing-150).

detectron2 registers ``ade20k_sem_seg_train`` / ``ade20k_sem_seg_val`` itself (``builtin.py``),
reading ``ADEChallengeData2016/annotations_detectron2/{training,validation}/*.png`` in which the
150 classes are 0..149 and 255 is ignored. The official ``ADEChallengeData2016`` release stores
0 = "other" (ignored) and 1..150 = the classes; this script shifts them (0 -> 255, k -> k - 1),
the conversion of detectron2's own ``datasets/prepare_ade20k_sem_seg.py``, which the pip/sdist
package does not ship. Files are written atomically; existing ones are kept unless
``--overwrite``.

Input::   ADEChallengeData2016/annotations/{training,validation}/*.png
Output::  ADEChallengeData2016/annotations_detectron2/{training,validation}/*.png
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from hiseg.data.datasets.common import atomic_save_png, reduce_zero_label  # noqa: E402


def shift_labels(label: np.ndarray) -> np.ndarray:
    """0 -> 255 and k -> k - 1 for k in 1..150 (uint8)."""
    return reduce_zero_label(label, 150, "SceneParsing-150")


def parse_args(argv=None):
    root = os.environ.get("DETECTRON2_DATASETS", "datasets")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ade-root", default=os.path.join(root, "ADEChallengeData2016"))
    p.add_argument("--split", nargs="+", choices=["training", "validation"],
                   default=["training", "validation"])  # fmt: skip
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    counts = {}
    for split in args.split:
        src = os.path.join(args.ade_root, "annotations", split)
        dst = os.path.join(args.ade_root, "annotations_detectron2", split)
        if not os.path.isdir(src):
            raise SystemExit(f"not found: {src} (download ADEChallengeData2016.zip)")
        files = sorted(f for f in os.listdir(src) if f.endswith(".png"))
        for f in tqdm(files, desc=split):
            out = os.path.join(dst, f)
            if os.path.isfile(out) and not args.overwrite:
                continue
            atomic_save_png(out, shift_labels(np.asarray(Image.open(os.path.join(src, f)))))
        counts[split] = len(files)
        print(f"{split}: {len(files)} label maps in {dst}")
    return counts


if __name__ == "__main__":
    main()
