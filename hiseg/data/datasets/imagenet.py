"""ImageNet-1K and ImageNet-100 as classification datasets, in the layouts users have.

Layouts under the datasets root (``$DETECTRON2_DATASETS``)::

    imagenet/{train,val}/<wnid>/*.JPEG        ILSVRC-2012 sorted into class folders
    imagenet100/{train,val}/<wnid> -> ...     prepare_imagenet100.py (symlinks into imagenet/)

Evaluation needs no ``train/`` folder. ``imagenet_1k_*`` use the standard ImageNet-1K class index:
the 1000 WordNet ids sorted (the ``torchvision.datasets.ImageFolder`` order of the full train
folder, the index of every released ImageNet classifier), read from timm's ImageNet info
(``timm.data.ImageNetInfo``), so a val folder alone, or one holding only some of the classes,
gets the right labels. ``imagenet_100_*`` take their 100 classes (sorted) from ``train/``, else
from the split's own class folders, else from the labels file.

The val split can also be given by config (:func:`register_from_cfg`, keys
``DATASETS.IMAGENET.*`` of :func:`hiseg.config.add_hiseg_config`), for the names of ``DATASETS.TEST``:

* ``VAL_DIR``: the folder of the images, class folders ``<wnid>/*`` or flat;
* ``VAL_LABELS``: a labels file for a flat folder (see :func:`read_labels_file`); image paths in
  it are relative to ``VAL_DIR`` when set, else to the labels file's folder;
* ``VAL_FIRST``: only the first N images, in file-name order; ``VAL_LIST``: only the images a
  text file names (one per line: file name, relative path or stem). The list applies first.

ImageNet val file names (``ILSVRC2012_val_00000001.JPEG`` ...) are in random class order, so
the first N of them are a fair sample of all classes; in a folder sorted by class (train), file
names start with the wnid and the first N are the first classes.

Dicts are ``{"file_name", "image_id", "label"}``, sorted by file name; metadata
``evaluator_type="classification"``, ``num_classes`` and ``classes`` (the wnids in index order).
Registered: ``imagenet_1k_{train,val}``, ``imagenet_100_{train,val}``.

ImageNet-100 is the 100-class subset of CMC (Tian et al., ECCV 2020,
https://github.com/HobbitLong/CMC/blob/master/imagenet100.txt), used by CAST for pre-training.
"""
import functools
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.data import MetadataCatalog

from .common import missing, register_lazy, require_dir, require_file

FAMILY = "imagenet"
IMAGE_EXTS = (".jpeg", ".jpg", ".png")
CONFIG_KEYS = "DATASETS.IMAGENET"

#: name -> (folder under the datasets root, number of classes, script hint)
VARIANTS = {
    "imagenet_1k": ("imagenet", 1000, None),
    "imagenet_100": ("imagenet100", 100, "prepare_imagenet100.py"),
}

__all__ = ["imagenet_1k_classes", "list_classes", "load_classification", "read_labels_file",
           "register_all", "register_from_cfg"]


@functools.lru_cache(maxsize=None)
def imagenet_1k_classes() -> Tuple[str, ...]:
    """The 1000 ImageNet-1K WordNet ids in the standard class-index order (sorted)."""
    from timm.data import ImageNetInfo

    wnids = tuple(ImageNetInfo().label_names())
    if len(wnids) != 1000 or list(wnids) != sorted(wnids):
        raise RuntimeError("timm's ImageNet-1K synset list is not the 1000 sorted wnids")
    return wnids


def list_classes(split_dir: str) -> List[str]:
    return sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


def _config_hint(name: str) -> str:
    return f"set {CONFIG_KEYS}.VAL_LABELS to a labels file (datasets/README.md, ImageNet-1K) for '{name}'"


def _parse_label(token, classes: Sequence[str], index: Dict[str, int]) -> Optional[int]:
    """A wnid or an integer class index -> index; None when it is neither."""
    if isinstance(token, int) or (isinstance(token, str) and token.strip().lstrip("-").isdigit()):
        k = int(token)
        return k if 0 <= k < len(classes) else -1
    return index.get(str(token).strip(), None)


