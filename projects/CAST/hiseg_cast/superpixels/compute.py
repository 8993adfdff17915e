"""Superpixels: the level-0 segments S_0 of CAST (Sec. 3.1, Appx. A.2).

SEEDS (Bergh et al. 2012) through OpenCV ``ximgproc`` is the default, SLIC (scikit-image) the
alternative of Table 7. ``slic_torch`` is SLIC in PyTorch (:mod:`hiseg_cast.superpixels.torch_slic`):
it runs batched on the images' device, so :func:`compute_superpixels_batch` (the backbone's path
when it is given only images) makes S_0 for a whole batch on the GPU in one call. Where S_0 is
computed (data mapper or backbone) is decided in one place, :mod:`hiseg_cast.superpixels.policy`.

Settings follow the authors' released code: SEEDS runs on the augmented
uint8 RGB image converted to LAB, with ``num_levels=1, prior=2, double_step=False``;
``histogram_bins=15`` and 20 iterations for MoCo training, 5 bins and 15 iterations for
supervised and dense training; 196 superpixels at 224x224 and ``H*W/16^2`` for dense tasks.

``seeds_input="released_segmenter"`` (``MODEL.CAST.SUPERPIXEL.SEEDS_INPUT``) reproduces what the
authors' Segmenter code (ADE20K / Pascal Context fine-tuning) gives SEEDS: its
``generate_superpixels`` multiplies the already-uint8 image by 255 in uint8 arithmetic, which
wraps to ``(-v) mod 256`` (0 stays 0, 1 becomes 255, 255 becomes 1: an inverted image with black
kept black), in training (``segm/data/base.py``) and in evaluation (``segm/model/utils.py``
``inference_with_superpixels``, called by ``engine_cast.evaluate`` and ``eval/miou_cast.py``
with the same 0-255 statistics); github twke18/CAST ec85adf. Weights trained with that code
were trained, and their numbers measured, on those superpixels. One difference remains: the
released code gets its uint8 image by truncating a normalised-then-de-normalised float image
(``astype(np.uint8)``), which can lower a value by 1 where the float round trip falls below
it; we start from the decoded uint8 image.

Every returned label map is int64 with labels ``0..n-1`` all present (SEEDS may return fewer
labels than asked and a few non-connected labels; both are fine downstream).
"""
import dataclasses
import logging
from dataclasses import dataclass

import cv2
import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["SuperpixelConfig", "compute_superpixels", "grid_superpixels", "patch_superpixels", "renumber_labels",
           "num_superpixels_for", "to_rgb_uint8", "compute_superpixels_batch", "METHODS", "SEEDS_INPUTS",
           "released_segmenter_seeds_input"]

METHODS = ("seeds", "slic", "slic_torch", "grid")
SEEDS_INPUTS = ("rgb", "released_segmenter")

# SEEDS in OpenCV hangs or crashes on very small images or blocks of a few pixels (measured:
# 16x16 asking for 196 never returns; 9x200 segfaults). Below these limits we fall back to a
# regular grid, which is what SEEDS would start from anyway.
_SEEDS_MIN_SIDE = 16
_SEEDS_MIN_BLOCK_AREA = 64


