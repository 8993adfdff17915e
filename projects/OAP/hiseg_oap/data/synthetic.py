"""Synthetic OAP training batches: shaped as ``OAPMultiCropDatasetMapper`` makes them (a global
view, local views cropped from it with their boxes and flips), with pictures of smooth random
colour blobs, so that OAP finds regions in them. For timing and memory measurements of a training
step with random weights (``tools/benchmark_oap_step.py``, the GPU check), where the step's cost
does not depend on what the pictures show."""
from typing import Dict, List

import torch
import torch.nn.functional as F

__all__ = ["blob_images", "synthetic_batch"]


def blob_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 3, size, size) uint8 pictures of smooth colour blobs (upsampled 6x6 noise)."""
    low = torch.rand(n, 3, 6, 6, generator=generator)
    img = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return (img * 255).to(torch.uint8)


def synthetic_batch(batch: int, size: int, crops: int, local: int, generator: torch.Generator) -> List[Dict]:
    """``batch`` dataset dicts: a ``size`` x ``size`` global view and ``crops`` local views of
    ``local`` x ``local`` (random square boxes of 5-40% of its area, not flipped), drawn from
    ``generator``."""
    images = blob_images(batch, size, generator)
    out = []
    for b in range(batch):
        boxes, views = [], []
        for _ in range(crops):
            side = int(size * (0.05 + 0.35 * float(torch.rand((), generator=generator))) ** 0.5)
            x0 = int(torch.randint(0, size - side + 1, (), generator=generator))
            y0 = int(torch.randint(0, size - side + 1, (), generator=generator))
            boxes.append([x0, y0, x0 + side, y0 + side])
            crop = images[b:b + 1, :, y0:y0 + side, x0:x0 + side].float()
            views.append(F.interpolate(crop, size=(local, local), mode="bilinear", align_corners=False)[0])
        out.append({
            "image": images[b], "height": size, "width": size,
            "local_images": torch.stack(views).round().clamp(0, 255).to(torch.uint8),
            "local_boxes": torch.tensor(boxes, dtype=torch.float32),
            "local_flips": torch.zeros(crops, dtype=torch.bool),
        })
    return out
