"""The images to make pseudo-masks of, and the ground truth to evaluate them against.

* :func:`items_from_images`: image files, directories or glob patterns; image ids from a ground
  truth (matched by file name), from COCO-style numeric names (``000000397133.jpg`` -> 397133),
  or 1, 2, ... in order;
* :func:`items_from_dataset`: the records of a registered detectron2 dataset;
* :func:`resolve_ground_truth`: the ground truth of ``--evaluate``, checked before any work.

A bad request raises :class:`hiseg.errors.UsageError` naming the flag of
``tools/generate_pseudo_masks.py`` it comes from.
"""
from __future__ import annotations

import difflib
import glob
import json
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

from hiseg.data.datasets.user_data import IMAGE_EXTS
from hiseg.errors import UsageError

__all__ = ["IMAGE_EXTS", "Item", "expand_image_patterns", "items_from_images", "items_from_dataset",
           "resolve_ground_truth"]

@dataclass
class Item:
    image_id: object
    file_name: str
    height: Optional[int] = None  # recorded size (dataset / GT); the masks are written at it
    width: Optional[int] = None


def expand_image_patterns(patterns: Sequence[str]) -> List[str]:
    """Files for glob patterns, directories (their image files) and plain paths, in order, each
    once. A pattern or directory that gives nothing raises UsageError."""
    files: List[str] = []
    for pat in patterns:
        if os.path.isdir(pat):
            found = sorted(p for p in glob.glob(os.path.join(pat, "*"))
                           if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTS))
            if not found:
                raise UsageError(f"--images {pat!r}: the directory has no image files ({', '.join(IMAGE_EXTS)})")
        elif glob.has_magic(pat):
            found = sorted(p for p in glob.glob(pat, recursive=True) if os.path.isfile(p))
            if not found:
                raise UsageError(f"--images {pat!r}: no file matches this pattern")
        else:
            if not os.path.exists(pat):
                raise UsageError(f"--images {pat!r}: no such file")
            found = [pat]
        files.extend(found)
    return list(dict.fromkeys(files))


def items_from_images(patterns: Sequence[str], max_images: Optional[int] = None,
                      gt: Optional[str] = None) -> List[Item]:
    """The files of ``patterns`` (the first ``max_images``); with ``gt`` (a COCO JSON or a
    registered dataset), each file's id and size come from the GT image of the same file name."""
    files = expand_image_patterns(patterns)
    if max_images is not None:
        files = files[:max_images]
    if not files:
        raise UsageError("--images: no image to process")
    if gt:
        import hiseg.data  # noqa: F401  (a --gt dataset name may be one of ours)

        from .evaluate import load_ground_truth

        try:
            coco, where = load_ground_truth(gt)
        except (ValueError, FileNotFoundError, json.JSONDecodeError) as e:
            raise UsageError(f"--gt {gt!r}: {e}") from e
        by_name = {}
        for im in coco.get("images", []):
            by_name.setdefault(os.path.basename(im["file_name"]), im)
        missing = [f for f in files if os.path.basename(f) not in by_name]
        if missing:
            raise UsageError(f"{len(missing)} image(s) are not in the ground truth {where} (matched by file "
                             f"name): {', '.join(os.path.basename(m) for m in missing[:5])}")
        return [Item(by_name[os.path.basename(f)]["id"], f, int(by_name[os.path.basename(f)]["height"]),
                     int(by_name[os.path.basename(f)]["width"])) for f in files]
    stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        ids = [int(s) for s in stems]  # COCO-style names: 000000397133.jpg -> 397133
    else:
        ids = list(range(1, len(files) + 1))
    return [Item(i, f) for i, f in zip(ids, files)]


def items_from_dataset(dataset: str, max_images: Optional[int] = None) -> List[Item]:
    """The records of the registered detectron2 dataset ``dataset`` (the first ``max_images``)."""
    import hiseg.data  # noqa: F401  (registers the project's datasets)
    from detectron2.data import DatasetCatalog

    names = DatasetCatalog.list()
    if dataset not in names:
        close = difflib.get_close_matches(dataset, names, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UsageError(f"unknown dataset {dataset!r}: it is not registered with detectron2's "
                         f"DatasetCatalog{hint} (or use --images)")
    try:
        dicts = DatasetCatalog.get(dataset)
    except FileNotFoundError as e:
        from hiseg.paths import datasets_root

        raise UsageError(f"dataset {dataset!r} cannot be loaded: {e} (datasets root: "
                         f"DETECTRON2_DATASETS={os.fspath(datasets_root())}; see datasets/README.md)") from e
    if not dicts:
        raise UsageError(f"dataset {dataset!r} has no images")
    if max_images is not None:
        dicts = dicts[:max_images]
    items = []
    for i, d in enumerate(dicts):
        if "file_name" not in d:
            raise UsageError(f"dataset {dataset!r}: record {i} has no 'file_name'")
        h, w = d.get("height"), d.get("width")
        items.append(Item(d.get("image_id", i), d["file_name"], int(h) if h else None, int(w) if w else None))
    return items


def resolve_ground_truth(evaluate: bool, gt: Optional[str], dataset: Optional[str]) -> Optional[str]:
    """The ground truth for ``--evaluate`` (checked before any computation): ``gt``, else the
    ``dataset`` itself (``cls_agnostic_coco`` for ``coco_2017_val`` when its file exists)."""
    if not evaluate:
        return gt
    if not gt:
        if not dataset:
            raise UsageError("--evaluate with --images needs --gt (a COCO JSON or a registered dataset "
                             "holding these images, matched by file name)")
        gt = dataset
        from detectron2.data import DatasetCatalog, MetadataCatalog

        if dataset == "coco_2017_val" and "cls_agnostic_coco" in DatasetCatalog.list():
            js = MetadataCatalog.get("cls_agnostic_coco").get("json_file")
            if js and os.path.isfile(js):
                gt = "cls_agnostic_coco"  # CutLER's class-agnostic COCO val: same image ids
    if not os.path.isfile(gt):
        from detectron2.data import DatasetCatalog

        import hiseg.data  # noqa: F401

        if gt not in DatasetCatalog.list():
            raise UsageError(f"--gt {gt!r} is neither a COCO JSON file nor a registered dataset")
    return gt
