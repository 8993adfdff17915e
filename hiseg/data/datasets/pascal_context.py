"""PASCAL-Context with the 59 most frequent classes (PC-59; Mottaghi et al., CVPR 2014).

Layout (the MaskFormer / mmsegmentation one; images are VOC2010's)::

    VOCdevkit/VOC2010/JPEGImages/<id>.jpg
    VOCdevkit/VOC2010/ImageSets/SegmentationContext/{train,val}.txt    image-id lists
    VOCdevkit/VOC2010/SegmentationClassContext/<id>.png                0 = background, 1..59
    VOCdevkit/VOC2010/annotations_detectron2/pc59_{train,val}/<id>.png prepare_pascal_context.py

``SegmentationClassContext`` is what mmsegmentation's ``pascal_context.py`` converter writes from
``trainval_merged.json`` with the Detail API. ``datasets/prepare_pascal_context.py`` turns it into
detectron2 label maps: class ``k`` (1..59) -> ``k-1`` and background (0) -> 255, i.e. PC-59 is
evaluated on its 59 classes with background ignored (mmsegmentation's ``reduce_zero_label``).

Registered: ``pascal_context_59_sem_seg_{train,val}`` (``evaluator_type="sem_seg"``).
"""
import os

from .common import read_split_file, register_lazy, sem_seg_dicts_from_ids

FAMILY = "pascal_context"
SCRIPT = "prepare_pascal_context.py"

PC59_CLASSES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow",
    "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground",
    "horse", "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate",
    "platform", "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky",
    "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water",
    "window", "wood",
)  # fmt: skip
assert len(PC59_CLASSES) == 59

VOC2010 = os.path.join("VOCdevkit", "VOC2010")


def load_pc59(name: str, voc_root: str, split: str):
    script = f"{SCRIPT} --split {split}"
    ids = read_split_file(
        name, os.path.join(voc_root, "ImageSets", "SegmentationContext", f"{split}.txt"), script
    )
    return sem_seg_dicts_from_ids(
        name,
        ids,
        os.path.join(voc_root, "JPEGImages"),
        os.path.join(voc_root, "annotations_detectron2", f"pc59_{split}"),
        image_ext=".jpg",
        script=script,
    )


def register_all(root: str, overwrite: bool = False) -> None:
    voc_root = os.path.join(root, VOC2010)
    for split in ("train", "val"):
        name = f"pascal_context_59_sem_seg_{split}"
        register_lazy(
            name,
            lambda n=name, s=split: load_pc59(n, voc_root, s),
            {
                "stuff_classes": list(PC59_CLASSES),
                "image_root": os.path.join(voc_root, "JPEGImages"),
                "sem_seg_root": os.path.join(voc_root, "annotations_detectron2", f"pc59_{split}"),
                "evaluator_type": "sem_seg",
                "ignore_label": 255,
            },
            family=FAMILY,
            overwrite=overwrite,
        )
