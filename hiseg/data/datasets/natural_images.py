"""All the unlabelled natural photographs at hand, as one training set for self-supervision.

Registered (lazily; see :mod:`hiseg.data`):

* ``coco_images_unlabelled_shared``: the COCO 2017 images of the shared real-data folder
  (``$HISEG_SHARED_DATA/coco/{train2017,val2017}/*.jpg``, 50 + 50), without their annotations;
  only when that folder exists;
* ``natural_images_unlabelled``: the union of three sources, each taken from its existing
  registration, in this order:

  - ``bsds500``: BSDS500 train (200 images) from ``bsds500_train`` (the datasets root) or, if
    that has no files, ``bsds500_train_shared``; never val or test (the experiments score on
    BSDS500 val);
  - ``coco``: ``coco_images_unlabelled_shared`` (100 images);
  - ``skimage``: ``skimage_natural_images`` (the 16 photographs inside scikit-image).

  Dicts keep only ``file_name``, ``height``, ``width``, a unique ``image_id``
  (``"<source>/<id>"``) and ``source``: no ground truth goes into self-supervised training.
  Nothing is copied; the files are read where they lie. A source whose files are missing is left
  out with a warning; :func:`natural_image_sources` says which were found, and loading raises
  ``FileNotFoundError`` only when none is.
"""
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from detectron2.data import DatasetCatalog

from hiseg.paths import shared_data_dir

from .common import missing, register_lazy

__all__ = ["register_all", "NAME", "COCO_NAME", "SOURCES", "load_coco_images_unlabelled",
           "load_natural_images", "natural_image_sources"]

logger = logging.getLogger(__name__)

NAME = "natural_images_unlabelled"
COCO_NAME = "coco_images_unlabelled_shared"
FAMILY = "natural_images"
# source -> registered dataset names, first one that loads wins
SOURCES: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("bsds500", ("bsds500_train", "bsds500_train_shared")),
    ("coco", (COCO_NAME,)),
    ("skimage", ("skimage_natural_images",)),
)


def load_coco_images_unlabelled(coco_root) -> List[dict]:
    """Dicts of the ``*.jpg`` in ``<coco_root>/{train2017,val2017}`` (sorted), no annotations."""
    from hiseg.image_io import image_size

    coco_root = Path(coco_root)
    out = []
    for split in ("train2017", "val2017"):
        folder = coco_root / split
        if not folder.is_dir():
            continue
        for p in sorted(folder.glob("*.jpg")):
            h, w = image_size(p)  # EXIF orientation applied, as the mappers read it
            out.append({"file_name": str(p), "image_id": f"{split}/{p.stem}", "height": h, "width": w})
    if not out:
        raise missing(COCO_NAME, coco_root / "{train2017,val2017}" / "*.jpg", None, "no COCO images")
    return out


def natural_image_sources() -> Dict[str, Optional[Tuple[str, int]]]:
    """For each source, ``(registered name used, number of images)``, or None when absent."""
    found = {}
    for source, names in SOURCES:
        found[source] = None
        for name in names:
            if name not in DatasetCatalog.list():
                continue
            try:
                n = len(DatasetCatalog.get(name))
            except FileNotFoundError:
                continue
            found[source] = (name, n)
            break
    return found


def load_natural_images() -> List[dict]:
    out = []
    for source, names in SOURCES:
        dicts = None
        for name in names:
            if name not in DatasetCatalog.list():
                continue
            try:
                dicts = DatasetCatalog.get(name)
            except FileNotFoundError:
                continue
            break
        if dicts is None:
            logger.warning("%s: source %r not found (tried %s); left out", NAME, source, ", ".join(names))
            continue
        for d in dicts:
            out.append({"file_name": d["file_name"], "height": d["height"], "width": d["width"],
                        "image_id": f"{source}/{d['image_id']}", "source": source})
    if not out:
        raise missing(NAME, "|".join(n for _, ns in SOURCES for n in ns), None, "no source found")
    return out


def register_all(root=None, overwrite: bool = False) -> List[str]:
    """Register the two names above (``root`` is unused: the sources have their own roots)."""
    done = []
    shared = shared_data_dir()
    if shared is not None and (shared / "coco").is_dir():
        coco_root = shared / "coco"
        if register_lazy(COCO_NAME, lambda r=coco_root: load_coco_images_unlabelled(r),
                         {"evaluator_type": "none", "image_root": os.fspath(coco_root),
                          "source": "COCO 2017 train/val images of the shared data, annotations dropped"},
                         family=FAMILY, overwrite=overwrite):
            done.append(COCO_NAME)
    if register_lazy(NAME, load_natural_images,
                     {"evaluator_type": "none",
                      "source": "BSDS500 train + shared COCO images + scikit-image photographs, unlabelled"},
                     family=FAMILY, overwrite=overwrite):
        done.append(NAME)
    return done
