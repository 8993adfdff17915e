"""Inference time of CAST against the ViT of the same width, and CAST's time per part (Table 8 of
the paper): what ``tools/benchmark.py`` prints, and the pictures and part timer the GPU check
(``dev/gpucheck``) reuses.

* :func:`sample_batch`: a batch of scikit-image's sample pictures (real images, no download);
* :func:`time_superpixels`: the superpixels of a batch on the CPU, sequential or in processes;
* :class:`PartTimer` / :func:`time_parts`: the seconds of each part of an encoder's forward pass
  (conv stem, segment tokens, the blocks of each level, each graph pooling and its FPS), from
  forward hooks that synchronise the device around every part, on a separate instrumented pass;
* :func:`bench_device`: CAST-S / CAST-B against ViT-S/16 / ViT-B/16 (timm) on one device, the
  calls alternating (:func:`hiseg.benchmark.time_interleaved`), and the per-part pass;
  :func:`throughput_table` and :func:`parts_table` write them as markdown.
"""
import statistics
import sys
import time
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch

from hiseg.benchmark import Sync, normalize, time_interleaved

__all__ = ["SIZES", "SAMPLE_IMAGES", "sample_batch", "time_superpixels", "PartTimer", "time_parts", "bench_device",
           "throughput_table", "parts_table"]

SIZES = {
    "S": dict(cast="CAST-S", vit="ViT-S/16", timm="vit_small_patch16_224", embed_dim=384, num_heads=12),
    "B": dict(cast="CAST-B", vit="ViT-B/16", timm="vit_base_patch16_224", embed_dim=768, num_heads=12),
}
SAMPLE_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "immunohistochemistry",
                 "motorcycle_left", "page", "text", "moon", "hubble_deep_field")


