from .backbone import CASTBackbone, build_cast_backbone, build_cast_fpn_backbone, encoder_from_cfg
from .encoder import CASTEncoder, compose_hierarchy
from .fps import farthest_point_sampling, farthest_point_sampling_reference
from .graph_pool import GraphPool
from .stem import ConvStem, sincos_position_embedding