def read_labels_file(name: str, path: str, classes: Sequence[str]) -> List[Tuple[str, int]]:
    """(image path as written, class index) pairs of a labels file.

    * ``.json``: a list of objects with the image under ``file`` (or ``file_name``) and the class
      as ``wnid`` and / or ``class_index`` (or ``label``), as ``imagenet_sample/labels.json``;
      with both, they must agree under the sorted-wnid index (a file in another class order is
      refused instead of silently scoring near 0); or one object ``{file: wnid or index}``.
    * any other suffix: one image per line, ``<file> <wnid or class index>``, separated by
      white space or a comma (``val.txt`` of Caffe, Kaggle's ``LOC_val_solution.csv``: the first
      word of the second field counts, a header line is skipped); ``#`` starts a comment.

    Class indices are in the sorted-wnid order, not the devkit's ``ILSVRC2012_ID`` order of
    ``ILSVRC2012_validation_ground_truth.txt`` (one number per line, no file name: refused).
    """
    require_file(name, path, None, "labels file")
    index = {w: k for k, w in enumerate(classes)}
    out: List[Tuple[str, int]] = []

    def bad(where: str, what: str) -> ValueError:
        from hiseg.errors import ConfigError

        return ConfigError(f"Dataset '{name}': labels file {path}, {where}: {what}")

    if path.lower().endswith(".json"):
        with open(path) as f:
            data = json.load(f)
        items = list(data.items()) if isinstance(data, dict) else data
        for k, item in enumerate(items):
            if isinstance(item, tuple):
                file, value = item
                wnid, idx = (None, value) if isinstance(value, int) or str(value).isdigit() else (value, None)
            elif isinstance(item, dict):
                file = item.get("file", item.get("file_name"))
                wnid, idx = item.get("wnid"), item.get("class_index", item.get("label"))
            else:
                raise bad(f"entry {k}", "expected an object with 'file' and 'wnid' / 'class_index'")
            if not file or (wnid is None and idx is None):
                raise bad(f"entry {k}", "needs 'file' and a 'wnid' or 'class_index'")
            label = _parse_label(wnid if wnid is not None else idx, classes, index)
            if label is None or label < 0:
                raise bad(f"entry {k}", f"unknown class {wnid if wnid is not None else idx!r} "
                                        f"(not one of the {len(classes)} classes)")
            if wnid is not None and idx is not None and _parse_label(idx, classes, index) != label:
                raise bad(f"entry {k} ({file})", f"class_index {idx} is not the index of {wnid} "
                                                 f"({label}) in the sorted-wnid order")
            out.append((str(file), label))
    else:
        with open(path) as f:
            lines = [ln.split("#", 1)[0].strip() for ln in f]
        for k, line in enumerate(lines, start=1):
            if not line:
                continue
            fields = [s.strip() for s in line.split(",", 1)] if "," in line else line.split(None, 1)
            if len(fields) < 2 or not fields[1]:
                raise bad(f"line {k}", "expected '<file> <wnid or class index>' (the devkit's "
                                       "ILSVRC2012_validation_ground_truth.txt has no file names and "
                                       "another class order: convert it to that form)")
            label = _parse_label(fields[1].split()[0], classes, index)
            if label is None and not out:
                continue  # a header line such as "ImageId,PredictionString"
            if label is None or label < 0:
                raise bad(f"line {k}", f"unknown class {fields[1].split()[0]!r} "
                                       f"(not one of the {len(classes)} classes)")
            out.append((fields[0], label))
    if not out:
        raise missing(name, path, None, "no labelled images in the labels file")
    return out


def _resolve_image(base: str, rel: str) -> Optional[str]:
    p = rel if os.path.isabs(rel) else os.path.join(base, rel)
    if os.path.isfile(p):
        return p
    if not os.path.splitext(rel)[1]:  # Kaggle-style ids without extension
        for ext in (".JPEG", ".jpg", ".jpeg", ".png", ".JPG", ".PNG"):
            if os.path.isfile(p + ext):
                return p + ext
    return None


