#!/usr/bin/env python
"""The main job (README's first command): CAST vs the ViT of the same size at an equal budget, on
the data at hand, in about 7 minutes on 2 CPU cores.

1. pre-train the small CAST (``configs/CAST/experiments/moco_cast_small_natural_cpu.yaml``) and
   the ViT of the same width and depth (``moco_vit_small_natural_cpu.yaml``) side by side with the
   same MoCo-v3 recipe for the same wall-clock budget (``--budget-minutes``, default 4 per model),
   one seed, with the protocol of the CAST vs ViT experiment (``hiseg_cast.experiments.cast_vs_vit``,
   docs/cast_vs_vit.md) on the unlabelled natural images at hand: BSDS500 train, the local COCO
   images and scikit-image's photographs (only the last without the shared data), printing
   progress;
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
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import hiseg  # noqa: E402,F401  (before torch and detectron2: it quietens their import-time warnings)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from PIL import Image  # noqa: E402

import hiseg.data  # noqa: E402,F401
from hiseg.cli import ArgumentParser, Skipped, bounded, check_output_dir, run_cli  # noqa: E402
from hiseg.image_io import read_image  # noqa: E402


def prepare_input(model, path, max_size):
    """(image uint8 RGB at model resolution, input dict for the model); InputError for a bad file."""
    from hiseg_cast.superpixels import SuperpixelConfig, superpixels_for_image_tensor

    img = read_image(path, format="RGB")
    h, w = img.shape[:2]
    s = min(1.0, max_size / max(h, w))
    if s < 1.0:
        img = np.asarray(Image.fromarray(img).resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR))
    t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
    cfg_sp = model.backbone.superpixel_cfg
    sp = superpixels_for_image_tensor(t, "RGB", SuperpixelConfig(
        method=cfg_sp.method, num_superpixels=0, pixels_per_superpixel=cfg_sp.pixels_per_superpixel,
        histogram_bins=cfg_sp.histogram_bins, iterations=cfg_sp.iterations, prior=cfg_sp.prior))
    return img, {"image": t, "superpixels": sp, "height": img.shape[0], "width": img.shape[1]}


def draw_pictures(model, out_dir, max_size, limit=0, skipped=None):
    from hiseg.visualization import hierarchy_panels, save_panel_grid

    os.makedirs(out_dir, exist_ok=True)
    written = []
    dicts = DatasetCatalog.get("skimage_natural_images")
    for d in dicts[:limit] if limit > 0 else dicts:
        prepared = prepare_or_skip(model, d["file_name"], max_size, skipped)
        if prepared is None:
            continue
        img, inp = prepared
        with torch.no_grad():
            out = model.inference([inp])[0]
        levels = [lvl.cpu().numpy() for lvl in out["hierarchy"]]
        name = os.path.splitext(os.path.basename(d["file_name"]))[0]
        path = save_panel_grid(os.path.join(out_dir, name + ".png"),
                               hierarchy_panels(img, levels, asked=model.backbone.encoder.num_segments),
                               suptitle=f"CAST hierarchy: {name}")
        written.append(path)
        print(f"[main job] picture {path}", flush=True)
    return written


def prepare_or_skip(model, file_name, max_size, skipped=None):
    """:func:`prepare_input`, or None when the file is unreadable and ``skipped`` (a
    :class:`hiseg.cli.Skipped`) reports it; without ``skipped`` the InputError propagates."""
    if skipped is None:
        return prepare_input(model, file_name, max_size)
    return skipped.read(file_name, prepare_input, model, file_name, max_size)


def bsds_available() -> bool:
    from hiseg_cast.experiments.cast_vs_vit import bsds_val

    try:
        bsds_val()
    except FileNotFoundError:
        return False
    return True


def load_final_cast(run_dir: str):
    """CAST as the experiment trained it: its saved config and its one scored point."""
    from hiseg_cast.experiments.budget import point_path
    from hiseg_cast.experiments.cast_vs_vit import _load_point_model, build_cfg

    return _load_point_model(build_cfg(os.path.join(run_dir, "config.yaml"), ["MODEL.DEVICE", "cpu"]),
                             point_path(run_dir, 1))


def main(argv=None):
    from hiseg_cast.experiments import cast_vs_vit

    ap = ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--out", default="output/main_job")
    ap.add_argument("--budget-minutes", type=bounded(float, 0, lo_open=True), default=4.0, help="training time per model (default 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-images", type=bounded(int, 1), default=None, help="BSDS500 val images to score (default all; "
                                                                   "--quick: 2)")
    ap.add_argument("--max-size", type=bounded(int, 1), default=320, help="long side of the pictures' images")
    ap.add_argument("--pictures", type=bounded(int, 0), default=0, help="number of pictures to draw (0 = all 16)")
    ap.add_argument("--quick", action="store_true", help="tiny models and seconds of training (tests)")
    ap.add_argument("--config-file", default=None, help="the CAST side (default: the experiment's small CAST)")
    ap.add_argument("--vit-config", default=None, help="the ViT side (default: the experiment's ViT)")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ... for both models")
    args = ap.parse_args(argv)
    check_output_dir(args.out, "--out")  # UsageError: one line, exit status 2, before any training
    setup_logger(name="hiseg")
    for name in ("detectron2", "d2", "fvcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    t0 = time.time()
    exp_out = os.path.join(args.out, "cast_vs_vit")
    with_bsds = bsds_available()
    exp_argv = ["--out", exp_out, "--seeds", str(args.seed), "--points", "1"]
    if args.quick:
        exp_argv += ["--quick"]
    else:
        exp_argv += ["--budget-minutes", f"{args.budget_minutes:g}"]
    if args.config_file:
        exp_argv += ["--cast-config", str(args.config_file)]
    if args.vit_config:
        exp_argv += ["--vit-config", str(args.vit_config)]
    if args.eval_images is not None:
        exp_argv += ["--eval-images", str(args.eval_images)]
    if not with_bsds:
        exp_argv += ["--train-only"]
    opts = list(args.opts[1:] if args.opts[:1] == ["--"] else args.opts)
    print(f"[main job] CAST vs ViT, {'quick' if args.quick else f'{args.budget_minutes:g} min'} of training each, "
          f"seed {args.seed}, side by side (hiseg_cast.experiments.cast_vs_vit; output {exp_out})", flush=True)
    cast_vs_vit.main(exp_argv + (["--", *opts] if opts else []),
                              command="python tools/main_job.py " + " ".join(sys.argv[1:] if argv is None else
                                                                             [str(a) for a in argv]))
    model = load_final_cast(os.path.join(exp_out, "runs", f"cast_s{args.seed}"))
    skipped = Skipped("image")
    pictures = draw_pictures(model, os.path.join(args.out, "pictures"), args.max_size, args.pictures, skipped)
    if with_bsds:
        with open(os.path.join(exp_out, cast_vs_vit.FINAL_TABLE)) as f:
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
