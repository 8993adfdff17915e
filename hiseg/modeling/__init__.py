"""Backbones shared by the CAST and OAP projects. Importing this package registers
``build_vit_backbone`` in detectron2's ``BACKBONE_REGISTRY``."""
from .config import add_vit_config
from .vit import (ChannelLayerNorm, SimpleFeaturePyramid, ViTBackbone, build_vit_backbone, feature_stride,
                  make_timm_vit, vit_base, vit_small)

__all__ = ["add_vit_config", "ChannelLayerNorm", "SimpleFeaturePyramid", "ViTBackbone", "build_vit_backbone",
           "feature_stride", "make_timm_vit", "vit_base", "vit_small"]