def _dicts_from_labels(name: str, labels: str, image_dir: Optional[str], classes) -> List[dict]:
    base = image_dir if image_dir else os.path.dirname(os.path.abspath(labels))
    out, absent = [], []
    for rel, label in read_labels_file(name, labels, classes):
        f = _resolve_image(base, rel)
        if f is None:
            absent.append(rel)
            continue
        out.append({"file_name": f, "image_id": os.path.splitext(os.path.basename(f))[0], "label": label})
    if absent:
        raise missing(name, os.path.join(base, absent[0]), None,
                      f"image listed in {labels}; {len(absent)} of the listed images are missing")
    return out


def _dicts_from_folders(name: str, split_dir: str, classes, script) -> List[dict]:
    folders = list_classes(split_dir)
    if not folders:
        if any(_is_image(f) for f in os.listdir(split_dir)):
            from hiseg.errors import ConfigError

            raise ConfigError(f"Dataset '{name}': {split_dir} holds images but no class folders; "
                              f"{_config_hint(name)}, or sort the images into <wnid>/ folders")
        raise missing(name, os.path.join(split_dir, "<wnid>", "*.JPEG"), script, "no class folders")
    index = {w: k for k, w in enumerate(classes)}
    unknown = [d for d in folders if d not in index]
    if unknown:
        raise missing(name, os.path.join(split_dir, unknown[0]), script,
                      f"{len(unknown)} folder(s) that are not among the {len(classes)} class wnids, "
                      f"e.g. {unknown[:3]}")
    out = []
    for wnid in folders:
        class_dir = os.path.join(split_dir, wnid)
        for f in sorted(os.listdir(class_dir)):
            if _is_image(f):
                out.append({"file_name": os.path.join(class_dir, f), "image_id": os.path.splitext(f)[0],
                            "label": index[wnid]})
    return out


def _classes_for(name: str, root: str, split_dir: str, num_classes: int, script,
                 labels: Optional[str]) -> List[str]:
    if num_classes == 1000:
        return list(imagenet_1k_classes())
    candidates = [os.path.join(root, "train"), split_dir]
    for d in candidates:
        if os.path.isdir(d):
            classes = list_classes(d)
            if len(classes) == num_classes:
                return classes
    if labels and os.path.isfile(labels) and labels.lower().endswith(".json"):
        with open(labels) as f:
            data = json.load(f)
        wnids = sorted({e.get("wnid") for e in data if isinstance(e, dict) and e.get("wnid")}) \
            if isinstance(data, list) else []
        if len(wnids) == num_classes:
            return wnids
    raise missing(name, os.path.join(root, "train"), script,
                  f"{num_classes} class folders, which fix the class order")


def _select(name: str, dicts: List[dict], first: int = 0, subset_list: Optional[str] = None) -> List[dict]:
    dicts = sorted(dicts, key=lambda d: (os.path.basename(d["file_name"]), d["file_name"]))
    if subset_list:
        require_file(name, subset_list, None, "image list")
        with open(subset_list) as f:
            wanted = [ln.split("#", 1)[0].strip() for ln in f]
        wanted = [w for w in wanted if w]
        keys: Dict[str, int] = {}
        for k, d in enumerate(dicts):
            f = d["file_name"]
            for key in (os.path.basename(f), os.path.splitext(os.path.basename(f))[0], f):
                keys.setdefault(key, k)
        picked, absent = [], []
        for w in wanted:
            k = keys.get(w, keys.get(os.path.basename(w), keys.get(os.path.splitext(os.path.basename(w))[0])))
            (absent if k is None else picked).append(w if k is None else k)
        if absent:
            raise missing(name, absent[0], None, f"image named in {subset_list}; {len(absent)} of its "
                                                 f"{len(wanted)} names match no image of the dataset")
        dicts = [dicts[k] for k in sorted(set(picked))]
    if first and first > 0:
        dicts = dicts[: int(first)]
    return dicts


