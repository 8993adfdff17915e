"""Your own data, named by its files: datasets registered from a name alone, with no code.

A dataset name of one of these forms can be put in ``DATASETS.TRAIN`` / ``DATASETS.TEST`` (in a
config file or as ``--opts``/trailing ``KEY VALUE`` overrides of ``tools/train_net.py``); it is
registered with detectron2's ``DatasetCatalog`` / ``MetadataCatalog`` under exactly that name the
first time it is named (:func:`register_user_datasets`, called by
:func:`hiseg.dataset_checks.check_datasets` before anything is built):

``folder:<dir>``
    every image file under ``<dir>`` (sub-folders included, sorted paths; extensions
    :data:`IMAGE_EXTS`), without labels: dicts with ``file_name`` and ``image_id`` (the path
    relative to ``<dir>``). For self-supervised training: CAST MoCo pre-training, OAP training.
    Image sizes are not read (the mappers read each image anyway; reading every header of a
    large folder up front would delay the first step).
``coco:<json>[:<image_root>]``
    a COCO-format instances file with its own categories, as detectron2's
    ``register_coco_instances`` (``evaluator_type`` ``"coco"``: evaluated by ``COCOEvaluator``
    against ``<json>``).
``cls_agnostic:<json>[:<image_root>]``
    a COCO-format file whose categories all count as one class ``fg`` (id 1), the form of
    CutLER's class-agnostic sets: the pseudo-mask file of ``tools/generate_pseudo_masks.py
    --annotations-out`` to self-train a one-class detector on, or your own annotations to
    evaluate it with. Evaluation is class-agnostic: when ``<json>`` has more than one category,
    a copy with the categories collapsed into ``fg`` is written (atomically) under
    :func:`collapsed_json_dir` and ``COCOEvaluator`` scores against it.

``<image_root>`` is joined to each image's ``file_name``; without it the names are used as
written in the file (absolute, or relative to the working directory, as the pseudo-mask tool
writes them). Paths may be relative to the working directory.

Why names rather than a config key listing registrations: a name is all detectron2 passes
around (``DATASETS.TRAIN`` / ``TEST``, evaluators, output folders), so a name that carries its
files works unchanged in every place that takes a dataset name, on the command line too, and
needs no second key kept in step with the first. The prefix says how the files are read.
"""
import hashlib
import json
import os
from typing import Iterable, List, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from .cls_agnostic import FG_CATEGORY, class_agnostic_coco, load_as_one_class
from ...utils.atomic_io import atomic_write_json
from .common import missing, register_lazy

__all__ = ["KINDS", "IMAGE_EXTS", "parse_user_dataset", "register_user_datasets", "load_image_folder",
           "load_user_coco", "collapsed_json_dir", "required_paths"]

FAMILY = "user"
KINDS = ("folder", "coco", "cls_agnostic")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_FORMS = "folder:<dir>, coco:<json>[:<image_root>] or cls_agnostic:<json>[:<image_root>]"


def parse_user_dataset(name: str) -> Optional[Tuple[str, str, str]]:
    """``(kind, path, image_root)`` of a name of the forms above, None for any other name.
    A known prefix with a malformed rest raises :class:`~hiseg.errors.ConfigError`."""
    from hiseg.errors import ConfigError

    kind, sep, rest = name.partition(":")
    if not sep or kind not in KINDS:
        return None
    if kind == "folder":
        path, image_root = rest, ""
    else:
        path, _, image_root = rest.partition(":")
    if not path:
        raise ConfigError(f"dataset '{name}': no path after '{kind}:'; write {_FORMS}")
    if kind != "folder" and not path.endswith(".json"):
        raise ConfigError(f"dataset '{name}': {path} is not a .json file; write {_FORMS}")
    return kind, path, image_root


