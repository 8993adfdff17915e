#!/usr/bin/env python
"""CAST vs ViT + K-means at an equal wall-clock budget (docs/cast_vs_vit.md).

    python projects/CAST/experiments/cast_vs_vit.py                      # the full experiment (resumable)
    python projects/CAST/experiments/cast_vs_vit.py --quick --out /tmp/q  # a tiny end-to-end run

For every seed, a small CAST (``configs/CAST/experiments/moco_cast_small_natural_cpu.yaml``) and
the ViT of the same width and depth (``moco_vit_small_natural_cpu.yaml``) are pre-trained with
the same MoCo-v3 recipe on ``natural_images_unlabelled`` (BSDS500 train + the local COCO images +
scikit-image's photographs) for the same training-time budget (:mod:`hiseg.engine.budget`:
schedule on the fraction of the budget, weights saved at fixed fractions, resumable). Then every
saved point is scored on BSDS500 val with :class:`~hiseg.evaluation.HierarchicalSegEvaluator`:
CAST's own hierarchy, the ViT's nested K-means hierarchy (Appx. D.4) and, once, the SEEDS
superpixels alone; and the outputs are written to ``--out``:

* ``results.md``: protocol, commands, commit, seeds, wall times; the final-point table and the
  table per point (mean +- sample standard deviation over seeds); iterations and step times;
  CAST's pooling diagnostics; ``final_point.md``: the final-point table alone (the main job prints it);
* ``learning_curves.png`` (metric vs iteration, one thin line per seed and a thick mean, both
  models, SEEDS as a dashed line), ``loss_curves.png`` (MoCo loss vs iteration and vs training
  time), ``pooling_entropy.png`` (CAST's assignment entropy per level vs iteration);
* ``results.json``: every number, per seed; ``manifest.json``: every invocation (command,
  commit, wall time); ``runs/<model>_s<seed>/``: checkpoints, ``steps.csv``, ``run.json``;
  ``eval/*.json``: one file per scored checkpoint.

Fairness (``--mode``):

* ``pair`` (default): the two models of a seed train at the same time, each in its own process
  with ``--threads`` (default 1) intra-op threads, so they see the same machine load for the
  same stretch of time; seeds run one after the other. On a 2-core machine this uses both cores,
  one per model.
* ``sequential``: one run after the other in this process with ``--threads`` (default 2). Fair
  only on a machine whose load does not change between runs.

Data loading runs in the training process (``DATALOADER.NUM_WORKERS: 0``), so each model pays
for its own augmentation and superpixels inside its budget; the ViT computes none (it reads
none).

Evaluation (the same for every checkpoint): each BSDS500 val image is resized to
``--eval-size`` on its long side; CAST gets SEEDS superpixels of its config's
``PIXELS_PER_SUPERPIXEL`` (64) on that image; hierarchies are scored at the ground truth's full
resolution (the ViT's K-means runs there, Appx. D.4). The default 192 turns the 481 x 321 BSDS
images into 192 x 128: 24 x 16 = 384 patches of 8 x 8 for the ViT and exactly 384 SEEDS
superpixels (OpenCV's 8 x 8 seed blocks) for CAST, the same number of tokens of the same area as
in training (196 of 64 pixels on 112 x 112 views). At 224 (224 x 149) SEEDS could only make 308
superpixels against the ViT's 532 patches. ``--eval-images N`` scores
the first N images of the sorted val ids.

Files: this script (command line, the order of the steps), ``cast_vs_vit_protocol.py`` (models,
measures, configs), ``cast_vs_vit_train.py``, ``cast_vs_vit_eval.py``, ``cast_vs_vit_report.py``.
They are scripts beside the CAST project, not part of the installed packages; run them from a
checkout with the packages installed (``setup.sh``).
"""

import argparse
import os
import shlex
import sys
import time
from typing import Optional

import hiseg  # noqa: F401  (before torch and detectron2: it quietens their import-time warnings)
import torch

from hiseg.provenance import Manifest, machine_description

from cast_vs_vit_eval import eval_settings, evaluate_points
from cast_vs_vit_protocol import (DEFAULT_BUDGET_MIN, DEFAULT_POINTS, MODELS, QUICK, QUICK_OPTS, build_cfg,
                                  run_dir_for, setup_process, train_dataset_name)
