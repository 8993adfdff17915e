"""The 2-image COCO panoptic sample of the shared real-data folder, as ``coco_panoptic_sample``.

Files (under ``$HISEG_SHARED_DATA``, default ``../shared/data``; see :mod:`hiseg.paths`)::

    coco_panoptic_sample/input_images/<id>.jpg
    coco_panoptic_sample/panoptic_examples/<id>.png          RGB-encoded segment ids
    coco_panoptic_sample/panoptic_examples.json              COCO panoptic annotations
    coco_panoptic_sample/panoptic_coco_categories.json       the 133 categories

The metadata mirrors detectron2's ``coco_panoptic_standard`` (``builtin_meta.py``): thing and
stuff classes both list all categories, and ``thing/stuff_dataset_id_to_contiguous_id`` map
dataset ids to their position in the categories file. ``evaluator_type="coco_panoptic_seg"``.
The categories file (a small JSON) is read when the dataset is registered, if it is readable;
if the sample is absent, registration still succeeds and loading raises ``FileNotFoundError``.
"""
import json
import os
from pathlib import Path

from detectron2.data.datasets.coco_panoptic import load_coco_panoptic_json

from hiseg.paths import REPO_ROOT, SHARED_DATA_ENV, shared_data_dir

from .common import register_lazy

FAMILY = "coco_panoptic_sample"
NAME = "coco_panoptic_sample"


def sample_dir() -> Path:
    """``$HISEG_SHARED_DATA/coco_panoptic_sample`` (default under ``../shared/data``).

    Returned whether or not it exists, so that loading can name the missing path."""
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        base = Path(env)
    else:
        base = shared_data_dir() or (REPO_ROOT.parent / "shared" / "data")
    return base / "coco_panoptic_sample"


def panoptic_metadata(categories) -> dict:
    """detectron2 ``coco_panoptic_standard``-style metadata for a list of panoptic categories."""
    names = [c["name"] for c in categories]
    colors = [c.get("color", [0, 0, 0]) for c in categories]
    thing_map, stuff_map = {}, {}
    for i, c in enumerate(categories):
        (thing_map if c["isthing"] else stuff_map)[int(c["id"])] = i
    return {
        "thing_classes": names,
        "thing_colors": colors,
        "stuff_classes": names,
        "stuff_colors": colors,
        "thing_dataset_id_to_contiguous_id": thing_map,
        "stuff_dataset_id_to_contiguous_id": stuff_map,
    }


def _files(base: Path):
    return {
        "image_root": base / "input_images",
        "panoptic_root": base / "panoptic_examples",
        "panoptic_json": base / "panoptic_examples.json",
        "categories": base / "panoptic_coco_categories.json",
    }


def load_sample(name: str, base: Path):
    f = _files(base)
    # No prepare script: the folder ships with the shared real data.
    hint = f"set {SHARED_DATA_ENV} to the shared real-data folder (no prepare script needed)"
    for key, exists in (
        ("categories", f["categories"].is_file()),
        ("panoptic_json", f["panoptic_json"].is_file()),
        ("image_root", f["image_root"].is_dir()),
        ("panoptic_root", f["panoptic_root"].is_dir()),
    ):
        if not exists:
            raise FileNotFoundError(
                f"Dataset '{name}': expected {f[key]}, which does not exist; {hint}."
            )
    with open(f["categories"]) as fh:
        meta = panoptic_metadata(json.load(fh))
    return load_coco_panoptic_json(
        str(f["panoptic_json"]), str(f["image_root"]), str(f["panoptic_root"]), meta
    )


def register_all(root: str = None, overwrite: bool = False) -> None:
    """``root`` is unused: the sample is in the shared real-data folder, not the datasets root."""
    base = sample_dir()
    f = _files(base)
    meta = {
        "image_root": str(f["image_root"]),
        "panoptic_root": str(f["panoptic_root"]),
        "panoptic_json": str(f["panoptic_json"]),
        "evaluator_type": "coco_panoptic_seg",
        "ignore_label": 255,
        "label_divisor": 1000,
    }
    try:
        with open(f["categories"]) as fh:
            meta.update(panoptic_metadata(json.load(fh)))
    except (OSError, ValueError, KeyError):
        pass  # registration must not fail; loading reports the missing / broken file
    register_lazy(
        NAME, lambda b=base: load_sample(NAME, b), meta, family=FAMILY, overwrite=overwrite
    )
