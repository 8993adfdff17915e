"""OAP: Online Agglomerative Pooling pseudo-masks for self-supervised universal segmentation.

``hiseg_oap.pooling`` holds the pseudo-mask generator (a literal reference of Alg. 1, a fast batched
PyTorch implementation, and the MaskCut baseline behind the same interface); ``hiseg_oap.modeling``
the multi-scale encoder (ViT-Adapter with pure-PyTorch multi-scale deformable attention),
registered as ``build_vit_adapter_backbone``; ``hiseg_oap.pseudo_labels`` the pseudo-masks of a
dataset or of image files as COCO JSON (``tools/generate_pseudo_masks.py``), apart from training.
"""
from . import data, evaluation, modeling, pooling
from .config import add_oap_config
from .modeling import add_vit_adapter_config
from .pooling import generate_pseudo_masks
