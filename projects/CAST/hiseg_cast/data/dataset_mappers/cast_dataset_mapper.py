"""``CASTDatasetMapper``: detectron2's ``DatasetMapper`` that stores the superpixels S_0 with each
augmented image.

Superpixels are computed after augmentation, on the uint8 image (as the released code does per
augmented view), so they always describe the pixels the model sees. ``dataset_dict
["superpixels"]`` is an (H, W) int64 tensor, given when
:func:`~hiseg_cast.superpixels.mapper_computes_superpixels` says so (otherwise the backbone makes
S_0 itself); :func:`~hiseg_cast.superpixels.batch_superpixels` pads a batch with -1 exactly like
``ImageList`` pads the images.
"""
import copy

from detectron2.data import DatasetMapper

from hiseg.data.mapper_registry import MAPPER_REGISTRY

from ...superpixels import SuperpixelConfig, mapper_computes_superpixels, superpixels_for_image_tensor

__all__ = ["CASTDatasetMapper"]


@MAPPER_REGISTRY.register()
class CASTDatasetMapper(DatasetMapper):
    def __init__(self, cfg, is_train: bool = True):
        super().__init__(cfg, is_train)
        self.superpixel_cfg = SuperpixelConfig.from_cfg(cfg.MODEL.CAST.SUPERPIXEL)
        self.with_superpixels = mapper_computes_superpixels(cfg)

    def __call__(self, dataset_dict):
        out = super().__call__(copy.deepcopy(dataset_dict))
        if self.with_superpixels:
            out["superpixels"] = superpixels_for_image_tensor(out["image"], self.image_format, self.superpixel_cfg)
        return out
