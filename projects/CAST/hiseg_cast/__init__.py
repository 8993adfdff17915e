"""CAST (Ke, Mo, Yu, ICLR 2024): a ViT on superpixel tokens with graph pooling, as a Detectron2
backbone. Importing this package registers ``build_cast_backbone`` in ``BACKBONE_REGISTRY``."""
from .config import add_cast_config
from .modeling import CASTBackbone, CASTEncoder, build_cast_backbone
from .superpixels import SuperpixelConfig, compute_superpixels
from .data_mapper import CASTDatasetMapper, batch_superpixels
from .moco import CASTMoCo
from .moco_mapper import MoCoTwoViewMapper
from .semantic import CASTSemanticSegmentor
from .semantic_config import add_cast_semantic_config
from .classification import CASTClassifier, CASTLinearProbe
from .cls_mapper import CASTClassificationMapper
from .segmenter import CASTSegmenter, CASTSegmenterMapper, add_cast_segmenter_config
