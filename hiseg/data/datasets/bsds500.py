"""BSDS500 (Berkeley Segmentation Data Set, Arbelaez et al., TPAMI 2011) for hierarchical
segmentation evaluation.

Layout, relative to ``$DETECTRON2_DATASETS`` (the ``BSR/BSDS500/data`` folder of the official
release, renamed)::

    bsds500/images/{train,val,test}/<id>.jpg         200 / 100 / 200 images, 481x321 or 321x481
    bsds500/groundTruth/{train,val,test}/<id>.mat    4-9 human segmentations per image
    bsds500/groundTruth/{train,val,test}/<id>.npz    optional, made by datasets/prepare_bsds500.py

Each ``.mat`` holds a cell ``groundTruth``; ``groundTruth{k}.Segmentation`` is a label map
(uint16, labels from 1) and ``groundTruth{k}.Boundaries`` its boundary map. The ``.npz`` files
hold the same data as two stacked arrays (``segs``: K x H x W uint16, ``boundaries``: K x H x W
bool) and load faster; :func:`load_bsds_ground_truth` uses them when present.

Registered (lazily; see :mod:`hiseg.data`):

* ``bsds500_{train,val,test}`` under the datasets root;
* when the shared real-data folder exists (:func:`hiseg.paths.shared_data_dir`):
  ``bsds500_{train,val}_shared`` (its ``bsds500`` folder, which has no test split) and
  ``bsds500_bench_sample`` (the 5 images of the official benchmark's ``bench/data``, whose
  reference outputs are used by the tests).

:func:`bsds500_val` finds the val set at hand: the datasets root's, else the shared one.

Dataset dicts: ``file_name``, ``image_id`` (the id string, e.g. ``"100007"``), ``height``,
``width``, ``bsds_gt_file`` (path of the ``.mat``). Metadata: ``evaluator_type =
"bsds_hierarchical"`` (see :class:`hiseg.evaluation.HierarchicalSegEvaluator`), ``image_root``,
``gt_root``.
"""
import logging
import os
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from hiseg.paths import datasets_root, shared_data_dir

from .common import missing, register_lazy

__all__ = [
    "FAMILY",
    "SCRIPT",
    "EVALUATOR_TYPE",
    "SPLITS",
    "register_bsds500",
    "register_bsds500_shared",
    "register_all",
    "load_bsds500_dicts",
    "load_bsds_ground_truth",
    "load_bsds_ground_truth_mat",
    "npz_path_for",
    "bsds500_val",
]

logger = logging.getLogger(__name__)

FAMILY = "bsds500"
SCRIPT = "prepare_bsds500.py"
EVALUATOR_TYPE = "bsds_hierarchical"
SPLITS = ("train", "val", "test")


def npz_path_for(mat_path) -> str:
    """The ``.npz`` written by ``prepare_bsds500.py`` for a ground-truth ``.mat``."""
    return os.fspath(Path(mat_path).with_suffix(".npz"))


def load_bsds_ground_truth_mat(mat_path) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """Human segmentations and boundary maps of one image, read from the official ``.mat``."""
    from scipy.io import loadmat

    mat_path = os.fspath(mat_path)
    if not os.path.isfile(mat_path):
        raise FileNotFoundError(f"BSDS500 ground truth {mat_path} does not exist")
    cells = loadmat(mat_path)["groundTruth"]
    segs, bdrys = [], []
    for k in range(cells.shape[1]):
        entry = cells[0][k]
        segs.append(np.asarray(entry["Segmentation"][0, 0]).astype(np.int32))
        bdrys.append(np.asarray(entry["Boundaries"][0, 0]).astype(bool))
    if not segs:
        raise ValueError(f"{mat_path}: no human segmentation in 'groundTruth'")
    return segs, bdrys


def load_bsds_ground_truth(mat_path) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """``(segmentations, boundaries)`` of one image: lists of int label maps and bool maps.

    Reads the ``.npz`` next to ``mat_path`` when ``prepare_bsds500.py`` made one, the ``.mat``
    otherwise (``scipy.io.loadmat(f)['groundTruth'][0][k]['Segmentation'][0, 0]`` and
    ``['Boundaries'][0, 0]``).
    """
    npz = npz_path_for(mat_path)
    if os.path.isfile(npz):
        with np.load(npz) as data:
            segs = data["segs"]
            bdrys = data["boundaries"]
        return [s.astype(np.int32) for s in segs], [b.astype(bool) for b in bdrys]
    return load_bsds_ground_truth_mat(mat_path)