def sample_batch(batch: int, size: int):
    """(batch, size, size, 3) uint8 RGB: scikit-image's sample pictures, centre-cropped square and
    resized, cycled (each repeat flipped / shifted so that no two images are identical)."""
    import cv2
    import skimage.data

    from .superpixels import to_rgb_uint8

    base = []
    for name in SAMPLE_IMAGES:
        try:
            img = to_rgb_uint8(np.asarray(getattr(skimage.data, name)()))
        except Exception:  # noqa: BLE001  (a picture that needs a download is skipped)
            continue
        h, w = img.shape[:2]
        s = min(h, w)
        y, x = (h - s) // 2, (w - s) // 2
        base.append(cv2.resize(img[y:y + s, x:x + s], (size, size), interpolation=cv2.INTER_AREA))
    if not base:
        raise SystemExit("no scikit-image sample picture could be loaded")
    out = []
    for i in range(batch):
        img, rep = base[i % len(base)], i // len(base)
        if rep % 2:
            img = img[:, ::-1]
        if rep >= 2:
            img = np.roll(img, 8 * (rep // 2), axis=0)
        out.append(np.ascontiguousarray(img))
    return np.stack(out)


def _superpixels_one(args):
    img, cfg = args
    from .superpixels import compute_superpixels

    return compute_superpixels(img, cfg)


def time_superpixels(images, cfg, iters: int, workers: int):
    """Median seconds to compute the superpixels of the whole batch, and the label maps."""
    pool = None
    if workers > 0:
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(workers)
        list(pool.map(_superpixels_one, [(images[0], cfg)] * workers))  # start the workers
    times, maps = [], None
    try:
        for _ in range(max(1, iters)):
            t0 = time.perf_counter()
            if pool is None:
                maps = [_superpixels_one((im, cfg)) for im in images]
            else:
                maps = list(pool.map(_superpixels_one, [(im, cfg) for im in images], chunksize=4))
            times.append(time.perf_counter() - t0)
    finally:
        if pool is not None:
            pool.shutdown()
    return statistics.median(times), np.stack(maps)


class PartTimer:
    """Wall time of named parts of a CAST encoder's forward, accumulated per pass."""

    def __init__(self, encoder, sync):
        self.enc, self.sync = encoder, sync
        self.acc = defaultdict(float)
        self._start = {}
        self._handles, self._patched = [], []
        self._level_of_block = {}
        start = 0
        for g, d in enumerate(encoder.depths):
            for i in range(start, start + d):
                self._level_of_block[i] = g
            start += d

    def _begin(self, key):
        self.sync()
        self._start[key] = time.perf_counter()

    def _end(self, key):
        self.sync()
        self.acc[key] += time.perf_counter() - self._start.pop(key)

    def _hook(self, module, key):
        self._handles.append(module.register_forward_pre_hook(lambda m, i: self._begin(key)))
        self._handles.append(module.register_forward_hook(lambda m, i, o: self._end(key)))

    def _wrap(self, obj, name, key):
        orig = getattr(obj, name)

        def timed(*a, **k):
            self._begin(key)
            try:
                return orig(*a, **k)
            finally:
                self._end(key)

        setattr(obj, name, timed)  # instance attribute shadows the method
        self._patched.append((obj, name))

    def __enter__(self):
        self._hook(self.enc.stem, "stem")
        self._wrap(self.enc, "segment_tokens", "segment_tokens")
        for i, blk in enumerate(self.enc.blocks):
            self._hook(blk, ("blocks", self._level_of_block[i]))
        for g, pool in enumerate(self.enc.pools):
            self._hook(pool, ("pool", g))
            self._wrap(pool, "sample_centroids", ("fps", g))
        self._hook(self.enc, "total")
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        for obj, name in self._patched:
            delattr(obj, name)
        self._handles, self._patched = [], []


def time_parts(encoder, images, superpixels, iters: int, warmup: int, sync):
    """Seconds per part of the instrumented pass whose total is the median of ``iters`` passes
    (one pass, so that its parts add up)."""
    runs = []
    with torch.no_grad(), PartTimer(encoder, sync) as pt:
        for it in range(warmup + iters):
            pt.acc.clear()
            encoder(images, superpixels)
            if it >= warmup:
                runs.append(dict(pt.acc))
    runs.sort(key=lambda r: r.get("total", 0.0))
    return runs[(len(runs) - 1) // 2]


def bench_device(device, images_u8, superpixels, models: Sequence[str], iters: int, warmup: int):
    """CAST of each size in ``models`` (:data:`SIZES`, random weights, nearest token pooling)
    against timm's ViT of the same width on ``device``: ``([{size, t_cast, t_vit}], {CAST name:
    (part times, encoder)})``, the median seconds per batch of ``images_u8`` (N, H, W, 3) with the
    given ``superpixels`` after ``warmup`` rounds, and one instrumented pass per model."""
    from timm import create_model

    from .modeling.encoder import CASTEncoder

    sync = Sync(device)
    x = normalize(torch.from_numpy(images_u8).permute(0, 3, 1, 2)).to(device)
    sp = torch.from_numpy(superpixels).to(device)
    rows, parts = [], {}
    for size in models:
        spec = SIZES[size]
        torch.manual_seed(0)
        # nearest token pooling: the paper times its ImageNet models (released classification code)
        enc = CASTEncoder(embed_dim=spec["embed_dim"], num_heads=spec["num_heads"],
                          token_pool_mode="nearest").to(device).eval()
        vit = create_model(spec["timm"], pretrained=False, num_classes=0).to(device).eval()
        t_cast, t_vit = time_interleaved([lambda: enc(x, sp), lambda: vit(x)], iters, warmup, device)
        parts[spec["cast"]] = (time_parts(enc, x, sp, iters, 1, sync), enc)
        del enc, vit
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(dict(size=size, t_cast=t_cast, t_vit=t_vit))
        print(f"  [{device}] {spec['cast']}: {1e3 * t_cast:.1f} ms/batch, {spec['vit']}: "
              f"{1e3 * t_vit:.1f} ms/batch", file=sys.stderr, flush=True)
    return rows, parts


def throughput_table(device_name, rows, batch, sp_time):
    out = [f"| device | model | ms / batch of {batch} | images/s | ViT model | ms / batch | images/s | "
           f"CAST/ViT time | CAST + SEEDS images/s | (CAST + SEEDS)/ViT time |",
           "|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        spec = SIZES[r["size"]]
        tc, tv = r["t_cast"], r["t_vit"]
        out.append(f"| {device_name} | {spec['cast']} | {1e3 * tc:.1f} | {batch / tc:.1f} | {spec['vit']} | "
                   f"{1e3 * tv:.1f} | {batch / tv:.1f} | {tc / tv:.2f} | {batch / (tc + sp_time):.1f} | "
                   f"{(tc + sp_time) / tv:.2f} |")
    return "\n".join(out)


def parts_table(name, device_name, part_times, enc, sp_time, m0):
    """Table 8 layout: one row per level (tokens, encoder blocks, graph pool (FPS))."""
    ms = lambda s: f"{1e3 * s:.1f}"  # noqa: E731
    pt = part_times
    stem = pt.get("stem", 0.0)
    seg = pt.get("segment_tokens", 0.0) - stem
    out = [f"**{name} on {device_name}** (ms per batch; superpixels on the CPU)", "",
           "| part | # tokens | encoder blocks | graph pool | of which FPS |", "|---|---:|---:|---:|---:|",
           f"| superpixels (SEEDS, whole batch) | {m0} | {ms(sp_time)} | | |",
           f"| conv stem | - | {ms(stem)} | | |",
           f"| superpixel averaging (segment tokens) | {m0} | {ms(seg)} | | |"]
    tokens = [m0] + list(enc.num_segments[:-1])
    summed = stem + seg
    for g in range(len(enc.depths)):
        b = pt.get(("blocks", g), 0.0)
        p = pt.get(("pool", g), 0.0)
        f = pt.get(("fps", g), 0.0)
        summed += b + p
        tag = " (read-out)" if g == len(enc.depths) - 1 else ""
        out.append(f"| level {g}: {enc.depths[g]} blocks, pool to {enc.num_segments[g]}{tag} | {tokens[g]} | "
                   f"{ms(b)} | {ms(p)} | {ms(f)} |")
    total = pt.get("total", 0.0)
    out.append(f"| other (concat, hierarchy, norm) | | {ms(max(0.0, total - summed))} | | |")
    out.append(f"| **total (instrumented pass)** | | **{ms(total)}** | | |")
    return "\n".join(out)


