"""CAST's meta-architectures, one per file, registered in detectron2's ``META_ARCH_REGISTRY``
(``MODEL.META_ARCHITECTURE``) when imported:

* ``CASTMoCo`` (:mod:`.moco`): MoCo-v3 pre-training (Table 11), hierarchy and figure-ground at test;
* ``CASTSemanticSegmentor`` (:mod:`.per_superpixel_semantic`): class logits per superpixel token
  from a 2-layer 1x1-conv head (Appx. E.5), with the segment-retrieval output;
* ``CASTSegmenter`` (:mod:`.segmenter`): Segmenter's mask transformer on the superpixel tokens
  with sliding-window inference (Table 3b/c);
* ``CASTClassifier`` (:mod:`.classifier`) and ``CASTLinearProbe`` (:mod:`.linear_probe`): image
  classification (Table 12) and linear probing (Appx. E.5), over :mod:`.classifier_base`.

Each reads its backbone through the backbone's public forward and documented outputs
(:mod:`hiseg_cast.modeling.backbone`, :class:`hiseg.modeling.vit.ViTBackbone`).
"""
from .classifier import CASTClassifier
from .classifier_base import ClassifierBase
from .linear_probe import CASTLinearProbe
from .moco import CASTMoCo
from .per_superpixel_semantic import CASTSemanticSegmentor
from .segmenter import CASTSegmenter

__all__ = ["CASTClassifier", "ClassifierBase", "CASTLinearProbe", "CASTMoCo", "CASTSemanticSegmentor",
           "CASTSegmenter"]