def collapsed_json_dir() -> str:
    """Where the one-category copies of ``cls_agnostic:`` files go: ``$HISEG_CACHE_DIR`` or
    ``~/.cache/hiseg``, sub-folder ``cls_agnostic``."""
    base = os.environ.get("HISEG_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "hiseg")
    return os.path.join(base, "cls_agnostic")


def _collapsed_path(json_file: str) -> str:
    key = hashlib.sha1(os.path.abspath(json_file).encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(json_file))[0]
    return os.path.join(collapsed_json_dir(), f"{stem}_{key}.json")


def required_paths(name: str) -> List[Tuple[str, str, str]]:
    """``(path, "file" | "dir", what)`` that the user dataset ``name`` needs (checked before
    training by :func:`hiseg.dataset_checks.check_datasets`)."""
    kind, path, image_root = parse_user_dataset(name)
    if kind == "folder":
        return [(path, "images", "image folder")]
    out = [(path, "file", "COCO-format annotation file")]
    if image_root:
        out.append((image_root, "dir", "image folder"))
    return out


def load_image_folder(name: str, folder: str) -> List[dict]:
    """Dicts (``file_name``, ``image_id``) of the image files under ``folder``, sorted."""
    if not os.path.isdir(folder):
        raise missing(name, folder, None, "image folder")
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTS)]
    if not files:
        raise missing(name, os.path.join(folder, "**", "*.jpg"), None, f"no image files ({', '.join(IMAGE_EXTS)})")
    return [{"file_name": f, "image_id": os.path.relpath(f, folder)} for f in files]


def _read_coco(name: str, json_file: str) -> dict:
    from hiseg.dataset_checks import read_json

    if not os.path.isfile(json_file):
        raise missing(name, json_file, None, "COCO-format annotation file")
    coco = read_json(json_file, "COCO-format annotation file")
    if not isinstance(coco, dict) or "images" not in coco:
        from hiseg.errors import InputError

        raise InputError(f"dataset '{name}': {json_file} is not a COCO instances file (no 'images' list); "
                         "give a file with 'images', 'annotations' and 'categories'")
    return coco


def load_user_coco(name: str, json_file: str, image_root: str, class_agnostic: bool) -> List[dict]:
    """Detectron2 dicts of a COCO-format file. ``class_agnostic``: every instance is class 0,
    and a one-category copy of the file is written for the evaluator when it has several."""
    if image_root and not os.path.isdir(image_root):
        raise missing(name, image_root, None, "image folder")
    if not class_agnostic:
        from detectron2.data.datasets import load_coco_json

        # dataset_name=name: detectron2 maps the ids and records thing_classes in the metadata
        return load_coco_json(json_file, image_root, dataset_name=name)
    coco = _read_coco(name, json_file)
    target = MetadataCatalog.get(name).json_file
    if target != json_file:  # several categories: evaluate against the collapsed copy
        atomic_write_json(target, class_agnostic_coco(coco))
    return load_as_one_class(json_file, image_root)


def _register(name: str, overwrite: bool = False) -> bool:
    kind, path, image_root = parse_user_dataset(name)
    if kind == "folder":
        meta = {"evaluator_type": "none", "image_root": path}
        return register_lazy(name, lambda: load_image_folder(name, path), meta, family=FAMILY,
                             overwrite=overwrite)
    meta = {"image_root": image_root, "evaluator_type": "coco"}
    if kind == "coco":
        meta["json_file"] = path
        return register_lazy(name, lambda: load_user_coco(name, path, image_root, False), meta,
                             family=FAMILY, overwrite=overwrite)
    json_file = path
    if os.path.isfile(path):
        try:
            with open(path) as f:
                cats = json.load(f).get("categories") or []
        except (ValueError, AttributeError, OSError):
            cats = []  # the check before training / the loader report the bad file
        if len(cats) != 1:
            json_file = _collapsed_path(path)
        else:
            meta["thing_dataset_id_to_contiguous_id"] = {int(cats[0]["id"]): 0}
    meta.setdefault("thing_dataset_id_to_contiguous_id", {FG_CATEGORY["id"]: 0})
    meta.update(json_file=json_file, thing_classes=[FG_CATEGORY["name"]], thing_colors=[[220, 20, 60]])
    return register_lazy(name, lambda: load_user_coco(name, path, image_root, True), meta,
                         family=FAMILY, overwrite=overwrite)


def register_user_datasets(names: Iterable[str]) -> List[str]:
    """Register every name of :data:`KINDS`' forms that is not registered yet; returns those
    registered now. Other names are left alone."""
    done = []
    for name in names:
        if name in DatasetCatalog.list() or parse_user_dataset(name) is None:
            continue
        if _register(name):
            done.append(name)
    return done
