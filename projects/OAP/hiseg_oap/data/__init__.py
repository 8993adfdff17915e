"""OAP's training data: the multi-crop mapper (Sec. 4.1, 5.1) and the cropping of the teacher's
pseudo-masks to the student's local views (Sec. 4.3, "Cropped Bipartite Matching").

Importing this package registers ``OAPMultiCropDatasetMapper`` in
``hiseg.data.mapper_registry.MAPPER_REGISTRY``.
"""
from .crop_targets import crop_masks_to_views
from .multicrop_mapper import OAPMultiCropDatasetMapper, dino_photometric_augment, sample_crop_box

__all__ = ["OAPMultiCropDatasetMapper", "crop_masks_to_views", "dino_photometric_augment", "sample_crop_box"]
