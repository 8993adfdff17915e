#!/usr/bin/env python
"""Superpixel timing: OpenCV SEEDS and scikit-image SLIC (per-image loops on the CPU) against
``slic_torch`` (one batched call, on the CPU and, when available, on CUDA).

    .venv/bin/python tools/benchmark_superpixels.py [--batch 64] [--size 224] [--num 196]

Images: the skimage sample pictures and, when the shared data folder is there, BSDS500 val
images, centre-cropped and resized to ``size x size``, repeated up to ``batch``. Prints a
markdown table: milliseconds per image (median of ``--repeats`` runs over the whole batch) and
the mean number of superpixels. An unreadable BSDS500 image (truncated, empty, zero-size) is a
warning naming it, is skipped and counted; the exit status is then 1.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np



def load_images(batch: int, size: int, skipped=None):
    """``batch`` pictures; unreadable files are added to ``skipped`` (a ``hiseg.cli.Skipped``)."""
    import cv2
    from skimage import data as skdata

    pictures = [getattr(skdata, n)() for n in ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left")
                if hasattr(skdata, n)]
    pictures = [p if p.ndim == 3 else np.repeat(p[:, :, None], 3, 2) for p in pictures]
    try:
        from hiseg.paths import shared_data_dir

        shared = shared_data_dir()
    except ImportError:
        shared = None
    if shared is not None:
        from hiseg.image_io import InputError, read_image

        files = sorted((shared / "bsds500" / "images" / "val").glob("*.jpg"))[:batch]
        for f in files:
            try:
                pictures.append(read_image(f, format="RGB"))
            except InputError as e:
                if skipped is None:
                    raise
                skipped.add(str(f), str(e))
    out = []
    for p in pictures:
        h, w = p.shape[:2]
        s = min(h, w)
        crop = p[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s, :3]
        out.append(np.ascontiguousarray(cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)))
    while len(out) < batch:
        out += out[:batch - len(out)]
    return out[:batch]


def timed(fn, repeats: int, sync=None):
    times, result = [], None
    for _ in range(repeats):
        if sync:
            sync()
        t = time.perf_counter()
        result = fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--num", type=int, default=196, help="superpixels asked for")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads for the CPU slic_torch row (OpenCV SEEDS and skimage run "
                         "single-threaded per image)")
    ap.add_argument("--no-cuda", action="store_true")
    args = ap.parse_args(argv)

    import cv2
    import torch
    from skimage.segmentation import slic

    from hiseg_cast.superpixels import SuperpixelConfig, compute_superpixels
    from hiseg_cast.superpixels.torch_slic import slic_torch

    from hiseg.cli import Skipped

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)
    skipped = Skipped("image")
    images = load_images(args.batch, args.size, skipped)
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    n = len(images)
    seeds_cfg = SuperpixelConfig(num_superpixels=args.num)  # 15 bins, 20 iterations (MoCo setting)
    rows = []

    def add(name, device, seconds, counts):
        rows.append((name, device, 1000.0 * seconds / n, float(np.mean(counts))))

    sec, maps = timed(lambda: [compute_superpixels(im, seeds_cfg) for im in images], args.repeats)
    add("SEEDS (OpenCV, per image)", "cpu", sec, [m.max() + 1 for m in maps])
    sec, maps = timed(lambda: [slic(im, n_segments=args.num, compactness=10, start_label=0) for im in images],
                      args.repeats)
    add("SLIC (skimage, per image)", "cpu", sec, [m.max() + 1 for m in maps])
    slic_torch(batch[:2], args.num)  # warm-up
    sec, out = timed(lambda: slic_torch(batch, args.num), args.repeats)
    add(f"slic_torch (batch of {n})", f"cpu, {args.threads} thread(s)", sec, (out.flatten(1).max(1).values + 1).tolist())
    if torch.cuda.is_available() and not args.no_cuda:
        gpu = batch.cuda()
        slic_torch(gpu, args.num)  # warm-up
        sec, out = timed(lambda: slic_torch(gpu, args.num), args.repeats, sync=torch.cuda.synchronize)
        add(f"slic_torch (batch of {n})", torch.cuda.get_device_name(), sec,
            (out.flatten(1).max(1).values + 1).tolist())

    print(f"{n} images {args.size}x{args.size}, {args.num} superpixels asked, median of {args.repeats} runs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print()
    print("| method | device | ms / image | superpixels (mean) |")
    print("|---|---|---:|---:|")
    for name, device, ms, count in rows:
        print(f"| {name} | {device} | {ms:.1f} | {count:.1f} |")
    if not (torch.cuda.is_available() and not args.no_cuda):
        print("\n(no CUDA device: GPU not measured)")
    skipped.finish(len(skipped) + n)  # the count of skipped images, exit status 1


if __name__ == "__main__":
    from hiseg.cli import run_cli

    sys.exit(run_cli(main))
