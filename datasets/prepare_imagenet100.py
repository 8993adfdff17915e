#!/usr/bin/env python
"""Build ImageNet-100 as a tree of symlinks to ImageNet-1K class folders.

ImageNet-100 is the 100-class subset introduced by CMC (Tian, Krishnan & Isola, "Contrastive
Multiview Coding", ECCV 2020; class list: https://github.com/HobbitLong/CMC/blob/master/
imagenet100.txt), which CAST uses for pre-training. The list is built in (``CMC_CLASSES``);
``--class-list FILE`` takes any other list, one wnid per line (``#`` comments allowed).

Result (registered as ``imagenet_100_{train,val}``)::

    <root>/imagenet100/{train,val}/<wnid> -> <root>/imagenet/{train,val}/<wnid>

The new tree is assembled in a temporary folder and renamed into place, so an interrupted run
leaves nothing half-made. An existing output is replaced only with ``--overwrite``. A missing
ImageNet folder, missing or empty class folders are one ``error:`` line, exit status 2.
"""
import argparse
import os
import shutil
import tempfile

from tqdm import tqdm

from hiseg.cli import script_main  # noqa: E402
from hiseg.dataset_checks import require_input  # noqa: E402
from hiseg.errors import DatasetNotFoundError, EmptyDatasetError  # noqa: E402

LAYOUT = "<imagenet-root>/{train,val}/<wnid>/*.JPEG (1000 class folders per split)"
HOW = ("download ILSVRC2012 (https://image-net.org), sort train and val into class folders "
       "(datasets/README.md, ImageNet-1K), or pass --imagenet-root")

#: CMC's ImageNet-100 classes, in the order of imagenet100.txt.
CMC_CLASSES = (
    "n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 n04589890 n03062245 "
    "n01773797 n01735189 n07831146 n07753275 n03085013 n04485082 n02105505 n01983481 n02788148 "
    "n03530642 n04435653 n02086910 n02859443 n13040303 n03594734 n02085620 n02099849 n01558993 "
    "n04493381 n02109047 n04111531 n02877765 n04429376 n02009229 n01978455 n02106550 n01820546 "
    "n01692333 n07714571 n02974003 n02114855 n03785016 n03764736 n03775546 n02087046 n07836838 "
    "n04099969 n04592741 n03891251 n02701002 n03379051 n02259212 n07715103 n03947888 n04026417 "
    "n02326432 n03637318 n01980166 n02113799 n02086240 n03903868 n02483362 n04127249 n02089973 "
    "n03017168 n02093428 n02804414 n02396427 n04418357 n02172182 n01729322 n02113978 n03787032 "
    "n02089867 n02119022 n03777754 n04238763 n02231487 n03032252 n02138441 n02104029 n03837869 "
    "n03494278 n04136333 n03794056 n03492542 n02018207 n04067472 n03930630 n03584829 n02123045 "
    "n04229816 n02100583 n03642806 n04336792 n03259280 n02116738 n02108089 n03424325 n01855672 "
    "n02090622"
).split()


def read_class_list(path):
    classes = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                classes.append(line.split()[0])
    if len(set(classes)) != len(classes):
        raise SystemExit(f"{path}: duplicate class ids")
    return classes


def build_subset(imagenet_root, output, classes, splits=("train", "val"), overwrite=False):
    """Create ``output/<split>/<wnid>`` symlinks; returns the number of links made."""
    imagenet_root = os.path.abspath(imagenet_root)
    output = os.path.abspath(output)
    for s in splits:
        require_input(os.path.join(imagenet_root, s), LAYOUT, HOW)
    missing = [
        os.path.join(imagenet_root, s, c)
        for s in splits
        for c in classes
        if not os.path.isdir(os.path.join(imagenet_root, s, c))
    ]
    if missing:
        raise DatasetNotFoundError(f"{len(missing)} class folders missing, e.g. {', '.join(missing[:3])}; "
                                   f"expected layout: {LAYOUT}; {HOW}")
    empty = [os.path.join(imagenet_root, s, c) for s in splits for c in classes
             if not any(True for _ in os.scandir(os.path.join(imagenet_root, s, c)))]
    if empty:
        raise EmptyDatasetError(f"{len(empty)} class folders are empty, e.g. {', '.join(empty[:3])}; "
                                f"expected layout: {LAYOUT}; {HOW}")
    if os.path.lexists(output) and not overwrite:
        raise SystemExit(f"{output} exists; pass --overwrite to replace it")
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(output) + ".", dir=parent)
    try:
        n = 0
        for split in splits:
            os.makedirs(os.path.join(tmp, split))
            for wnid in tqdm(classes, desc=split):
                os.symlink(os.path.join(imagenet_root, split, wnid), os.path.join(tmp, split, wnid))
                n += 1
        os.chmod(tmp, 0o755)
        if os.path.lexists(output):
            old = output + ".old"
            os.rename(output, old)
            os.rename(tmp, output)
            shutil.rmtree(old)  # removes the links, never what they point to
        else:
            os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return n


def parse_args(argv=None):
    root = os.environ.get("DETECTRON2_DATASETS", "datasets")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--class-list", help="file with one wnid per line (default: CMC's 100 classes)")
    p.add_argument("--imagenet-root", default=os.path.join(root, "imagenet"))
    p.add_argument("--output", default=os.path.join(root, "imagenet100"))
    p.add_argument("--splits", nargs="+", default=["train", "val"])
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    classes = read_class_list(args.class_list) if args.class_list else list(CMC_CLASSES)
    n = build_subset(args.imagenet_root, args.output, classes, args.splits, args.overwrite)
    print(f"linked {n} class folders ({len(classes)} classes x {len(args.splits)} splits)")
    print(f"ImageNet subset written to {args.output}")
    return n


if __name__ == "__main__":
    script_main(main, result_is_status=False)
