"""PartImageNet part segmentation (He et al., ECCV 2022, https://github.com/TACJu/PartImageNet).

Layout (the release's semantic part-segmentation annotations; class sub-folders optional)::

    PartImageNet/images/{train,val,test}/[<wnid>/]<wnid>_<n>.JPEG
    PartImageNet/annotations/{train,val,test}/[<wnid>/]<wnid>_<n>.png

Each label PNG holds the part id 0..39 per pixel and 40 for background, in the order of the
release's category list (11 super-categories, 40 parts; below). Background is evaluated as the
41st class, as in the release's semantic-segmentation setting; 255 is ignored. No prepare script
is needed. Registered: ``partimagenet_{train,val,test}`` (``evaluator_type="sem_seg"``).
"""
import os

from .common import missing, register_lazy, require_dir

FAMILY = "partimagenet"

PART_CLASSES = (
    "Quadruped Head", "Quadruped Body", "Quadruped Foot", "Quadruped Tail",
    "Biped Head", "Biped Body", "Biped Hand", "Biped Foot", "Biped Tail",
    "Fish Head", "Fish Body", "Fish Fin", "Fish Tail",
    "Bird Head", "Bird Body", "Bird Wing", "Bird Foot", "Bird Tail",
    "Snake Head", "Snake Body",
    "Reptile Head", "Reptile Body", "Reptile Foot", "Reptile Tail",
    "Car Body", "Car Tier", "Car Side Mirror",
    "Bicycle Body", "Bicycle Head", "Bicycle Seat", "Bicycle Tier",
    "Boat Body", "Boat Sail",
    "Aeroplane Head", "Aeroplane Body", "Aeroplane Engine", "Aeroplane Wing", "Aeroplane Tail",
    "Bottle Mouth", "Bottle Body",
)  # fmt: skip
assert len(PART_CLASSES) == 40
BACKGROUND = len(PART_CLASSES)  # label 40
CLASSES = PART_CLASSES + ("background",)
IMAGE_EXTS = (".JPEG", ".jpg", ".jpeg", ".png")


def load_partimagenet(name: str, root: str, split: str):
    image_dir = os.path.join(root, "images", split)
    gt_dir = os.path.join(root, "annotations", split)
    require_dir(name, gt_dir, None, "part label maps")
    require_dir(name, image_dir, None, "images")
    out = []
    for dirpath, _, files in sorted(os.walk(gt_dir)):
        rel = os.path.relpath(dirpath, gt_dir)
        for f in sorted(files):
            if not f.endswith(".png"):
                continue
            stem = f[: -len(".png")]
            # Same relative folder as the label, else a <wnid>/ sub-folder, else flat.
            candidates = [os.path.join(image_dir, rel, stem)]
            candidates.append(os.path.join(image_dir, stem.split("_")[0], stem))
            candidates.append(os.path.join(image_dir, stem))
            image = next(
                (c + e for c in candidates for e in IMAGE_EXTS if os.path.isfile(c + e)), None
            )
            if image is None:
                raise missing(name, candidates[0] + ".JPEG", None, f"image for {f}")
            out.append(
                {
                    "file_name": image,
                    "sem_seg_file_name": os.path.join(dirpath, f),
                    "image_id": stem,
                }
            )
    if not out:
        raise missing(name, os.path.join(gt_dir, "*.png"), None, "no label maps")
    return out


def register_all(root: str, overwrite: bool = False) -> None:
    pin_root = os.path.join(root, "PartImageNet")
    for split in ("train", "val", "test"):
        name = f"partimagenet_{split}"
        register_lazy(
            name,
            lambda n=name, s=split: load_partimagenet(n, pin_root, s),
            {
                "stuff_classes": list(CLASSES),
                "image_root": os.path.join(pin_root, "images", split),
                "sem_seg_root": os.path.join(pin_root, "annotations", split),
                "evaluator_type": "sem_seg",
                "ignore_label": 255,
                "background_label": BACKGROUND,
            },
            family=FAMILY,
            overwrite=overwrite,
        )
