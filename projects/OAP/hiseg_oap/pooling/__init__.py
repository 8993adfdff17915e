"""Pseudo-mask generators on ViT feature maps: Online Agglomerative Pooling (OAP paper, Sec. 4.2,
Alg. 1) in a literal reference form and a fast batched PyTorch form, UniAP (the variant the
authors released with S2-UniSeg, ``uniap.py``) in the same two forms, and the MaskCut baseline.

Typical use::

    from hiseg_oap.pooling import OAPConfig, oap_fast, vit_key_features
    feats = vit_key_features(vit, images)            # (B, D, h, w)
    results = oap_fast(feats, OAPConfig())           # one PseudoMasks per image
    layer = results[0].layers[-1]
    masks = layer.instance.upsample(images.shape[-2:])

The ViT is :func:`hiseg.modeling.vit.make_timm_vit`; a pretrained CNN feature source is
:mod:`hiseg.modeling.efficientnet_lite0`. Pseudo-mask files (COCO results) are made by
:mod:`hiseg_oap.pseudo_labels`. See ``docs/oap_pooling.md``.
"""
from .fast import connected_components, grid_edges, oap_fast
from .features import flatten_normalized, vit_key_features
from .generators import (
    OAP_VARIANTS, MaskCutGenerator, OAPGenerator, UniAPGenerator, build_generator, build_oap_generator,
    generate_pseudo_masks,
)
from .maskcut import maskcut, normalized_cut
from .reference import grid_adjacency, oap_reference
from .types import MaskCutConfig, MaskLevel, OAPConfig, OAPLayer, PseudoMasks, UniAPConfig, first_unique_rows
from .uniap import uniap_fast, uniap_reference

__all__ = [
    "OAPConfig", "UniAPConfig", "MaskCutConfig", "MaskLevel", "OAPLayer", "PseudoMasks", "first_unique_rows",
    "oap_fast", "oap_reference", "uniap_fast", "uniap_reference", "maskcut", "normalized_cut",
    "connected_components", "grid_edges", "grid_adjacency",
    "flatten_normalized", "vit_key_features",
    "OAPGenerator", "UniAPGenerator", "MaskCutGenerator", "OAP_VARIANTS", "build_generator",
    "build_oap_generator", "generate_pseudo_masks",
]
