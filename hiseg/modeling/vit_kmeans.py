"""Hierarchical segments from a plain ViT by K-means on its output tokens (CAST, Appx. D.4).

The paper's ViT baseline for hierarchical segmentation: "We generate segments from ViT by
applying K-Means clustering to the final output tokens. We bilinearly upscale the feature map and
then apply K-Means to the pixel-level features [...]. To maintain a consistent cluster hierarchy,
we iteratively run K-Means, reducing the number of clusters by grouping the clusters from the
previous iteration into coarser clusters." The authors' notebook (``save_segmentation_vit``) uses
spherical K-means with 30 iterations and the counts 64, 32, 16, 8, and clusters the mean feature
("prototype") of each finer cluster to get the next level. We do the same:

1. the (D, h, w) token map is bilinearly upsampled (``align_corners=False``) to the image; with
   ``patch_size`` given it is upsampled to the padded grid ``(h*p, w*p)`` and cropped to the
   image, so each token stays over its own patch when the ViT padded the image (timm's
   ``dynamic_img_pad``);
2. level 1: K-means (greedy k-means++ seeding, Lloyd iterations; cosine distance on L2-normalised
   features when ``spherical``) fitted on at most ``max_fit_pixels`` pixels drawn at random,
   then every pixel is assigned to its nearest centroid. The upsampled features are produced in
   bands of rows from two small separable interpolation matrices, so the (H*W, D) map is never
   held in memory (a 481x321 BSDS image with ViT-S features: 1-2 s on 2 CPU cores);
3. level l > 1: the prototypes of level l-1 (exact means over *all* their pixels, re-normalised
   when spherical) are clustered into ``counts[l]`` groups (optionally weighted by pixel counts,
   ``weighted=True``; the authors' notebook does not weight), and each pixel takes the group of
   its level-(l-1) cluster. Levels are therefore nested by construction.

Labels of every level are consecutive (``0..n_l-1``); a level has fewer segments than asked
when K-means leaves clusters empty or the previous level had fewer.

``level0="patches"`` (default) prepends a finest level like CAST's superpixels: the ViT's input
patches, each split along the level-1 cluster boundaries so that the hierarchy stays nested
(``(L+1, H, W)``, the same shape as CAST's hierarchy). ``level0="none"`` returns only the K-means
levels (``(L, H, W)``), as the authors' notebook.

:class:`ViTKMeansSegmenter` (``MODEL.META_ARCHITECTURE: ViTKMeansSegmenter``, keys
``MODEL.VIT_KMEANS.*`` from :func:`add_vit_kmeans_config`) wraps any backbone with
``forward_tokens`` (:class:`~hiseg.modeling.vit.ViTBackbone`) or any detectron2 backbone output;
its inference returns ``{"hierarchy": (L+1, height, width)}`` per image, which
:class:`~hiseg.evaluation.HierarchicalSegEvaluator` scores.
"""
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from torch import nn

from .interpolation_taps import interpolation_taps, taps_matrix

__all__ = ["add_vit_kmeans_config", "kmeans", "vit_kmeans_hierarchy", "ViTKMeansSegmenter"]


def add_vit_kmeans_config(cfg):
    """Add ``MODEL.VIT_KMEANS.*`` (defaults: Appx. D.4 / the authors' notebook). Idempotent."""
    if "VIT_KMEANS" in cfg.MODEL:
        return cfg
    cfg.MODEL.VIT_KMEANS = CN()
    k = cfg.MODEL.VIT_KMEANS
    k.COUNTS = [64, 32, 16, 8]  # clusters per level, fine to coarse
    k.SPHERICAL = True  # cosine K-means on L2-normalised features
    k.SEED = 0
    k.ITERS = 30  # Lloyd iterations (at most; stops when assignments no longer change)
    k.MAX_FIT_PIXELS = 20000  # pixels drawn to fit level 1 (all pixels are then assigned)
    k.WEIGHTED = False  # weight prototypes by their pixel counts when clustering them
    k.N_INIT = 1  # K-means runs per level (best inertia kept)
    k.LEVEL0 = "patches"  # "patches": prepend the patch grid split by level 1; "none"
    # which features: "tokens" = final output tokens (after the final norm when
    # MODEL.VIT.FINAL_NORM), "keys" = last block's attention keys; or IN_FEATURE below
    k.FEATURE = "tokens"
    k.IN_FEATURE = ""  # non-empty: use this output of any detectron2 backbone instead
    return cfg


