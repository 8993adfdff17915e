"""DensePose-COCO coarse body-part segmentation (14 parts + background) as semantic segmentation.

DensePose-COCO (Güler et al., CVPR 2018) annotates people of COCO 2014 with ``dp_masks``: for each
person, 14 RLE masks (one per coarse body part, empty when absent) on a 256x256 grid spanning the
person's ``bbox``. The official notebook (``DensePose/notebooks/DensePose-COCO-Visualize.ipynb``)
builds a part map with ``MaskGen[decode(dp_masks[i-1]) > 0] = i`` and resizes it with nearest
neighbour into the (image-clipped) box; :func:`render_part_map` does the same for a whole image:

* 0 background, 1..14 the parts in :data:`PART_CLASSES` order;
* 255 (ignored) on people *without* ``dp_masks`` (and crowd regions), taken from their COCO
  ``segmentation``, because their parts are unknown;
* people are painted largest box first, so smaller (usually nearer) people win overlaps.

Layout::

    coco/{train2014,val2014}/*.jpg
    coco/annotations/densepose_{train2014,minival2014}.json        DensePose-COCO release
    coco/densepose_parts_{train2014,minival2014}/<stem>.png         prepare_densepose_parts.py

Registered: ``densepose_coco_parts_train``, ``densepose_coco_parts_minival``
(``evaluator_type="sem_seg"``, 15 classes, ``ignore_label=255``).
"""
import os

import numpy as np

from .common import register_lazy, sem_seg_dicts_from_gt_dir

FAMILY = "densepose_parts"
SCRIPT = "prepare_densepose_parts.py"

#: The 14 coarse parts of ``dp_masks`` (index i -> label i + 1), per the DensePose-COCO notebook.
PART_CLASSES = (
    "torso", "right hand", "left hand", "left foot", "right foot",
    "upper leg right", "upper leg left", "lower leg right", "lower leg left",
    "upper arm left", "upper arm right", "lower arm left", "lower arm right", "head",
)  # fmt: skip
CLASSES = ("background",) + PART_CLASSES
IGNORE_LABEL = 255
DP_MASK_SIZE = 256

#: name -> (image folder, label folder, annotation json, split word for the script)
SPLITS = {
    "densepose_coco_parts_train": (
        "coco/train2014",
        "coco/densepose_parts_train2014",
        "coco/annotations/densepose_train2014.json",
        "train2014",
    ),
    "densepose_coco_parts_minival": (
        "coco/val2014",
        "coco/densepose_parts_minival2014",
        "coco/annotations/densepose_minival2014.json",
        "minival2014",
    ),
}


def dp_part_grid(dp_masks) -> np.ndarray:
    """256x256 uint8 part map (0 = none, 1..14) from one person's ``dp_masks`` list."""
    from pycocotools import mask as mask_utils

    grid = np.zeros((DP_MASK_SIZE, DP_MASK_SIZE), dtype=np.uint8)
    for i, rle in enumerate(dp_masks[: len(PART_CLASSES)]):
        if rle:
            grid[mask_utils.decode(rle) > 0] = i + 1
    return grid


def _box(bbox, height, width):
    """Integer box of the notebook: truncated x, y, w, h; the far corner clipped to the image."""
    x1, y1, w, h = (int(v) for v in np.asarray(bbox, dtype=np.float64))
    x1, y1 = max(x1, 0), max(y1, 0)
    x2, y2 = min(x1 + w, width), min(y1 + h, height)
    return x1, y1, x2, y2


def render_part_map(annotations, height: int, width: int) -> np.ndarray:
    """The uint8 label map of one image from its DensePose-COCO annotations (see module doc)."""
    import cv2
    from pycocotools import mask as mask_utils

    label = np.zeros((height, width), dtype=np.uint8)
    # 1) people whose parts are unknown: ignore their silhouette.
    for ann in annotations:
        if ann.get("dp_masks") and not ann.get("iscrowd", 0):
            continue
        segm = ann.get("segmentation")
        if not segm:
            continue
        if isinstance(segm, list):
            rles = mask_utils.frPyObjects(segm, height, width)
            rle = mask_utils.merge(rles)
        elif isinstance(segm.get("counts"), list):
            rle = mask_utils.frPyObjects(segm, height, width)
        else:
            rle = segm
        label[mask_utils.decode(rle) > 0] = IGNORE_LABEL
    # 2) people with dp_masks, largest box first.
    people = [a for a in annotations if a.get("dp_masks") and not a.get("iscrowd", 0)]
    people.sort(key=lambda a: -float(a["bbox"][2]) * float(a["bbox"][3]))
    for ann in people:
        x1, y1, x2, y2 = _box(ann["bbox"], height, width)
        if x2 <= x1 or y2 <= y1:
            continue
        grid = dp_part_grid(ann["dp_masks"])
        parts = cv2.resize(grid, (x2 - x1, y2 - y1), interpolation=cv2.INTER_NEAREST)
        region = label[y1:y2, x1:x2]
        region[parts > 0] = parts[parts > 0]
    return label


def load_parts(name: str, image_root: str, gt_root: str, split_word: str):
    return sem_seg_dicts_from_gt_dir(
        name, image_root, gt_root, image_ext=".jpg", script=f"{SCRIPT} --split {split_word}"
    )


def register_all(root: str, overwrite: bool = False) -> None:
    for name, (image_root, gt_root, json_file, split_word) in SPLITS.items():
        image_root, gt_root = os.path.join(root, image_root), os.path.join(root, gt_root)
        register_lazy(
            name,
            lambda n=name, i=image_root, g=gt_root, s=split_word: load_parts(n, i, g, s),
            {
                "stuff_classes": list(CLASSES),
                "image_root": image_root,
                "sem_seg_root": gt_root,
                "densepose_json": os.path.join(root, json_file),
                "evaluator_type": "sem_seg",
                "ignore_label": IGNORE_LABEL,
            },
            family=FAMILY,
            overwrite=overwrite,
        )