@dataclass(frozen=True)
class SuperpixelConfig:
    """How to compute S_0. ``num_superpixels <= 0`` means ``H*W / pixels_per_superpixel``."""

    method: str = "seeds"  # "seeds" | "slic" | "slic_torch" | "grid"
    num_superpixels: int = 196
    pixels_per_superpixel: int = 256  # 16^2: one superpixel per ViT-B/16 patch (dense tasks)
    histogram_bins: int = 15
    iterations: int = 20
    prior: int = 2
    num_levels: int = 1
    double_step: bool = False
    slic_compactness: float = 10.0
    slic_iterations: int = 10  # SLIC's default (skimage's max_num_iter); "slic_torch" only
    seeds_input: str = "rgb"  # "rgb" | "released_segmenter" (see the module docstring)

    @property
    def on_model_device(self) -> bool:
        """``slic_torch``: the model computes S_0 for the whole batch on its device (after the
        data mappers, which then leave ``superpixels`` out); the other methods run per image on
        the CPU in the mappers."""
        return self.method == "slic_torch"

    def for_whole_images(self) -> "SuperpixelConfig":
        """The same settings with the count from ``pixels_per_superpixel`` (``num_superpixels`` is
        the training views'): S_0 of a whole image at evaluation, in the demo and the experiments."""
        return dataclasses.replace(self, num_superpixels=0)

    @classmethod
    def from_cfg(cls, cfg_sp):
        return cls(
            method=cfg_sp.METHOD.lower(),
            num_superpixels=int(cfg_sp.NUM_SUPERPIXELS),
            pixels_per_superpixel=int(cfg_sp.PIXELS_PER_SUPERPIXEL),
            histogram_bins=int(cfg_sp.HISTOGRAM_BINS),
            iterations=int(cfg_sp.ITERATIONS),
            prior=int(cfg_sp.PRIOR),
            seeds_input=str(getattr(cfg_sp, "SEEDS_INPUT", "rgb")),
        )


