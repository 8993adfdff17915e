"""One interface for the pseudo-mask generators: ``generator(features) -> list[PseudoMasks]``."""
from __future__ import annotations

from typing import List, Optional

import torch

from .fast import oap_fast
from .maskcut import maskcut
from .reference import oap_reference
from .types import MaskCutConfig, OAPConfig, PseudoMasks, UniAPConfig
from .uniap import uniap_fast, uniap_reference

__all__ = ["OAPGenerator", "UniAPGenerator", "MaskCutGenerator", "OAP_VARIANTS", "build_generator",
           "build_oap_generator", "generate_pseudo_masks"]

#: The OAP pooling variants: ``"alg1"``, the seed paper's Alg. 1 (default), and ``"uniap"``, the
#: pooling the authors released with S2-UniSeg (:mod:`hiseg_oap.pooling.uniap`).
OAP_VARIANTS = ("alg1", "uniap")


class OAPGenerator:
    """Online Agglomerative Pooling. ``impl='fast'`` (batched PyTorch, runs on the features'
    device) or ``'reference'`` (literal Alg. 1, NumPy/SciPy on the CPU, float64)."""

    def __init__(self, config: Optional[OAPConfig] = None, impl: str = "fast",
                 dtype: Optional[torch.dtype] = None):
        if impl not in ("fast", "reference"):
            raise ValueError(f"impl must be 'fast' or 'reference', got {impl!r}")
        self.config = config or OAPConfig()
        self.impl = impl
        self.dtype = dtype

    def __call__(self, features: torch.Tensor) -> List[PseudoMasks]:
        if self.impl == "reference":
            return [r.to(features.device) for r in oap_reference(features, self.config)]
        return oap_fast(features, self.config, dtype=self.dtype)


class UniAPGenerator:
    """UniAP, the authors' released pooling (:mod:`hiseg_oap.pooling.uniap`). ``impl='fast'`` (batched
    PyTorch on the features' device) or ``'reference'`` (the release step by step, NumPy/SciPy)."""

    def __init__(self, config: Optional[UniAPConfig] = None, impl: str = "fast",
                 dtype: Optional[torch.dtype] = None):
        if impl not in ("fast", "reference"):
            raise ValueError(f"impl must be 'fast' or 'reference', got {impl!r}")
        self.config = config or UniAPConfig()
        self.impl = impl
        self.dtype = dtype

    def __call__(self, features: torch.Tensor) -> List[PseudoMasks]:
        if self.impl == "reference":
            x = features if self.dtype is None else features.to(self.dtype)
            return [r.to(features.device) for r in uniap_reference(x, self.config)]
        return uniap_fast(features, self.config, dtype=self.dtype)


class MaskCutGenerator:
    """The MaskCut baseline (normalised cuts, NumPy/SciPy on the CPU)."""

    def __init__(self, config: Optional[MaskCutConfig] = None):
        self.config = config or MaskCutConfig()

    def __call__(self, features: torch.Tensor) -> List[PseudoMasks]:
        return maskcut(features, self.config)


def build_generator(method: str = "oap", variant: str = "alg1", **kwargs):
    """``method``: ``'oap'`` (kwargs: config, impl, dtype; ``variant`` ``'alg1'`` with an
    :class:`OAPConfig` or ``'uniap'`` with a :class:`UniAPConfig`) or ``'maskcut'`` (kwargs:
    config)."""
    if method == "oap":
        if variant == "alg1":
            return OAPGenerator(**kwargs)
        if variant == "uniap":
            return UniAPGenerator(**kwargs)
        raise ValueError(f"unknown OAP variant {variant!r} (use one of {', '.join(OAP_VARIANTS)})")
    if method == "maskcut":
        return MaskCutGenerator(**kwargs)
    raise ValueError(f"unknown pseudo-mask method {method!r} (use 'oap' or 'maskcut')")


def build_oap_generator(variant: str = "alg1", impl: str = "fast", thresholds=(0.8, 0.7, 0.6, 0.5, 0.4),
                        phi: Optional[int] = None, sigma: float = 0.07, w_f: float = 0.6, w_s: float = 0.4,
                        vote_normalize: bool = False, dtype: Optional[torch.dtype] = None):
    """The OAP generator of a variant from flat options (config keys, command-line flags).

    ``phi`` is the minimum mask area in tokens; ``None`` takes the variant's own default (Alg. 1:
    5, Sec. 5.1; UniAP: 4, the release's). ``sigma``, ``w_f``, ``w_s`` and ``vote_normalize``
    are Alg. 1's (Eq. 4, 6) and are not used by UniAP, which has no spatial term and no vote.
    Raises ValueError on an unknown variant or an invalid value.
    """
    if variant == "alg1":
        cfg = OAPConfig(thresholds=tuple(thresholds), sigma=sigma, w_f=w_f, w_s=w_s,
                        vote_normalize=vote_normalize, **({} if phi is None else {"phi": phi}))
    elif variant == "uniap":
        cfg = UniAPConfig(thresholds=tuple(thresholds), **({} if phi is None else {"min_size": phi}))
    else:
        raise ValueError(f"unknown OAP variant {variant!r} (use one of {', '.join(OAP_VARIANTS)})")
    return build_generator("oap", variant=variant, config=cfg, impl=impl, dtype=dtype)


def generate_pseudo_masks(
    features: torch.Tensor, method: str = "oap", **kwargs,
) -> List[PseudoMasks]:
    """Pseudo-masks of a ``(B, C, h, w)`` feature map with the given method."""
    return build_generator(method, **kwargs)(features)