from cast_vs_vit_report import write_report
from cast_vs_vit_train import train_all

__all__ = ["main", "parse_args", "build_cfg", "run_dir_for", "MODELS"]


def _floats(s):
    return tuple(float(x) for x in s.split(",") if x.strip())


def _ints(s):
    return tuple(int(x) for x in s.split(",") if x.strip())


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="projects/CAST/experiments/cast_vs_vit.py",
        description="CAST vs ViT + K-means pre-trained with MoCo-v3 for the same wall-clock budget, scored on "
                    "BSDS500 val along the way (docs/cast_vs_vit.md). Re-running resumes.")
    ap.add_argument("--out", default=None, help="output folder (default output/cast_vs_vit, "
                                                "output/cast_vs_vit_quick with --quick)")
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help=f"training time per (model, seed) run (default {DEFAULT_BUDGET_MIN:g})")
    ap.add_argument("--seeds", type=_ints, default=(0, 1), help="comma-separated seeds (default 0,1)")
    ap.add_argument("--points", type=_floats, default=None,
                    help="fractions of the budget at which weights are saved and scored, ending with 1 "
                         "(default 0.125,0.25,0.5,0.75,1)")
    ap.add_argument("--warmup-fraction", type=float, default=0.1, help="LR warm-up, fraction of the budget")
    ap.add_argument("--mode", choices=("pair", "sequential"), default="pair",
                    help="pair: the two models of a seed train at the same time, one process each (default); "
                         "sequential: one after the other in this process")
    ap.add_argument("--threads", type=int, default=None, help="threads per run (default 1 in pair mode, "
                                                              "min(2, cores) in sequential mode)")
    ap.add_argument("--eval-images", type=int, default=None, help="score the first N BSDS500 val images (0 = all)")
    ap.add_argument("--eval-size", type=int, default=None, help="long side of the evaluated images (default 192)")
    ap.add_argument("--eval-jobs", type=int, default=2, help="evaluation processes (1 thread each when > 1)")
    ap.add_argument("--eval-dataset", default=None, help="BSDS500 val dataset name (default: the first found)")
    ap.add_argument("--quick", action="store_true", help="tiny models, a few seconds per run, 8 training images, "
                                                         "2 val images (tests)")
    ap.add_argument("--train-only", action="store_true", help="train (or resume) and stop")
    ap.add_argument("--eval-only", action="store_true", help="score what is finished and write the report")
    ap.add_argument("--train-dataset", default="natural_images_unlabelled")
    ap.add_argument("--max-train-images", type=int, default=None, help="use N images spread over the set (0 = all)")
    ap.add_argument("--pause-after-steps", type=int, default=None,
                    help="stop each run of this call after N steps, resumable (split a job over sessions)")
    ap.add_argument("--pause-after-minutes", type=float, default=None,
                    help="stop each run of this call after M minutes of wall time, resumable")
    ap.add_argument("--save-every-s", type=float, default=None,
                    help="training seconds between resume checkpoints (default: 5%% of the budget, >= 30 s)")
    ap.add_argument("--print-every-s", type=float, default=None, help="seconds between progress lines (default 30)")
    ap.add_argument("--cast-config", default=MODELS["cast"][1],
                    help="the CAST side (e.g. an ablation of configs/CAST/experiments/ablations/, with its own --out)")
    ap.add_argument("--cast-label", default=MODELS["cast"][0], help="its name in the tables and plots")
    ap.add_argument("--vit-config", default=MODELS["vit"][1])
    ap.add_argument("--command", default=None,
                    help="the command that manifest.json and the report cite (default: this command line; "
                         "the main job passes its own)")
    ap.add_argument("opts", nargs=argparse.REMAINDER,
                    help="config overrides KEY VALUE ... applied to both models (after --)")
    args = ap.parse_args(argv)
    opts = list(args.opts)
    if opts and opts[0] == "--":
        opts = opts[1:]
    if len(opts) % 2:
        ap.error(f"config overrides come in KEY VALUE pairs, got {opts}")
    q = QUICK if args.quick else {}
    args.opts = (list(QUICK_OPTS) if args.quick else []) + opts
    args.out = args.out or os.path.join("output", "cast_vs_vit_quick" if args.quick else "cast_vs_vit")
    args.budget_minutes = args.budget_minutes if args.budget_minutes is not None else q.get("budget_minutes",
                                                                                             DEFAULT_BUDGET_MIN)
    args.points = tuple(args.points) if args.points is not None else tuple(q.get("points", DEFAULT_POINTS))
    if len(args.points) < 1 or args.points[-1] != 1.0:
        ap.error("--points must end with 1")
    args.eval_images = args.eval_images if args.eval_images is not None else q.get("eval_images", 0)
    args.eval_size = args.eval_size if args.eval_size is not None else q.get("eval_size", 192)
    args.max_train_images = args.max_train_images if args.max_train_images is not None else \
        q.get("max_train_images", 0)
    budget_s = 60.0 * args.budget_minutes
    args.save_every_s = args.save_every_s if args.save_every_s is not None else \
        q.get("save_every_s", max(30.0, 0.05 * budget_s))
    args.print_every_s = args.print_every_s if args.print_every_s is not None else q.get("print_every_s", 30.0)
    if args.threads is None:
        args.threads = 1 if args.mode == "pair" else min(2, os.cpu_count() or 1)
    args.models = ("cast", "vit")
    args.configs = {"cast": args.cast_config, "vit": args.vit_config}
    args.labels = {"cast": args.cast_label, "vit": MODELS["vit"][0]}
    if len(set(args.seeds)) != len(args.seeds) or not args.seeds:
        ap.error(f"--seeds must be distinct, got {args.seeds}")
    return args


