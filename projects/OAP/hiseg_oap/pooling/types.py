"""Configuration and result containers shared by the OAP and MaskCut pseudo-mask generators.

All masks live on the ``h x w`` feature grid; :meth:`MaskLevel.upsample` brings them to image
size. A result holds one entry per OAP layer, and each entry an instance level and a semantic
level (MaskCut fills one layer with an empty semantic level).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["OAPConfig", "UniAPConfig", "MaskCutConfig", "MaskLevel", "OAPLayer", "PseudoMasks", "first_unique_rows"]


@dataclass(frozen=True)
class OAPConfig:
    """Hyper-parameters of Online Agglomerative Pooling (defaults: OAP paper, Sec. 5.1).

    Attributes:
        thresholds: ``tau_t`` per layer; an edge is contracted when its similarity is strictly
            larger than the threshold. One OAP layer (instance + semantic pooling) per entry.
        sigma: softmax temperature of the feature vote (Eq. 6).
        phi: minimum mask area, in tokens, for a mask to be emitted (Alg. 1, line 10).
        w_f, w_s: weights of the feature and spatial similarities (Eq. 4).
        vote_normalize: ``False`` (default) follows Eq. 6 / Alg. 1 line 9 literally,
            ``softmax(M_i A / sigma)``, where ``M_i A`` is the *sum* of the affinity rows of the
            tokens in the mask. ``True`` divides by the mask area first (``M_i A / M_i 1^T``, the
            same affinity distribution as Eq. 3), which keeps the vote's sharpness independent of
            the mask size. The paper's text calls Eq. 6 "similar to Equation 3" without writing
            the division, so the literal form is the default and the other is offered.
    """

    thresholds: Tuple[float, ...] = (0.8, 0.7, 0.6, 0.5, 0.4)
    sigma: float = 0.07
    phi: int = 5
    w_f: float = 0.6
    w_s: float = 0.4
    vote_normalize: bool = False

    def __post_init__(self):
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        if len(self.thresholds) == 0:
            raise ValueError("OAPConfig.thresholds must not be empty")
        if self.sigma <= 0:
            raise ValueError("OAPConfig.sigma must be positive")
        if self.phi < 1:
            raise ValueError("OAPConfig.phi must be >= 1")
        if self.w_f < 0 or self.w_s < 0:
            raise ValueError("OAPConfig.w_f and w_s must be non-negative")
        # S = w_f S^f + w_s S^s (Eq. 4) with S^f a cosine and S^s = 1 - mean |P_i - P_j| (Eq. 3,
        # P entries mean cosines), both in [-1, 1]: an edge merges when S > tau, so a tau at or
        # above w_f + w_s merges nothing (0 masks) and one below -(w_f + w_s) merges everything.
        top = self.w_f + self.w_s
        bad = [t for t in self.thresholds if not -top <= t < top]
        if bad:
            raise ValueError(f"OAP thresholds {bad} lie outside [-{top:g}, {top:g}), the range of the similarity "
                             f"w_f*S^f + w_s*S^s (Eq. 4) that an edge must exceed; give thresholds in it")


@dataclass(frozen=True)
class UniAPConfig:
    """Hyper-parameters of UniAP, the pooling the OAP authors released with S2-UniSeg
    (github bio-mlhui/S2-UniSeg, commit 9049574, ``FastUniAP.py``; see :mod:`hiseg_oap.pooling.uniap`).

    The release hard-codes both values (``for threshold in [0.8, 0.7, 0.6, 0.5, 0.4]`` and
    ``node_num_patches[m] >= 4`` in ``aggo_merge_graph`` / ``aggo_whole_batch``); here they are
    configurable, with the release's values as defaults.

    Attributes:
        thresholds: one layer per entry; edges whose score is strictly larger are contracted,
            repeatedly, until none is.
        min_size: a cluster of fewer tokens is not emitted (the release: 4).
    """

    thresholds: Tuple[float, ...] = (0.8, 0.7, 0.6, 0.5, 0.4)
    min_size: int = 4

    def __post_init__(self):
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        if len(self.thresholds) == 0:
            raise ValueError("UniAPConfig.thresholds must not be empty")
        if self.min_size < 1:
            raise ValueError("UniAPConfig.min_size must be >= 1")


@dataclass(frozen=True)
class MaskCutConfig:
    """Hyper-parameters of the MaskCut baseline (CutLER defaults for its released pseudo-labels).

    Attributes:
        tau: affinity threshold; ``A_ij = 1`` if cosine > tau, else ``eps``.
        eps: floor given to the edges below ``tau`` (keeps the graph connected, D invertible).
        num_masks: at most this many normalised cuts per image.
        iou_thresh: a later mask whose IoU with an earlier kept mask exceeds this is dropped.
        min_area_ratio: a later mask covering at most this fraction of the grid is dropped.
    """

    tau: float = 0.15
    eps: float = 1e-5
    num_masks: int = 3
    iou_thresh: float = 0.5
    min_area_ratio: float = 0.01


def first_unique_rows(flat: torch.Tensor) -> torch.Tensor:
    """Indices of the first occurrence of every distinct row of ``flat`` (T, N), in order (a mask
    that later OAP layers repeat, flattened, is kept at its first layer)."""
    if flat.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=flat.device)
    # uint8 rows: unique over rows of bool tensors is not implemented on every device
    _, inverse = torch.unique(flat.to(torch.uint8), dim=0, return_inverse=True)
    t = flat.shape[0]
    first = torch.full((int(inverse.max()) + 1,), t, dtype=torch.long, device=flat.device)
    first = first.scatter_reduce(0, inverse, torch.arange(t, device=flat.device), reduce="amin")
    return first.sort().values


def _resize_masks(masks: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    size = (int(size[0]), int(size[1]))
    if masks.shape[0] == 0:
        return masks.new_zeros((0,) + size, dtype=torch.bool)
    x = masks[:, None].float()
    if mode == "nearest":
        # "nearest-exact" samples each output pixel at its centre: a pure function of the grid,
        # so the partition property of a level is kept at image size.
        out = F.interpolate(x, size=size, mode="nearest-exact")
        return out[:, 0] > 0.5
    if mode == "bilinear":
        out = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return out[:, 0] >= 0.5
    raise ValueError(f"unknown upsampling mode {mode!r} (use 'nearest' or 'bilinear')")


@dataclass
class MaskLevel:
    """The masks one level (instance or semantic) of one layer emits.

    Attributes:
        masks: ``(K, h, w)`` bool, masks at feature resolution; pairwise disjoint.
        features: ``(K, d)`` L2-normalised mask embeddings (Eq. 6 for OAP).
        parents: ``(K,)`` long, index of the mask in the *next* layer's same level that this mask
            belongs to; ``-1`` at the last layer (or where none exists). For the instance level
            the parent always contains the mask. The semantic level of a layer is computed
            afresh from that layer's instance graph, so a semantic mask is not guaranteed to be
            nested in one of the next layer; its parent is the next-layer semantic mask with the
            largest overlap (ties: lowest index) and ``nested`` says whether it contains it.
        nested: ``(K,)`` bool, whether ``parents`` fully contains the mask.
        partition: ``(h, w)`` long, the supernode of every token *including* the supernodes
            below the area threshold (OAP), or the index of the mask / -1 (MaskCut).
        supernode_ids: ``(K,)`` long, the supernode each mask is (index into ``partition``).
    """

    masks: torch.Tensor
    features: torch.Tensor
    parents: torch.Tensor
    nested: torch.Tensor
    partition: Optional[torch.Tensor] = None
    supernode_ids: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    @property
    def areas(self) -> torch.Tensor:
        """``(K,)`` number of tokens in each mask."""
        return self.masks.flatten(1).sum(1)

    def label_map(self) -> torch.Tensor:
        """``(h, w)`` long: index of the mask containing each token, ``-1`` where none does."""
        k = self.masks.shape[0]
        idx = torch.arange(1, k + 1, device=self.masks.device).view(k, 1, 1)
        return (self.masks.long() * idx).sum(0) - 1

    def upsample(self, size: Sequence[int], mode: str = "nearest") -> torch.Tensor:
        """Masks at ``size = (H, W)`` (e.g. the image size), ``(K, H, W)`` bool.

        ``mode='nearest'`` keeps the masks disjoint; ``'bilinear'`` gives smoother outlines
        (interpolated soft masks thresholded at 0.5).
        """
        return _resize_masks(self.masks, size, mode)

    def select(self, index) -> "MaskLevel":
        """The masks ``index`` (a slice or index tensor) with their per-mask fields; the
        partition (a property of the layer) is kept as it is."""
        return MaskLevel(masks=self.masks[index], features=self.features[index], parents=self.parents[index],
                         nested=self.nested[index], partition=self.partition,
                         supernode_ids=None if self.supernode_ids is None else self.supernode_ids[index])

    def to(self, device) -> "MaskLevel":
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device) if torch.is_tensor(v) else v
        return MaskLevel(**kw)

    @staticmethod
    def empty(h: int, w: int, dim: int, device=None, dtype=torch.float32) -> "MaskLevel":
        return MaskLevel(
            masks=torch.zeros((0, h, w), dtype=torch.bool, device=device),
            features=torch.zeros((0, dim), dtype=dtype, device=device),
            parents=torch.zeros((0,), dtype=torch.long, device=device),
            nested=torch.zeros((0,), dtype=torch.bool, device=device),
            partition=torch.full((h, w), -1, dtype=torch.long, device=device),
            supernode_ids=torch.zeros((0,), dtype=torch.long, device=device),
        )


@dataclass
class OAPLayer:
    """Output of one OAP layer: instance pooling, then semantic pooling on its supernodes.

    ``instance_to_semantic[k]`` is the index of the semantic mask of the same layer that contains
    instance mask ``k`` (always defined: a semantic mask is a union of instance supernodes and is
    at least as large as each of them).
    """

    threshold: float
    instance: MaskLevel
    semantic: MaskLevel
    instance_to_semantic: torch.Tensor

    def level(self, name: str) -> MaskLevel:
        if name not in ("instance", "semantic"):
            raise ValueError(f"level must be 'instance' or 'semantic', got {name!r}")
        return getattr(self, name)


@dataclass
class PseudoMasks:
    """Pseudo-masks of one image: one :class:`OAPLayer` per layer (coarser with each layer)."""

    feature_size: Tuple[int, int]
    layers: List[OAPLayer] = field(default_factory=list)
    method: str = "oap"

    def level(self, name: str) -> List[MaskLevel]:
        """The given level (``'instance'`` or ``'semantic'``) of every layer."""
        return [layer.level(name) for layer in self.layers]

    def all_masks(self, name: str = "instance") -> Tuple[torch.Tensor, torch.Tensor]:
        """All masks of a level over all layers, concatenated: ``(masks, features)``."""
        levels = self.level(name)
        return torch.cat([lv.masks for lv in levels]), torch.cat([lv.features for lv in levels])

    def upsample(self, size: Sequence[int], name: str = "instance", mode: str = "nearest"):
        """All masks of a level over all layers at image size, ``(sum K, H, W)`` bool."""
        return _resize_masks(self.all_masks(name)[0], size, mode)

    def to(self, device) -> "PseudoMasks":
        layers = [
            OAPLayer(
                threshold=lay.threshold,
                instance=lay.instance.to(device),
                semantic=lay.semantic.to(device),
                instance_to_semantic=lay.instance_to_semantic.to(device),
            )
            for lay in self.layers
        ]
        return PseudoMasks(feature_size=self.feature_size, layers=layers, method=self.method)
