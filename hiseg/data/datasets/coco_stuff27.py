"""COCO-Stuff-27: COCO 2017 semantic segmentation with the 27 coarse classes of STEGO / U2Seg.

STEGO (Hamilton et al., ICLR 2022, https://github.com/mhamilton723/STEGO) evaluates unsupervised
semantic segmentation on the 27 COCO-Stuff super-categories, 12 "thing" and 15 "stuff" groups,
in this order (STEGO's ``get_class_labels("cocostuff27")``)::

    things  0-11: electronic appliance food furniture indoor kitchen accessory animal outdoor
                  person sports vehicle
    stuff  12-26: ceiling floor food furniture rawmaterial textile wall window building ground
                  plant sky solid structural water

U2Seg (Niu et al., CVPR 2024) derives the same 27 labels from the COCO *panoptic* annotations,
which is what ``datasets/prepare_coco_stuff27.py`` does: every panoptic category is mapped to
the index of its ``supercategory`` in the order above (stuff supercategories are spelled
``food-stuff``, ``furniture-stuff`` and ``raw-material`` in ``panoptic_coco_categories.json``,
so the 27 names below are unique). Unlabelled / void pixels (panoptic id 0) become 255.
Crowd segments keep their class, as in COCO-Stuff's own label maps.

Registered: ``coco_2017_{train,val}_stuff27`` (``evaluator_type="sem_seg"``, ``ignore_label=255``),
images ``coco/{split}2017/*.jpg``, label maps ``coco/stuff27_{split}2017/*.png``.
"""
import os
from typing import Dict, Iterable, Mapping

from .common import register_lazy, sem_seg_dicts_from_gt_dir

FAMILY = "coco_stuff27"
SCRIPT = "prepare_coco_stuff27.py"

THING_GROUPS = (
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen",
    "accessory", "animal", "outdoor", "person", "sports", "vehicle",
)  # fmt: skip
STUFF_GROUPS = (
    "ceiling", "floor", "food-stuff", "furniture-stuff", "raw-material", "textile", "wall",
    "window", "building", "ground", "plant", "sky", "solid", "structural", "water",
)  # fmt: skip
#: The 27 class names in label order (COCO panoptic supercategory spelling).
STUFF27_CLASSES = THING_GROUPS + STUFF_GROUPS
IGNORE_LABEL = 255

_THING_INDEX = {name: i for i, name in enumerate(THING_GROUPS)}
_STUFF_INDEX = {name: len(THING_GROUPS) + i for i, name in enumerate(STUFF_GROUPS)}
# STEGO's spellings of the three stuff groups whose panoptic names differ.
_STUFF_ALIASES = {
    "food": "food-stuff",
    "furniture": "furniture-stuff",
    "rawmaterial": "raw-material",
}


def supercategory_to_label(supercategory: str, isthing: bool) -> int:
    """Label 0..26 of a COCO (panoptic) supercategory; ``isthing`` tells food/furniture apart."""
    if isthing:
        table, key = _THING_INDEX, supercategory
    else:
        table, key = _STUFF_INDEX, _STUFF_ALIASES.get(supercategory, supercategory)
    if key not in table:
        kind = "thing" if isthing else "stuff"
        raise KeyError(
            f"unknown COCO {kind} supercategory {supercategory!r}; known: {sorted(table)}"
        )
    return table[key]


def category_to_label(categories: Iterable[Mapping]) -> Dict[int, int]:
    """``{panoptic category id: label 0..26}`` from ``panoptic_coco_categories.json`` entries."""
    return {
        int(c["id"]): supercategory_to_label(c["supercategory"], bool(c["isthing"]))
        for c in categories
    }


def _stuff27_colors():
    # Fixed, distinct-enough colours for visualisation (not part of any convention).
    return [[(37 * i) % 256, (97 * i + 50) % 256, (157 * i + 100) % 256] for i in range(27)]


SPLITS = {
    "coco_2017_train_stuff27": ("coco/train2017", "coco/stuff27_train2017"),
    "coco_2017_val_stuff27": ("coco/val2017", "coco/stuff27_val2017"),
}


def load_stuff27(name: str, image_root: str, gt_root: str):
    split = "train" if "train" in name else "val"
    return sem_seg_dicts_from_gt_dir(
        name, image_root, gt_root, image_ext=".jpg", script=f"{SCRIPT} --split {split}"
    )


def register_all(root: str, overwrite: bool = False) -> None:
    for name, (image_root, gt_root) in SPLITS.items():
        image_root, gt_root = os.path.join(root, image_root), os.path.join(root, gt_root)
        register_lazy(
            name,
            lambda n=name, i=image_root, g=gt_root: load_stuff27(n, i, g),
            {
                "stuff_classes": list(STUFF27_CLASSES),
                "stuff_colors": _stuff27_colors(),
                "image_root": image_root,
                "sem_seg_root": gt_root,
                "evaluator_type": "sem_seg",
                "ignore_label": IGNORE_LABEL,
            },
            family=FAMILY,
            overwrite=overwrite,
        )
