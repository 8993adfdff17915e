"""Image classification with CAST (or a plain ViT): what the classification meta-architectures
share (batching, normalisation, the class-token features).

Meta-architectures (``MODEL.META_ARCHITECTURE``; keys ``MODEL.CLS.*``; data from
``CASTClassificationMapper``), one per file:

* ``CASTClassifier`` (:mod:`.classifier`): class token -> ``Linear`` head, trained with soft-target cross-entropy,
  label smoothing 0.1 and Mixup 0.8 / CutMix 1.0 (switch probability 0.5), the DeiT recipe of
  Table 12. The backbone is ``MODEL.BACKBONE.NAME``: ``build_cast_backbone`` (the class token
  of :class:`~hiseg_cast.modeling.CASTEncoder`, final LayerNorm applied) or ``build_vit_backbone``
  (timm's class token after the final norm, as DeiT's head sees it).
* ``CASTLinearProbe`` (:mod:`.linear_probe`): the frozen backbone (``requires_grad=False``, kept in eval mode even when
  the model trains, features computed under ``no_grad``) -> ``BatchNorm1d(affine=False)`` ->
  ``Linear`` (normal init, std 0.01), cross-entropy; SGD momentum 0.9, weight decay 0, 90 epochs;
  IN-1K batch 1024 lr 30, IN-100 batch 256 lr 0.8 (Appx. E.5, in the yaml files).

Both return ``{"logits": (num_classes,)}`` per image at inference, which
``hiseg.evaluation.classification.ClassificationEvaluator`` scores.

Both read the backbone through its public forward, ``backbone(images, features=())``: the class
token ``cls`` (a ViT without class token: the mean of its ``patch_tokens``), and CAST's
``hierarchy`` for TENT (:mod:`hiseg_cast.modeling.tent`, Appx. B). Mixup / CutMix with
superpixels: :mod:`hiseg_cast.modeling.superpixel_mixup`. Superpixels follow
:mod:`hiseg_cast.superpixels.policy`: the mapper's when every input has them, otherwise the
backbone computes them (after Mixup, on the images the model sees).
"""
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ...superpixels import input_superpixels

__all__ = ["ClassifierBase"]


class ClassifierBase(nn.Module):
    """Shared by the meta-architectures: batching, normalisation, the class-token features."""

    def __init__(self, backbone: nn.Module, pixel_mean, pixel_std):
        super().__init__()
        self.backbone = backbone
        if not callable(getattr(backbone, "freeze_unread_by_class_token", None)):
            raise ValueError("classification needs MODEL.BACKBONE.NAME build_cast_backbone or build_vit_backbone")
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)

    @property
    def device(self):
        return self.pixel_mean.device

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.pixel_mean) / self.pixel_std

    def _batch(self, batched_inputs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Pixel-space images (B, C, H, W) float and superpixels (B, H, W) or None."""
        sizes = {tuple(d["image"].shape) for d in batched_inputs}
        if len(sizes) != 1:
            raise ValueError(f"classification batches need images of one size, got {sorted(sizes)}; "
                             "use CASTClassificationMapper (fixed crops)")
        x = torch.stack([d["image"] for d in batched_inputs]).to(self.device).float()
        # the mapper's S_0 when every input has them; otherwise the backbone makes them later
        sp = input_superpixels(self.backbone, batched_inputs, x, compute=False)
        return x, sp

    def superpixels_of_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """S_0 of pixel-space images (the backbone's own superpixel settings)."""
        return self.backbone.superpixels_from_images(self.normalize(x))

    def encode(self, x: torch.Tensor, superpixels: Optional[torch.Tensor] = None):
        """Class-token features (B, D) of normalised images, and the backbone's outputs (CAST's
        include ``hierarchy``). ``superpixels`` None: the backbone computes S_0 (CAST)."""
        out = self.backbone(x, features=(), **({} if superpixels is None else {"superpixels": superpixels}))
        if "cls" not in out:  # a ViT without class token: mean of the patch tokens
            return out["patch_tokens"].flatten(2).mean(-1), out
        return out["cls"], out

    def embed(self, batched_inputs):
        """``encode`` of a list of input dicts (one image size)."""
        x, sp = self._batch(batched_inputs)
        return self.encode(self.normalize(x), sp)

    @torch.no_grad()
    def inference(self, batched_inputs):
        results: List[Optional[dict]] = [None] * len(batched_inputs)
        groups: Dict[tuple, List[int]] = {}
        for i, d in enumerate(batched_inputs):
            groups.setdefault(tuple(d["image"].shape), []).append(i)
        for idx in groups.values():
            feats, _ = self.embed([batched_inputs[i] for i in idx])
            logits = self.head(feats)
            for k, i in enumerate(idx):
                results[i] = {"logits": logits[k]}
        return results
