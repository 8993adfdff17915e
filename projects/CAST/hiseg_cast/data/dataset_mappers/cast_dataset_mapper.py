"""A DatasetMapper that stores the superpixels S_0 with each augmented image.

Superpixels are computed after augmentation, on the uint8 image (as the released code does per
augmented view), so they always describe the pixels the model sees. ``dataset_dict
["superpixels"]`` is an (H, W) int64 tensor; :func:`batch_superpixels` pads a batch with -1
exactly like ``ImageList`` pads the images.
"""
import copy
from typing import List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import DatasetMapper

from hiseg.data.mapper_registry import MAPPER_REGISTRY

from .superpixels import SuperpixelConfig, compute_superpixels

__all__ = ["CASTDatasetMapper", "batch_superpixels", "superpixels_for_image_tensor"]


def superpixels_for_image_tensor(image: torch.Tensor, input_format: str, cfg: SuperpixelConfig) -> torch.Tensor:
    """S_0 for a (C, H, W) uint8-valued image tensor in ``input_format`` (RGB or BGR)."""
    img = image.permute(1, 2, 0).numpy()
    if input_format == "BGR":
        img = img[:, :, ::-1]
    elif input_format == "L":
        img = np.repeat(img, 3, axis=2)
    img = np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8))
    return torch.from_numpy(compute_superpixels(img, cfg))


@MAPPER_REGISTRY.register()
class CASTDatasetMapper(DatasetMapper):
    def __init__(self, cfg, is_train: bool = True):
        super().__init__(cfg, is_train)
        self.superpixel_cfg = SuperpixelConfig.from_cfg(cfg.MODEL.CAST.SUPERPIXEL)

    def __call__(self, dataset_dict):
        out = super().__call__(copy.deepcopy(dataset_dict))
        if not self.superpixel_cfg.on_model_device:  # slic_torch: the model computes them on its device
            out["superpixels"] = superpixels_for_image_tensor(out["image"], self.image_format, self.superpixel_cfg)
        return out


def batch_superpixels(maps: Sequence[torch.Tensor], padded_hw) -> torch.Tensor:
    """Stack (H_i, W_i) label maps into (B, H, W), padding bottom/right with -1."""
    h, w = padded_hw
    out: List[torch.Tensor] = []
    for m in maps:
        if m.shape[0] > h or m.shape[1] > w:
            raise ValueError(f"superpixel map {tuple(m.shape)} larger than the padded image {(h, w)}")
        out.append(F.pad(m, (0, w - m.shape[1], 0, h - m.shape[0]), value=-1))
    return torch.stack(out)
