"""``CASTSegmenterMapper``: the training data of ``CASTSegmenter`` (CAST Table 3b/c, Appx. E.3).

``CASTSegmenterMapper`` (``INPUT.DATASET_MAPPER_NAME: CASTSegmenterMapper``) is
``CASTDatasetMapper`` with Segmenter's (mmsegmentation's) training pipeline: resize (short side
drawn from ``INPUT.MIN_SIZE_TRAIN``, range sampling for the 0.5-2.0 ratio), random crop of
``INPUT.CROP.SIZE`` in which one class covers at most
``MODEL.CAST_SEGMENTER.CROP_SINGLE_CATEGORY_MAX_AREA`` (mmseg's ``cat_max_ratio`` 0.75),
horizontal flip, photometric distortion (``MODEL.CAST_SEGMENTER.COLOR_AUG``), then the
superpixels. detectron2's own mapper crops *before* resizing, which would not give fixed-size
training crops.
"""
from typing import List

import numpy as np
from detectron2.data import transforms as T

from hiseg.data.mapper_registry import MAPPER_REGISTRY

from .cast_dataset_mapper import CASTDatasetMapper

__all__ = ["CASTSegmenterMapper", "PhotometricDistortion", "segmenter_train_augmentations"]


def _photometric(img: np.ndarray, brightness, contrast, contrast_first: bool, saturation, hue,
                 image_format: str) -> np.ndarray:
    import cv2

    x = img
    if brightness is not None:
        x = np.clip(x.astype(np.float32) + brightness, 0, 255).astype(np.uint8)
    if contrast is not None and contrast_first:
        x = np.clip(x.astype(np.float32) * contrast, 0, 255).astype(np.uint8)
    if saturation is not None or hue is not None:
        to_hsv, from_hsv = ((cv2.COLOR_BGR2HSV, cv2.COLOR_HSV2BGR) if image_format == "BGR"
                            else (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB))
        hsv = cv2.cvtColor(np.ascontiguousarray(x), to_hsv)
        if saturation is not None:
            hsv[..., 1] = np.clip(hsv[..., 1].astype(np.float32) * saturation, 0, 255).astype(np.uint8)
        if hue is not None:  # OpenCV's uint8 hue is in [0, 180)
            hsv[..., 0] = ((hsv[..., 0].astype(np.int64) + hue) % 180).astype(np.uint8)
        x = cv2.cvtColor(hsv, from_hsv)
    if contrast is not None and not contrast_first:
        x = np.clip(x.astype(np.float32) * contrast, 0, 255).astype(np.uint8)
    return x


class PhotometricDistortion(T.Augmentation):
    """mmsegmentation's ``PhotoMetricDistortion`` (Segmenter's training pipeline), each step with
    probability 0.5: brightness + U(-32, 32); contrast x U(0.5, 1.5), before or after the HSV
    steps (a coin flip); saturation x U(0.5, 1.5); hue + U{-18..18} (OpenCV's 0..180 hue).
    uint8 HxWx3 images only; anything else is left unchanged."""

    def __init__(self, brightness_delta: int = 32, contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5),
                 hue_delta: int = 18, image_format: str = "RGB"):
        super().__init__()
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"PhotometricDistortion needs an RGB or BGR image, got INPUT.FORMAT {image_format!r}")
        self._init(locals())

    def get_transform(self, image):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            return T.NoOpTransform()
        rnd = np.random
        brightness = rnd.uniform(-self.brightness_delta, self.brightness_delta) if rnd.rand() < 0.5 else None
        contrast_first = rnd.rand() < 0.5
        contrast = rnd.uniform(*self.contrast_range) if rnd.rand() < 0.5 else None
        saturation = rnd.uniform(*self.saturation_range) if rnd.rand() < 0.5 else None
        hue = int(rnd.randint(-self.hue_delta, self.hue_delta + 1)) if rnd.rand() < 0.5 else None
        fmt = self.image_format
        return T.ColorTransform(lambda img: _photometric(img, brightness, contrast, contrast_first, saturation,
                                                         hue, fmt))


def segmenter_train_augmentations(cfg) -> List[T.Augmentation]:
    """resize -> crop (category-area constrained) -> flip -> photometric, as mmseg's pipeline."""
    augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                                 cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(T.RandomCrop_CategoryAreaConstraint(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE,
                                                        cfg.MODEL.CAST_SEGMENTER.CROP_SINGLE_CATEGORY_MAX_AREA,
                                                        cfg.MODEL.CAST_SEGMENTER.IGNORE_VALUE))
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                                 vertical=cfg.INPUT.RANDOM_FLIP == "vertical"))
    if cfg.MODEL.CAST_SEGMENTER.COLOR_AUG:
        augs.append(PhotometricDistortion(image_format=cfg.INPUT.FORMAT))
    return augs


@MAPPER_REGISTRY.register()
class CASTSegmenterMapper(CASTDatasetMapper):
    """``CASTDatasetMapper`` (superpixels after augmentation) with Segmenter's training
    augmentations; at test time the same as ``CASTDatasetMapper`` (shortest-edge resize)."""

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        if is_train:
            ret["augmentations"] = segmenter_train_augmentations(cfg)
        return ret
