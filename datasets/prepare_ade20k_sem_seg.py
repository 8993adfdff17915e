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

A missing or empty input folder is one ``error:`` line (exit status 2); an unreadable label map
(truncated, empty, not a PNG) is a warning, is skipped and counted, and the exit status is 1.
"""
import argparse
import os

import numpy as np

from hiseg.cli import Skipped, script_main  # noqa: E402
from hiseg.data.datasets.common import convert_label_maps, reduce_zero_label  # noqa: E402
from hiseg.dataset_checks import require_files, require_input  # noqa: E402

LAYOUT = "<ade-root>/annotations/{training,validation}/*.png"
HOW = ("download ADEChallengeData2016.zip (http://sceneparsing.csail.mit.edu), unzip it under "
       "$DETECTRON2_DATASETS, or pass --ade-root")


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
    counts, skipped, total = {}, Skipped("label map"), 0
    for split in args.split:
        src = require_input(os.path.join(args.ade_root, "annotations", split), LAYOUT, HOW)
        dst = os.path.join(args.ade_root, "annotations_detectron2", split)
        files = require_files(sorted(f for f in os.listdir(src) if f.endswith(".png")), src, "*.png", HOW)
        total += len(files)
        counts[split] = convert_label_maps(((f, os.path.join(src, f), os.path.join(dst, f)) for f in files),
                                           shift_labels, skipped, args.overwrite, desc=split)
        print(f"{split}: {counts[split]} label maps in {dst}")
    skipped.finish(total)
    return counts


if __name__ == "__main__":
    script_main(main, result_is_status=False)
