"""``skimage_natural_images``: the natural photographs that ship inside scikit-image.

Unlabelled; used by the main job and the demos as built-in training / picture data that needs no
download. Text, synthetic and binary images of ``skimage.data`` are left out.
``skimage_instances_{train,val}``: the same images as a 16-class classification set (one class
per image), for quick classification runs and tests. :func:`skimage_image`: any image of
``skimage.data`` by name (the demo's ``--skimage``).
"""
import os

import numpy as np

from hiseg.image_io import InputError, image_size

from .common import register_lazy

__all__ = ["register_all", "SKIMAGE_NATURAL", "load_skimage_images", "load_skimage_instances", "skimage_image"]

SKIMAGE_NATURAL = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "clock_motion.png",
                   "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg",
                   "ihc.png", "moon.png", "motorcycle_left.png", "motorcycle_right.png", "retina.jpg",
                   "rocket.jpg")


def load_skimage_images():
    import skimage.data

    folder = os.path.dirname(skimage.data.__file__)
    out = []
    for i, name in enumerate(SKIMAGE_NATURAL):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        h, w = image_size(path)  # EXIF orientation applied, as the mappers read it
        out.append({"file_name": path, "image_id": i, "height": h, "width": w})
    if not out:
        raise FileNotFoundError(f"no scikit-image sample images found in {folder}")
    return out


def load_skimage_instances():
    return [dict(d, label=SKIMAGE_NATURAL.index(os.path.basename(d["file_name"]))) for d in load_skimage_images()]


def skimage_image(name: str) -> np.ndarray:
    """An image shipped with scikit-image (``skimage.data.<name>()``)."""
    import skimage.data

    fn = getattr(skimage.data, name, None)
    if name.startswith("_") or not callable(fn):
        raise InputError(f"skimage:{name}: no such image in skimage.data")
    try:
        img = fn()
    except Exception as e:  # noqa: BLE001  (e.g. needs a download)
        raise InputError(f"skimage:{name}: could not load ({type(e).__name__}: {e})") from None
    return np.asarray(img)


def register_all(root=None, overwrite=False):
    register_lazy("skimage_natural_images", load_skimage_images,
                  {"evaluator_type": "none", "source": "scikit-image skimage.data"},
                  family="skimage", overwrite=overwrite)
    classes = [os.path.splitext(n)[0] for n in SKIMAGE_NATURAL]
    for split in ("train", "val"):
        register_lazy(f"skimage_instances_{split}", load_skimage_instances,
                      {"evaluator_type": "classification", "num_classes": len(classes), "classes": classes,
                       "source": "scikit-image skimage.data, one class per image"},
                      family="skimage", overwrite=overwrite)
