#!/usr/bin/env python
"""Build PASCAL VOC 2012 "train_aug": SBD class maps as PNGs, merged with the official labels.

Inputs (under $DETECTRON2_DATASETS)::

    SBD/benchmark_RELEASE/dataset/cls/<id>.mat       SBD (Hariharan et al., ICCV 2011): a MATLAB
    SBD/benchmark_RELEASE/dataset/{train,val}.txt    struct GTcls with field Segmentation (uint8,
                                                     0 = background, 1..20 the VOC classes)
    VOC2012/SegmentationClass/<id>.png               official labels (palette PNG, 255 = border)
    VOC2012/ImageSets/Segmentation/{train,val}.txt

Outputs (registered as ``voc_2012_sem_seg_train_aug``)::

    VOC2012/SegmentationClassAug/<id>.png            8-bit grayscale label maps
    VOC2012/ImageSets/Segmentation/train_aug.txt     (SBD train + SBD val + VOC train) - VOC val

Where an image has both an SBD and an official label map, the official one is used (it marks
object borders 255). This gives the 10582 training images of DeepLab's "train_aug". Every file
is written atomically. ``--sbd-only`` converts the SBD maps alone (no VOC files needed, no list).

A missing input folder or list, or an empty ``cls/`` folder, is one ``error:`` line (exit status
2); an unreadable ``.mat`` / label PNG is a warning, is skipped and counted, and then
``train_aug.txt`` is not written (exit status 1).
"""
import argparse
import os

import numpy as np
from PIL import Image
from scipy.io import loadmat
from tqdm import tqdm

from hiseg.cli import Skipped, script_main  # noqa: E402
from hiseg.utils.atomic_io import atomic_save_png, atomic_write  # noqa: E402
from hiseg.dataset_checks import reading, require_files, require_input  # noqa: E402
from hiseg.image_io import verify_image  # noqa: E402

SBD_LAYOUT = "<sbd-root>/cls/<id>.mat and <sbd-root>/{train,val}.txt"
SBD_HOW = ("download benchmark.tgz (SBD, http://home.bharathh.info/pubs/codes/SBD/download.html) and "
           "unpack it to <root>/SBD, or pass --sbd-root")
VOC_LAYOUT = "<voc-root>/SegmentationClass/<id>.png and <voc-root>/ImageSets/Segmentation/{train,val}.txt"
VOC_HOW = "download VOCtrainval_11-May-2012.tar and unpack it to <root>/VOC2012 (or pass --voc-root / --sbd-only)"

NUM_CLASSES = 21  # background + 20


def read_ids(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return [line.strip().split()[0] for line in f if line.strip()]


def sbd_class_map(mat_path) -> np.ndarray:
    """The uint8 class map of one SBD ``cls/*.mat`` file (``GTcls.Segmentation``); InputError
    for a truncated or damaged file."""
    with reading(mat_path, "SBD .mat file"):
        gt = loadmat(mat_path)["GTcls"][0, 0]
    seg = np.asarray(gt["Segmentation"])
    if seg.dtype == object:  # some scipy versions keep one more level of nesting
        seg = seg.item()
    seg = np.asarray(seg)
    bad = np.setdiff1d(np.unique(seg), np.r_[np.arange(NUM_CLASSES), 255])
    if bad.size:
        raise ValueError(f"{mat_path}: unexpected labels {bad.tolist()}")
    return seg.astype(np.uint8)


def voc_class_map(png_path) -> np.ndarray:
    """Class indices of an official VOC label PNG (palette indices, not colours); InputError for
    a truncated, empty or non-image file."""
    verify_image(png_path)
    image = Image.open(png_path)
    if image.mode not in ("P", "L"):
        raise ValueError(f"{png_path}: expected a palette or grayscale PNG, got mode {image.mode}")
    return np.asarray(image, dtype=np.uint8)


def parse_args(argv=None):
    root = os.environ.get("DETECTRON2_DATASETS", "datasets")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sbd-root",
        default=os.path.join(root, "SBD", "benchmark_RELEASE", "dataset"),
        help="SBD folder holding cls/, train.txt, val.txt",
    )
    p.add_argument("--voc-root", default=os.path.join(root, "VOC2012"))
    p.add_argument("--output", help="default: <voc-root>/SegmentationClassAug")
    p.add_argument("--sbd-only", action="store_true", help="only convert the SBD .mat files")
    args = p.parse_args(argv)
    args.output = args.output or os.path.join(args.voc_root, "SegmentationClassAug")
    return args


def main(argv=None):
    args = parse_args(argv)
    cls_dir = require_input(os.path.join(args.sbd_root, "cls"), SBD_LAYOUT, SBD_HOW)
    seg_dir = os.path.join(args.voc_root, "SegmentationClass")
    sets_dir = os.path.join(args.voc_root, "ImageSets", "Segmentation")
    voc_train = read_ids(os.path.join(sets_dir, "train.txt"))
    voc_val = read_ids(os.path.join(sets_dir, "val.txt"))
    if not args.sbd_only:
        have_lists = voc_train is not None and voc_val is not None
        require_input(seg_dir, VOC_LAYOUT, VOC_HOW)
        if not have_lists:
            require_input(os.path.join(sets_dir, "train.txt" if voc_train is None else "val.txt"),
                          VOC_LAYOUT, VOC_HOW, kind="file")

    skipped = Skipped("label map")
    sbd_ids = require_files(sorted(f[:-4] for f in os.listdir(cls_dir) if f.endswith(".mat")), cls_dir,
                            "*.mat", SBD_HOW)
    written = set()
    for image_id in tqdm(sbd_ids, desc="SBD .mat -> png"):
        label = skipped.read(image_id, sbd_class_map, os.path.join(cls_dir, image_id + ".mat"))
        if label is None:
            continue
        atomic_save_png(os.path.join(args.output, image_id + ".png"), label)
        written.add(image_id)
    if args.sbd_only:
        print(f"wrote {len(written)} SBD label maps to {args.output}")
        skipped.finish(len(sbd_ids))
        return {"sbd": sbd_ids, "voc": [], "train_aug": None}

    voc_ids = sorted(f[:-4] for f in os.listdir(seg_dir) if f.endswith(".png"))
    for image_id in tqdm(voc_ids, desc="VOC png -> png"):
        label = skipped.read(image_id, voc_class_map, os.path.join(seg_dir, image_id + ".png"))
        if label is None:
            continue
        atomic_save_png(os.path.join(args.output, image_id + ".png"), label)
        written.add(image_id)
    if skipped:
        print(f"wrote {len(written)} label maps to {args.output}; train_aug.txt not written")
        skipped.finish(len(sbd_ids) + len(voc_ids))

    sbd_train = read_ids(os.path.join(args.sbd_root, "train.txt")) or []
    sbd_val = read_ids(os.path.join(args.sbd_root, "val.txt")) or []
    train_aug = sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val))
    unlabeled = [i for i in train_aug if i not in written]
    if unlabeled:
        raise SystemExit(f"{len(unlabeled)} train_aug ids have no label map, e.g. {unlabeled[:5]}")
    with atomic_write(os.path.join(sets_dir, "train_aug.txt"), "w") as f:
        f.write("".join(i + "\n" for i in train_aug))
    print(
        f"wrote {len(written)} label maps to {args.output} "
        f"({len(sbd_ids)} SBD, {len(voc_ids)} VOC); "
        f"train_aug.txt: {len(train_aug)} ids"
    )
    return {"sbd": sbd_ids, "voc": voc_ids, "train_aug": train_aug}


if __name__ == "__main__":
    script_main(main, result_is_status=False)
