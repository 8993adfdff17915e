"""Config keys of the OAP universal segmenter (``MODEL.OAP``, ``INPUT.OAP``): ``add_oap_config(cfg)``.

Defaults are the paper's (OAP, Sec. 5.1) where it states them and Mask2Former's "official
setting" (which Sec. 5.1 says the mask decoder follows) for the decoder; where both are silent
the choice and the reason are written next to the key.
"""
from detectron2.config import CfgNode as CN

from hiseg.config import add_hiseg_config

from .modeling.adapter_config import add_vit_adapter_config

__all__ = ["add_oap_config"]


def add_oap_config(cfg):
    """Add every key of the OAP project: ``MODEL.OAP.*``, ``INPUT.OAP.*``, the ViT-Adapter
    (``MODEL.VIT_ADAPTER``) and the shared keys (:func:`hiseg.config.add_hiseg_config`).
    Idempotent."""
    add_hiseg_config(cfg)
    add_vit_adapter_config(cfg)
    if "OAP" in cfg.MODEL:
        return cfg
    cfg.MODEL.OAP = CN()
    o = cfg.MODEL.OAP

    # ---- pseudo-mask generator in the teacher (Sec. 4.2, 5.1) ----
    o.POOLING = CN()
    o.POOLING.METHOD = "oap"  # "oap" or "maskcut" (baseline)
    # Which OAP: "alg1" (the seed paper's Alg. 1, the keys below) or "uniap" (the pooling the
    # authors released with S2-UniSeg, FastUniAP.py at 9049574: raw summed features, cosine edge
    # scores, no spatial term / vote; uses THRESHOLDS and UNIAP_MIN_SIZE; its semantic level is its
    # instance level, see oap/pooling/uniap.py).
    o.POOLING.VARIANT = "alg1"
    o.POOLING.IMPL = "fast"  # "fast" (batched torch, runs on the teacher's device) or "reference"
    o.POOLING.THRESHOLDS = [0.8, 0.7, 0.6, 0.5, 0.4]
    o.POOLING.SIGMA = 0.07
    o.POOLING.PHI = 5
    o.POOLING.W_F = 0.6
    o.POOLING.W_S = 0.4
    o.POOLING.VOTE_NORMALIZE = False
    o.POOLING.UNIAP_MIN_SIZE = 4  # UniAP's minimum cluster size in tokens (hard-coded 4 in the release)
    # At most this many teacher masks per image and level (largest first), taken on the global
    # view before cropping. 0 = no limit. Matching is bipartite: targets beyond the number of
    # queries of their level stay unmatched anyway.
    o.POOLING.MAX_TARGETS = 0
    # A cropped teacher mask must keep at least this many pixels of the student's mask grid to be
    # a target ("pseudo-masks that do not overlap with the student local view are dropped").
    o.POOLING.MIN_CROPPED_AREA = 1

    # ---- teacher (Sec. 4.3, 5.1) ----
    o.TEACHER = CN()
    o.TEACHER.MOMENTUM = 0.996  # cosine schedule from 0.996 to 1 over SOLVER.MAX_ITER
    o.TEACHER.MOMENTUM_END = 1.0
    # What OAP pools: "key" = keys of the last ViT self-attention block (Sec. 4.2 "Graph
    # Initialization"; ViT / ViT-Adapter backbones), or the name of a backbone output (e.g. "res3"
    # when the CAST backbone stands in for the ViT).
    o.TEACHER.FEATURES = "key"

    # ---- pixel decoder (Mask2Former's MSDeformAttnPixelDecoder) ----
    o.PIXEL_DECODER = CN()
    o.PIXEL_DECODER.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    o.PIXEL_DECODER.DEFORM_IN_FEATURES = ["res3", "res4", "res5"]
    o.PIXEL_DECODER.CONV_DIM = 256
    o.PIXEL_DECODER.MASK_DIM = 256
    o.PIXEL_DECODER.NORM = "GN"
    o.PIXEL_DECODER.ENC_LAYERS = 6
    o.PIXEL_DECODER.DIM_FEEDFORWARD = 1024
    o.PIXEL_DECODER.NHEADS = 8
    o.PIXEL_DECODER.N_POINTS = 4
    o.PIXEL_DECODER.DROPOUT = 0.0
    o.PIXEL_DECODER.COMMON_STRIDE = 4

    # ---- masked-attention transformer decoder with level-specific queries (Sec. 4.3) ----
    o.DECODER = CN()
    o.DECODER.HIDDEN_DIM = 256
    o.DECODER.NUM_SEM_QUERIES = 50  # Sec. 5.1
    o.DECODER.NUM_INS_QUERIES = 150  # Sec. 5.1
    o.DECODER.NHEADS = 8
    o.DECODER.DIM_FEEDFORWARD = 2048
    o.DECODER.DEC_LAYERS = 9  # Mask2Former: 9 layers = 3 rounds over 3 scales
    o.DECODER.PRE_NORM = False
    o.DECODER.ENFORCE_INPUT_PROJ = False

    # ---- projection head of the query-wise self-distillation (Sec. 5.1: DINO head) ----
    o.HEAD = CN()
    o.HEAD.OUT_DIM = 512  # K prototypes (Sec. 5.1, Table 4)
    o.HEAD.HIDDEN_DIM = 2048
    o.HEAD.BOTTLENECK_DIM = 256
    o.HEAD.NUM_LAYERS = 3
    o.HEAD.NORM_LAST_LAYER = True

    # ---- losses (Sec. 4.3; Mask2Former's weights for the mask terms) ----
    o.LOSS = CN()
    o.LOSS.MASK_WEIGHT = 5.0
    o.LOSS.DICE_WEIGHT = 5.0
    # Objectness (matched vs no-object, Mask2Former's class loss with one class) gives the
    # instance scores at inference; the paper keeps Mask2Former's official setting.
    o.LOSS.OBJECTNESS_WEIGHT = 2.0
    o.LOSS.NO_OBJECT_WEIGHT = 0.1
    o.LOSS.SD_WEIGHT = 1.0
    # Eq. 7 sums SD over the L matched pairs of a view; "mean" divides by L (the mask terms are
    # means over matched masks too, so the weights stay comparable); "sum" is Eq. 7 literally.
    o.LOSS.SD_REDUCTION = "mean"
    o.LOSS.STUDENT_TEMP = 0.1  # DINO
    o.LOSS.TEACHER_TEMP = 0.04  # DINO
    o.LOSS.CENTER_MOMENTUM = 0.9  # DINO
    o.LOSS.DEEP_SUPERVISION = True
    o.LOSS.TRAIN_NUM_POINTS = 112 * 112  # Mask2Former point-sampled mask losses
    o.LOSS.OVERSAMPLE_RATIO = 3.0
    o.LOSS.IMPORTANCE_SAMPLE_RATIO = 0.75

    # ---- inference ----
    o.TEST = CN()
    o.TEST.INSTANCE_ON = True
    o.TEST.SEMANTIC_ON = True
    o.TEST.PANOPTIC_ON = True
    o.TEST.DETECTIONS_PER_IMAGE = 100
    o.TEST.OBJECT_MASK_THRESHOLD = 0.8  # Mask2Former panoptic inference
    o.TEST.OVERLAP_THRESHOLD = 0.8
    # How evaluators map prototype clusters to dataset classes: "hungarian" (one-to-one, STEGO /
    # Sec. 5.1 "mapped using Hungarian matching") or "majority" (each cluster to its most
    # overlapping class, many-to-one).
    o.TEST.CLUSTER_MAPPING = "hungarian"

    # ---- multi-crop input (Sec. 4.1, 5.1) ----
    cfg.INPUT.OAP = CN()
    i = cfg.INPUT.OAP
    i.GLOBAL_SIZE = 448  # Sec. 5.1: "images are resized to 448"
    i.GLOBAL_FLIP = True
    i.NUM_LOCAL_CROPS = 4  # paper silent; DINO uses several small local views
    i.LOCAL_SIZE = 224  # paper silent; 224 keeps a 7x7 stride-32 map at patch 8
    i.LOCAL_SCALE = [0.05, 0.4]  # Sec. 5.1
    i.LOCAL_RATIO = [0.75, 1.3333]  # RandomResizedCrop default
    i.LOCAL_FLIP = True
    i.LOCAL_COLOR_AUG = True  # DINO photometric augmentations on the student views only
    return cfg
