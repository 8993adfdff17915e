#!/usr/bin/env python
"""Convert BSDS500 ground truth from MATLAB ``.mat`` files to ``.npz`` files.

The official release stores each image's human segmentations in a MATLAB cell array
(``groundTruth{k}.Segmentation`` / ``.Boundaries``), which is slow to parse. This script writes,
next to every ``<root>/bsds500/groundTruth/<split>/<id>.mat``, a ``<id>.npz`` with

* ``segs``: uint16 array (K, H, W), the K human label maps;
* ``boundaries``: bool array (K, H, W), their boundary maps,

which :func:`hiseg.data.datasets.bsds500.load_bsds_ground_truth` reads instead of the ``.mat``.
Every file is written atomically (temporary file + rename). Existing ``.npz`` files are kept
unless ``--overwrite``. ``--output-dir`` writes the ``.npz`` files to another folder (one
sub-folder per split) instead, e.g. when the dataset folder is read-only.

Example::

    .venv/bin/python datasets/prepare_bsds500.py --root $DETECTRON2_DATASETS --splits val test

A split folder that is absent is skipped with a note; none present, or present but without
``.mat`` files, is one ``error:`` line (exit status 2). An unreadable ``.mat`` (truncated,
damaged) is a warning, is skipped and counted, and the exit status is 1.
"""
import argparse
import os
import sys

import numpy as np
from tqdm import tqdm


from hiseg.cli import Skipped, script_main  # noqa: E402
from hiseg.data.datasets.bsds500 import SPLITS, load_bsds_ground_truth_mat  # noqa: E402
from hiseg.dataset_checks import reading, require_input  # noqa: E402
from hiseg.errors import EmptyDatasetError, InputError  # noqa: E402
from hiseg.utils.atomic_io import atomic_write  # noqa: E402
from hiseg.paths import datasets_root  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--root",
        default=None,
        help="datasets root holding bsds500/ (default: $DETECTRON2_DATASETS or ./datasets)",
    )
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    p.add_argument("--output-dir", default=None, help="write <split>/<id>.npz here instead")
    p.add_argument("--overwrite", action="store_true", help="rewrite existing .npz files")
    return p.parse_args(argv)


def convert(mat_path: str, npz_path: str) -> None:
    """Write the ``.npz`` for one ``.mat`` (atomically); InputError for an unreadable file."""
    with reading(mat_path, "BSDS500 .mat file"):
        segs, bdrys = load_bsds_ground_truth_mat(mat_path)
    if any(s.max() > np.iinfo(np.uint16).max or s.min() < 0 for s in segs):
        raise ValueError(f"{mat_path}: labels do not fit in uint16")
    segs = np.stack([s.astype(np.uint16) for s in segs])
    bdrys = np.stack([b.astype(bool) for b in bdrys])
    with atomic_write(npz_path, "wb") as f:
        np.savez_compressed(f, segs=segs, boundaries=bdrys)


def main(argv=None) -> int:
    args = parse_args(argv)
    root = os.fspath(datasets_root() if args.root is None else args.root)
    layout = "<root>/bsds500/groundTruth/<split>/<id>.mat (and images/<split>/<id>.jpg)"
    how = ("download BSR_bsds500.tgz (https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/"
           "resources.html), move BSR/BSDS500/data/* to <root>/bsds500, or pass --root")
    jobs, present, mats = [], [], 0
    for split in args.splits:
        gt_dir = os.path.join(root, "bsds500", "groundTruth", split)
        if not os.path.isdir(gt_dir):
            print(f"skipping {split}: {gt_dir} does not exist", file=sys.stderr)
            continue
        present.append(gt_dir)
        out_dir = gt_dir if args.output_dir is None else os.path.join(args.output_dir, split)
        for name in sorted(os.listdir(gt_dir)):
            if name.endswith(".mat") and not name.startswith("."):
                mats += 1
                npz = os.path.join(out_dir, name[: -len(".mat")] + ".npz")
                if args.overwrite or not os.path.isfile(npz):
                    jobs.append((os.path.join(gt_dir, name), npz))
    if not present:
        require_input(os.path.join(root, "bsds500", "groundTruth", args.splits[0]), layout, how)
    if not mats:
        raise EmptyDatasetError(f"{', '.join(present)}: no .mat ground truth files, nothing to convert; "
                                f"expected layout: {layout}; {how}")
    if not jobs:
        print("nothing to convert")
        return 0
    skipped = Skipped(".mat file")
    for mat_path, npz_path in tqdm(jobs, desc="bsds500 groundTruth -> npz"):
        try:
            convert(mat_path, npz_path)
        except InputError as e:
            skipped.add(mat_path, str(e))
    print(f"wrote {len(jobs) - len(skipped)} files")
    skipped.finish(len(jobs))
    return 0


if __name__ == "__main__":
    script_main(main)
