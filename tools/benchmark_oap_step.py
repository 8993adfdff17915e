#!/usr/bin/env python
"""Training-step time of the OAP universal segmenter and the share spent in OAP (Sec. 5.1 setting).

    python tools/benchmark_oap_step.py [--config-file configs/OAP/oap_vit_b8_in1k.yaml]
        [--batch 16] [--size 448] [--local-crops 4] [--local-size 224] [--steps 5] [--warmup 2]
        [--device cuda] [--opts KEY VALUE ...]

Builds the config's model (random weights: the step time does not depend on them, the number of
pseudo-masks does a little), feeds synthetic multi-crop batches shaped as OAPMultiCropDatasetMapper
makes them (the pictures are smooth random blobs, so OAP finds regions), and times full training
steps: teacher EMA + teacher encoder + OAP + student forward + losses + backward + AdamW step.
It prints a table: seconds per step, per image, and the teacher / OAP shares, from the model's
own timers (``oap/teacher_seconds``, ``oap/pooling_seconds``, synchronised on CUDA).
"""
import argparse
import os
import statistics
import sys
import time

import hiseg  # noqa: F401  (before torch and detectron2: it quietens their import-time warnings)
import torch

from hiseg_oap.data.synthetic import synthetic_batch

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=os.path.join(REPO, "configs", "OAP", "oap_vit_b8_in1k.yaml"))
    p.add_argument("--batch", type=int, default=16, help="images per step (global views)")
    p.add_argument("--size", type=int, default=448, help="global view size")
    p.add_argument("--local-crops", type=int, default=None, help="local views per image (default: config)")
    p.add_argument("--local-size", type=int, default=None, help="local view size (default: config)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE ...")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from hiseg.cli import check_device, merge_config
    from hiseg.engine import build_hiseg_optimizer
    from hiseg_cast import add_cast_config
    from hiseg_oap import add_oap_config

    check_device(args.device)  # UsageError: one line, exit status 2
    cfg = add_oap_config(add_cast_config(get_cfg()))
    merge_config(cfg, args.config_file, list(args.opts))  # a bad file / key: one line, status 2
    cfg.MODEL.DEVICE = args.device
    cfg.MODEL.WEIGHTS = ""
    crops = args.local_crops or cfg.INPUT.OAP.NUM_LOCAL_CROPS
    local = args.local_size or cfg.INPUT.OAP.LOCAL_SIZE
    torch.manual_seed(args.seed)
    model = build_model(cfg)
    model.train()
    optimizer = build_hiseg_optimizer(cfg, model)
    gen = torch.Generator().manual_seed(args.seed)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    rows = []
    with EventStorage(0) as storage:
        for it in range(args.warmup + args.steps):
            data = synthetic_batch(args.batch, args.size, crops, local, gen)
            storage.iter = it
            sync()
            t0 = time.perf_counter()
            losses = model(data)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sync()
            step = time.perf_counter() - t0
            latest = storage.latest()
            teacher = latest["oap/teacher_seconds"][0]
            pooling = latest["oap/pooling_seconds"][0]
            targets = latest["oap/instance_targets_per_view"][0]
            print(f"step {it}{' (warm-up)' if it < args.warmup else ''}: {step:.3f} s, teacher {teacher:.3f} s, "
                  f"OAP {pooling:.3f} s, loss {float(loss.detach()):.3f}", flush=True)
            if it >= args.warmup:
                rows.append((step, teacher, pooling, targets))
    step = statistics.median(r[0] for r in rows)
    teacher = statistics.median(r[1] for r in rows)
    pooling = statistics.median(r[2] for r in rows)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    threads = torch.get_num_threads()
    print()
    print(f"OAP training step, {os.path.relpath(args.config_file, REPO)}: batch {args.batch} x {args.size}^2 global "
          f"+ {crops} x {local}^2 local views; ViT {cfg.MODEL.VIT.EMBED_DIM}-d depth {cfg.MODEL.VIT.DEPTH} "
          f"patch {cfg.MODEL.VIT.PATCH_SIZE}; {dev} ({threads} threads); median of {len(rows)} steps")
    print("| measure | seconds | per image | share of step |")
    print("|---|---|---|---|")
    print(f"| training step | {step:.3f} | {step / args.batch:.4f} | 100% |")
    print(f"| teacher (encoder + OAP + head) | {teacher:.3f} | {teacher / args.batch:.4f} | {100 * teacher / step:.1f}% |")
    print(f"| OAP pooling alone | {pooling:.3f} | {pooling / args.batch:.4f} | {100 * pooling / step:.1f}% |")
    print(f"instance targets per view (median): {statistics.median(r[3] for r in rows):.1f}")
    return 0


if __name__ == "__main__":
    from hiseg.cli import run_cli

    sys.exit(run_cli(main))
