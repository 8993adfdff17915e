"""Timing the pseudo-mask generators side by side (used by ``tools/benchmark_oap.py``).

* :func:`random_features`, :func:`structured_features`: synthetic token maps.
* :func:`efficientnet_image_features`: real features, the pretrained EfficientNet-Lite0 maps of
  image files (read and resized as ``tools/generate_pseudo_masks.py`` does: RGB, square side
  bilinear with antialiasing, ``(x - 127) / 128``).
* :func:`time_interleaved`: seconds per image of several generators on the same feature maps,
  run image by image in turn (the start rotates from image to image), so that a change in the
  machine's load hits every method alike; every thread pool pinned to one count
  (:func:`hiseg.threads.pinned_threads`), one warm-up call per method first.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from hiseg.threads import pinned_threads

__all__ = ["random_features", "structured_features", "efficientnet_image_features", "timed",
           "time_interleaved", "same_partitions", "mask_counts"]


def random_features(n, c, h, w, seed):
    """``(n, c, h, w)`` i.i.d. Gaussian features (OAP's worst case: almost nothing merges)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g)


def structured_features(n, c, h, w, seed):
    """Piecewise-smooth synthetic scenes with a hierarchy.

    2-3 horizontal "stuff" bands and 3-6 rectangular objects of 2 parts each (the parts'
    directions are their class direction plus a part-specific offset, so parts separate at high
    thresholds and join at lower ones; objects may share a class), plus spatially smooth noise,
    drawn independently for every region, and white noise.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        classes = rng.standard_normal((8, c))
        classes /= np.linalg.norm(classes, axis=1, keepdims=True)
        dirs = [classes[k] for k in range(3)]            # stuff classes 0..2
        labels = np.zeros((h, w), dtype=np.int64)
        cuts = np.sort(rng.choice(np.arange(h // 5, h - h // 5), size=rng.integers(1, 3),
                                  replace=False))
        for k, r in enumerate(cuts):
            labels[r:] = k + 1
        for _ in range(rng.integers(3, 7)):              # objects of classes 3..7
            cls = classes[rng.integers(3, 8)]
            oh, ow = rng.integers(h // 8, h // 3, size=2)
            r0, c0 = rng.integers(0, h - oh), rng.integers(0, w - ow)
            split = r0 + oh // 2
            for rows in (slice(r0, split), slice(split, r0 + oh)):
                part = cls + 1.2 * rng.standard_normal(c) / np.sqrt(c)
                dirs.append(part / np.linalg.norm(part))
                labels[rows, c0:c0 + ow] = len(dirs) - 1
        f = np.stack(dirs)[labels]                        # (h, w, c)
        for k in np.unique(labels):
            smooth = ndimage.gaussian_filter(rng.standard_normal((h, w, c)), (3.0, 3.0, 0))
            f[labels == k] += (0.025 / smooth.std()) * smooth[labels == k]
        f += 0.01 * rng.standard_normal((h, w, c))
        out.append(torch.from_numpy(f.transpose(2, 0, 1)).float())
    return torch.stack(out)


@torch.no_grad()
def efficientnet_image_features(paths: Sequence[str], size: int = 448,
                                layers: Optional[Sequence[str]] = None) -> torch.Tensor:
    """``(len(paths), C, h, w)`` EfficientNet-Lite0 features of image files at ``size x size``
    (default layers ``block10`` + ``head``: stride 16, 28 x 28 at 448; ``block4 block10 head``:
    stride 8, 56 x 56). ``size`` must be a multiple of the coarsest layer's stride."""
    from hiseg.image_io import read_image

    from hiseg.modeling.efficientnet_lite0 import (
        EFFICIENTNET_LITE0_MEAN, EFFICIENTNET_LITE0_STD, build_efficientnet_lite0_features,
    )

    model = build_efficientnet_lite0_features(*([tuple(layers)] if layers else []))
    if size % model.max_stride:
        raise ValueError(f"size {size} is not a multiple of the coarsest layer's stride {model.max_stride}")
    mean = torch.tensor(EFFICIENTNET_LITE0_MEAN).view(3, 1, 1)
    std = torch.tensor(EFFICIENTNET_LITE0_STD).view(3, 1, 1)
    out = []
    for p in paths:
        x = torch.from_numpy(np.array(read_image(p, format="RGB"), dtype=np.uint8)).permute(2, 0, 1).float()
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(model((x - mean) / std)[0])
    return torch.stack(out)


def timed(fn: Callable, sync: Optional[Callable] = None):
    """``(seconds, fn())``, with ``sync`` (e.g. ``torch.cuda.synchronize``) before and after."""
    if sync:
        sync()
    t0 = time.perf_counter()
    out = fn()
    if sync:
        sync()
    return time.perf_counter() - t0, out


def time_interleaved(features: torch.Tensor, methods: Mapping[str, Callable[[torch.Tensor], object]],
                     threads: int = 1, sync: Optional[Callable] = None,
                     ) -> Tuple[Dict[str, List[float]], Dict[str, list], List[Dict]]:
    """Seconds per image of every method on ``features`` (``(B, C, h, w)``), one image per call.

    Image ``i`` runs the methods in the order of ``methods`` rotated by ``i``. Returns
    ``(seconds, outputs, pools)``: per method the list of per-image seconds and outputs, and the
    thread pools as they were set (:func:`hiseg.threads.thread_pools`).
    """
    names = list(methods)
    seconds: Dict[str, List[float]] = {n: [] for n in names}
    outputs: Dict[str, list] = {n: [] for n in names}
    with pinned_threads(threads) as pools:
        for n in names:  # warm-up (first-call allocations, lazy imports)
            methods[n](features[:1])
        for i in range(features.shape[0]):
            x = features[i:i + 1]
            k = i % len(names)
            for n in names[k:] + names[:k]:
                t, out = timed(lambda: methods[n](x), sync)
                seconds[n].append(t)
                outputs[n].append(out)
    return seconds, outputs, pools


def same_partitions(ra, rb) -> bool:
    """Whether two :class:`PseudoMasks` have the same partitions at every layer and level."""
    for la, lb in zip(ra.layers, rb.layers):
        for name in ("instance", "semantic"):
            if not torch.equal(la.level(name).partition.cpu(), lb.level(name).partition.cpu()):
                return False
    return True


def mask_counts(results) -> Tuple[float, float]:
    """Mean masks per image (instance, semantic), summed over the layers."""
    ins = np.mean([sum(len(lay.instance) for lay in r.layers) for r in results])
    sem = np.mean([sum(len(lay.semantic) for lay in r.layers) for r in results])
    return float(ins), float(sem)