# ----------------------------------------------------------------------------------------------
# bilinear upsampling, computed band by band
def _bilinear_taps(out_size: int, in_size: int, device=None):
    """(index0, index1, weight0, weight1) of ``F.interpolate(mode="bilinear", align_corners=False)``."""
    index, weight = interpolation_taps("bilinear", out_size, in_size, device)
    return index[0], index[1], weight[0], weight[1]


class _Upsampled:
    """Pixel features of a (D, h, w) map bilinearly resized to (H, W), produced on demand
    (equal to ``F.interpolate(mode="bilinear", align_corners=False)``, never materialised)."""

    def __init__(self, fmap: torch.Tensor, image_size: Tuple[int, int], patch_size: Optional[int], normalize: bool):
        _, h, w = fmap.shape
        H, W = (int(s) for s in image_size)
        dev = fmap.device
        if patch_size:
            if h * patch_size < H or w * patch_size < W:
                raise ValueError(f"a {h}x{w} token grid with patch {patch_size} does not cover a {H}x{W} image")
            ty, tx = _bilinear_taps(h * patch_size, h, dev), _bilinear_taps(w * patch_size, w, dev)
        else:
            ty, tx = _bilinear_taps(H, h, dev), _bilinear_taps(W, w, dev)
        # (index0, index1, weight0, weight1) per output row / column, cropped to the image
        self.ty = [t[:H] if t.dtype == torch.long else t[:H].float() for t in ty]
        self.tx = [t[:W] if t.dtype == torch.long else t[:W].float() for t in tx]
        self.ry = taps_matrix(torch.stack(self.ty[:2]), torch.stack(self.ty[2:]), h)  # (H, h)
        self.rx = taps_matrix(torch.stack(self.tx[:2]), torch.stack(self.tx[2:]), w)  # (W, w)
        self.grid = fmap.float().permute(1, 2, 0).contiguous()  # (h, w, D)
        self.size = (H, W)
        self.normalize = normalize

    def _post(self, x):
        return F.normalize(x, dim=-1) if self.normalize else x

    def rows(self, y0: int, y1: int) -> torch.Tensor:
        """Features of rows y0..y1-1, ((y1-y0)*W, D), raster order."""
        a = torch.einsum("yi,ijd->yjd", self.ry[y0:y1], self.grid)  # (b, w, D)
        b = torch.matmul(self.rx, a)  # (b, W, D)
        return self._post(b.reshape(-1, b.shape[-1]))

    def pixels(self, flat_idx: torch.Tensor) -> torch.Tensor:
        """Features of the pixels ``flat_idx`` (raster indices), (n, D)."""
        W = self.size[1]
        ys, xs = flat_idx // W, flat_idx % W
        i0, i1, w0, w1 = (t[ys] for t in self.ty)
        j0, j1, v0, v1 = (t[xs] for t in self.tx)
        g = self.grid
        f = ((w0 * v0)[:, None] * g[i0, j0] + (w0 * v1)[:, None] * g[i0, j1]
             + (w1 * v0)[:, None] * g[i1, j0] + (w1 * v1)[:, None] * g[i1, j1])
        return self._post(f)


# ----------------------------------------------------------------------------------------------
# K-means
def _scores(x: torch.Tensor, c: torch.Tensor, spherical: bool) -> torch.Tensor:
    """Higher = closer: cosine similarity, or minus the squared distance up to a per-row constant."""
    if spherical:
        return x @ c.t()
    return 2.0 * (x @ c.t()) - (c * c).sum(1)[None]


def _sq_dist_to(x: torch.Tensor, c: torch.Tensor, spherical: bool) -> torch.Tensor:
    """Squared distances of every x to its nearest c (spherical: 2 - 2 cos), (N,)."""
    if spherical:
        return (2.0 - 2.0 * (x @ c.t()).amax(1)).clamp(min=0)
    return torch.cdist(x, c).amin(1).pow(2)


def _cluster_sums(labels: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """(k, D) sums of the rows of x per label."""
    return torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).scatter_add_(
        0, labels[:, None].expand(-1, x.shape[1]), x)


def _assign(x: torch.Tensor, c: torch.Tensor, spherical: bool, chunk: int = 65536) -> torch.Tensor:
    return torch.cat([_scores(x[i:i + chunk], c, spherical).argmax(1) for i in range(0, x.shape[0], chunk)])


