"""The superpixels S_0 of CAST (Sec. 3.1, Appx. A.2): the methods (:mod:`.compute`: SEEDS, SLIC,
grids; :mod:`.torch_slic`: SLIC in PyTorch on the images' device) and the one rule deciding where
they are computed, data mapper or backbone (:mod:`.policy`)."""
from .compute import (METHODS, SEEDS_INPUTS, SuperpixelConfig, compute_superpixels, compute_superpixels_batch,
                      grid_superpixels, num_superpixels_for, patch_superpixels, released_segmenter_seeds_input,
                      renumber_labels, to_rgb_uint8)
from .policy import (SUPERPIXEL_BACKBONES, batch_superpixels, input_superpixels, mapper_computes_superpixels,
                     reads_superpixels, superpixels_for_image_tensor)
from .torch_slic import connected_components, grid_shape, rgb_to_lab, slic_torch

__all__ = [
    "METHODS", "SEEDS_INPUTS", "SuperpixelConfig", "compute_superpixels", "compute_superpixels_batch",
    "grid_superpixels", "num_superpixels_for", "patch_superpixels", "released_segmenter_seeds_input",
    "renumber_labels", "to_rgb_uint8",
    "SUPERPIXEL_BACKBONES", "batch_superpixels", "input_superpixels", "mapper_computes_superpixels",
    "reads_superpixels", "superpixels_for_image_tensor",
    "connected_components", "grid_shape", "rgb_to_lab", "slic_torch",
]
