"""``CASTClassifier``: supervised image classification with CAST or a ViT, the DeiT recipe of
CAST Table 12 (class token -> ``Linear`` head, soft-target cross-entropy, label smoothing 0.1,
Mixup 0.8 / CutMix 1.0 with superpixels, :mod:`hiseg_cast.modeling.superpixel_mixup`). See
:mod:`.classifier_base`."""
from typing import Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from torch import nn

from ..superpixel_mixup import SuperpixelMixup, smoothed_one_hot, soft_target_cross_entropy
from .classifier_base import ClassifierBase

__all__ = ["CASTClassifier"]


@META_ARCH_REGISTRY.register()
class CASTClassifier(ClassifierBase):
    """Supervised classification (DeiT recipe, Table 12); see the module docstring."""

    @configurable
    def __init__(self, *, backbone: nn.Module, num_classes: int, label_smoothing: float = 0.1,
                 mixup: Optional[SuperpixelMixup] = None, head_init_std: float = 0.02, pixel_mean, pixel_std):
        super().__init__(backbone, pixel_mean, pixel_std)
        self.num_classes = int(num_classes)
        self.label_smoothing = float(label_smoothing)
        self.mixup = mixup
        self.head = nn.Linear(self.embed_dim, self.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=head_init_std)
        nn.init.zeros_(self.head.bias)
        # what no class-token loss reaches is frozen, so DDP (which detectron2 v0.6 builds without
        # find_unused_parameters) and the optimizer skip it
        self.backbone.freeze_unread_by_class_token()

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.CLS
        mixup = None
        if (c.MIXUP_ALPHA > 0 or c.CUTMIX_ALPHA > 0) and c.MIXUP_PROB > 0:
            mixup = SuperpixelMixup(c.NUM_CLASSES, c.MIXUP_ALPHA, c.CUTMIX_ALPHA, c.MIXUP_PROB, c.MIXUP_SWITCH_PROB,
                                    c.MIXUP_MODE, c.LABEL_SMOOTHING, c.MIXUP_SUPERPIXELS)
        return {"backbone": build_backbone(cfg), "num_classes": c.NUM_CLASSES, "label_smoothing": c.LABEL_SMOOTHING,
                "mixup": mixup, "head_init_std": c.HEAD_INIT_STD, "pixel_mean": cfg.MODEL.PIXEL_MEAN,
                "pixel_std": cfg.MODEL.PIXEL_STD}

    def forward(self, batched_inputs):
        if not self.training:
            return self.inference(batched_inputs)
        x, sp = self._batch(batched_inputs)
        labels = torch.tensor([int(d["label"]) for d in batched_inputs], device=self.device)
        if self.mixup is not None:
            use_sp = sp is not None and getattr(self.backbone, "tokens", "segment") == "segment"
            x, mixed_sp, target = self.mixup(x, sp if use_sp else None, labels, self.superpixels_of_pixels)
            sp = mixed_sp if use_sp else None  # patch tokens / no superpixels: made from x below
        else:
            target = smoothed_one_hot(labels, self.num_classes, self.label_smoothing)
        feats, _ = self.encode(self.normalize(x), sp)
        return {"loss_cls": soft_target_cross_entropy(self.head(feats), target)}