def _kmeanspp(x, w, k, spherical, gen):
    """Greedy k-means++ seeding (weighted by w; as scikit-learn: 2 + log k candidates per step,
    keeping the one that lowers the potential most). May return fewer than k centres when
    points coincide."""
    trials = 2 + int(np.log(k))
    first = int(torch.multinomial(w.cpu().double(), 1, generator=gen))
    centres = [first]
    d2 = _sq_dist_to(x, x[first:first + 1], spherical)
    for _ in range(1, k):
        p = (w * d2).cpu().double()
        if float(p.sum()) <= 0:
            break
        cand = torch.multinomial(p, trials, replacement=True, generator=gen).to(x.device)
        if spherical:
            cd2 = (2.0 - 2.0 * (x @ x[cand].t())).clamp(min=0)  # (N, trials)
        else:
            cd2 = torch.cdist(x, x[cand]).pow(2)
        new_d2 = torch.minimum(d2[:, None], cd2)
        best = int(torch.argmin((w[:, None] * new_d2).sum(0)))
        centres.append(int(cand[best]))
        d2 = new_d2[:, best]
    return x[torch.tensor(centres, device=x.device)].clone()


def kmeans(x: torch.Tensor, k: int, *, weights: Optional[torch.Tensor] = None, spherical: bool = True,
           iters: int = 30, seed: int = 0, n_init: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weighted (spherical) K-means with greedy k-means++ seeding; deterministic for a seed.

    Args:
        x: (N, D) points (normalised inside when ``spherical``).
        k: number of clusters (at most N; fewer when points coincide).
        weights: (N,) non-negative point weights (default 1).
        iters: maximum Lloyd iterations; stops early when assignments no longer change.
        n_init: runs from different seedings; the one with the lowest inertia is kept.
    Returns:
        centroids (k', D) (unit norm when spherical) and labels (N,) in 0..k'-1. An empty
        cluster is re-seeded with the point farthest from its centroid.
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans expects (N, D) points with N > 0, got {tuple(x.shape)}")
    x = x.float()
    if spherical:
        x = F.normalize(x, dim=1)
    n = x.shape[0]
    w = torch.ones(n, device=x.device) if weights is None else weights.float().to(x.device)
    if bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError("kmeans weights must be non-negative and not all zero")
    k = max(1, min(int(k), n))
    gen = torch.Generator().manual_seed(int(seed))
    best = None
    for _ in range(max(1, int(n_init))):
        c, labels = _lloyd(x, w, _kmeanspp(x, w, k, spherical, gen), spherical, iters)
        inertia = float((w * ((x - c[labels]) ** 2).sum(1)).sum())
        if best is None or inertia < best[0]:
            best = (inertia, c, labels)
    return best[1], best[2]


def _lloyd(x, w, c, spherical, iters):
    k = c.shape[0]
    labels = _assign(x, c, spherical)
    for _ in range(max(1, int(iters))):
        sums = _cluster_sums(labels, x * w[:, None], k)
        mass = _cluster_sums(labels, w[:, None], k)[:, 0]
        empty = mass <= 0
        c = torch.where(empty[:, None], c, sums / mass.clamp(min=1e-12)[:, None])
        if spherical:
            c = F.normalize(c, dim=1)
        if bool(empty.any()):
            # re-seed empty clusters at the worst-fitted points (distinct, deterministic)
            err = ((x - c[labels]) ** 2).sum(1) * (w > 0)
            worst = torch.sort(err, descending=True, stable=True).indices[: int(empty.sum())]
            c[empty.nonzero()[:, 0][: worst.numel()]] = x[worst]
        new = _assign(x, c, spherical)
        if torch.equal(new, labels):
            break
        labels = new
    return c, labels


def _consecutive(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(labels mapped to 0..n-1 keeping their order, the old label of each new one)."""
    old, inv = torch.unique(labels, return_inverse=True)
    return inv.view_as(labels), old


# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def vit_kmeans_hierarchy(feature_map: torch.Tensor, image_size: Sequence[int],
                         counts: Sequence[int] = (64, 32, 16, 8), spherical: bool = True, seed: int = 0, *,
                         patch_size: Optional[int] = None, level0: str = "patches", iters: int = 30,
                         max_fit_pixels: int = 20000, weighted: bool = False, n_init: int = 1,
                         band_rows: int = 64) -> torch.Tensor:
    """Nested K-means hierarchy of a token map (Appx. D.4); see the module docstring.

    Args:
        feature_map: (D, h, w) or (1, D, h, w) tokens (e.g. ``ViTBackbone.forward_tokens``).
        image_size: (H, W) of the output label maps.
        counts: clusters per level, fine to coarse (each level clusters the previous one).
        spherical: cosine K-means on L2-normalised pixel features (the authors' choice).
        seed: seeds the pixel sample and the k-means++ seeding.
        patch_size: the ViT patch size: the map is upsampled to ``(h*p, w*p)`` and cropped to
            the image (right for timm's bottom/right padding); None: resized to the image.
        level0: "patches" prepends the patch grid split by the level-1 clusters; "none" does not.
        iters: Lloyd iterations per level (at most).
        max_fit_pixels: pixels drawn (without replacement) to fit level 1; all are assigned.
        weighted: cluster prototypes weighted by their pixel counts (levels >= 2).
        n_init: K-means runs per level (different seedings; the lowest inertia is kept).
        band_rows: rows of pixels upsampled at once (memory: band_rows * W * D floats).
    Returns:
        (L+1, H, W) int64 label maps (``(L, H, W)`` with ``level0="none"``), fine to coarse,
        labels 0..n_l-1 in each level, on the feature map's device.
    """
    if feature_map.dim() == 4:
        if feature_map.shape[0] != 1:
            raise ValueError(f"one image at a time: got a batch of {feature_map.shape[0]}")
        feature_map = feature_map[0]
    if feature_map.dim() != 3:
        raise ValueError(f"feature_map must be (D, h, w), got {tuple(feature_map.shape)}")
    counts = [int(c) for c in counts]
    if not counts or min(counts) < 1:
        raise ValueError(f"counts must be positive, got {counts}")
    if level0 not in ("patches", "none"):
        raise ValueError(f"level0 must be 'patches' or 'none', got {level0!r}")
    H, W = (int(s) for s in image_size)
    dev = feature_map.device
    up = _Upsampled(feature_map, (H, W), patch_size, normalize=spherical)
    d = feature_map.shape[0]

    # level 1: fit on a pixel sample, assign every pixel (band by band), accumulate prototypes
    gen = torch.Generator().manual_seed(int(seed))
    n_pix = H * W
    n_fit = min(int(max_fit_pixels), n_pix) if max_fit_pixels and max_fit_pixels > 0 else n_pix
    sample = torch.randperm(n_pix, generator=gen)[:n_fit].sort().values.to(dev)
    cents, _ = kmeans(up.pixels(sample), counts[0], spherical=spherical, iters=iters, seed=seed, n_init=n_init)
    k1 = cents.shape[0]
    lab1 = torch.empty(n_pix, dtype=torch.long, device=dev)
    sums = torch.zeros(k1, d, device=dev)
    mass = torch.zeros(k1, device=dev)
    step = max(1, int(band_rows))
    for y0 in range(0, H, step):
        y1 = min(H, y0 + step)
        f = up.rows(y0, y1)
        lab = _assign(f, cents, spherical)
        lab1[y0 * W:y1 * W] = lab
        sums += _cluster_sums(lab, f, k1)
        mass += torch.bincount(lab, minlength=k1).to(mass.dtype)
    lab1, kept = _consecutive(lab1)
    sums, mass = sums[kept], mass[kept]
    levels = [lab1]

    # levels >= 2: cluster the previous level's prototypes
    for level, k in enumerate(counts[1:], start=2):
        protos = sums / mass[:, None]
        m = protos.shape[0]
        if k >= m:
            group = torch.arange(m, device=dev)
        else:
            _, group = kmeans(protos, k, weights=mass if weighted else None, spherical=spherical,
                              iters=iters, seed=seed + level, n_init=n_init)
            group, _ = _consecutive(group)
        n_groups = int(group.max()) + 1
        sums = torch.zeros(n_groups, d, device=dev).index_add_(0, group, sums)
        mass = torch.zeros(n_groups, device=dev).index_add_(0, group, mass)
        levels.append(group[levels[-1]])

    out = [lvl.view(H, W) for lvl in levels]
    if level0 == "patches":
        h, w = feature_map.shape[-2:]
        if patch_size:
            py = torch.arange(H, device=dev) // int(patch_size)
            px = torch.arange(W, device=dev) // int(patch_size)
        else:
            py = (torch.arange(H, device=dev) * h) // H
            px = (torch.arange(W, device=dev) * w) // W
        cell = py[:, None] * w + px[None, :]
        pair = cell * (int(out[0].max()) + 1) + out[0]
        out.insert(0, _consecutive(pair)[0])
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------
@META_ARCH_REGISTRY.register()
class ViTKMeansSegmenter(nn.Module):
    """Inference-only meta-architecture: a backbone's tokens -> :func:`vit_kmeans_hierarchy`.

    Inputs: detectron2 dicts with ``image`` ((C, H, W) in ``INPUT.FORMAT``, 0-255) and
    optionally ``height`` / ``width`` (the hierarchy is resized to them, nearest). Outputs:
    ``{"hierarchy": (L+1, height, width) int64, "num_segments": (L+1,) int64}``.
    """

    @configurable
    def __init__(self, *, backbone: nn.Module, counts=(64, 32, 16, 8), spherical=True, seed=0, iters=30,
                 max_fit_pixels=20000, weighted=False, n_init=1, level0="patches", feature="tokens", in_feature="",
                 pixel_mean=(123.675, 116.28, 103.53), pixel_std=(58.395, 57.12, 57.375)):
        super().__init__()
        if feature not in ("tokens", "keys"):
            raise ValueError(f"MODEL.VIT_KMEANS.FEATURE must be 'tokens' or 'keys', got {feature!r}")
        if not in_feature and not hasattr(backbone, "forward_tokens"):
            raise ValueError("the backbone has no forward_tokens (not a ViTBackbone): set MODEL.VIT_KMEANS.IN_FEATURE")
        self.backbone = backbone
        self.kmeans_args = dict(counts=tuple(counts), spherical=bool(spherical), seed=int(seed), iters=int(iters),
                                max_fit_pixels=int(max_fit_pixels), weighted=bool(weighted), n_init=int(n_init),
                                level0=level0)
        self.feature = feature
        self.in_feature = in_feature
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        k = cfg.MODEL.VIT_KMEANS
        return {"backbone": build_backbone(cfg), "counts": k.COUNTS, "spherical": k.SPHERICAL, "seed": k.SEED,
                "iters": k.ITERS, "max_fit_pixels": k.MAX_FIT_PIXELS, "weighted": k.WEIGHTED, "n_init": k.N_INIT,
                "level0": k.LEVEL0,
                "feature": k.FEATURE, "in_feature": k.IN_FEATURE, "pixel_mean": cfg.MODEL.PIXEL_MEAN,
                "pixel_std": cfg.MODEL.PIXEL_STD}

    @property
    def device(self):
        return self.pixel_mean.device

    def token_map(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[int]]:
        """(1, D, h, w) features of one normalised image and the stride to upsample them with."""
        if self.in_feature:
            feats = self.backbone(x)[self.in_feature]
            return feats, self.backbone.output_shape()[self.in_feature].stride
        if self.feature == "keys":
            k, (h, w) = self.backbone.key_features(x, return_grid=True)
            return k.transpose(1, 2).reshape(1, -1, h, w), self.backbone.patch_size
        return self.backbone.forward_tokens(x)[1], self.backbone.patch_size

    def forward(self, batched_inputs):
        if self.training:
            raise RuntimeError("ViTKMeansSegmenter has nothing to train: call model.eval() (inference only)")
        return self.inference(batched_inputs)

    @torch.no_grad()
    def inference(self, batched_inputs):
        results = []
        for d in batched_inputs:
            img = d["image"].to(self.device).float()
            x = ((img - self.pixel_mean) / self.pixel_std)[None]
            fmap, stride = self.token_map(x)
            hier = vit_kmeans_hierarchy(fmap[0], x.shape[-2:], patch_size=stride, **self.kmeans_args)
            height, width = int(d.get("height", hier.shape[-2])), int(d.get("width", hier.shape[-1]))
            if (height, width) != tuple(hier.shape[-2:]):
                hier = F.interpolate(hier[None].float(), size=(height, width), mode="nearest")[0].long()
            results.append({"hierarchy": hier, "num_segments": hier.flatten(1).amax(1) + 1})
        return results
