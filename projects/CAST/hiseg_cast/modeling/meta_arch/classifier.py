"""Image classification with CAST (or a plain ViT): supervised DeiT training (Table 12), linear
probing of frozen features (Appx. E.5) and test-time adaptation with TENT (Appx. B).

Meta-architectures (``MODEL.META_ARCHITECTURE``; keys ``MODEL.CLS.*`` from
:func:`hiseg_cast.classification_config.add_cast_classification_config`; data from
``CASTClassificationMapper``):

* ``CASTClassifier``: class token -> ``Linear`` head, trained with soft-target cross-entropy,
  label smoothing 0.1 and Mixup 0.8 / CutMix 1.0 (switch probability 0.5), the DeiT recipe of
  Table 12. The backbone is ``MODEL.BACKBONE.NAME``: ``build_cast_backbone`` (the class token
  of :class:`~hiseg_cast.modeling.CASTEncoder`, final LayerNorm applied) or ``build_vit_backbone``
  (timm's class token after the final norm, as DeiT's head sees it).
* ``CASTLinearProbe``: the frozen backbone (``requires_grad=False``, kept in eval mode even when
  the model trains, features computed under ``no_grad``) -> ``BatchNorm1d(affine=False)`` ->
  ``Linear`` (normal init, std 0.01), cross-entropy; SGD momentum 0.9, weight decay 0, 90 epochs;
  IN-1K batch 1024 lr 30, IN-100 batch 256 lr 0.8 (Appx. E.5, in the yaml files).

Both return ``{"logits": (num_classes,)}`` per image at inference, which
``hiseg.evaluation.classification.ClassificationEvaluator`` scores.

Mixup / CutMix with superpixels (:class:`SuperpixelMixup`): timm's ``Mixup`` mixes image i with
image B-1-i of the batch. The authors' DeiT code applies it to the images only, so a mixed image
keeps the superpixels of its first image; here the superpixels follow the pixels:

* CutMix pastes a box of the partner image; the superpixel map takes the partner's labels inside
  the box (offset past the image's own labels, then relabelled 0..n-1), so every superpixel lies
  on one source image and the box edge is a superpixel boundary. Superpixels of either image cut
  by the box are clipped to their visible part; an own superpixel split into pieces keeps one
  label (SEEDS labels need not be connected either).
* Mixup blends all pixels, so no cheap map is exact. ``MODEL.CLS.MIXUP_SUPERPIXELS``:
  ``"dominant"`` (default): the superpixels of the image with weight >= 0.5 (timm's lambda is
  Beta(0.8, 0.8), mostly near 0 or 1, so the dominant image usually makes up most of the
  pixels; no extra cost). ``"overlay"``: the intersection of both maps (each region is uniform
  in both sources, hence in the blend; about 3-5x more tokens, so the first block group costs
  about 10x more attention). ``"recompute"``: the blend is rounded to uint8 and SEEDS runs on
  it inside the model's forward (exact, but about 5-10 ms per 224 image on one CPU core in the
  training process instead of the loader workers).

Test-time adaptation (Appx. B): :func:`tent_adapt` adapts the affine parameters of the
backbone's normalisation layers with one SGD step (lr 1.0) minimising the prediction entropy of a
single image, then restores them (episodic: every image starts from the trained model). The
classifier can be the model's head or :class:`CosinePrototypeClassifier` (class means of
normalised training embeddings, cosine logits / 0.07), as in the paper.
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from torch import nn

__all__ = [
    "CASTClassifier", "CASTLinearProbe", "SuperpixelMixup", "CosinePrototypeClassifier",
    "smoothed_one_hot", "soft_target_cross_entropy", "rand_bbox", "cutmix_superpixels",
    "overlay_superpixels", "relabel_consecutive", "norm_parameters", "prediction_entropy", "tent_adapt",
]

MIXUP_SUPERPIXEL_POLICIES = ("dominant", "overlay", "recompute")


# ----------------------------------------------------------------------------------------------
# targets and losses
def smoothed_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(B, C) targets: ``1 - smoothing + smoothing / C`` on the label, ``smoothing / C`` elsewhere."""
    off = smoothing / num_classes
    t = torch.full((labels.numel(), num_classes), off, dtype=torch.float32, device=labels.device)
    return t.scatter_(1, labels.view(-1, 1).long(), 1.0 - smoothing + off)


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_c target_c log softmax(logits)_c`` (timm's loss)."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


# ----------------------------------------------------------------------------------------------
# superpixel-aware Mixup / CutMix
def relabel_consecutive(labels: torch.Tensor) -> torch.Tensor:
    """Labels present mapped to 0..n-1 in their order; -1 (padding) stays -1."""
    values, inv = torch.unique(labels, return_inverse=True)
    inv = inv.view_as(labels)
    if values.numel() and int(values[0]) < 0:
        inv = inv - 1
    return inv


def rand_bbox(height: int, width: int, lam: float, rng) -> Tuple[int, int, int, int]:
    """timm's CutMix box (``rand_bbox``, no margin): side ratio sqrt(1 - lam), random centre,
    clipped to the image. Returns (y0, y1, x0, x1)."""
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.randint(0, height)), int(rng.randint(0, width))
    y0, y1 = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height))
    x0, x1 = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width))
    return y0, y1, x0, x1


