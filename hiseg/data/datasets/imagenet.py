"""ImageNet-1K and ImageNet-100 as classification datasets (folder per class).

Layout::

    imagenet/{train,val}/<wnid>/*.JPEG        ILSVRC-2012; val sorted into class folders
    imagenet100/{train,val}/<wnid> -> ...     prepare_imagenet100.py (symlinks into imagenet/)

ImageNet-100 is the 100-class subset of CMC (Tian et al., ECCV 2020,
https://github.com/HobbitLong/CMC/blob/master/imagenet100.txt), used by CAST for pre-training.

Dicts are ``{"file_name", "image_id", "label"}``; ``label`` indexes the sorted wnids, the
``torchvision.datasets.ImageFolder`` convention. Metadata: ``evaluator_type="classification"``,
``num_classes`` and ``classes`` (the sorted wnids). ``classes`` is filled in at registration when
the train folder already exists (one directory listing) and otherwise when the set is loaded.
Registered: ``imagenet_1k_{train,val}``, ``imagenet_100_{train,val}``.
"""
import os

from detectron2.data import MetadataCatalog

from .common import missing, register_lazy, require_dir

FAMILY = "imagenet"
IMAGE_EXTS = (".jpeg", ".jpg", ".png")

#: name -> (folder under the datasets root, number of classes, script hint)
VARIANTS = {
    "imagenet_1k": ("imagenet", 1000, None),
    "imagenet_100": ("imagenet100", 100, "prepare_imagenet100.py"),
}


def list_classes(split_dir: str):
    return sorted(
        d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d))
    )


def load_classification(name: str, root: str, split: str, num_classes: int, script):
    split_dir = os.path.join(root, split)
    require_dir(name, split_dir, script, "class folders")
    # Class indices always come from the *train* folder so train and val agree.
    train_dir = os.path.join(root, "train")
    require_dir(name, train_dir, script, "class folders")
    classes = list_classes(train_dir)
    if len(classes) != num_classes:
        raise missing(
            name, train_dir, script, f"{num_classes} class folders, found {len(classes)}"
        )
    meta = MetadataCatalog.get(name)
    if getattr(meta, "classes", None) != classes:
        if hasattr(meta, "classes"):
            del meta.classes  # folder content changed since registration
        meta.classes = classes
    out = []
    for label, wnid in enumerate(classes):
        class_dir = os.path.join(split_dir, wnid)
        if not os.path.isdir(class_dir):
            raise missing(name, class_dir, script, "class folder")
        for f in sorted(os.listdir(class_dir)):
            if f.lower().endswith(IMAGE_EXTS):
                out.append(
                    {
                        "file_name": os.path.join(class_dir, f),
                        "image_id": os.path.splitext(f)[0],
                        "label": label,
                    }
                )
    if not out:
        raise missing(name, os.path.join(split_dir, "<wnid>", "*.JPEG"), script, "no images")
    return out


def register_all(root: str, overwrite: bool = False) -> None:
    for prefix, (folder, num_classes, script) in VARIANTS.items():
        base = os.path.join(root, folder)
        for split in ("train", "val"):
            name = f"{prefix}_{split}"
            meta = {
                "evaluator_type": "classification",
                "num_classes": num_classes,
                "image_root": os.path.join(base, split),
            }
            train_dir = os.path.join(base, "train")
            try:
                classes = list_classes(train_dir) if os.path.isdir(train_dir) else []
            except OSError:  # registration must not fail; loading reports the problem
                classes = []
            if len(classes) == num_classes:
                meta["classes"] = classes
            register_lazy(
                name,
                lambda n=name, b=base, s=split, k=num_classes, h=script: load_classification(
                    n, b, s, k, h
                ),
                meta,
                family=FAMILY,
                overwrite=overwrite,
            )
