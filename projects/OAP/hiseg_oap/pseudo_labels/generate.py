"""The per-image loop of ``tools/generate_pseudo_masks.py``: each image read, resized for the
feature source, batched with images of the same input size, turned into features and pseudo-masks
(OAP or MaskCut, :func:`build_pseudo_mask_generator`), exported as COCO result entries at its
original (or recorded) size and filtered, and pictured (:func:`generate_results`).

An image that cannot be read or processed (missing, empty, truncated, not an image, out of
memory) costs only itself: a warning naming it, a line in :attr:`Generated.failures`; the other
images go on.
"""
from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from hiseg.cli import one_line
from hiseg.errors import UsageError, UserError
from hiseg.image_io import InputError

from ..pooling import flatten_normalized
from .export import pseudo_masks_to_results
from .filtering import DEFAULT_MAX_AREA_FRACTION, DEFAULT_MAX_PER_IMAGE, filter_results
from .overlays import save_overlays
from .preprocess import preprocess, read_rgb, target_size

__all__ = ["warn", "build_pseudo_mask_generator", "Generated", "generate_results"]


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def build_pseudo_mask_generator(method: str = "oap", maskcut_tau: float = 0.15, num_masks: int = 3, **oap_options):
    """(generator, number of layers, the kinds it fills): OAP
    (:func:`~hiseg_oap.pooling.build_oap_generator` of ``oap_options``: ``variant``, ``impl``,
    ``thresholds``, ``phi``, ...; a bad setting raises UsageError) or MaskCut (one layer,
    ``instance`` only)."""
    from ..pooling import MaskCutConfig, build_generator, build_oap_generator

    if method == "oap":
        try:
            gen = build_oap_generator(**oap_options)
        except ValueError as e:
            raise UsageError(str(e)) from e
        return gen, len(gen.config.thresholds), ("instance", "semantic")
    cfg = MaskCutConfig(tau=maskcut_tau, num_masks=num_masks)
    return build_generator("maskcut", config=cfg), 1, ("instance",)


@dataclass
class Generated:
    """What :func:`generate_results` made."""

    #: COCO result entries of every image written, in image order
    results: List[dict] = field(default_factory=list)
    #: the images written: ``id``, ``file_name``, ``height``, ``width`` (the masks' size)
    images: List[dict] = field(default_factory=list)
    #: one line per image skipped (file name and problem)
    failures: List[str] = field(default_factory=list)
    #: masks written per ``(kind, layer)``
    counts: Counter = field(default_factory=Counter)
    #: seconds spent computing features and pseudo-masks, all images together
    seconds: Dict[str, float] = field(default_factory=lambda: {"features": 0.0, "generator": 0.0})
    #: the names of the pictured images (file stems)
    pictures: set = field(default_factory=set)

    def summary(self, levels: Sequence[Tuple[str, int]], method: str, device, batch_size: int) -> List[str]:
        """The lines printed after the results are written: masks per level, seconds per image of
        the features and of the generator (at least one image written)."""
        done = len(self.images)
        lines = []
        if self.counts:
            lines.append("masks per level: " + ", ".join(f"{k} L{l}: {self.counts[(k, l)]}" for k, l in levels))
        lines.append(f"seconds per image: features {self.seconds['features'] / done:.4f}, {method} "
                     f"{self.seconds['generator'] / done:.4f} ({device}, batch {batch_size})")
        return lines

    def failure_report(self, total: int) -> str:
        """The closing lines naming every skipped image (``total``: the images asked for)."""
        return (f"{len(self.failures)} image(s) could not be read or processed and were skipped "
                f"({len(self.images)} of {total} written):\n  " + "\n  ".join(self.failures))


