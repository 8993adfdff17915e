"""OAP's multi-scale encoder: multi-scale deformable attention and ViT-Adapter.

Importing this package registers ``build_vit_adapter_backbone`` in detectron2's
``BACKBONE_REGISTRY``; ``add_vit_adapter_config(cfg)`` adds its ``MODEL.VIT_ADAPTER`` keys.
"""
from .adapter_config import add_vit_adapter_config
from .ms_deform_attn import (MSDeformAttn, level_start_index, ms_deform_attn_pytorch, ms_deform_attn_reference,
                             spatial_shapes_tensor)
from .vit_adapter import (ConvFFN, Extractor, Injector, InteractionBlock, SpatialPriorModule, ViTAdapterBackbone,
                          build_vit_adapter_backbone, even_interaction_indexes, resample_stride)

__all__ = [
    "add_vit_adapter_config", "MSDeformAttn", "level_start_index", "ms_deform_attn_pytorch",
    "ms_deform_attn_reference", "spatial_shapes_tensor", "ConvFFN", "Extractor", "Injector", "InteractionBlock",
    "SpatialPriorModule", "ViTAdapterBackbone", "build_vit_adapter_backbone", "even_interaction_indexes",
    "resample_stride",
]
from .pixel_decoder import MSDeformAttnPixelDecoder, sine_position_embedding  # noqa: E402
from .transformer_decoder import LevelQueryTransformerDecoder, masked_attention_mask  # noqa: E402

__all__ += ["MSDeformAttnPixelDecoder", "sine_position_embedding", "LevelQueryTransformerDecoder",
            "masked_attention_mask"]
from .criterion import OAPCriterion  # noqa: E402
from .dino_head import DINOHead  # noqa: E402
from .matcher import DiceMatcher  # noqa: E402

__all__ += ["OAPCriterion", "DINOHead", "DiceMatcher"]
from .meta_arch import OAPSegmentor, teacher_momentum  # noqa: E402
from .pseudo_targets import LevelTargets, pseudo_mask_targets  # noqa: E402

__all__ += ["OAPSegmentor", "teacher_momentum", "LevelTargets", "pseudo_mask_targets"]
