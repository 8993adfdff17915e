"""What the CAST vs ViT comparison is (``cast_vs_vit.py``): the two models and their configs, the
measures, the ``--quick`` sizes, the names of the run folders and files, the config builder, and
the set-up of every training and evaluation process."""
import logging
import os
from typing import Optional, Sequence

import numpy as np
import torch

MODELS = {
    "cast": ("CAST", "configs/CAST/experiments/moco_cast_small_natural_cpu.yaml"),
    "vit": ("ViT + K-means (Appx. D.4)", "configs/CAST/experiments/moco_vit_small_natural_cpu.yaml"),
}
SEEDS_LABEL = "SEEDS superpixels alone"
REGION_TARGETS = (64, 32, 16, 8)
# (result key, column name, higher is better)
METRICS = [("ODS", "ODS", True), ("OIS", "OIS", True), ("AP", "AP", True),
           ("Covering_ODS", "Covering", True), ("PRI_ODS", "PRI", True), ("VI_ODS", "VI", False)] + \
          [(f"RegionF@{k}", f"RegionF@{k}", True) for k in REGION_TARGETS]
DEFAULT_POINTS = (0.125, 0.25, 0.5, 0.75, 1.0)
DEFAULT_BUDGET_MIN = 30.0
#: the final-point table alone, next to results.md
FINAL_TABLE = "final_point.md"
EVAL_VERSION = 1

# --quick: a tiny version of both models (the same overrides for both), a few images
QUICK_OPTS = ["MODEL.CAST.EMBED_DIM", 48, "MODEL.VIT.EMBED_DIM", 48, "MODEL.VIT.OUT_CHANNELS", 48,
              "MODEL.CAST.DEPTHS", [1, 1, 1, 1], "MODEL.VIT.DEPTH", 4,
              "MODEL.MOCO.MLP_DIM", 64, "MODEL.MOCO.DIM", 32,
              "INPUT.CROP.SIZE", [64, 64], "MODEL.VIT.IMG_SIZE", 64,
              "MODEL.CAST.SUPERPIXEL.NUM_SUPERPIXELS", 64, "MODEL.CAST.NUM_SEGMENTS", [16, 8, 4, 2],
              "SOLVER.IMS_PER_BATCH", 4]
QUICK = {"budget_minutes": 0.05, "points": (0.25, 0.5, 0.75, 1.0), "eval_images": 2, "eval_size": 96,
         "max_train_images": 8, "save_every_s": 1.0, "print_every_s": 0.0}



def setup_process(threads: int):
    """Threads and logging of a training / evaluation process."""
    torch.set_num_threads(max(1, int(threads)))
    try:
        import cv2

        cv2.setNumThreads(max(1, int(threads)))
    except ImportError:  # pragma: no cover - cv2 is a dependency of the superpixels
        pass
    from detectron2.utils.logger import setup_logger

    setup_logger()  # once (cached); the trainer would call it otherwise and log at INFO
    for name in ("detectron2", "d2", "fvcore", "hiseg", "hiseg_cast"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import hiseg.data  # noqa: F401  (registers the datasets)


def train_dataset_name(base: str, max_images: int) -> str:
    """``base`` itself, or (``max_images`` > 0) a registered subset of that many images spread
    evenly over it (so a handful still mixes the sources)."""
    if max_images <= 0:
        return base
    from detectron2.data import DatasetCatalog

    from hiseg.data.datasets.common import register_lazy

    name = f"{base}__spread{max_images}"

    def load(base=base, n=max_images):
        dicts = DatasetCatalog.get(base)
        idx = sorted(set(np.linspace(0, len(dicts) - 1, min(n, len(dicts))).round().astype(int).tolist()))
        return [dicts[i] for i in idx]

    register_lazy(name, load, {"evaluator_type": "none", "source": f"{max_images} images of {base}"},
                  family="experiments")
    return name


def build_cfg(config_file: str, opts: Sequence = (), train_dataset: Optional[str] = None):
    from detectron2.config import get_cfg

    from hiseg.cli import merge_config
    from hiseg.paths import repo_relative
    from hiseg_cast import add_cast_config

    cfg = get_cfg()
    add_cast_config(cfg)
    # a missing file, an unknown key or a bad value: one-line ConfigError (hiseg.cli)
    merge_config(cfg, repo_relative(config_file),
                 [str(o) if not isinstance(o, (list, tuple)) else str(list(o)) for o in opts])
    if train_dataset:
        cfg.DATASETS.TRAIN = (train_dataset,)
    cfg.freeze()
    return cfg


def run_dir_for(out: str, model: str, seed: int) -> str:
    return os.path.join(out, "runs", f"{model}_s{seed}")

