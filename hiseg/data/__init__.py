"""Dataset registration for the CAST and OAP projects.

Importing this package registers every dataset of ``datasets/README.md`` with detectron2's
``DatasetCatalog`` / ``MetadataCatalog`` under ``$DETECTRON2_DATASETS`` (default ``./datasets``),
by calling :func:`register_all`. Registration is lazy and idempotent: no dataset file is read at
import (importing works with an empty or missing datasets root), names that already exist,
detectron2's built-ins included, are skipped, and a dataset whose files are missing raises
``FileNotFoundError`` naming the expected path and the prepare script when it is loaded.

Every dataset's metadata has ``evaluator_type`` (``coco``, ``sem_seg``, ``coco_panoptic_seg`` or
``classification``) so a trainer can pick its evaluator from the metadata alone.
"""
import os
from typing import Optional

from hiseg.paths import datasets_root

from .datasets import (
    bsds500,
    cls_agnostic,
    coco_panoptic_sample,
    coco_stuff27,
    densepose,
    imagenet,
    natural_images,
    partimagenet,
    pascal_context,
    skimage_images,
    voc,
)
from .datasets.common import registered_names

__all__ = ["register_all", "registered_names", "DATASET_MODULES"]

DATASET_MODULES = [
    cls_agnostic,
    coco_stuff27,
    coco_panoptic_sample,
    voc,
    pascal_context,
    imagenet,
    partimagenet,
    densepose,
    skimage_images,
    bsds500,
    natural_images,  # after the sources it unites
]


def register_all(root: Optional[str] = None, overwrite: bool = False) -> None:
    """Register all datasets under ``root`` (default: :func:`hiseg.paths.datasets_root`).

    Calling it again is a no-op unless ``overwrite=True``, which re-points the names this package
    registered (never detectron2's built-ins) at ``root``. A dataset module joins in by defining
    ``register_all(root, overwrite=False)``.
    """
    root = os.fspath(datasets_root() if root is None else root)
    for module in DATASET_MODULES:
        fn = getattr(module, "register_all", None)
        if fn is not None:
            fn(root, overwrite=overwrite)


register_all()
