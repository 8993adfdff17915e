"""Config keys of ``CASTSemanticSegmentor`` (``add_cast_semantic_config``): ``MODEL.CAST_SEM_SEG.*``.

Needs ``add_cast_config`` (``MODEL.CAST.*``) for the backbone. Defaults follow CAST Appx. E.5
("transfer learning" on PASCAL VOC: 21 classes, 2-layer 1x1-conv head, per-pixel softmax) and
its segment-retrieval protocol (Hwang et al. 2019: 20 nearest segments).
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_cast_semantic_config"]


def add_cast_semantic_config(cfg):
    cfg.MODEL.CAST_SEM_SEG = CN()
    c = cfg.MODEL.CAST_SEM_SEG
    c.NUM_CLASSES = 21  # PASCAL VOC: background + 20 classes
    c.IGNORE_VALUE = 255
    c.LOSS_WEIGHT = 1.0
    # The 2-layer 1x1-conv head (Appx. E.5): conv(D -> HEAD_DIM) - norm - ReLU - conv(-> classes).
    # The paper does not give the hidden width; 256 is our choice.
    c.HEAD_DIM = 256
    c.HEAD_NORM = "BN"  # "BN" | "SyncBN" | "" (none)
    # Where the head sees the fused tokens f_seg:
    #   1: every pixel takes the token of its superpixel (the paper's "scatter segment tokens to
    #      per-pixel features using superpixel indices"), logits at full input resolution;
    #   s > 1: tokens averaged over s x s cells (exact area weights), head on the stride-s grid,
    #      logits upsampled bilinearly (cheaper, blurs the superpixel boundaries).
    c.FEATURE_STRIDE = 1
    # Segment retrieval (Appx. E.5, unsupervised evaluation): also output one hierarchy level's
    # label map and the L2-normalised mean fused token of each of its segments.
    c.RETRIEVAL_OUTPUT = False
    c.RETRIEVAL_LEVEL = -1  # hierarchy level (0 = superpixels); -1: the level nearest the count below
    c.RETRIEVAL_NUM_SEGMENTS = 40  # as the 40 K-means segments of the ViT baseline
    c.RETRIEVAL_K = 20  # neighbours voting for a segment's label (SegmentRetrievalEvaluator, Appx. E.5)
    return cfg
