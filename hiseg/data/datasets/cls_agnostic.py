"""Class-agnostic COCO-format detection sets (one category ``"fg"``) for unsupervised detection.

Names and file locations follow CutLER's ``cutler/data/datasets/builtin.py``
(https://github.com/facebookresearch/CutLER), so configs written for CutLER work unchanged:

* ``cls_agnostic_coco``: images ``coco/val2017``,
  annotations ``coco/annotations/coco_cls_agnostic_instances_val2017.json``
* ``cls_agnostic_voc``: images ``voc/``,
  annotations ``voc/annotations/trainvaltest_2007_cls_agnostic.json``
* ``cls_agnostic_uvo``: images ``uvo/all_UVO_frames``,
  annotations ``uvo/annotations/val_sparse_cleaned_cls_agnostic.json``

CutLER's metadata gives these sets one thing class, dataset id 1, named ``"fg"`` (its UVO entry
calls the class ``"object"``; here all three use ``"fg"``). Every annotation is mapped to
contiguous class 0 whatever its category id in the file, so the loader is class-agnostic even on a
multi-class JSON; ``COCOEvaluator`` however scores against the JSON itself, so evaluate with a
file written by ``datasets/prepare_cls_agnostic_coco.py`` (one category, id 1).
"""
import os

from detectron2.data.datasets import load_coco_json

from .common import register_lazy, require_dir, require_file

FAMILY = "cls_agnostic"
SCRIPT = "prepare_cls_agnostic_coco.py"

#: name -> (image root, json file), relative to the datasets root (CutLER's layout).
SPLITS = {
    "cls_agnostic_coco": (
        "coco/val2017",
        "coco/annotations/coco_cls_agnostic_instances_val2017.json",
    ),
    "cls_agnostic_voc": ("voc", "voc/annotations/trainvaltest_2007_cls_agnostic.json"),
    "cls_agnostic_uvo": (
        "uvo/all_UVO_frames",
        "uvo/annotations/val_sparse_cleaned_cls_agnostic.json",
    ),
}

#: How to create each JSON (shown in the FileNotFoundError).
_HOW = {
    "cls_agnostic_coco": SCRIPT,
    "cls_agnostic_voc": SCRIPT + " --input <COCO-format VOC2007 trainval+test json> "
    "--output $DETECTRON2_DATASETS/voc/annotations/trainvaltest_2007_cls_agnostic.json",
    "cls_agnostic_uvo": SCRIPT + " --input <COCO-format UVO sparse val json> "
    "--output $DETECTRON2_DATASETS/uvo/annotations/val_sparse_cleaned_cls_agnostic.json",
}

FG_CATEGORY = {"id": 1, "name": "fg", "supercategory": "fg"}


def metadata(json_file: str, image_root: str) -> dict:
    return {
        "thing_classes": [FG_CATEGORY["name"]],
        "thing_colors": [[220, 20, 60]],
        "thing_dataset_id_to_contiguous_id": {FG_CATEGORY["id"]: 0},
        "json_file": json_file,
        "image_root": image_root,
        "evaluator_type": "coco",
    }


def class_agnostic_coco(coco: dict) -> dict:
    """A copy of a COCO instances dict with every category collapsed into ``fg`` (id 1); images
    and annotations (``iscrowd``, ``area``, ...) otherwise unchanged."""
    out = {k: v for k, v in coco.items() if k not in ("annotations", "categories")}
    out["categories"] = [dict(FG_CATEGORY)]
    out["annotations"] = [dict(a, category_id=FG_CATEGORY["id"]) for a in coco.get("annotations", [])]
    return out


def load_cls_agnostic(name: str, json_file: str, image_root: str):
    """COCO-format dicts with every instance labelled class 0 (``"fg"``)."""
    require_file(name, json_file, _HOW.get(name, SCRIPT), "class-agnostic annotations")
    require_dir(name, image_root, None, "image folder")
    return load_as_one_class(json_file, image_root)


def load_as_one_class(json_file: str, image_root: str):
    """``load_coco_json`` dicts with every instance's ``category_id`` set to 0, whatever the
    file's categories."""
    # dataset_name=None: load_coco_json neither remaps ids nor writes metadata (ours is fixed).
    dicts = load_coco_json(json_file, image_root, dataset_name=None)
    for record in dicts:
        for obj in record.get("annotations", []):
            obj["category_id"] = 0
    return dicts


def register_all(root: str, overwrite: bool = False) -> None:
    for name, (image_root, json_file) in SPLITS.items():
        image_root = os.path.join(root, image_root)
        json_file = os.path.join(root, json_file)
        register_lazy(
            name,
            lambda n=name, j=json_file, i=image_root: load_cls_agnostic(n, j, i),
            metadata(json_file, image_root),
            family=FAMILY,
            overwrite=overwrite,
        )
