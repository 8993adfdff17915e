"""PASCAL VOC 2012 semantic segmentation, with the SBD-augmented training set ("train_aug").

Layout (``VOC2012`` directly under the datasets root, as for detectron2's built-in
``voc_2012_*`` detection sets)::

    VOC2012/JPEGImages/<id>.jpg
    VOC2012/SegmentationClass/<id>.png            official labels (palette PNG, 255 = border)
    VOC2012/SegmentationClassAug/<id>.png         prepare_voc_sbd.py: SBD + official labels
    VOC2012/ImageSets/Segmentation/val.txt        1449 official val ids
    VOC2012/ImageSets/Segmentation/train_aug.txt  prepare_voc_sbd.py: 10582 ids

``train_aug`` is the usual DeepLab set: SBD train+val and VOC12 train, minus VOC12 val
(Hariharan et al., ICCV 2011; Chen et al., DeepLab). Labels: 0 background, 1-20 the VOC classes,
255 ignored. Registered: ``voc_2012_sem_seg_train_aug``, ``voc_2012_sem_seg_val``
(``evaluator_type="sem_seg"``). The built-in ``voc_2012_{train,val,trainval}`` detection sets
are detectron2's and are not touched.
"""
import os

from .common import read_split_file, register_lazy, sem_seg_dicts_from_ids

FAMILY = "voc_sem_seg"
SCRIPT = "prepare_voc_sbd.py"

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


def voc_palette(n: int = 256):
    """The standard PASCAL VOC colour map (bit-interleaved label index), as ``n`` RGB triples."""
    colors = []
    for label in range(n):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colors.append([r, g, b])
    return colors


#: name -> (split list, label folder, script hint), relative to ``<root>/VOC2012``.
SPLITS = {
    "voc_2012_sem_seg_train_aug": (
        "ImageSets/Segmentation/train_aug.txt",
        "SegmentationClassAug",
        SCRIPT,
    ),
    "voc_2012_sem_seg_val": (
        "ImageSets/Segmentation/val.txt",
        "SegmentationClass",
        None,  # part of the official VOC2012 trainval tar
    ),
}


def load_voc_sem_seg(name: str, voc_root: str, split_file: str, gt_dir: str, script):
    ids = read_split_file(name, os.path.join(voc_root, split_file), script)
    return sem_seg_dicts_from_ids(
        name,
        ids,
        os.path.join(voc_root, "JPEGImages"),
        os.path.join(voc_root, gt_dir),
        image_ext=".jpg",
        script=script,
    )


def register_all(root: str, overwrite: bool = False) -> None:
    voc_root = os.path.join(root, "VOC2012")
    for name, (split_file, gt_dir, script) in SPLITS.items():
        register_lazy(
            name,
            lambda n=name, s=split_file, g=gt_dir, h=script: load_voc_sem_seg(n, voc_root, s, g, h),
            {
                "stuff_classes": list(VOC_CLASSES),
                "stuff_colors": voc_palette(len(VOC_CLASSES)),
                "image_root": os.path.join(voc_root, "JPEGImages"),
                "sem_seg_root": os.path.join(voc_root, gt_dir),
                "evaluator_type": "sem_seg",
                "ignore_label": 255,
            },
            family=FAMILY,
            overwrite=overwrite,
        )
