#!/usr/bin/env python
"""CAST hierarchical segmentation (Fig. 5 style pictures) or OAP pseudo-masks and universal
segmentation of any images.

    python tools/demo.py --input photo.jpg 'dir/*.png' [--skimage astronaut coffee chelsea]
        [--config-file configs/CAST/Base-CAST-S.yaml] [--output output/demo] [--save-labels]
        [--max-size 640] [--device cpu|cuda] [--color mean|palette] [--opts KEY VALUE ...]

Per image it writes ``<name>_hierarchy.png``: the input, the superpixels (level 0) and each level's
segments (mean colour, with boundaries), titled with the number of segments. ``--save-labels``
also writes ``<name>_level<l>.png`` (16-bit, label + 1; 0 = none) and ``<name>_levels.npz``
(``levels`` (L+1, H, W) int32, ``num_segments``, ``image``).

With an OAP config (``META_ARCHITECTURE: OAPSegmentor``, e.g.
``configs/OAP/quick/oap_vit_tiny_coco_sample_cpu.yaml``) it writes ``<name>_oap.png`` instead: the
input, the teacher's OAP pseudo-masks of every layer (instance and semantic level), and the
model's class-agnostic instances (``--score-threshold``), semantic clusters and panoptic segments;
``MODEL.WEIGHTS`` is a full OAP checkpoint (tools/train_net.py output) or converted DINO weights.

The CAST model is built from the config (``MODEL.CAST.*``) and loads ``MODEL.WEIGHTS`` into the encoder
when given (a full detectron2 model, a CAST backbone or a bare encoder checkpoint; ``hiseg_cast.demo``). Without weights
the model is randomly initialised: its hierarchy then only reflects superpixel colours and
positions. Images are read by ``hiseg.image_io.read_image``, the reader of every tool (EXIF
orientation applied; grey, alpha, palette, CMYK and 16-bit images as RGB uint8, 16-bit scaled
by 1/257), and downscaled to ``--max-size`` on their long side. Every file is decoded completely
with truncation refused: a missing, empty, truncated, zero-size or non-image file is reported as
a warning with its name and skipped, the others still run, the summary counts the skipped ones,
and the exit status is 1. A bad config file / key or weights file, a ``--device`` this machine
lacks or an ``--output`` folder that cannot be written is one ``error:`` line with exit status 2
(``hiseg.cli.run_cli``), before any model is built.
"""
import argparse
import glob
import logging
import os
import sys
import time

import numpy as np

from hiseg.cli import ArgumentParser, bounded, check_device, check_output_dir, merge_config, run_cli
from hiseg.data.datasets.skimage_images import skimage_image
from hiseg.image_io import InputError, read_image

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "CAST", "Base-CAST-S.yaml")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")

logger = logging.getLogger("hiseg_cast.demo")


# ------------------------------------------------------------------------------------------------
# inputs
def expand_inputs(patterns):
    """[(display name, path)] for files, directories (their image files) and glob patterns, plus
    a list of (pattern, error message) for patterns that give nothing."""
    items, errors = [], []
    for pat in patterns:
        if os.path.isdir(pat):
            found = sorted(p for p in glob.glob(os.path.join(pat, "*")) if p.lower().endswith(IMAGE_EXTS))
            if not found:
                errors.append((pat, f"{pat}: directory has no image files ({', '.join(IMAGE_EXTS)})"))
            items += [(p, p) for p in found]
        elif glob.has_magic(pat):
            found = sorted(p for p in glob.glob(pat, recursive=True) if os.path.isfile(p))
            if not found:
                errors.append((pat, f"{pat}: no file matches this pattern"))
            items += [(p, p) for p in found]
        else:
            items.append((pat, pat))  # existence is checked when read, with a clear message
    return items, errors


def prepare_image(img: np.ndarray, max_size: int, name: str) -> np.ndarray:
    """RGB uint8, long side at most ``max_size`` (area interpolation)."""
    import cv2
    from hiseg_cast.superpixels import to_rgb_uint8

    arr = np.asarray(img)
    if arr.dtype == bool:  # binary masks: 0/255, not 0/1
        arr = arr.astype(np.uint8) * 255
    try:
        rgb = to_rgb_uint8(arr)
    except ValueError as e:
        raise InputError(f"{name}: {e}") from None
    h, w = rgb.shape[:2]
    if max_size > 0 and max(h, w) > max_size:
        s = max_size / max(h, w)
        nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
        rgb = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgb)


# ------------------------------------------------------------------------------------------------
# model
def setup_cfg(config_file: str, opts):
    from detectron2.config import get_cfg
    from hiseg_cast import add_cast_config
    from hiseg_oap import add_oap_config

    cfg = get_cfg()
    add_oap_config(add_cast_config(cfg))
    merge_config(cfg, config_file, list(opts or []))
    cfg.freeze()
    return cfg


def is_oap(cfg) -> bool:
    return cfg.MODEL.META_ARCHITECTURE == "OAPSegmentor"


def build_oap_model(cfg, device: str):
    """The whole OAP segmenter, ``MODEL.WEIGHTS`` loaded by detectron2's checkpointer, eval mode."""
    from hiseg.checkpoint.io import load_model

    model = load_model(cfg, cfg.MODEL.WEIGHTS, device)
    if cfg.MODEL.WEIGHTS:
        print(f"loaded {cfg.MODEL.WEIGHTS}")
    else:
        print("WARNING: MODEL.WEIGHTS is empty: the OAP model is randomly initialised, so its pseudo-masks "
              "follow colours only and its decoder outputs are untrained.")
    return model