def generate_results(
    items, source, generator, levels: Sequence[Tuple[str, int]], device: torch.device, *,
    score: str = "coherence", upsample: str = "bilinear", unique: bool = False,
    max_area_fraction: Optional[float] = DEFAULT_MAX_AREA_FRACTION,
    max_per_image: Optional[int] = DEFAULT_MAX_PER_IMAGE, input_size: int = 448, keep_aspect: bool = False,
    batch_size: int = 1, method: str = "oap", vis_dir: Optional[str] = None, max_vis: int = 8,
    vis_size: int = 512, progress: bool = True,
) -> Generated:
    """Pseudo-masks of ``items`` (:class:`~hiseg_oap.pseudo_labels.inputs.Item`) from ``source``'s
    features (:mod:`~hiseg_oap.pseudo_labels.feature_sources`, already on ``device``) and
    ``generator`` (:func:`build_pseudo_mask_generator`), as COCO result entries of the ``levels``
    (:func:`~hiseg_oap.pseudo_labels.pseudo_masks_to_results` with ``score`` / ``upsample`` /
    ``unique``, then :func:`~hiseg_oap.pseudo_labels.filter_results`). Inputs: ``input_size``
    (:func:`~hiseg_oap.pseudo_labels.preprocess.target_size`), at most ``batch_size`` images of
    one size per batch. ``vis_dir``: pictures of the first ``max_vis`` images
    (:func:`~hiseg_oap.pseudo_labels.overlays.save_overlays`)."""
    from tqdm import tqdm

    out = Generated()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pbar = tqdm(total=len(items), desc=f"{method} pseudo-masks", unit="img", disable=not progress,
                file=sys.stderr, dynamic_ncols=True)
    batch: list = []

    def skip(file_name: str, e: Exception) -> None:
        """An image that could not be processed (e.g. too large for this machine's memory):
        warned about now, counted in the summary; the other images go on."""
        out.failures.append(f"{file_name}: could not be processed ({type(e).__name__}: {one_line(e)[:300]})")
        pbar.write(f"warning: {out.failures[-1]}; skipped", file=sys.stderr)

    def flush():
        if not batch:
            return
        try:
            x = torch.stack([b[2] for b in batch]).to(device)
            sync()
            t0 = time.perf_counter()
            feats = source(x)
            sync()
            t1 = time.perf_counter()
            pseudo = generator(feats)
            sync()
            t2 = time.perf_counter()
            tokens = flatten_normalized(feats)[0] if score == "coherence" else None
        except (RuntimeError, MemoryError) as e:  # out of memory for this batch: its images are skipped
            for item, *_ in batch:
                skip(item.file_name, e)
            pbar.update(len(batch))
            batch.clear()
            return
        out.seconds["features"] += t1 - t0
        out.seconds["generator"] += t2 - t1
        for j, (item, img, _x, out_size) in enumerate(batch):
            try:
                res = pseudo_masks_to_results(pseudo[j], item.image_id, out_size, levels,
                                              None if tokens is None else tokens[j], score, upsample,
                                              unique=unique)
                res = filter_results(res, max_area_fraction, max_per_image)
                if vis_dir and len(out.pictures) < max_vis:
                    stem = os.path.splitext(os.path.basename(item.file_name))[0]
                    name = stem if stem not in out.pictures else f"{stem}_{item.image_id}"
                    save_overlays(vis_dir, name, img, pseudo[j], levels, method, upsample, vis_size)
                    out.pictures.add(name)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001  (one image must not cost the others their results)
                skip(item.file_name, e)
                continue
            out.results.extend(res)
            for r in res:
                out.counts[(r["level"], r["layer"])] += 1
            out.images.append({"id": item.image_id, "file_name": item.file_name,
                               "height": int(out_size[0]), "width": int(out_size[1])})
        pbar.update(len(batch))
        batch.clear()

    size_warned = False
    for item in items:
        try:
            img = read_rgb(item.file_name)
        except InputError as e:
            out.failures.append(str(e))
            pbar.write(f"warning: {e}; skipped", file=sys.stderr)
            pbar.update(1)
            continue
        out_size = (item.height, item.width) if item.height and item.width else img.shape[:2]
        if tuple(out_size) != tuple(img.shape[:2]) and not size_warned:
            warn(f"{item.file_name}: read as {img.shape[1]}x{img.shape[0]} but recorded as "
                 f"{out_size[1]}x{out_size[0]}; masks are written at the recorded size")
            size_warned = True
        size = target_size(img.shape[0], img.shape[1], input_size, source.multiple, keep_aspect)
        try:
            x = preprocess(img, size, source.mean, source.std, source.bgr)
        except (RuntimeError, MemoryError) as e:
            skip(item.file_name, e)
            pbar.update(1)
            continue
        if batch and (batch[0][2].shape != x.shape or len(batch) >= batch_size):
            flush()
        batch.append((item, img, x, out_size))
    flush()
    pbar.close()
    return out
