"""An image file -> the network input of a feature source.

Every image is resized to one input size (square, as MaskCut's fixed-size inputs; or its long
side, keeping the aspect ratio), each side rounded to a multiple of the source's patch / stride,
so that the feature grid covers the whole image (:func:`target_size`); the masks are brought back
to the original image size afterwards (:func:`hiseg_oap.pseudo_labels.pseudo_masks_to_results`).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

from hiseg.image_io import InputError, read_image

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "read_rgb", "target_size", "preprocess"]

#: ImageNet statistics on the 0-255 scale (DINO / timm ViTs), RGB
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def read_rgb(path: str) -> np.ndarray:
    """HxWx3 uint8 RGB (EXIF orientation applied, grey / alpha / palette converted); a missing,
    empty, truncated, zero-size or non-image file raises InputError (``hiseg.image_io``)."""
    img = read_image(path, format="RGB")
    img = np.array(img, dtype=np.uint8, copy=True)  # writable, contiguous
    if img.ndim != 3 or img.shape[2] != 3 or img.size == 0:
        raise InputError(f"{path}: unexpected image shape {img.shape}")
    return img


def target_size(h: int, w: int, size: int, multiple: int, keep_aspect: bool) -> Tuple[int, int]:
    """Network input size: square ``size`` (or long side ``size`` with ``keep_aspect``), each side
    rounded to a multiple of ``multiple`` (at least one multiple)."""
    def rnd(v):
        return max(multiple, int(round(v / multiple)) * multiple)

    if not keep_aspect:
        s = rnd(size)
        return s, s
    scale = size / max(h, w)
    return rnd(h * scale), rnd(w * scale)


def preprocess(img: np.ndarray, size: Tuple[int, int], mean, std, bgr: bool) -> torch.Tensor:
    """``(3, *size)`` float input: ``img`` (HxWx3 uint8 RGB) in the source's channel order
    (``bgr``), resized (bilinear, antialiased) and normalised ``(x - mean) / std`` (0-255 scale)."""
    x = torch.from_numpy(img).permute(2, 0, 1).float()
    if bgr:
        x = x.flip(0)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