def main(argv=None, command: Optional[str] = None) -> str:
    """Run the experiment (see the module docstring); returns the report's text ('' with
    ``--train-only``). ``command`` (else ``--command``, else this command line) is what
    ``manifest.json`` and the report cite."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = command or args.command or "python projects/CAST/experiments/cast_vs_vit.py " + shlex.join(argv)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    manifest = Manifest(os.path.join(args.out, "manifest.json"))
    inv = manifest.start(command.strip())
    setup_process(torch.get_num_threads())
    from hiseg.data.datasets.natural_images import natural_image_sources

    ds = train_dataset_name(args.train_dataset, args.max_train_images)
    from detectron2.data import DatasetCatalog

    n_train = len(DatasetCatalog.get(ds))
    if args.train_dataset == "natural_images_unlabelled":
        src = natural_image_sources()
        parts = ", ".join(f"{k}: {v[1]} from `{v[0]}`" if v else f"{k}: missing" for k, v in src.items())
        manifest.data["train_images"] = f"{n_train} images used; the full set has {parts}"
    else:
        manifest.data["train_images"] = f"{n_train} images"
    manifest.data.update(train_dataset=ds, machine=machine_description())
    print(f"[cast_vs_vit] {args.out}: models {', '.join(args.models)}, seeds {list(args.seeds)}, budget "
          f"{args.budget_minutes:g} min per run, mode {args.mode} ({args.threads} thread(s) per run), "
          f"{n_train} training images", flush=True)

    for model in args.models:  # a bad config file or key: one error line here, not in a child process
        build_cfg(args.configs[model], args.opts, ds)
    if not args.eval_only:
        t0 = time.perf_counter()
        inv["train_groups_wall_s"] = train_all(args)
        inv["train_wall_s"] = round(time.perf_counter() - t0, 1)
    if args.train_only:
        manifest.finish(inv)
        return ""
    settings = eval_settings(args)
    inv["eval_wall_s"] = evaluate_points(args, settings)
    manifest.finish(inv)
    text = write_report(args, settings, manifest.data)
    print(text, flush=True)
    print(f"[cast_vs_vit] done in {time.perf_counter() - t_start:.0f} s; report {os.path.join(args.out, 'results.md')}",
          flush=True)
    return text


if __name__ == "__main__":
    from hiseg.cli import script_main

    script_main(main, result_is_status=False)  # a bad argument or file: one error line, exit status 2
