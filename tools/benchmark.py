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
import sys

import hiseg  # noqa: F401  (before torch and detectron2: it quietens their import-time warnings)
import numpy as np
import torch

from hiseg_cast.benchmark import SIZES, bench_device, parts_table, sample_batch, throughput_table, time_superpixels


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
        rows, parts = bench_device(device, images, maps, args.models, args.iters, args.warmup)
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
