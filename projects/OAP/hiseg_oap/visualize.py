"""Pictures of OAP pseudo-masks and of the universal segmenter's outputs.

* :func:`overlay`: masks of one level (a label map) blended over the image, with outlines.
* :func:`pseudo_mask_panels`: one panel per OAP layer and level (instance / semantic, Alg. 1).
* :func:`prediction_panels`: the segmenter's class-agnostic instances, semantic clusters and
  panoptic segments (Sec. 5.1 inference).
* :func:`oap_demo_panels`: both, for one RGB image and an ``OAPSegmentor`` (used by tools/demo.py).

Panels are ``(title, HxWx3 uint8)`` pairs for :func:`hiseg.visualization.save_panel_grid`.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from hiseg.visualization import boundary_thickness, draw_boundaries, palette_image

__all__ = ["overlay", "masks_to_labels", "pseudo_mask_panels", "prediction_panels", "oap_demo_panels"]

Panel = Tuple[str, np.ndarray]


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The masks of one level (label map, -1 = none) blended over the image, with outlines."""
    out = image.copy()
    valid = labels >= 0
    if valid.any():
        fill = palette_image(labels)
        out[valid] = np.clip(0.45 * image[valid].astype(np.float32) + 0.55 * fill[valid], 0, 255).astype(np.uint8)
        out = draw_boundaries(out, labels, (255, 255, 255), boundary_thickness(image.shape))
    return out


def masks_to_labels(masks: np.ndarray) -> np.ndarray:
    """``(K, H, W)`` bool -> ``(H, W)`` int64 label map (-1 = no mask); a later mask is drawn over
    an earlier one, so pass overlapping masks in increasing order of importance."""
    masks = np.asarray(masks, dtype=bool)
    labels = np.full(masks.shape[1:], -1, np.int64)
    for k in range(masks.shape[0]):
        labels[masks[k]] = k
    return labels


def pseudo_mask_panels(image: np.ndarray, pseudo, upsample: str = "nearest") -> List[Panel]:
    """One overlay per OAP layer and level of ``pseudo`` (a :class:`hiseg_oap.pooling.PseudoMasks`)."""
    panels = []
    for t, layer in enumerate(pseudo.layers):
        for kind in ("instance", "semantic"):
            level = layer.level(kind)
            if kind == "semantic" and len(level) == 0 and pseudo.method != "oap":
                continue  # MaskCut has no semantic level
            masks = level.upsample(image.shape[:2], mode=upsample).cpu().numpy()
            n = len(level)
            panels.append((f"{kind} L{t} (tau {layer.threshold:g}): {n} mask{'s' if n != 1 else ''}",
                           overlay(image, masks_to_labels(masks))))
    return panels


def prediction_panels(image: np.ndarray, output: Dict, score_threshold: float = 0.5) -> List[Panel]:
    """Overlays of an ``OAPSegmentor`` output: instances with ``score >= score_threshold``
    (highest score on top), the per-pixel semantic cluster, and the panoptic segments."""
    panels = []
    if "instances" in output:
        inst = output["instances"].to("cpu")
        keep = inst.scores >= score_threshold
        order = torch.argsort(inst.scores[keep])  # ascending: best drawn last
        masks = inst.pred_masks[keep][order].numpy()
        panels.append((f"instances (score >= {score_threshold:g}): {masks.shape[0]}",
                       overlay(image, masks_to_labels(masks))))
    if "sem_seg_clusters" in output:
        sem = output["sem_seg_clusters"].cpu().numpy()
        panels.append((f"semantic: {len(np.unique(sem))} clusters", overlay(image, sem)))
    if "panoptic_seg" in output:
        pan, segments = output["panoptic_seg"]
        labels = pan.cpu().numpy().astype(np.int64) - 1
        things = sum(1 for s in segments if s["isthing"])
        panels.append((f"panoptic: {things} things, {len(segments) - things} stuff", overlay(image, labels)))
    return panels


@torch.no_grad()
def oap_demo_panels(model, rgb: np.ndarray, input_format: str = "RGB",
                    score_threshold: float = 0.5) -> List[Panel]:
    """Input, the teacher's OAP pseudo-masks per layer and level, and the model's outputs for one
    RGB uint8 image; ``input_format`` is the model's ``INPUT.FORMAT``."""
    if input_format not in ("RGB", "BGR"):
        raise ValueError(f"INPUT.FORMAT {input_format!r} is not supported by the OAP demo (RGB or BGR)")
    h, w = rgb.shape[:2]
    chw = torch.from_numpy(np.ascontiguousarray(rgb if input_format == "RGB" else rgb[:, :, ::-1])).permute(2, 0, 1)
    was_training = model.training
    model.eval()
    try:
        net = model._inference_network()
        div = getattr(net.backbone, "size_divisibility", 32) or 32
        x = model._normalize(chw)[None]
        ph, pw = -(-h // div) * div, -(-w // div) * div
        x = F.pad(x, (0, pw - w, 0, ph - h))
        fmap = model.teacher_feature_map(x)
        # keep the tokens that cover the image, not the padding
        gh, gw = fmap.shape[-2:]
        fmap = fmap[..., :max(1, round(gh * h / ph)), :max(1, round(gw * w / pw))]
        (pseudo,) = model.generator(fmap)
        output = model([{"image": chw, "height": h, "width": w}])[0]
    finally:
        model.train(was_training)
    panels = [(f"input {w}x{h}", rgb)]
    panels += pseudo_mask_panels(rgb, pseudo)
    panels += prediction_panels(rgb, output, score_threshold)
    return panels
