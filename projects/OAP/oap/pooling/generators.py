"""One interface for the pseudo-mask generators: ``generator(features) -> list[PseudoMasks]``."""
from __future__ import annotations

from typing import List, Optional

import torch

from .fast import oap_fast
from .maskcut import maskcut
from .reference import oap_reference
from .types import MaskCutConfig, OAPConfig, PseudoMasks

__all__ = ["OAPGenerator", "MaskCutGenerator", "build_generator", "generate_pseudo_masks"]


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


class MaskCutGenerator:
    """The MaskCut baseline (normalised cuts, NumPy/SciPy on the CPU)."""

    def __init__(self, config: Optional[MaskCutConfig] = None):
        self.config = config or MaskCutConfig()

    def __call__(self, features: torch.Tensor) -> List[PseudoMasks]:
        return maskcut(features, self.config)


def build_generator(method: str = "oap", **kwargs):
    """``method``: ``'oap'`` (kwargs: config, impl, dtype) or ``'maskcut'`` (kwargs: config)."""
    if method == "oap":
        return OAPGenerator(**kwargs)
    if method == "maskcut":
        return MaskCutGenerator(**kwargs)
    raise ValueError(f"unknown pseudo-mask method {method!r} (use 'oap' or 'maskcut')")


def generate_pseudo_masks(
    features: torch.Tensor, method: str = "oap", **kwargs,
) -> List[PseudoMasks]:
    """Pseudo-masks of a ``(B, C, h, w)`` feature map with the given method."""
    return build_generator(method, **kwargs)(features)
