#!/usr/bin/env python
"""The main job (README's first command), on built-in data, on a CPU in a few minutes:

1. pre-train a small CAST with MoCo-v3 (``configs/CAST/quick/moco_cast_tiny_skimage_cpu.yaml``)
   on the natural images that ship with scikit-image, printing progress;
2. draw its segmentation hierarchy for each of those images (``<output>/pictures/*.png``);
3. pre-train the ViT baseline of the same width and depth the same way
   (``configs/CAST/quick/moco_vit_tiny_skimage_cpu.yaml``; its hierarchy is the nested K-means
   of its tokens, Appx. D.4);
4. where BSDS500 is available (``$DETECTRON2_DATASETS/bsds500`` or the shared real data), score
   CAST, ViT + K-means and the SEEDS superpixels alone on BSDS500 val with the same
   hierarchical evaluator in one pass, and print the table (also in ``<output>/bsds500_val.md``).

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

import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.engine import HookBase  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from PIL import Image  # noqa: E402

import hiseg.data  # noqa: E402,F401
from hiseg.cli import Skipped, merge_config, run_cli  # noqa: E402
from hiseg.dataset_checks import check_datasets  # noqa: E402
from hiseg.image_io import read_image  # noqa: E402
from hiseg.engine import HisegTrainer  # noqa: E402
from hiseg.setup import add_all_configs  # noqa: E402

DEFAULT_CONFIG = "configs/CAST/quick/moco_cast_tiny_skimage_cpu.yaml"
DEFAULT_VIT_CONFIG = "configs/CAST/quick/moco_vit_tiny_skimage_cpu.yaml"


class _Progress(HookBase):
    """One line per iteration: iteration, loss, seconds so far."""

    def __init__(self, max_iter):
        self.max_iter = max_iter
        self.t0 = time.time()

    def after_step(self):
        it = self.trainer.iter + 1
        loss = self.trainer.storage.history("total_loss").latest()
        print(f"[main job] train iter {it}/{self.max_iter}  loss {loss:.4f}  {time.time() - self.t0:.0f}s",
              flush=True)


def prepare_input(model, path, max_size):
    """(image uint8 RGB at model resolution, input dict for the model); InputError for a bad file."""
    from cast.data_mapper import superpixels_for_image_tensor
    from cast.superpixels import SuperpixelConfig

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
    from cast.visualize import hierarchy_panels, save_panel_grid

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


def bsds_dataset():
    """The first BSDS500 val dataset whose files exist, or None."""
    for name in ("bsds500_val", "bsds500_val_shared"):
        if name in DatasetCatalog.list():
            try:
                return name, DatasetCatalog.get(name)
            except FileNotFoundError:
                continue
    return None, None


def bsds_table(model, vit_model, name, dicts, num_images, max_size, out_dir, skipped=None):
    from hiseg.evaluation import HierarchicalSegEvaluator

    dicts = dicts[:num_images] if num_images > 0 else dicts
    rows = ["CAST (ours, main job)"] + (["ViT + K-means (Appx. D.4)"] if vit_model is not None else []) \
        + ["SEEDS superpixels alone"]
    methods = {k: HierarchicalSegEvaluator(name, distributed=False) for k in rows}
    for ev in methods.values():
        ev.reset()
    for i, d in enumerate(dicts):
        prepared = prepare_or_skip(model, d["file_name"], max_size, skipped)
        if prepared is None:
            continue
        img, inp = prepared
        h, w = d["height"], d["width"]
        with torch.no_grad():
            full = model.inference([dict(inp, height=h, width=w)])[0]["hierarchy"]
            methods["CAST (ours, main job)"].process([d], [{"hierarchy": full}])
            methods["SEEDS superpixels alone"].process([d], [{"hierarchy": full[:1]}])
            if vit_model is not None:
                vit_h = vit_model.inference([dict(inp, height=h, width=w)])[0]["hierarchy"]
                methods["ViT + K-means (Appx. D.4)"].process([d], [{"hierarchy": vit_h}])
        print(f"[main job] BSDS500 {name}: image {i + 1}/{len(dicts)}", flush=True)
    rows = {k: ev.evaluate()["bsds"] for k, ev in methods.items()}
    keys = [k for k in ("ODS", "OIS", "AP", "Covering_ODS", "PRI_ODS", "VI_ODS", "RegionF@64", "RegionF@32",
                        "RegionF@16") if k in next(iter(rows.values()))]
    lines = [f"BSDS500 val ({len(dicts)} images, dataset `{name}`)", "",
             "| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for method, r in rows.items():
        lines.append(f"| {method} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    text = "\n".join(lines)
    with open(os.path.join(out_dir, "bsds500_val.md"), "w") as f:
        f.write(text + "\n")
    return text


def train(config_file, opts, output_dir=None):
    """Pre-train one model with the trainer; returns it in eval mode (``.output_dir`` set)."""
    cfg = get_cfg()
    add_all_configs(cfg)
    merge_config(cfg, config_file, opts)
    if output_dir:
        cfg.OUTPUT_DIR = output_dir
    cfg.freeze()
    check_datasets(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    backbone = cfg.MODEL.BACKBONE.NAME
    print(f"[main job] training {cfg.MODEL.META_ARCHITECTURE} ({backbone}) on {cfg.DATASETS.TRAIN} for "
          f"{cfg.SOLVER.MAX_ITER} iterations (output {cfg.OUTPUT_DIR})", flush=True)
    trainer = HisegTrainer(cfg)
    trainer.register_hooks([_Progress(cfg.SOLVER.MAX_ITER)])
    trainer.resume_or_load(resume=False)
    trainer.train()
    model = trainer.model.eval()
    model.output_dir = cfg.OUTPUT_DIR
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config-file", default=DEFAULT_CONFIG)
    ap.add_argument("--vit-config", default=DEFAULT_VIT_CONFIG,
                    help="config of the ViT + K-means baseline ('' to skip it)")
    ap.add_argument("--max-size", type=int, default=320, help="long side of images for pictures / BSDS")
    ap.add_argument("--bsds-images", type=int, default=20, help="BSDS500 val images to score (0 = all)")
    ap.add_argument("--pictures", type=int, default=0, help="number of pictures to draw (0 = all 16)")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = ap.parse_args(argv)
    setup_logger(name="hiseg")
    logging.getLogger("detectron2").setLevel(logging.WARNING)
    logging.getLogger("d2").setLevel(logging.WARNING)
    logging.getLogger("fvcore").setLevel(logging.WARNING)
    torch.manual_seed(0)
    np.random.seed(0)
    t0 = time.time()

    model = train(args.config_file, args.opts)
    out_dir = model.output_dir
    vit_model = train(args.vit_config, args.opts, os.path.join(out_dir, "vit")) if args.vit_config else None
    skipped = Skipped("image")
    pictures = draw_pictures(model, os.path.join(out_dir, "pictures"), args.max_size, args.pictures, skipped)
    total = len(pictures) + len(skipped)
    name, dicts = bsds_dataset()
    if dicts:
        print(bsds_table(model, vit_model, name, dicts, args.bsds_images, args.max_size, out_dir, skipped),
              flush=True)
        total += len(dicts[:args.bsds_images] if args.bsds_images > 0 else dicts)
    else:
        print("[main job] BSDS500 not found (set DETECTRON2_DATASETS or HISEG_SHARED_DATA): table skipped")
    print(f"[main job] done in {time.time() - t0:.0f}s; outputs in {out_dir}", flush=True)
    skipped.finish(total)  # SkippedInputsError (exit status 1) with the count, if any was skipped
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
