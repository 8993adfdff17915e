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

import glob
import os
import platform

import numpy as np
import torch

from hiseg.cli import ArgumentParser, bounded
from hiseg.errors import UsageError
from hiseg.threads import pinned_threads
from hiseg_oap.pooling import MaskCutConfig, OAPConfig, maskcut, oap_fast, oap_reference, uniap_fast
from hiseg_oap.pooling.benchmark import (
    efficientnet_image_features, mask_counts as counts, random_features, same_partitions, structured_features,
    time_interleaved, timed,
)


def pools_line(pools=None) -> str:
    from hiseg.threads import thread_pools

    return "threads: " + ", ".join(f"{p['api']}/{p['library']} {p['num_threads']}" for p in (pools or thread_pools()))


def real(args):
    """Interleaved timing on EfficientNet-Lite0 features of real images."""
    paths = sorted({p for pat in args.images for p in (glob.glob(os.path.join(pat, "*.jpg"))
                                                       if os.path.isdir(pat) else glob.glob(pat))})
    if not paths:
        raise UsageError(f"--images {' '.join(args.images)}: no image found")
    paths = paths[:args.num_images]
    try:
        feats = efficientnet_image_features(paths, args.input_size, args.effnet_layers)
    except (ImportError, ValueError) as e:
        raise UsageError(f"EfficientNet-Lite0 features: {e}") from e
    methods = {
        "OAP Alg. 1 fast": lambda x: oap_fast(x, OAPConfig()),
        "UniAP fast": lambda x: uniap_fast(x),
        "MaskCut": lambda x: maskcut(x, MaskCutConfig()),
    }
    secs, outs, pools = time_interleaved(feats, methods, threads=args.threads)
    print(f"{len(paths)} images, features {tuple(feats.shape[1:])}; {pools_line(pools)} (while timing); "
          f"load average {'/'.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs")
    print()
    print("| method | ms/img (mean) | ms/img (median) | MaskCut's time / row's | instance masks/img |")
    print("|---|---:|---:|---:|---:|")
    mc = float(np.mean(secs["MaskCut"]))
    for name in methods:
        t = float(np.mean(secs[name]))
        print(f"| {name} | {1000 * t:.1f} | {1000 * float(np.median(secs[name])):.1f} | {mc / t:.1f}x | "
              f"{counts([r for out in outs[name] for r in out])[0]:.1f} |")


def main(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=bounded(int, 1), nargs=2, default=(56, 56), metavar=("H", "W"))
    ap.add_argument("--dim", type=bounded(int, 1), default=768)
    ap.add_argument("--num-images", type=bounded(int, 1), default=4,
                    help="images for the fast OAP rows (with --images: images)")
    ap.add_argument("--ref-images", type=bounded(int, 1), default=1, help="images for the reference row")
    ap.add_argument("--maskcut-images", type=bounded(int, 1), default=2, help="images for the MaskCut row")
    ap.add_argument("--threads", type=bounded(int, 0), default=0,
                    help="threads of every pool: torch's and the BLAS / OpenMP libraries' (0: as they are)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", nargs="+", default=None, metavar="PATTERN",
                    help="real images (files, globs or folders of .jpg): time OAP Alg. 1, UniAP and MaskCut "
                         "interleaved on their EfficientNet-Lite0 features instead of synthetic maps")
    ap.add_argument("--input-size", type=bounded(int, 1), default=448, help="with --images: square input side")
    ap.add_argument("--effnet-layers", nargs="+", default=None, metavar="LAYER",
                    help="with --images: EfficientNet-Lite0 layers (default block10 head: 28 x 28 at 448; "
                         "block4 block10 head: 56 x 56)")
    args = ap.parse_args(argv)
    if args.images:
        return real(args)
    with pinned_threads(args.threads):
        return synthetic(args)


def synthetic(args):
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
        uniap_fast(x[:1])  # warm-up
        t, resu = timed(lambda: [r for i in range(args.num_images) for r in uniap_fast(x[i:i + 1])])
        rows.setdefault("UniAP fast (released variant; CPU, float32, B=1)", {})[kind] = (
            t / args.num_images, counts(resu), None)
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
          f"{pools_line()}, {platform.processor() or platform.machine()}")
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