def cutmix_superpixels(own: torch.Tensor, other: torch.Tensor, box: Sequence[int]) -> torch.Tensor:
    """Superpixels after pasting ``other``'s pixels into ``box`` = (y0, y1, x0, x1) of ``own``:
    ``other``'s labels inside the box, offset past ``own``'s, then relabelled 0..n-1."""
    y0, y1, x0, x1 = (int(v) for v in box)
    out = own.clone()
    if y1 <= y0 or x1 <= x0:
        return out
    patch = other[y0:y1, x0:x1]
    offset = int(own.max()) + 1
    out[y0:y1, x0:x1] = torch.where(patch >= 0, patch + offset, patch)
    return relabel_consecutive(out)


def overlay_superpixels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The intersection of two label maps (a region per pair of labels), relabelled 0..n-1."""
    key = a * (int(b.max()) + 1) + b
    key = torch.where((a >= 0) & (b >= 0), key, torch.full_like(key, -1))
    return relabel_consecutive(key)


class SuperpixelMixup:
    """timm's ``Mixup`` (modes "batch" and "elem", label smoothing, CutMix with the corrected
    lambda) that also mixes the superpixel maps (see the module docstring).

    Call with pixel-space images (B, C, H, W) float, superpixels (B, H, W) int64 or None, labels
    (B,); returns (images, superpixels, soft targets (B, num_classes)). ``last`` holds the drawn
    parameters (``lam`` per image, ``cutmix`` flags, ``boxes``, ``partner`` indices).
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, mode: str = "batch", label_smoothing: float = 0.1,
                 superpixel_policy: str = "dominant", rng=None):
        if mode not in ("batch", "elem"):
            raise ValueError(f"MODEL.CLS.MIXUP_MODE must be 'batch' or 'elem', got {mode!r}")
        if superpixel_policy not in MIXUP_SUPERPIXEL_POLICIES:
            raise ValueError(f"MODEL.CLS.MIXUP_SUPERPIXELS must be one of {MIXUP_SUPERPIXEL_POLICIES}, "
                             f"got {superpixel_policy!r}")
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("SuperpixelMixup needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.num_classes = int(num_classes)
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.prob = float(prob)
        self.switch_prob = float(switch_prob)
        self.mode = mode
        self.label_smoothing = float(label_smoothing)
        self.superpixel_policy = superpixel_policy
        self.rng = rng  # None: numpy's global RNG (as timm; seeded by detectron2's seed_all_rng)
        self.last: Dict[str, object] = {}

    @property
    def _rng(self):
        return self.rng if self.rng is not None else np.random

    def draw(self) -> Tuple[float, bool]:
        """(lambda, use_cutmix) as timm's ``_params_per_batch``."""
        lam, use_cutmix = 1.0, False
        rng = self._rng
        if rng.rand() < self.prob:
            if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
                use_cutmix = bool(rng.rand() < self.switch_prob)
                alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
            elif self.mixup_alpha > 0:
                alpha = self.mixup_alpha
            else:
                use_cutmix, alpha = True, self.cutmix_alpha
            lam = float(rng.beta(alpha, alpha))
        return lam, use_cutmix

    def __call__(self, images: torch.Tensor, superpixels: Optional[torch.Tensor], labels: torch.Tensor,
                 superpixel_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        b, _, h, w = images.shape
        if superpixels is not None and superpixels.shape != (b, h, w):
            raise ValueError(f"superpixels {tuple(superpixels.shape)} do not match images {tuple(images.shape)}")
        if self.superpixel_policy == "recompute" and superpixels is not None and superpixel_fn is None:
            raise ValueError("MIXUP_SUPERPIXELS 'recompute' needs a superpixel_fn")
        src = images
        out = images.clone()
        sp_out = superpixels.clone() if superpixels is not None else None
        if self.mode == "batch":
            lam, cut = self.draw()
            box = rand_bbox(h, w, lam, self._rng) if cut and lam < 1.0 else None
            params = [(lam, cut, box)] * b
        else:
            params = []
            for _ in range(b):
                lam, cut = self.draw()
                params.append((lam, cut, rand_bbox(h, w, lam, self._rng) if cut and lam < 1.0 else None))
        lams, boxes, flags, recompute = [], [], [], []
        for i, (lam, cut, box) in enumerate(params):
            j = b - 1 - i
            if lam >= 1.0:  # not mixed
                lams.append(1.0)
                boxes.append(None)
                flags.append(False)
                continue
            if cut:
                y0, y1, x0, x1 = box
                out[i, :, y0:y1, x0:x1] = src[j, :, y0:y1, x0:x1]
                lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)  # timm's correct_lam
                if sp_out is not None and i != j:
                    sp_out[i] = cutmix_superpixels(superpixels[i], superpixels[j], box)
            else:
                out[i] = src[i] * lam + src[j] * (1.0 - lam)
                if sp_out is not None and i != j:
                    if self.superpixel_policy == "dominant":
                        sp_out[i] = superpixels[i] if lam >= 0.5 else superpixels[j]
                    elif self.superpixel_policy == "overlay":
                        sp_out[i] = overlay_superpixels(superpixels[i], superpixels[j])
                    else:  # the model sees exactly the uint8 image the superpixels are computed on
                        out[i] = out[i].round()
                        recompute.append(i)
            lams.append(lam)
            boxes.append(box if cut else None)
            flags.append(bool(cut))
        if recompute:
            fresh = superpixel_fn(out[recompute]).to(sp_out.device)
            for k, i in enumerate(recompute):
                sp_out[i] = fresh[k]
        lam_t = torch.tensor(lams, dtype=torch.float32, device=labels.device)[:, None]
        y1 = smoothed_one_hot(labels, self.num_classes, self.label_smoothing)
        y2 = smoothed_one_hot(labels.flip(0), self.num_classes, self.label_smoothing)
        self.last = {"lam": lams, "cutmix": flags, "boxes": boxes, "partner": [b - 1 - i for i in range(b)]}
        return out, sp_out, lam_t * y1 + (1.0 - lam_t) * y2


# ----------------------------------------------------------------------------------------------
class _ClassifierBase(nn.Module):
    """Shared by the meta-architectures: batching, normalisation, the class-token features."""

    def __init__(self, backbone: nn.Module, pixel_mean, pixel_std):
        super().__init__()
        self.backbone = backbone
        if not (hasattr(backbone, "encoder") or hasattr(backbone, "forward_tokens")):
            raise ValueError("classification needs MODEL.BACKBONE.NAME build_cast_backbone or build_vit_backbone")
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)

    @property
    def device(self):
        return self.pixel_mean.device

    @property
    def is_cast(self) -> bool:
        return hasattr(self.backbone, "encoder")

    @property
    def embed_dim(self) -> int:
        return self.backbone.encoder.embed_dim if self.is_cast else self.backbone.embed_dim

    def _freeze_unread_parameters(self):
        """Parameters no class-token loss can reach are frozen, so DDP (which detectron2 v0.6
        builds without ``find_unused_parameters``) and the optimizer skip them: CAST's dense
        read-out (``fuse``, ``out_norms``) and its last graph pooling (used only for the
        hierarchy's coarsest level), or the ViT's feature pyramid."""
        if self.is_cast:
            unread = [self.backbone.fuse, self.backbone.out_norms]
            if self.backbone.encoder.pooling:
                unread.append(self.backbone.encoder.pools[-1])
        else:
            unread = [self.backbone.pyramid]
        for m in unread:
            for p in m.parameters():
                p.requires_grad_(False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.pixel_mean) / self.pixel_std

    def _batch(self, batched_inputs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Pixel-space images (B, C, H, W) float and superpixels (B, H, W) or None."""
        sizes = {tuple(d["image"].shape) for d in batched_inputs}
        if len(sizes) != 1:
            raise ValueError(f"classification batches need images of one size, got {sorted(sizes)}; "
                             "use CASTClassificationMapper (fixed crops)")
        x = torch.stack([d["image"] for d in batched_inputs]).to(self.device).float()
        sp = None
        if self.is_cast and all("superpixels" in d for d in batched_inputs):
            sp = torch.stack([d["superpixels"] for d in batched_inputs]).to(self.device).long()
        return x, sp

    def superpixels_of_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """S_0 of pixel-space images (the backbone's own superpixel settings)."""
        return self.backbone.superpixels_from_images(self.normalize(x))

    def encode(self, x: torch.Tensor, superpixels: Optional[torch.Tensor] = None):
        """Class-token features (B, D) of normalised images, and CAST's encoder output (or None)."""
        if self.is_cast:
            if superpixels is None:
                superpixels = self.backbone.superpixels_from_images(x)
            counts = None if self.backbone.training else self.backbone.test_num_segments
            out = self.backbone.encoder(x, superpixels, num_segments=counts)
            return out["cls"], out
        prefix, fmap = self.backbone.forward_tokens(x)
        if prefix.shape[1] == 0:  # a ViT without class token: mean of the patch tokens
            return fmap.flatten(2).mean(-1), None
        return prefix[:, 0], None

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


@META_ARCH_REGISTRY.register()
class CASTClassifier(_ClassifierBase):
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
        self._freeze_unread_parameters()

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


@META_ARCH_REGISTRY.register()
class CASTLinearProbe(_ClassifierBase):
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


# ----------------------------------------------------------------------------------------------
# test-time adaptation (Appx. B)
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)


def norm_parameters(module: nn.Module) -> List[nn.Parameter]:
    """Affine weights / biases of the normalisation layers of ``module`` (what TENT adapts)."""
    params, seen = [], set()
    for m in module.modules():
        if isinstance(m, _NORMS):
            for p in (m.weight, m.bias):
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of softmax(logits) per row."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class CosinePrototypeClassifier(nn.Module):
    """Logits = cos(embedding, class vector) / temperature; class vector = mean of the
    L2-normalised training embeddings of the class (Appx. B.1)."""

    def __init__(self, prototypes: torch.Tensor, temperature: float = 0.07):
        super().__init__()
        self.register_buffer("prototypes", F.normalize(prototypes.float(), dim=-1))
        self.temperature = float(temperature)

    @classmethod
    def from_embeddings(cls, embeddings: torch.Tensor, labels: torch.Tensor, num_classes: Optional[int] = None,
                        temperature: float = 0.07) -> "CosinePrototypeClassifier":
        labels = labels.long().to(embeddings.device)
        c = int(num_classes) if num_classes is not None else int(labels.max()) + 1
        z = F.normalize(embeddings.float(), dim=-1)
        sums = torch.zeros(c, z.shape[1], device=z.device).index_add_(0, labels, z)
        counts = torch.bincount(labels, minlength=c).clamp(min=1).to(z.dtype)
        return cls(sums / counts[:, None], temperature)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.normalize(embeddings.float(), dim=-1) @ self.prototypes.t() / self.temperature


def tent_adapt(model: _ClassifierBase, batched_inputs, classifier: Optional[nn.Module] = None, lr: float = 1.0,
               steps: int = 1, reset: bool = True, modules: Optional[nn.Module] = None) -> List[dict]:
    """TENT (Wang et al. 2021) per image, as CAST's Appx. B: for each input dict on its own,
    ``steps`` SGD steps (lr ``lr``, no momentum) on the affine parameters of the normalisation
    layers of ``modules`` (default: the backbone) minimising the entropy of ``classifier``
    (default: the model's head) on that image; every other parameter is frozen and the model
    runs in eval mode (dropout off; no label or batch information is used). With ``reset``
    the adapted parameters are restored after each image.

    Returns per image ``logits_before`` / ``logits`` (after), ``entropy_before`` / ``entropy``
    and, for CAST, ``hierarchy_before`` / ``hierarchy`` ((L+1, H, W) label maps).
    """
    head = classifier if classifier is not None else model.head
    params = norm_parameters(modules if modules is not None else model.backbone)
    if not params:
        raise ValueError("no normalisation layer with affine parameters to adapt")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    results = []
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        for d in batched_inputs:
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                feats, out = model.embed([d])
                before = head(feats)[0]
            opt = torch.optim.SGD(params, lr=lr, momentum=0.0)
            for _ in range(int(steps)):
                feats, _ = model.embed([d])
                loss = prediction_entropy(head(feats)).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                feats, out_after = model.embed([d])
                after = head(feats)[0]
            rec = {"logits_before": before, "logits": after,
                   "entropy_before": prediction_entropy(before[None])[0], "entropy": prediction_entropy(after[None])[0]}
            if out is not None:
                rec["hierarchy_before"] = out["hierarchy"][0]
                rec["hierarchy"] = out_after["hierarchy"][0]
            results.append(rec)
            if reset:
                with torch.no_grad():
                    for p, s in zip(params, saved):
                        p.copy_(s)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return results
