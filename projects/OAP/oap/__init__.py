"""OAP: Online Agglomerative Pooling pseudo-masks for self-supervised universal segmentation.

``oap.pooling`` holds the pseudo-mask generator (a literal reference of Alg. 1, a fast batched
PyTorch implementation, and the MaskCut baseline behind the same interface).
"""
from . import pooling
from .pooling import generate_pseudo_masks
