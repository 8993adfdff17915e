"""``CASTLinearProbe``: linear probing of a frozen CAST or ViT backbone (CAST Appx. E.5, MoCo-v3's
protocol). See :mod:`.classifier_base`."""
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from torch import nn

from .classifier_base import ClassifierBase

__all__ = ["CASTLinearProbe"]


@META_ARCH_REGISTRY.register()
class CASTLinearProbe(ClassifierBase):
    """Linear probing of a frozen backbone (Appx. E.5, MoCo-v3 protocol)."""

    @configurable
    def __init__(self, *, backbone: nn.Module, num_classes: int, use_bn: bool = True, init_std: float = 0.01,
                 pixel_mean, pixel_std):
        super().__init__(backbone, pixel_mean, pixel_std)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()
        self.num_classes = int(num_classes)
        linear = nn.Linear(self.embed_dim, self.num_classes)
        nn.init.normal_(linear.weight, std=init_std)
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(self.embed_dim, affine=False, eps=1e-6), linear) if use_bn \
            else linear

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.CLS
        return {"backbone": build_backbone(cfg), "num_classes": c.NUM_CLASSES, "use_bn": c.PROBE_BN,
                "init_std": c.PROBE_INIT_STD, "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD}

    def train(self, mode: bool = True):
        """Only the head trains: the frozen backbone stays in eval mode (no dropout / drop-path,
        no BatchNorm statistics updates), as MoCo-v3's ``main_lincls`` does."""
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, batched_inputs):
        if not self.training:
            return self.inference(batched_inputs)
        x, sp = self._batch(batched_inputs)
        labels = torch.tensor([int(d["label"]) for d in batched_inputs], device=self.device)
        with torch.no_grad():
            feats, _ = self.encode(self.normalize(x), sp)
        return {"loss_cls": F.cross_entropy(self.head(feats.detach()), labels)}
