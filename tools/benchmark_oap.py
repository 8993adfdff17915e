#!/usr/bin/env python
"""Seconds per image of the OAP pseudo-mask generator versus MaskCut, on the same token maps.

Default: 56 x 56 tokens with 768 channels (the key features of ViT-B/8 on a 448 x 448 image, the
setting of the OAP paper's Table 1), two kinds of synthetic feature maps:

* ``random``: i.i.d. Gaussian features, the worst case for OAP (almost no edge is contracted
  before the last layer, so thousands of supernodes reach every semantic pooling step);
* ``structured``: a piecewise-smooth scene, "stuff" bands plus rectangular "objects" (some of
  them sharing a class direction), with spatially smooth and white noise.

Rows: OAP reference (NumPy/SciPy, float64), OAP fast on the CPU (float32; one image per call and
a batch per call), OAP fast on CUDA when available, and MaskCut (SciPy ``eigh``, no CRF). The
ratio column is MaskCut's time divided by the row's time. The "same" column says whether the
fast implementation's partitions equal the reference's on the images both ran.

Example::

    python tools/benchmark_oap.py --num-images 4 --ref-images 1 --maskcut-images 2
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
from scipy import ndimage

from hiseg.cli import ArgumentParser, bounded
from oap.pooling import MaskCutConfig, OAPConfig, maskcut, oap_fast, oap_reference


def random_features(n, c, h, w, seed):
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


def timed(fn, sync=None):
    if sync:
        sync()
    t0 = time.perf_counter()
    out = fn()
    if sync:
        sync()
    return time.perf_counter() - t0, out


def same_partitions(ra, rb):
    for la, lb in zip(ra.layers, rb.layers):
        for name in ("instance", "semantic"):
            if not torch.equal(la.level(name).partition.cpu(), lb.level(name).partition.cpu()):
                return False
    return True


def counts(results):
    ins = np.mean([sum(len(lay.instance) for lay in r.layers) for r in results])
    sem = np.mean([sum(len(lay.semantic) for lay in r.layers) for r in results])
    return ins, sem


def main(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=bounded(int, 1), nargs=2, default=(56, 56), metavar=("H", "W"))
    ap.add_argument("--dim", type=bounded(int, 1), default=768)
    ap.add_argument("--num-images", type=bounded(int, 1), default=4, help="images for the fast OAP rows")
    ap.add_argument("--ref-images", type=bounded(int, 1), default=1, help="images for the reference row")
    ap.add_argument("--maskcut-images", type=bounded(int, 1), default=2, help="images for the MaskCut row")
    ap.add_argument("--threads", type=bounded(int, 0), default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    h, w = args.size
    n = max(args.num_images, args.ref_images, args.maskcut_images)
    data = {
        "random": random_features(n, args.dim, h, w, args.seed),
        "structured": structured_features(n, args.dim, h, w, args.seed),
    }
    cfg, mcfg = OAPConfig(), MaskCutConfig()
    rows = {}  # row name -> kind -> (sec/img, (ins, sem) mask counts, same-as-reference)

    for kind, x in data.items():
        print(f"[{kind}] running ...", flush=True)
        xr = x[:args.ref_images]
        t, ref = timed(lambda: oap_reference(xr, cfg))
        rows.setdefault("OAP reference (CPU, float64, NumPy/SciPy)", {})[kind] = (
            t / len(xr), counts(ref), None)

        oap_fast(x[:1], cfg)  # warm-up
        times, res1 = [], []
        for i in range(args.num_images):
            ti, r = timed(lambda: oap_fast(x[i:i + 1], cfg))
            times.append(ti)
            res1 += r
        same = all(same_partitions(a, b) for a, b in zip(ref, res1))
        rows.setdefault("OAP fast (CPU, float32, B=1)", {})[kind] = (
            float(np.mean(times)), counts(res1), same)
        xb = x[:args.num_images]
        t, resb = timed(lambda: oap_fast(xb, cfg))
        rows.setdefault(f"OAP fast (CPU, float32, B={len(xb)})", {})[kind] = (
            t / len(xb), counts(resb), all(same_partitions(a, b) for a, b in zip(ref, resb)))

        if torch.cuda.is_available():
            dev = torch.device("cuda")
            sync = torch.cuda.synchronize
            xc = x[:args.num_images].to(dev)
            oap_fast(xc[:1], cfg)
            times, resc = [], []
            for i in range(len(xc)):
                ti, r = timed(lambda: oap_fast(xc[i:i + 1], cfg), sync)
                times.append(ti)
                resc += r
            rows.setdefault(f"OAP fast (CUDA {torch.cuda.get_device_name()}, float32, B=1)",
                            {})[kind] = (float(np.mean(times)), counts(resc),
                                         all(same_partitions(a, b) for a, b in zip(ref, resc)))
            t, resc = timed(lambda: oap_fast(xc, cfg), sync)
            rows.setdefault(f"OAP fast (CUDA, float32, B={len(xc)})", {})[kind] = (
                t / len(xc), counts(resc), all(same_partitions(a, b) for a, b in zip(ref, resc)))

        xm = x[:args.maskcut_images]
        t, mc = timed(lambda: maskcut(xm, mcfg))
        rows.setdefault("MaskCut (CPU, SciPy eigh, N=3, no CRF)", {})[kind] = (
            t / len(xm), counts(mc), None)

    if not torch.cuda.is_available():
        rows["GPU: not measured in this session (no GPU available)"] = {}

    mc_name = "MaskCut (CPU, SciPy eigh, N=3, no CRF)"
    print()
    print(f"tokens {h}x{w}, {args.dim} channels; torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, {platform.processor() or platform.machine()}")
    print(f"images: fast {args.num_images}, reference {args.ref_images}, "
          f"MaskCut {args.maskcut_images} per kind; load average at the end "
          f"{'/'.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs")
    print()
    print("Seconds per image (speed-up = MaskCut's seconds / the row's seconds):")
    print()
    print("| method | " + " | ".join(f"{k}: s/img | {k}: speed-up vs MaskCut" for k in data) + " |")
    print("|---|" + "---:|" * (2 * len(data)))
    for name, per_kind in rows.items():
        cells = []
        for kind in data:
            if kind not in per_kind:
                cells += ["-", "-"]
                continue
            sec = per_kind[kind][0]
            cells += [f"{sec:.3f}", f"{rows[mc_name][kind][0] / sec:.1f}x"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    print("Masks per image (instance / semantic, summed over the layers) and whether the "
          "partitions equal the reference's on the images the reference ran:")
    print()
    print("| method | " + " | ".join(f"{k}: masks | {k}: same as reference" for k in data) + " |")
    print("|---|" + "---|" * (2 * len(data)))
    for name, per_kind in rows.items():
        if not per_kind:
            continue
        cells = []
        for kind in data:
            _, (ni, ns), same = per_kind[kind]
            cells += [f"{ni:.1f} / {ns:.1f}", "-" if same is None else ("yes" if same else "no")]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    import sys

    from hiseg.cli import run_cli

    sys.exit(run_cli(main))
