"""Helpers shared by the dataset modules: idempotent lazy registration, missing-file errors.

Conventions
-----------
* Names that detectron2 already registers (``coco_2017_val``, ``ade20k_sem_seg_val``,
  ``cityscapes_fine_sem_seg_val``, ...) are never registered again: :func:`register_lazy` skips
  every name that is already in ``DatasetCatalog``, so calling ``register_all`` twice is harmless.
* Names registered here are remembered, so ``register_all(root, overwrite=True)`` can point *our*
  names at another root (tests do this); built-in names are never touched, not even then.
* Loaders check their inputs before reading and raise ``FileNotFoundError`` whose message holds
  the expected path and the prepare script to run (see ``datasets/README.md``).
"""
import os
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog

from hiseg.utils.atomic_io import atomic_save_png

__all__ = [
    "README_HINT",
    "register_lazy",
    "registered_names",
    "require_dir",
    "require_file",
    "missing",
    "read_split_file",
    "sem_seg_dicts_from_ids",
    "sem_seg_dicts_from_gt_dir",
]

README_HINT = "see datasets/README.md"

# Names this package registered (so that overwrite=True may replace them, and only them).
_OWN: Dict[str, str] = {}


def registered_names(family: Optional[str] = None) -> List[str]:
    """Names registered by :mod:`hiseg.data` (optionally only one family, e.g. ``"imagenet"``)."""
    return sorted(n for n, f in _OWN.items() if family is None or f == family)


def register_lazy(
    name: str,
    loader: Callable[[], list],
    metadata: dict,
    *,
    family: str,
    overwrite: bool = False,
) -> bool:
    """Register ``name`` unless it already exists; returns True when it was (re-)registered.

    ``overwrite`` replaces a name only if this package registered it before; a name owned by
    detectron2 or another package is always left alone.
    """
    if name in DatasetCatalog.list():
        if not (overwrite and name in _OWN):
            return False
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)
    _OWN[name] = family
    return True


def missing(name: str, path, script: Optional[str], what: str = "") -> FileNotFoundError:
    """The error a loader raises when ``path`` is absent (a :class:`DatasetNotFoundError`) or,
    when ``what`` starts with "no " (``path`` is a pattern that matched nothing), when the
    dataset is empty (an :class:`EmptyDatasetError`); names the script that creates it. Both
    are ``FileNotFoundError`` s and one-line user errors (:mod:`hiseg.errors`)."""
    from hiseg.errors import DatasetNotFoundError, EmptyDatasetError

    if script:
        how = f"run `python datasets/{script}` ({README_HINT} for the expected layout)"
    else:
        how = "download it as described in datasets/README.md (expected layout there)"
    if what.startswith("no "):
        return EmptyDatasetError(
            f"Dataset '{name}' is empty: nothing found at {os.fspath(path)} ({what}); {how}."
        )
    what = f" ({what})" if what else ""
    return DatasetNotFoundError(
        f"Dataset '{name}': expected {os.fspath(path)}{what}, which does not exist; {how}."
    )


def require_file(name: str, path, script: Optional[str], what: str = "") -> str:
    if not os.path.isfile(path):
        raise missing(name, path, script, what)
    return os.fspath(path)


def require_dir(name: str, path, script: Optional[str], what: str = "") -> str:
    if not os.path.isdir(path):
        raise missing(name, path, script, what)
    return os.fspath(path)


def read_split_file(name: str, path, script: Optional[str]) -> List[str]:
    """Non-empty stripped lines of an image-id list such as ``ImageSets/Segmentation/val.txt``."""
    require_file(name, path, script, "image-id list")
    with open(path) as f:
        return [line.strip().split()[0] for line in f if line.strip()]


def sem_seg_dicts_from_ids(
    name: str,
    ids: Iterable[str],
    image_dir,
    gt_dir,
    *,
    image_ext: str,
    gt_ext: str = ".png",
    script: Optional[str] = None,
) -> List[dict]:
    """Detectron2 semantic-segmentation dicts (``file_name``, ``sem_seg_file_name``, ``image_id``).

    Every listed id must have both files; the first missing one raises ``FileNotFoundError``.
    """
    image_dir, gt_dir = Path(image_dir), Path(gt_dir)
    out = []
    for image_id in ids:
        image = image_dir / f"{image_id}{image_ext}"
        gt = gt_dir / f"{image_id}{gt_ext}"
        require_file(name, gt, script, "label map")
        require_file(name, image, None, "image")
        out.append(
            {"file_name": str(image), "sem_seg_file_name": str(gt), "image_id": image_id}
        )
    if not out:
        raise missing(name, gt_dir, script, "no images listed")
    return out


def sem_seg_dicts_from_gt_dir(
    name: str, image_dir, gt_dir, *, image_ext: str, gt_ext: str = ".png", script=None
) -> List[dict]:
    """Like :func:`sem_seg_dicts_from_ids` with the ids taken from the label maps in ``gt_dir``."""
    require_dir(name, gt_dir, script, "label-map folder")
    require_dir(name, image_dir, None, "image folder")
    ids = sorted(f[: -len(gt_ext)] for f in os.listdir(gt_dir) if f.endswith(gt_ext))
    if not ids:
        raise missing(name, Path(gt_dir) / f"*{gt_ext}", script, "no label maps")
    return sem_seg_dicts_from_ids(
        name, ids, image_dir, gt_dir, image_ext=image_ext, gt_ext=gt_ext, script=script
    )


def convert_label_maps(items, convert: Callable, skipped, overwrite: bool = False, desc: str = "") -> int:
    """For each ``(name, source, output)``: read the source label map, write ``convert(label)`` to
    ``output`` (:func:`hiseg.utils.atomic_io.atomic_save_png`). An existing output is kept unless ``overwrite``; an
    unreadable source is reported and counted by ``skipped`` (:class:`hiseg.cli.Skipped`).
    Returns how many outputs exist afterwards."""
    from tqdm import tqdm

    from hiseg.image_io import read_image

    items = list(items)
    before = len(skipped)
    for name, source, output in tqdm(items, desc=desc):
        if os.path.isfile(output) and not overwrite:
            continue
        label = skipped.read(name, read_image, source, format=None)
        if label is not None:
            atomic_save_png(output, convert(label))
    return len(items) - (len(skipped) - before)


def reduce_zero_label(label, num_classes: int, what: str):
    """Label maps whose 0 means "unlabelled": 0 -> 255 and k -> k - 1 for k in 1..num_classes
    (uint8), as mmsegmentation's ``reduce_zero_label``; larger labels are an error naming
    ``what``."""
    label = np.asarray(label)
    if label.size and int(label.max()) > num_classes:
        raise ValueError(f"label {int(label.max())} > {num_classes}: not a {what} label map")
    out = label.astype(np.int16) - 1
    out[label == 0] = 255
    return out.astype(np.uint8)
