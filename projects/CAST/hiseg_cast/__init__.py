"""CAST (Ke, Mo, Yu, ICLR 2024): a ViT on superpixel tokens with graph pooling, as a Detectron2
project. Importing this package registers its parts: the backbones (``build_cast_backbone``,
``build_cast_fpn_backbone`` in ``BACKBONE_REGISTRY``), the meta-architectures (``CASTMoCo``,
``CASTSemanticSegmentor``, ``CASTSegmenter``, ``CASTClassifier``, ``CASTLinearProbe``), the data
mappers (``MAPPER_REGISTRY``), the ``sem_seg_retrieval`` evaluator factory and the config check.

Layout: :mod:`.config` (``add_cast_config``, every key), :mod:`.superpixels` (S_0 and where it is
computed), :mod:`.data` (dataset mappers), :mod:`.modeling` (encoder, backbone, heads,
meta-architectures), :mod:`.evaluation`, :mod:`.released_weights` (the authors' released
checkpoints -> ours), :mod:`.flops`.
"""
from . import evaluation  # noqa: F401  (registers the sem_seg_retrieval evaluator factory)
from .config import add_cast_config, check_cast_config
from .data import dataset_mappers  # noqa: F401  (registers the mappers)
from .data.dataset_mappers import (CASTClassificationMapper, CASTDatasetMapper, CASTSegmenterMapper,
                                   MoCoTwoViewMapper)
from .modeling import (CASTBackbone, CASTClassifier, CASTEncoder, CASTLinearProbe, CASTMoCo, CASTSegmenter,
                       CASTSemanticSegmentor, build_cast_backbone, build_cast_fpn_backbone)
from .superpixels import SuperpixelConfig, compute_superpixels

__all__ = [
    "add_cast_config", "check_cast_config",
    "CASTDatasetMapper", "CASTSegmenterMapper", "MoCoTwoViewMapper", "CASTClassificationMapper",
    "CASTBackbone", "CASTEncoder", "build_cast_backbone", "build_cast_fpn_backbone",
    "CASTMoCo", "CASTSemanticSegmentor", "CASTSegmenter", "CASTClassifier", "CASTLinearProbe",
    "SuperpixelConfig", "compute_superpixels",
]
