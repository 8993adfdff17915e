"""Where the superpixels S_0 of an input are computed: one rule for every data mapper and model.

CAST computes S_0 on each augmented image, so that they describe the pixels the model sees
(Sec. 3.1; the released code runs SEEDS on every augmented view). Two places can do it:

* **the data mapper**, per image on the CPU of a loader worker, after every augmentation. Its
  output then carries ``"superpixels"`` (MoCo's two views: ``"superpixels1"`` /
  ``"superpixels2"``), an (H, W) int64 map of the image's pixels;
* **the backbone**, for a batch, when an input carries none:
  :meth:`~hiseg_cast.modeling.CASTBackbone.superpixels_from_images` de-normalises the images and
  computes S_0, on the CPU image by image, or for the whole batch on the model's device with
  ``MODEL.CAST.SUPERPIXEL.METHOD: slic_torch``; CAST with patch tokens (``MODEL.CAST.TOKENS:
  patch``, Table 3a) makes its square cells there.

The decision, :func:`mapper_computes_superpixels`, is the same for every mapper
(``CASTDatasetMapper``, ``CASTSegmenterMapper``, ``MoCoTwoViewMapper``,
``CASTClassificationMapper``): the mapper computes S_0 exactly when the backbone reads superpixels
(a CAST backbone, ``SUPERPIXEL_BACKBONES``, with segment tokens) and the method runs on the CPU.
It leaves them out for the ViT baseline (it reads none: SEEDS would cost wall-clock time for
nothing), for patch tokens (the backbone makes the cells) and for ``slic_torch`` (the model
computes them on its device, for the whole batch at once).

The models take what the mapper gave and leave the rest to the backbone, through one function,
:func:`input_superpixels` (CAST's meta-architectures), or by calling the backbone without
superpixels (a detectron2 head calls ``backbone(images)``: S_0 of the padded batch).
"""
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .compute import SuperpixelConfig, compute_superpixels

__all__ = ["SUPERPIXEL_BACKBONES", "mapper_computes_superpixels", "superpixels_for_image_tensor",
           "reads_superpixels", "input_superpixels", "batch_superpixels"]

#: ``MODEL.BACKBONE.NAME`` of the backbones that read superpixels (with ``MODEL.CAST.TOKENS: segment``)
SUPERPIXEL_BACKBONES = ("build_cast_backbone", "build_cast_fpn_backbone")


def mapper_computes_superpixels(cfg) -> bool:
    """Whether a data mapper gives each image (each view) its S_0: the backbone reads
    superpixels (``MODEL.BACKBONE.NAME`` in :data:`SUPERPIXEL_BACKBONES`, ``MODEL.CAST.TOKENS:
    segment``) and the method is not computed on the model's device (``slic_torch``)."""
    if cfg.MODEL.BACKBONE.NAME not in SUPERPIXEL_BACKBONES or cfg.MODEL.CAST.TOKENS != "segment":
        return False
    return not SuperpixelConfig.from_cfg(cfg.MODEL.CAST.SUPERPIXEL).on_model_device


def superpixels_for_image_tensor(image: torch.Tensor, input_format: str, cfg: SuperpixelConfig) -> torch.Tensor:
    """S_0 of a (C, H, W) uint8-valued image tensor in ``input_format`` (RGB, BGR or L), as a
    mapper computes it: (H, W) int64."""
    img = image.permute(1, 2, 0).numpy()
    if input_format == "BGR":
        img = img[:, :, ::-1]
    elif input_format == "L":
        img = np.repeat(img, 3, axis=2)
    img = np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8))
    return torch.from_numpy(compute_superpixels(img, cfg))


def reads_superpixels(backbone) -> bool:
    """Whether ``backbone`` takes superpixels: CAST's backbone (it has
    ``superpixels_from_images``); the ViT baseline takes none."""
    return callable(getattr(backbone, "superpixels_from_images", None))


def batch_superpixels(maps: Sequence[torch.Tensor], padded_hw) -> torch.Tensor:
    """Stack (H_i, W_i) label maps into (B, H, W), padding bottom/right with -1 (as
    ``ImageList`` pads the images)."""
    h, w = padded_hw
    out: List[torch.Tensor] = []
    for m in maps:
        if m.shape[0] > h or m.shape[1] > w:
            raise ValueError(f"superpixel map {tuple(m.shape)} larger than the padded image {(h, w)}")
        out.append(F.pad(m, (0, w - m.shape[1], 0, h - m.shape[0]), value=-1))
    return torch.stack(out)


def input_superpixels(backbone, batched_inputs: Sequence[dict], images: torch.Tensor,
                      image_sizes: Optional[Sequence] = None, key: str = "superpixels",
                      compute: bool = True) -> Optional[torch.Tensor]:
    """S_0 of a batch for ``backbone``: (B, H, W) int64 on ``images.device``, -1 beyond each
    image's size; None for a backbone that reads no superpixels.

    Args:
        batched_inputs: the inputs; an input's ``key`` entry (the data mapper's S_0, see
            :func:`mapper_computes_superpixels`) is used when present, checked against its size.
        images: (B, 3, H, W) normalised (padded) images.
        image_sizes: each image's (h, w) in the padded batch; None: all (H, W).
        compute: True: the inputs without S_0 get the backbone's
            (:meth:`~hiseg_cast.modeling.CASTBackbone.superpixels_from_images` of each image's
            own extent, one call for all of them). False: None unless every input has one (the
            caller lets the backbone compute them later, e.g. on Mixup's blended images).
    """
    if not reads_superpixels(backbone):
        return None
    padded = tuple(images.shape[-2:])
    sizes = [tuple(s) for s in image_sizes] if image_sizes is not None else [padded] * len(batched_inputs)
    maps: List[Optional[torch.Tensor]] = []
    for d, (h, w) in zip(batched_inputs, sizes):
        sp = d.get(key)
        if sp is not None and tuple(sp.shape) != (h, w):
            raise ValueError(f"superpixels {tuple(sp.shape)} do not match the image {(h, w)}")
        maps.append(sp)
    missing = [i for i, m in enumerate(maps) if m is None]
    if not missing:  # the mappers' S_0 (on the CPU): padded there, one copy to the device
        return batch_superpixels([m.cpu().long() for m in maps], padded).to(images.device)
    if not compute:
        return None
    fresh = backbone.superpixels_from_images(images[missing], [sizes[i] for i in missing])
    if len(missing) == len(maps):  # already (B, H, W), -1 beyond each image's size
        return fresh.long()
    for k, i in enumerate(missing):
        maps[i] = fresh[k, :sizes[i][0], :sizes[i][1]]
    return batch_superpixels([m.to(images.device).long() for m in maps], padded)
