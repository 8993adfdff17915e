"""CAST's data mappers, one per file, registered in :data:`hiseg.data.mapper_registry.MAPPER_REGISTRY`
(``INPUT.DATASET_MAPPER_NAME``) when imported. Each computes the superpixels after its
augmentations when :func:`hiseg_cast.superpixels.mapper_computes_superpixels` says so."""
from .cast_dataset_mapper import CASTDatasetMapper
from .classification_dataset_mapper import CASTClassificationMapper, build_cls_transforms
from .moco_two_view_dataset_mapper import MoCoTwoViewMapper
from .segmenter_dataset_mapper import CASTSegmenterMapper, PhotometricDistortion, segmenter_train_augmentations

__all__ = ["CASTDatasetMapper", "CASTClassificationMapper", "build_cls_transforms", "MoCoTwoViewMapper",
           "CASTSegmenterMapper", "PhotometricDistortion", "segmenter_train_augmentations"]
