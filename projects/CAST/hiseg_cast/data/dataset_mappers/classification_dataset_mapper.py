"""``CASTClassificationMapper``: the data of CAST / ViT image classification (DeiT, linear probe).

``CASTClassificationMapper`` (``INPUT.DATASET_MAPPER_NAME: CASTClassificationMapper``) reads a
classification dict (``file_name``, ``label``, as :mod:`hiseg.data.datasets.imagenet` makes) and
returns ``image`` ((C, S, S) uint8 tensor in ``INPUT.FORMAT``), ``superpixels`` ((S, S) int64,
when :func:`hiseg_cast.superpixels.mapper_computes_superpixels` says so: CAST with segment tokens
and a CPU method), ``label``, ``height`` / ``width`` (= S).

Training (DeiT, Table 12): RandomResizedCrop(S, scale (``MODEL.CLS.CROP_MIN_SCALE``, 1), bicubic)
-> horizontal flip -> RandAugment -> superpixels on the augmented uint8 image, so S_0 always
describes the pixels the model sees. RandAugment: ``MODEL.CLS.AUTO_AUGMENT`` is a timm config
string, by default DeiT's own ``rand-m9-mstd0.5-inc1`` (2 ops, magnitude 9 with Gaussian noise of
std 0.5, "increasing" op variants): Table 12's "RandAug(9, 0.5)", built with timm's
``rand_augment_transform`` exactly as ``timm.data.create_transform`` does (translate 45% of S,
fill = the pixel mean). ``"torchvision"`` selects ``torchvision.transforms.RandAugment(num_ops=2,
magnitude=9)`` instead, an approximation (fixed magnitude, no magnitude noise, a different op
set / ranges). Not reproduced from DeiT: random erasing (``--reprob 0.25``, not listed in Table 12)
and repeated augmentation (a sampler matter). Mixup / CutMix happen in the model (they mix
pairs of a batch, see :class:`hiseg_cast.modeling.superpixel_mixup.SuperpixelMixup`).

Linear probing (MoCo-v3 ``main_lincls``): ``AUTO_AUGMENT: ""`` and ``INTERPOLATION: bilinear``
give RandomResizedCrop + flip only. Test: resize the short side to ``S / TEST_CROP_PCT``
(256 for 224), centre crop S.

``skimage_instances_{train,val}``: the 16 natural photographs of scikit-image, each its own class
(instance recognition), for CPU smoke runs of the classification pipeline (train on random crops,
test on centre crops of the same images), are registered by :mod:`hiseg.data.datasets.skimage_images`.
"""
import copy

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from hiseg.data.mapper_registry import MAPPER_REGISTRY
from hiseg.image_io import read_image

from ...superpixels import SuperpixelConfig, compute_superpixels, mapper_computes_superpixels

__all__ = ["CASTClassificationMapper", "build_cls_transforms"]

_INTERP = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}


def _randaugment(name: str, size: int, mean_rgb, interpolation: str):
    if not name:
        return None
    if name == "torchvision":
        return T.RandAugment(num_ops=2, magnitude=9, interpolation=_INTERP[interpolation])
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.transforms import str_to_pil_interp

    if not name.startswith("rand"):
        raise ValueError(f"MODEL.CLS.AUTO_AUGMENT must be a timm 'rand-...' string, 'torchvision' or '', got {name!r}")
    hparams = {"translate_const": int(size * 0.45),
               "img_mean": tuple(min(255, int(round(float(m)))) for m in mean_rgb),
               "interpolation": str_to_pil_interp(interpolation)}
    return rand_augment_transform(name, hparams)


def build_cls_transforms(cfg, is_train: bool):
    """The PIL -> PIL transform of the mapper (see the module docstring)."""
    c = cfg.MODEL.CLS
    size = int(cfg.INPUT.CROP.SIZE[0])
    interp = c.INTERPOLATION
    if interp not in _INTERP:
        raise ValueError(f"MODEL.CLS.INTERPOLATION must be one of {sorted(_INTERP)}, got {interp!r}")
    if not is_train:
        return T.Compose([T.Resize(int(size / c.TEST_CROP_PCT), interpolation=_INTERP[interp]),
                          T.CenterCrop(size)])
    mean = list(cfg.MODEL.PIXEL_MEAN)
    if cfg.INPUT.FORMAT == "BGR":
        mean = mean[::-1]
    tfs = [T.RandomResizedCrop(size, scale=(c.CROP_MIN_SCALE, 1.0), interpolation=_INTERP[interp]),
           T.RandomHorizontalFlip()]
    ra = _randaugment(c.AUTO_AUGMENT, size, mean, interp)
    if ra is not None:
        tfs.append(ra)
    return T.Compose(tfs)


@MAPPER_REGISTRY.register()
class CASTClassificationMapper:
    def __init__(self, cfg, is_train: bool = True):
        if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
            raise ValueError(f"classification needs INPUT.FORMAT RGB or BGR, got {cfg.INPUT.FORMAT!r}")
        self.is_train = is_train
        self.transform = build_cls_transforms(cfg, is_train)
        self.image_format = cfg.INPUT.FORMAT
        self.superpixel_cfg = SuperpixelConfig.from_cfg(cfg.MODEL.CAST.SUPERPIXEL) \
            if mapper_computes_superpixels(cfg) else None

    def __call__(self, dataset_dict):
        d = copy.deepcopy(dataset_dict)
        img = Image.fromarray(read_image(d["file_name"], "RGB"))  # EXIF-oriented, 16-bit scaled
        arr = np.ascontiguousarray(np.asarray(self.transform(img), dtype=np.uint8))
        if self.superpixel_cfg is not None:  # after every augmentation: S_0 matches the pixels
            d["superpixels"] = torch.from_numpy(compute_superpixels(arr, self.superpixel_cfg))
        if self.image_format == "BGR":
            arr = arr[:, :, ::-1]
        d["image"] = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        d["height"], d["width"] = arr.shape[:2]
        if "label" in d:
            d["label"] = int(d["label"])
        return d
