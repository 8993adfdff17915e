"""Mixup / CutMix that also mixes the superpixel maps, with DeiT's soft targets (CAST Table 12).

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

Targets and loss: label-smoothed one-hot targets mixed with the same weights, and timm's
soft-target cross-entropy.
"""
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SuperpixelMixup", "MIXUP_SUPERPIXEL_POLICIES", "smoothed_one_hot", "soft_target_cross_entropy",
           "rand_bbox", "cutmix_superpixels", "overlay_superpixels", "renumber_labels_keep_padding"]

MIXUP_SUPERPIXEL_POLICIES = ("dominant", "overlay", "recompute")


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(B, C) targets: ``1 - smoothing + smoothing / C`` on the label, ``smoothing / C`` elsewhere."""
    off = smoothing / num_classes
    t = torch.full((labels.numel(), num_classes), off, dtype=torch.float32, device=labels.device)
    return t.scatter_(1, labels.view(-1, 1).long(), 1.0 - smoothing + off)


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_c target_c log softmax(logits)_c`` (timm's loss)."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def renumber_labels_keep_padding(labels: torch.Tensor) -> torch.Tensor:
    """The labels >= 0 present mapped to 0..n-1 in increasing order; -1 (padding) stays -1 (for
    numpy maps without padding: :func:`hiseg_cast.superpixels.renumber_labels`)."""
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
    return renumber_labels_keep_padding(out)


def overlay_superpixels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The intersection of two label maps (a region per pair of labels), relabelled 0..n-1."""
    key = a * (int(b.max()) + 1) + b
    key = torch.where((a >= 0) & (b >= 0), key, torch.full_like(key, -1))
    return renumber_labels_keep_padding(key)


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
