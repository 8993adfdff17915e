#!/usr/bin/env python
"""Inference time of CAST vs ViT, and CAST's per-part time as in Table 8 of the paper.

    python tools/benchmark.py [--batch 64] [--size 224] [--iters 5] [--warmup 2]
        [--devices cpu cuda] [--models S B] [--sp-workers 0] [--threads N] [--quick] [--save out.md]

For each device (CPU, and CUDA when available) and model size, on one batch of real images
(scikit-image's sample pictures, resized to ``--size``) with SEEDS superpixels (196 per image, the
config's SEEDS settings):

* images/s of CAST-S vs ViT-S/16 and CAST-B vs ViT-B/16 (timm, same width, no head), fp32,
  ``torch.no_grad``, median of ``--iters`` timed batches after ``--warmup`` untimed ones, with
  ``torch.cuda.synchronize`` around every timed region on GPU; CAST and ViT batches alternate, so
  that load changes of a shared machine hit both; the ratio is CAST time / ViT time;
* CAST's per-part time (Table 8): superpixels for the whole batch (SEEDS on the CPU, sequential
  or with ``--sp-workers`` processes), conv stem, superpixel averaging, the blocks of each level,
  each graph pooling and its FPS share. Parts are timed with forward hooks (synchronised on GPU) on
  a separate instrumented pass, so the hooks never slow the end-to-end figures.

Output: markdown tables on stdout (and in ``--save``). ``--quick``: batch 4, 2 timed iterations.
"""
import argparse
import os
import platform
import statistics
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

import hiseg  # noqa: E402,F401  (before torch and detectron2: it quietens their import-time warnings)
import numpy as np  # noqa: E402
import torch  # noqa: E402

SIZES = {
    "S": dict(cast="CAST-S", vit="ViT-S/16", timm="vit_small_patch16_224", embed_dim=384, num_heads=12),
    "B": dict(cast="CAST-B", vit="ViT-B/16", timm="vit_base_patch16_224", embed_dim=768, num_heads=12),
}
SAMPLE_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "immunohistochemistry",
                 "motorcycle_left", "page", "text", "moon", "hubble_deep_field")
MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)


# ------------------------------------------------------------------------------------------------
def sample_batch(batch: int, size: int):
    """(batch, size, size, 3) uint8 RGB: scikit-image's sample pictures, centre-cropped square and
    resized, cycled (each repeat flipped / shifted so that no two images are identical)."""
    import cv2
    import skimage.data
    from hiseg_cast.superpixels import to_rgb_uint8

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
    from hiseg_cast.superpixels import compute_superpixels

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


# ------------------------------------------------------------------------------------------------
class _Sync:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self):
        if self.cuda:
            torch.cuda.synchronize()


def time_interleaved(fns, iters: int, warmup: int, sync):
    """Median seconds of each of ``fns`` over ``iters`` rounds after ``warmup`` rounds; within a
    round the functions run one after the other, so that a change of machine load hits all of them
    alike (fairer ratios on a shared machine)."""
    times = [[] for _ in fns]
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns:
                fn()
        sync()
        for _ in range(iters):
            for i, fn in enumerate(fns):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


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


# ------------------------------------------------------------------------------------------------
def bench_device(device, images_u8, superpixels, args, sp_time):
    from timm import create_model
    from hiseg_cast.modeling.encoder import CASTEncoder

    sync = _Sync(device)
    x = torch.from_numpy(((images_u8.astype(np.float32) - MEAN) / STD).transpose(0, 3, 1, 2).copy()).to(device)
    sp = torch.from_numpy(superpixels).to(device)
    rows, parts = [], {}
    for size in args.models:
        spec = SIZES[size]
        torch.manual_seed(0)
        # nearest token pooling: the paper times its ImageNet models (released classification code)
        enc = CASTEncoder(embed_dim=spec["embed_dim"], num_heads=spec["num_heads"],
                          token_pool_mode="nearest").to(device).eval()
        vit = create_model(spec["timm"], pretrained=False, num_classes=0).to(device).eval()
        t_cast, t_vit = time_interleaved([lambda: enc(x, sp), lambda: vit(x)], args.iters, args.warmup, sync)
        parts[spec["cast"]] = (time_parts(enc, x, sp, args.iters, 1, sync), enc)
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


def main(argv=None):
    from hiseg.cli import ArgumentParser, bounded, check_device, check_output_file

    ap = ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--batch", type=bounded(int, 1), default=64)
    ap.add_argument("--size", type=bounded(int, 1), default=224)
    ap.add_argument("--iters", type=bounded(int, 1), default=5, help="timed iterations (median reported)")
    ap.add_argument("--warmup", type=bounded(int, 0), default=2)
    ap.add_argument("--devices", nargs="+", default=None,
                    help="default: cpu, plus cuda when available")
    ap.add_argument("--models", nargs="+", choices=sorted(SIZES), default=["S", "B"])
    ap.add_argument("--num-superpixels", type=bounded(int, 1), default=196)
    ap.add_argument("--sp-workers", type=bounded(int, 0), default=0,
                    help="processes computing SEEDS (0 = sequential in this process)")
    ap.add_argument("--threads", type=bounded(int, 0), default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--quick", action="store_true", help="batch 4, 2 timed iterations, 1 warm-up")
    ap.add_argument("--save", default="", help="also write the tables (markdown) here")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.iters, args.warmup = 4, 2, 1
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    for d in devices:
        check_device(d, "--devices")  # UsageError: one line, exit status 2
    if args.save:
        check_output_file(args.save, "--save")

    from hiseg_cast.superpixels import SuperpixelConfig
    from detectron2.config import get_cfg
    from hiseg_cast import add_cast_config
    from hiseg_oap import add_oap_config

    cfg = get_cfg()
    add_oap_config(add_cast_config(cfg))
    sp_cfg = SuperpixelConfig.from_cfg(cfg.MODEL.CAST.SUPERPIXEL)
    sp_cfg = SuperpixelConfig(**{**sp_cfg.__dict__, "num_superpixels": args.num_superpixels})

    images = sample_batch(args.batch, args.size)
    sp_time, maps = time_superpixels(images, sp_cfg, args.iters, args.sp_workers)
    m0 = int(np.median([m.max() + 1 for m in maps]))

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    header = [
        f"Command: `python tools/benchmark.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"Batch {args.batch} x {args.size}x{args.size}, fp32, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} logical CPUs, load average {load[0]:.2f} at start), median of {args.iters} after "
        f"{args.warmup} warm-up; superpixels: {sp_cfg.method.upper()} {args.num_superpixels} asked "
        f"(median {m0} per image), {'sequential' if args.sp_workers <= 0 else f'{args.sp_workers} processes'}, "
        f"{1e3 * sp_time:.1f} ms for the batch.",
    ]
    print("\n".join(header), file=sys.stderr, flush=True)
    sections = ["\n".join(header)]
    for d in devices:
        device = torch.device(d)
        name = "CPU" if device.type == "cpu" else torch.cuda.get_device_name(device)
        rows, parts = bench_device(device, images, maps, args, sp_time)
        sections.append(f"### {name}\n\n" + throughput_table(name, rows, args.batch, sp_time))
        for cast_name, (pt, enc) in parts.items():
            sections.append(parts_table(cast_name, name, pt, enc, sp_time, m0))
    text = "\n\n".join(sections)
    print(text)
    if args.save:
        with open(args.save, "w") as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    from hiseg.cli import run_cli

    sys.exit(run_cli(main))  # a bad argument or file: one line on stderr, exit status 2