def load_classification(name: str, root: str, split: str, num_classes: int, script, *,
                        split_dir: Optional[str] = None, labels: Optional[str] = None, first: int = 0,
                        subset_list: Optional[str] = None) -> List[dict]:
    """Dataset dicts of one split: ``split_dir`` (default ``root/split``) with class folders, or
    with a ``labels`` file; optionally the ``first`` N / the images of ``subset_list``."""
    given_dir = split_dir
    split_dir = split_dir or os.path.join(root, split)
    classes = _classes_for(name, root, split_dir, num_classes, script, labels)
    if labels:
        if given_dir:
            require_dir(name, given_dir, None, "image folder")
        dicts = _dicts_from_labels(name, labels, given_dir, classes)
    else:
        require_dir(name, split_dir, script, "class folders, or a flat folder with a labels file")
        if split == "train" and num_classes == 1000:
            folders = list_classes(split_dir)
            if len(folders) != num_classes:
                raise missing(name, split_dir, script, f"{num_classes} class folders, found {len(folders)}")
        dicts = _dicts_from_folders(name, split_dir, classes, script)
    meta = MetadataCatalog.get(name)
    if getattr(meta, "classes", None) != classes:
        if hasattr(meta, "classes"):
            del meta.classes  # folder content changed since registration
        meta.classes = classes
    dicts = _select(name, dicts, first, subset_list)
    if not dicts:
        raise missing(name, labels or os.path.join(split_dir, "<wnid>", "*.JPEG"), script, "no images")
    return dicts


def _register(name, base, split, num_classes, script, overwrite, **kwargs):
    meta = {"evaluator_type": "classification", "num_classes": num_classes,
            "image_root": kwargs.get("split_dir") or os.path.join(base, split)}
    if num_classes == 1000:
        meta["classes"] = list(imagenet_1k_classes())
    else:
        train_dir = os.path.join(base, "train")
        try:
            classes = list_classes(train_dir) if os.path.isdir(train_dir) else []
        except OSError:  # registration must not fail; loading reports the problem
            classes = []
        if len(classes) == num_classes:
            meta["classes"] = classes
    register_lazy(
        name,
        lambda: load_classification(name, base, split, num_classes, script, **kwargs),
        meta,
        family=FAMILY,
        overwrite=overwrite,
    )


def register_all(root: str, overwrite: bool = False) -> None:
    for prefix, (folder, num_classes, script) in VARIANTS.items():
        for split in ("train", "val"):
            _register(f"{prefix}_{split}", os.path.join(root, folder), split, num_classes, script, overwrite)


def register_from_cfg(cfg, root: Optional[str] = None) -> List[str]:
    """Re-point the ``imagenet_*_val`` names of ``cfg.DATASETS.TEST`` at ``DATASETS.IMAGENET.*``
    (nothing to do when those keys are at their defaults). Returns the names re-registered;
    a key set for a config that evaluates no ImageNet val set is a one-line error."""
    from hiseg.errors import ConfigError
    from hiseg.paths import datasets_root

    c = cfg.DATASETS.IMAGENET
    if not (c.VAL_DIR or c.VAL_LABELS or c.VAL_FIRST or c.VAL_LIST):
        return []
    root = os.fspath(datasets_root() if root is None else root)
    names = [n for n in cfg.DATASETS.TEST if n in (f"{p}_val" for p in VARIANTS)]
    if not names:
        raise ConfigError(f"{CONFIG_KEYS}.* describe an ImageNet val set, but DATASETS.TEST "
                          f"{tuple(cfg.DATASETS.TEST)} has none; add imagenet_1k_val to DATASETS.TEST")
    if c.VAL_FIRST < 0:
        raise ConfigError(f"{CONFIG_KEYS}.VAL_FIRST must be >= 0 (0 = all images), got {c.VAL_FIRST}")
    absolute = {k: os.path.abspath(v) if v else None
                for k, v in (("split_dir", c.VAL_DIR), ("labels", c.VAL_LABELS), ("subset_list", c.VAL_LIST))}
    for name in names:
        folder, num_classes, script = VARIANTS[name[: -len("_val")]]
        _register(name, os.path.join(root, folder), "val", num_classes, script, True,
                  first=int(c.VAL_FIRST), **absolute)
    return names
