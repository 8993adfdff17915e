"""Two augmented views per image for MoCo-v3 pre-training, each with its own superpixels.

Augmentations of MoCo-v3 (Chen et al. 2021), as the released CAST MoCo code uses them: random
resized crop (scale 0.08-1) to ``INPUT.CROP.SIZE``, horizontal flip, colour jitter (0.4, 0.4,
0.2, 0.1) with p=0.8, greyscale p=0.2, Gaussian blur (p=1.0 / 0.1, sigma 0.1-2.0) and solarize
(p=0 / 0.2) for view 1 / view 2. Superpixels are computed on each augmented uint8 view (SEEDS,
15 bins, 20 iterations, Table 11 / released code), so they always match the view's pixels.
They are left out when the model would not read them (the ViT baseline, CAST with patch tokens,
``slic_torch``): :func:`hiseg_cast.superpixels.mapper_computes_superpixels`, the rule every
mapper follows.
"""
import copy

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from hiseg.data.mapper_registry import MAPPER_REGISTRY
from hiseg.image_io import read_image

from ...superpixels import SuperpixelConfig, compute_superpixels, mapper_computes_superpixels
from .cast_dataset_mapper import CASTDatasetMapper

__all__ = ["MoCoTwoViewMapper"]


class _Blur:
    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        if np.random.rand() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=np.random.uniform(0.1, 2.0)))


class _Solarize:
    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if np.random.rand() < self.p else img


def _view_transform(size, blur_p, solarize_p, scale_min):
    return T.Compose([
        T.RandomResizedCrop(size, scale=(scale_min, 1.0)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        _Blur(blur_p),
        _Solarize(solarize_p),
    ])


@MAPPER_REGISTRY.register()
class MoCoTwoViewMapper:
    """Training: two augmented views (``view1`` / ``view2``, with ``superpixels1`` / ``2``).
    Evaluation (``is_train=False``, e.g. ``--eval-only`` or ``TEST.EVAL_PERIOD`` on BSDS500): one
    ``image`` resized as detectron2's test mapper does (``INPUT.MIN_SIZE_TEST`` /
    ``MAX_SIZE_TEST``), with its ``superpixels`` under the same rule as the views, which is what
    :meth:`hiseg_cast.CASTMoCo.inference` reads."""

    def __init__(self, cfg, is_train: bool = True):
        self.is_train = is_train
        self.with_superpixels = mapper_computes_superpixels(cfg)
        self.superpixel_cfg = SuperpixelConfig.from_cfg(cfg.MODEL.CAST.SUPERPIXEL)
        self.image_format = cfg.INPUT.FORMAT
        if not is_train:
            self.test_mapper = CASTDatasetMapper(cfg, False)
            return
        size = cfg.INPUT.CROP.SIZE[0]
        scale_min = cfg.MODEL.MOCO.CROP_MIN_SCALE
        self.views = [_view_transform(size, 1.0, 0.0, scale_min), _view_transform(size, 0.1, 0.2, scale_min)]

    def __call__(self, dataset_dict):
        if not self.is_train:
            return self.test_mapper(dataset_dict)
        d = copy.deepcopy(dataset_dict)
        img = Image.fromarray(read_image(d["file_name"], "RGB"))  # EXIF-oriented, 16-bit scaled
        for k, tf in enumerate(self.views, start=1):
            view = np.ascontiguousarray(np.asarray(tf(img)))
            arr = view[:, :, ::-1] if self.image_format == "BGR" else view
            d[f"view{k}"] = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
            if self.with_superpixels:
                d[f"superpixels{k}"] = torch.from_numpy(compute_superpixels(view, self.superpixel_cfg))
        return d
