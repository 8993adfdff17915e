"""One image's :class:`~hiseg_oap.pooling.PseudoMasks` -> COCO result entries at image size, for
the chosen ``(kind, layer)`` levels (:func:`pseudo_masks_to_results`)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..pooling.types import first_unique_rows
from .encoding import masks_to_results
from .scoring import SCORES, coherence_scores

__all__ = ["UPSAMPLE_PIXELS", "pseudo_masks_to_results"]


def _first_occurrences(pseudo, levels: Sequence[Tuple[str, int]]) -> Dict[Tuple[str, int], torch.Tensor]:
    """``{(kind, layer): indices}`` of the masks of each listed level that no earlier listed layer
    of the same kind emitted identically (:func:`first_unique_rows` over the layers in order, as
    the training targets are made)."""
    out = {}
    for kind in dict.fromkeys(k for k, _ in levels):
        layers = [i for k, i in levels if k == kind]
        masks = [pseudo.layers[i].level(kind).masks for i in layers]
        first = first_unique_rows(torch.cat(masks).flatten(1))
        start = 0
        for i, m in zip(layers, masks):
            stop = start + m.shape[0]
            out[(kind, i)] = first[(first >= start) & (first < stop)] - start
            start = stop
    return out


#: masks x pixels upsampled at once by :func:`pseudo_masks_to_results`: 2^25 (about 0.25 GB of
#: float32 interpolation output, bool masks and their uint8 copy for the RLE encoder)
UPSAMPLE_PIXELS = 1 << 25


def pseudo_masks_to_results(
    pseudo, image_id, image_size: Sequence[int], levels: Sequence[Tuple[str, int]],
    token_features: Optional[torch.Tensor] = None, score: str = "coherence",
    upsample: str = "bilinear", chunk: Optional[int] = None, unique: bool = False,
    max_pixels: Optional[int] = None,
) -> List[dict]:
    """COCO result entries for the chosen ``(kind, layer)`` levels of one image.

    Masks are brought from the feature grid to ``image_size = (H, W)`` (the original image) with
    :meth:`MaskLevel.upsample` (``upsample``: ``bilinear`` or ``nearest``), as many masks at a
    time as fit ``max_pixels`` image-size pixels (default :data:`UPSAMPLE_PIXELS`; at least one
    mask; ``chunk``, if given, caps the count too). The memory of this step is thus bounded by
    the image's pixels, not by the number of masks: each mask is upsampled on its own, so the
    entries are the same whatever the grouping. Each entry gets ``level`` (kind), ``layer`` (index) and ``threshold`` (``tau_t`` of the
    layer; MaskCut: its affinity threshold). ``score``: ``coherence`` (needs ``token_features``,
    see :func:`coherence_scores`) or ``one`` (1.0, as CutLER's pseudo-labels). ``unique``: a mask
    equal on the feature grid to one already written for the same kind (a supernode that did not
    merge is emitted again by the next layer) is left out, as the training targets leave it
    (``hiseg_oap.modeling.pseudo_targets``); levels are visited in the given order.
    """
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose from {SCORES}")
    if score == "coherence" and token_features is None:
        raise ValueError("score='coherence' needs the token features")
    size = (int(image_size[0]), int(image_size[1]))
    budget = int(UPSAMPLE_PIXELS if max_pixels is None else max_pixels)
    out: List[dict] = []
    keep = _first_occurrences(pseudo, levels) if unique else {}
    for kind, layer_idx in levels:
        layer = pseudo.layers[layer_idx]
        level = layer.level(kind)
        if (kind, layer_idx) in keep:
            level = level.select(keep[(kind, layer_idx)])
        k = len(level)
        if k == 0:
            continue
        if score == "coherence":
            scores = coherence_scores(level.masks.to(token_features.device), token_features).tolist()
        else:
            scores = [1.0] * k
        step = max(1, min(int(chunk) if chunk else k, budget // (size[0] * size[1] or 1)))
        for start in range(0, k, step):
            stop = start + step
            big = level.select(slice(start, stop)).upsample(size, mode=upsample).cpu().numpy()
            out.extend(masks_to_results(big, image_id, scores[start:stop], level=kind,
                                        layer=int(layer_idx), threshold=float(layer.threshold)))
    return out
