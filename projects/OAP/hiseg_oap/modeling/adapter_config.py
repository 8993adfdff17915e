"""Config keys of OAP's multi-scale encoder, ``build_vit_adapter_backbone`` (``MODEL.VIT_ADAPTER``)."""
from detectron2.config import CfgNode as CN

from hiseg.modeling import add_vit_config

__all__ = ["add_vit_adapter_config"]


def add_vit_adapter_config(cfg):
    """Add ``MODEL.VIT.*`` (if missing) and ``MODEL.VIT_ADAPTER.*``. Idempotent.

    The ViT itself (width, depth, heads, patch size, ...) is configured by ``MODEL.VIT``; OAP
    uses DINO's ViT-B/8: ``MODEL.VIT.{EMBED_DIM: 768, NUM_HEADS: 12, PATCH_SIZE: 8}`` with
    ``VIT_ADAPTER.DEFORM_NUM_HEADS: 12``. Defaults below are ViT-Adapter's.
    """
    add_vit_config(cfg)
    if "VIT_ADAPTER" in cfg.MODEL:
        return cfg
    cfg.MODEL.VIT_ADAPTER = CN()
    a = cfg.MODEL.VIT_ADAPTER
    a.CONV_INPLANES = 64  # spatial prior module widths: C, 2C, 4C, 4C at strides 4, 8, 16, 32
    a.SPM_NORM = "GN"  # "GN" (gcd(32, C) groups), "LN" (channel LayerNorm), "" or a detectron2 norm
    a.DEFORM_NUM_HEADS = 6  # heads of the injector / extractor deformable attention
    a.N_POINTS = 4  # sampling points per head and level
    a.DEFORM_RATIO = 0.5  # deformable-attention value width = EMBED_DIM * DEFORM_RATIO (ViT-Adapter configs)
    a.INIT_VALUES = 0.0  # injector gamma init when ZERO_INIT is False
    # ViT block ranges [first, last] (inclusive) of the 4 interaction stages; [] = evenly spaced
    # (depth 12: [[0, 2], [3, 5], [6, 8], [9, 11]])
    a.INTERACTION_INDEXES = []
    a.WITH_CFFN = True  # ConvFFN after each extractor
    a.CFFN_RATIO = 0.25  # ConvFFN hidden width = EMBED_DIM * CFFN_RATIO
    a.DROP_PATH_RATE = 0.0  # stochastic depth on the extractors' ConvFFN
    a.EXTRA_EXTRACTOR = True  # two more extractors after the last stage
    a.ADD_VIT_FEATURE = True  # add each stage's ViT map (resampled) to the output levels
    # OAP Sec. 4.3: the adapter starts as a no-op (injector gamma, spatial-prior projections, level
    # embedding, extractor output layers zero): outputs = normalised pretrained ViT features
    a.ZERO_INIT = True
    a.OUT_FEATURES = ["res2", "res3", "res4", "res5"]  # strides 4, 8, 16, 32; EMBED_DIM channels
    a.OUT_NORM = "LN"  # per-level output norm: "LN" (channel LayerNorm), "GN", "" or a detectron2 norm
    return cfg