def process_oap(model, name, img, args, stem, input_format):
    from hiseg.visualization import save_panel_grid
    from hiseg_oap.visualize import oap_demo_panels

    t0 = time.perf_counter()
    rgb = prepare_image(img, args.max_size, name)
    panels = oap_demo_panels(model, rgb, input_format, args.score_threshold)
    out_png = save_panel_grid(os.path.join(args.output, f"{stem}_oap.png"), panels, ncols=args.columns,
                              suptitle=os.path.basename(name))
    print(f"{name}: {rgb.shape[1]}x{rgb.shape[0]}, {len(panels) - 1} panels "
          f"({time.perf_counter() - t0:.2f}s) -> {out_png}")
    return [out_png]


# ------------------------------------------------------------------------------------------------
def unique_stem(name: str, used: set) -> str:
    base = os.path.splitext(os.path.basename(name.rstrip("/")))[0] or "image"
    base = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in base)
    stem, i = base, 1
    while stem in used:
        stem = f"{base}_{i}"
        i += 1
    used.add(stem)
    return stem


def process(backbone, name, img, args, stem):
    from hiseg_cast.demo import hierarchy_pictures

    t0 = time.perf_counter()
    rgb = prepare_image(img, args.max_size, name)
    written, present, asked = hierarchy_pictures(backbone, rgb, os.path.join(args.output, stem), args.device,
                                                 title=os.path.basename(name), color=args.color,
                                                 columns=args.columns, save_labels=args.save_labels)
    out_png = written[0]
    lv = (f"levels {' / '.join(str(n) for n in present[1:])} segments" if len(present) > 1
          else "no pooled levels (MODEL.CAST.POOLING is off)")
    msg = (f"{name}: {rgb.shape[1]}x{rgb.shape[0]}, {present[0]} superpixels, {lv} "
           f"({time.perf_counter() - t0:.2f}s) -> {out_png}")
    print(msg)
    short = [(l + 1, present[l + 1], asked[l]) for l in range(min(len(asked), len(present) - 1))
             if present[l + 1] < asked[l]]
    if short:
        print(f"  note: {name} gives only {present[0]} superpixels, so "
              + ", ".join(f"level {l} keeps {n} segments (asked {a})" for l, n, a in short))
    return written


def get_parser():
    ap = ArgumentParser(description="CAST hierarchy pictures (Fig. 5 style) or OAP pseudo-mask and "
                                             "universal segmentation pictures (OAPSegmentor configs).",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE")
    ap.add_argument("--input", nargs="+", default=[], help="image files, directories or glob patterns")
    ap.add_argument("--skimage", nargs="+", default=[], metavar="NAME",
                    help="images shipped with scikit-image, e.g. astronaut coffee chelsea rocket")
    ap.add_argument("--output", default=os.path.join("output", "demo"), help="output folder")
    ap.add_argument("--save-labels", action="store_true",
                    help="also write each level's label map (16-bit PNG) and an NPZ with all levels")
    ap.add_argument("--max-size", type=bounded(int, 0), default=640,
                    help="downscale images to this long side for the model and the pictures (0 = never)")
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    ap.add_argument("--color", choices=("mean", "palette"), default="mean",
                    help="fill segments with their mean colour or a palette colour")
    ap.add_argument("--columns", type=bounded(int, 1), default=3, help="panels per row")
    ap.add_argument("--score-threshold", type=float, default=0.5,
                    help="OAP: instances drawn when their score is at least this")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (no weights)")
    ap.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                    help="config overrides KEY VALUE ..., e.g. MODEL.WEIGHTS model.pth")
    return ap


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    if not args.input and not args.skimage:
        get_parser().error("give images with --input and/or --skimage")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import torch

    check_device(args.device)  # UsageError: one line, exit status 2
    check_output_dir(args.output)
    torch.manual_seed(args.seed)
    cfg = setup_cfg(args.config_file, args.opts)
    if is_oap(cfg):
        model = build_oap_model(cfg, args.device)
        run_one = lambda name, img, stem: process_oap(model, name, img, args, stem, cfg.INPUT.FORMAT)  # noqa: E731
    else:
        from hiseg_cast.demo import build_demo_backbone

        backbone = build_demo_backbone(cfg, args.device)
        run_one = lambda name, img, stem: process(backbone, name, img, args, stem)  # noqa: E731
    os.makedirs(args.output, exist_ok=True)

    failures, skipped = [], []
    items, errors = expand_inputs(args.input)
    for pat, msg in errors:
        print(f"ERROR: {msg}", file=sys.stderr)
        failures.append(pat)
    jobs = [(name, ("file", path)) for name, path in items] + \
           [(f"skimage:{n}", ("skimage", n)) for n in args.skimage]
    used, done = set(), 0
    for name, (kind, src) in jobs:
        stem = unique_stem(("skimage_" + src) if kind == "skimage" else src, used)
        try:
            img = read_image(src, "RGB") if kind == "file" else skimage_image(src)
            run_one(name, img, stem)
            done += 1
        except InputError as e:  # a bad image file: warn, skip, count
            print(f"warning: {e}; skipped", file=sys.stderr)
            skipped.append(name)
        except Exception as e:  # noqa: BLE001  (report, go on with the other images)
            logger.debug("failure on %s", name, exc_info=True)
            print(f"ERROR: {name}: {type(e).__name__}: {e}", file=sys.stderr)
            failures.append(name)
    print(f"{done} image(s) written to {args.output}"
          + (f"; {len(skipped)} skipped (unreadable): {', '.join(skipped)}" if skipped else "")
          + (f"; {len(failures)} failed: {', '.join(failures)}" if failures else ""))
    return 1 if failures or skipped else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