def _image_size(path: str) -> Tuple[int, int]:
    from hiseg.image_io import image_size

    return image_size(path)  # as read_image gives the pixels (EXIF orientation applied)


def load_bsds500_dicts(name: str, image_dir, gt_dir, script: Optional[str] = SCRIPT) -> List[dict]:
    """Dataset dicts for the images of ``image_dir`` that have ground truth in ``gt_dir``.

    Raises ``FileNotFoundError`` naming the expected path when a folder, or every image, is
    missing.
    """
    image_dir, gt_dir = Path(image_dir), Path(gt_dir)
    if not image_dir.is_dir():
        raise missing(name, image_dir, None, "BSDS500 image folder")
    if not gt_dir.is_dir():
        raise missing(name, gt_dir, None, "BSDS500 groundTruth folder")
    ids = sorted(
        {
            p.stem
            for p in gt_dir.iterdir()
            if p.suffix in (".mat", ".npz") and not p.name.startswith(".")
        }
    )
    dicts = []
    for image_id in ids:
        image = image_dir / f"{image_id}.jpg"
        if not image.is_file():
            raise missing(name, image, None, "image listed in groundTruth")
        height, width = _image_size(str(image))
        dicts.append(
            {
                "file_name": str(image),
                "image_id": image_id,
                "height": height,
                "width": width,
                "bsds_gt_file": str(gt_dir / f"{image_id}.mat"),
            }
        )
    if not dicts:
        raise missing(name, gt_dir / "*.mat", None, "no ground truth files")
    return dicts


def _register(name: str, image_dir: Path, gt_dir: Path, overwrite: bool) -> bool:
    def loader(name=name, image_dir=image_dir, gt_dir=gt_dir):
        return load_bsds500_dicts(name, image_dir, gt_dir)

    metadata = {
        "evaluator_type": EVALUATOR_TYPE,
        "image_root": str(image_dir),
        "gt_root": str(gt_dir),
    }
    return register_lazy(name, loader, metadata, family=FAMILY, overwrite=overwrite)


def register_bsds500(root=None, overwrite: bool = False) -> List[str]:
    """Register ``bsds500_{train,val,test}`` under ``<root>/bsds500`` (default root:
    :func:`hiseg.paths.datasets_root`). Existing names are skipped unless ``overwrite`` (and
    this package registered them). Returns the names (re-)registered."""
    root = Path(os.fspath(datasets_root() if root is None else root)) / "bsds500"
    done = []
    for split in SPLITS:
        name = f"bsds500_{split}"
        if _register(name, root / "images" / split, root / "groundTruth" / split, overwrite):
            done.append(name)
    return done


def register_bsds500_shared(shared=None, overwrite: bool = False) -> List[str]:
    """Register ``bsds500_{train,val}_shared`` and ``bsds500_bench_sample`` on the shared
    real-data folder, if it exists (nothing otherwise)."""
    shared = shared_data_dir() if shared is None else Path(shared)
    if shared is None or not Path(shared).is_dir():
        return []
    shared = Path(shared)
    done = []
    for split in ("train", "val"):
        name = f"bsds500_{split}_shared"
        base = shared / "bsds500"
        if _register(name, base / "images" / split, base / "groundTruth" / split, overwrite):
            done.append(name)
    bench = shared / "bsds500_bench"
    if _register("bsds500_bench_sample", bench / "images", bench / "groundTruth", overwrite):
        done.append("bsds500_bench_sample")
    return done


def bsds500_val(name: Optional[str] = None) -> Tuple[str, List[dict]]:
    """``(dataset name, dicts sorted by image id)`` of BSDS500 val: ``name``, else the first of
    ``bsds500_val`` / ``bsds500_val_shared`` whose files exist; ``FileNotFoundError`` when none
    does."""
    from detectron2.data import DatasetCatalog

    names = [name] if name else ["bsds500_val", "bsds500_val_shared"]
    for n in names:
        if n in DatasetCatalog.list():
            try:
                return n, sorted(DatasetCatalog.get(n), key=lambda d: str(d["image_id"]))
            except FileNotFoundError:
                continue
    raise FileNotFoundError(f"no BSDS500 val set found (tried {names}); set DETECTRON2_DATASETS or HISEG_SHARED_DATA")


def register_all(root=None, overwrite: bool = False) -> List[str]:
    """Entry point used by :func:`hiseg.data.register_all`: both of the above."""
    return register_bsds500(root, overwrite) + register_bsds500_shared(overwrite=overwrite)


# Importing this module directly registers the names too (idempotent, never raises).
try:
    register_all()
except Exception as e:  # pragma: no cover - registration must never break an import
    logger.warning("BSDS500 registration failed: %s", e)