def num_superpixels_for(height: int, width: int, cfg: SuperpixelConfig) -> int:
    if cfg.num_superpixels > 0:
        return cfg.num_superpixels
    return max(1, int(round(height * width / cfg.pixels_per_superpixel)))


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Any image array (grey, grey+alpha, RGB, RGBA; uint8/uint16/float) as HxWx3 uint8 RGB.

    16-bit images (uint16, or int32 as PIL returns them) are scaled by 1/257, booleans to 0/255;
    float images are taken as [0, 1] if their maximum is at
    most 1, else as [0, 255]. Alpha is dropped.
    """
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"expected an image of shape HxW or HxWxC with C in 1..4, got {img.shape}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"empty image of shape {img.shape}")
    if img.shape[2] in (1, 2):
        img = np.repeat(img[:, :, :1], 3, axis=2)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    if img.dtype == np.uint8:
        return np.ascontiguousarray(img)
    if img.dtype == bool:
        return np.ascontiguousarray(img.astype(np.uint8) * 255)
    if np.issubdtype(img.dtype, np.floating):
        if not np.isfinite(img).all():
            raise ValueError("image contains NaN or infinite values")
        scale = 255.0 if img.max() <= 1.0 else 1.0
        return np.clip(img * scale, 0, 255).round().astype(np.uint8)
    if np.issubdtype(img.dtype, np.integer):
        # uint16, or 16-bit data that PIL hands over as int32 ("I" / "I;16" modes)
        top = int(img.max())
        if top > 255:
            div = 257.0 if top <= 65535 else top / 255.0
            return np.clip(img.astype(np.float64) / div, 0, 255).round().astype(np.uint8)
        return np.clip(img, 0, 255).astype(np.uint8)
    raise ValueError(f"unsupported image dtype {img.dtype}")


def renumber_labels(labels: np.ndarray) -> np.ndarray:
    """Every value present (negative ones included) mapped to ``0..n-1`` in increasing order
    (int64): the label maps of the superpixel methods. For torch label maps with -1 padding,
    see :func:`hiseg_cast.modeling.superpixel_mixup.renumber_labels_keep_padding`."""
    _, inv = np.unique(labels, return_inverse=True)
    return inv.reshape(labels.shape).astype(np.int64)


def grid_superpixels(height: int, width: int, num: int) -> np.ndarray:
    """A regular grid of about ``num`` near-square cells (also the 'patch tokens' of Table 3a)."""
    from .torch_slic import grid_shape  # the same grid SLIC starts from

    rows, cols = grid_shape(height, width, num)
    r = np.minimum((np.arange(height) * rows) // height, rows - 1)
    c = np.minimum((np.arange(width) * cols) // width, cols - 1)
    return renumber_labels(r[:, None] * cols + c[None, :])


def patch_superpixels(height: int, width: int, patch: int) -> np.ndarray:
    """Square ``patch x patch`` cells (partial cells at the borders): ViT's patch tokens."""
    r = np.arange(height) // patch
    c = np.arange(width) // patch
    return (r[:, None] * (-(-width // patch)) + c[None, :]).astype(np.int64)


def compute_superpixels(image_rgb: np.ndarray, cfg: SuperpixelConfig = SuperpixelConfig()) -> np.ndarray:
    """Superpixel label map (H x W, int64, labels 0..n-1) for one image.

    Args:
        image_rgb: H x W x 3 uint8 RGB (use :func:`to_rgb_uint8` for anything else).
    """
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"compute_superpixels expects HxWx3 uint8 RGB, got {image_rgb.shape} "
                         f"{image_rgb.dtype}; convert with hiseg_cast.superpixels.to_rgb_uint8")
    h, w = image_rgb.shape[:2]
    n = num_superpixels_for(h, w, cfg)
    method = cfg.method
    if method == "grid":
        return grid_superpixels(h, w, n)
    if method == "slic":
        from skimage.segmentation import slic

        labels = slic(image_rgb, n_segments=n, compactness=cfg.slic_compactness, start_label=0,
                      channel_axis=-1)
        return renumber_labels(labels)
    if method == "slic_torch":
        x = torch.from_numpy(np.ascontiguousarray(image_rgb)).permute(2, 0, 1)[None]
        return _slic_torch(x, n, cfg)[0].numpy()
    if method != "seeds":
        raise ValueError(f"unknown superpixel method {cfg.method!r}: use one of {', '.join(METHODS)}")
    if min(h, w) < _SEEDS_MIN_SIDE:
        logger.debug("image %dx%d too small for SEEDS; using a regular grid", h, w)
        return grid_superpixels(h, w, min(n, max(1, h * w // _SEEDS_MIN_BLOCK_AREA)))
    n = min(n, max(1, (h * w) // _SEEDS_MIN_BLOCK_AREA))
    if cfg.seeds_input == "released_segmenter":
        image_rgb = released_segmenter_seeds_input(image_rgb)
    elif cfg.seeds_input != "rgb":
        raise ValueError(f"unknown SEEDS input {cfg.seeds_input!r}: use one of {', '.join(SEEDS_INPUTS)}")
    lab = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2LAB)
    seeds = cv2.ximgproc.createSuperpixelSEEDS(
        w, h, 3, n, cfg.num_levels, cfg.prior, cfg.histogram_bins, cfg.double_step)
    seeds.iterate(lab, cfg.iterations)
    return renumber_labels(seeds.getLabels())


def released_segmenter_seeds_input(image_rgb: np.ndarray) -> np.ndarray:
    """The image the authors' Segmenter code gives SEEDS: ``image * 255`` in uint8 arithmetic,
    which wraps to ``(-v) mod 256`` per channel (see the module docstring)."""
    return (image_rgb.astype(np.uint8) * np.uint8(255)).astype(np.uint8)


def _slic_torch(images: torch.Tensor, n: int, cfg: SuperpixelConfig) -> torch.Tensor:
    from .torch_slic import slic_torch

    return slic_torch(images, n, compactness=cfg.slic_compactness, iterations=cfg.slic_iterations)


@torch.no_grad()
def compute_superpixels_batch(images: torch.Tensor, cfg: SuperpixelConfig = SuperpixelConfig()) -> torch.Tensor:
    """Superpixel label maps (B, H, W) int64 on ``images.device`` for (B, 3, H, W) uint8 RGB images.

    ``slic_torch`` runs once for the whole batch on the images' device; the other methods run
    :func:`compute_superpixels` image by image on the CPU.
    """
    if images.dim() != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"compute_superpixels_batch expects (B, 3, H, W) uint8 RGB, got "
                         f"{tuple(images.shape)} {images.dtype}")
    h, w = images.shape[-2:]
    if cfg.method == "slic_torch":
        return _slic_torch(images, num_superpixels_for(h, w, cfg), cfg)
    img = images.permute(0, 2, 3, 1).cpu().numpy()
    maps = [compute_superpixels(np.ascontiguousarray(im), cfg) for im in img]
    return torch.from_numpy(np.stack(maps)).to(images.device)
