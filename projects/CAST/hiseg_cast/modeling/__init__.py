"""CAST's model: the encoder (:mod:`.encoder`, with :mod:`.stem`, :mod:`.segment_ops`,
:mod:`.graph_pool`, :mod:`.fps`), the Detectron2 backbone (:mod:`.backbone`), heads
(:mod:`.heads`), meta-architectures (:mod:`.meta_arch`), superpixel-aware Mixup
(:mod:`.superpixel_mixup`) and TENT (:mod:`.tent`). Importing it registers the backbones and
the meta-architectures."""
from .backbone import (CASTBackbone, build_cast_backbone, build_cast_fpn_backbone, build_cast_token_backbone,
                       encoder_from_cfg)
from .encoder import CASTEncoder, compose_hierarchy
from .fps import farthest_point_sampling, farthest_point_sampling_reference
from .graph_pool import GraphPool
from .heads import LinearDecoder, MaskTransformerDecoder, PixelHead, superpixel_cross_entropy
from .meta_arch import (CASTClassifier, CASTLinearProbe, CASTMoCo, CASTSegmenter, CASTSemanticSegmentor,
                        ClassifierBase)
from .stem import ConvStem, sincos_position_embedding
from .superpixel_mixup import SuperpixelMixup
from .tent import CosinePrototypeClassifier, tent_adapt
