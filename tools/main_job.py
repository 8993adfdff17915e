#!/usr/bin/env python
"""The main job (README's first command): CAST vs the ViT of the same size at an equal budget, on
the data at hand, in about 7 minutes on 2 CPU cores.

1. pre-train the small CAST (``configs/CAST/experiments/moco_cast_small_natural_cpu.yaml``) and
   the ViT of the same width and depth (``moco_vit_small_natural_cpu.yaml``) side by side with the
   same MoCo-v3 recipe for the same wall-clock budget (``--budget-minutes``, default 4 per model),
   one seed, with the protocol of the CAST vs ViT experiment (``projects/CAST/experiments/cast_vs_vit.py``,
   docs/cast_vs_vit.md, run as a sub-command) on the unlabelled natural images at hand: BSDS500
   train, the local COCO images and scikit-image's photographs (only the last without the shared
   data), printing progress;
2. draw CAST's segmentation hierarchy for scikit-image's images (``<out>/pictures/*.png``);
3. where BSDS500 val is available (``$DETECTRON2_DATASETS/bsds500`` or the shared real data),
   score CAST, ViT + K-means (Appx. D.4) and the SEEDS superpixels alone on all its images with
   the hierarchical evaluator and print the table (also in ``<out>/bsds500_val.md``; the full
   report in ``<out>/cast_vs_vit/results.md``).

Why 4 minutes: in the 30-minute, 2-seed run of docs/cast_vs_vit.md every measure but RegionF@64
had its final leader from the first scored point on (12.5% of the budget, 3.75 minutes of
training); docs/cast.md ("The main job's BSDS500 table") compares this job's table with that run.

A bad config file or key, checkpoint or dataset folder is one ``error:`` line with exit status 2;
an unreadable image (truncated, empty, zero-size, not an image) is a warning, is skipped and
counted, and the exit status is then 1 (``hiseg.cli``).
"""
import argparse
import logging
import os
import subprocess
import sys
import time

import hiseg  # noqa: F401  (before torch and detectron2: it quietens their import-time warnings)
from detectron2.config import get_cfg
from detectron2.utils.logger import setup_logger

import hiseg.data  # noqa: F401  (registers the datasets)
from hiseg.checkpoint.io import load_model
from hiseg.cli import ArgumentParser, Skipped, bounded, check_output_dir, merge_config, run_cli
from hiseg.data.datasets.bsds500 import bsds500_val
from hiseg.engine.budget import point_path
from hiseg.paths import repo_relative
from hiseg_cast import add_cast_config
from hiseg_cast.demo import dataset_pictures

EXPERIMENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "projects", "CAST", "experiments",
                          "cast_vs_vit.py")
CAST_CONFIG = "configs/CAST/experiments/moco_cast_small_natural_cpu.yaml"
VIT_CONFIG = "configs/CAST/experiments/moco_vit_small_natural_cpu.yaml"
#: the final-point table the experiment writes next to its results.md
FINAL_TABLE = "final_point.md"


def cast_cfg(config_file: str, opts=()):
    """A CAST-project config as the experiment builds it; a bad file or key is one ConfigError."""
    cfg = add_cast_config(get_cfg())
    merge_config(cfg, repo_relative(config_file), list(opts))
    cfg.freeze()
    return cfg


def bsds_available() -> bool:
    try:
        bsds500_val()
    except FileNotFoundError:
        return False
    return True


def main(argv=None):
    ap = ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--out", default="output/main_job")
    ap.add_argument("--budget-minutes", type=bounded(float, 0, lo_open=True), default=4.0, help="training time per model (default 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-images", type=bounded(int, 1), default=None, help="BSDS500 val images to score (default all; "
                                                                   "--quick: 2)")
    ap.add_argument("--max-size", type=bounded(int, 1), default=320, help="long side of the pictures' images")
    ap.add_argument("--pictures", type=bounded(int, 0), default=0, help="number of pictures to draw (0 = all 16)")
    ap.add_argument("--quick", action="store_true", help="tiny models and seconds of training (tests)")
    ap.add_argument("--config-file", default=CAST_CONFIG, help="the CAST side (default: the experiment's small CAST)")
    ap.add_argument("--vit-config", default=VIT_CONFIG, help="the ViT side (default: the experiment's ViT)")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ... for both models")
    args = ap.parse_args(argv)
    check_output_dir(args.out, "--out")  # UsageError: one line, exit status 2, before any training
    opts = list(args.opts[1:] if args.opts[:1] == ["--"] else args.opts)
    for config_file in (args.config_file, args.vit_config):
        cast_cfg(config_file, opts)  # ConfigError: one line, exit status 2, before any training
    setup_logger(name="hiseg")
    for name in ("detectron2", "d2", "fvcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    t0 = time.time()
    exp_out = os.path.join(args.out, "cast_vs_vit")
    with_bsds = bsds_available()
    command = "python tools/main_job.py " + " ".join(sys.argv[1:] if argv is None else [str(a) for a in argv])
    exp_argv = ["--out", exp_out, "--seeds", str(args.seed), "--points", "1", "--command", command]
    if args.quick:
        exp_argv += ["--quick"]
    else:
        exp_argv += ["--budget-minutes", f"{args.budget_minutes:g}"]
    exp_argv += ["--cast-config", str(args.config_file), "--vit-config", str(args.vit_config)]
    if args.eval_images is not None:
        exp_argv += ["--eval-images", str(args.eval_images)]
    if not with_bsds:
        exp_argv += ["--train-only"]
    print(f"[main job] CAST vs ViT, {'quick' if args.quick else f'{args.budget_minutes:g} min'} of training each, "
          f"seed {args.seed}, side by side (projects/CAST/experiments/cast_vs_vit.py; output {exp_out})", flush=True)
    status = subprocess.run([sys.executable, EXPERIMENT, *exp_argv, *(["--", *opts] if opts else [])]).returncode
    if status:
        return status  # the experiment printed why
    run_dir = os.path.join(exp_out, "runs", f"cast_s{args.seed}")
    model = load_model(cast_cfg(os.path.join(run_dir, "config.yaml"), ["MODEL.DEVICE", "cpu"]), point_path(run_dir, 1))
    skipped = Skipped("image")
    pictures = dataset_pictures(model, "skimage_natural_images", os.path.join(args.out, "pictures"), args.max_size,
                                args.pictures, skipped, log=lambda line: print("[main job] " + line, flush=True))
    if with_bsds:
        with open(os.path.join(exp_out, FINAL_TABLE)) as f:
            table = f.read().strip()
        with open(os.path.join(args.out, "bsds500_val.md"), "w") as f:
            f.write(table + "\n")
        print("[main job] BSDS500 val, " + table, flush=True)
    else:
        print("[main job] BSDS500 not found (set DETECTRON2_DATASETS or HISEG_SHARED_DATA): table skipped")
    print(f"[main job] done in {time.time() - t0:.0f}s; outputs in {args.out}", flush=True)
    skipped.finish(len(pictures) + len(skipped))  # SkippedInputsError (exit status 1) if any was skipped
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
