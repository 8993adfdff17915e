"""Config keys shared by both projects (``add_hiseg_config``). Only keys that exist neither in
detectron2 v0.6 nor on main are added, so our yaml files load with either."""
from detectron2.config import CfgNode as CN

__all__ = ["add_hiseg_config", "register_config_check", "check_config"]


def add_hiseg_config(cfg):
    """Add the keys of the shared core: solver, input, test and dataset keys, the plain ViT
    (``MODEL.VIT``) and the ViT + K-means baseline (``MODEL.VIT_KMEANS``). Each project's
    ``add_<project>_config`` calls it. Idempotent: a second call changes nothing, not even merged
    values."""
    from .modeling.config import add_vit_config
    from .modeling.vit_kmeans import add_vit_kmeans_config

    add_vit_config(cfg)
    add_vit_kmeans_config(cfg)
    if "HISEG" in cfg:
        return cfg
    s = cfg.SOLVER
    s.OPTIMIZER = "SGD"  # "SGD" | "ADAMW"
    s.BETAS = [0.9, 0.999]  # AdamW
    # weight decay of position embeddings and class / [SEM] / [INS] tokens (no decay, as DeiT)
    s.WEIGHT_DECAY_EMBED = 0.0
    # gradient accumulation: one optimizer step (= one iteration) from this many micro-batches of
    # IMS_PER_BATCH / (processes x ACCUMULATION_STEPS) images; IMS_PER_BATCH stays the total batch.
    # Refused where it is not the same as the larger batch (hiseg/engine/accumulation.py).
    s.ACCUMULATION_STEPS = 1
    s.POLY_LR_POWER = 0.9  # "WarmupPolyLR": lr * (1 - iter / max_iter) ** power (Chen et al. 2016)
    cfg.INPUT.DATASET_MAPPER_NAME = ""  # "" = detectron2's DatasetMapper; "CASTDatasetMapper" adds S_0
    # empty = chosen from each test dataset's metadata.evaluator_type; entries "<type>" apply to
    # every test dataset, "<dataset>:<type>" to that dataset only
    cfg.TEST.EVALUATORS = []
    cfg.TEST.IMS_PER_BATCH = 1  # images per test batch and process (detectron2 v0.6 uses 1)
    # ImageNet val as users have it (hiseg.data.datasets.imagenet.register_from_cfg), for the
    # imagenet_*_val names of DATASETS.TEST: image folder (class folders or flat; "" = the
    # datasets root's imagenet/val), labels file of a flat folder, first N images (0 = all) in
    # file-name order, a file naming the images to use (one per line)
    cfg.DATASETS.IMAGENET = CN()
    cfg.DATASETS.IMAGENET.VAL_DIR = ""
    cfg.DATASETS.IMAGENET.VAL_LABELS = ""
    cfg.DATASETS.IMAGENET.VAL_FIRST = 0
    cfg.DATASETS.IMAGENET.VAL_LIST = ""
    cfg.HISEG = CN()
    cfg.HISEG.VIS_PERIOD = 0
    # converted checkpoints store the settings their weights were trained with
    # (hiseg.checkpoint.weights_config): "strict" = evaluating with other settings fails, "warn" =
    # only warn (to evaluate them with other settings on purpose). Training from them only warns.
    cfg.HISEG.WEIGHTS_CONFIG_CHECK = "strict"
    return cfg


# ------------------------------------------------------------------------------------------------
# value checks: every config merged by hiseg.cli.merge_config is checked, so each entry point
# refuses a value the model cannot be built with in one line, before anything is built.
_CONFIG_CHECKS = []


def register_config_check(fn):
    """Register ``fn(cfg)``, which raises :class:`~hiseg.errors.ConfigError` for values the model
    cannot be built with (naming the keys and the rule). Projects register theirs on import; a
    check must pass configs that lack its keys. Returns ``fn`` (usable as a decorator)."""
    if fn not in _CONFIG_CHECKS:
        _CONFIG_CHECKS.append(fn)
    return fn


def check_config(cfg) -> None:
    """Run every registered config check on ``cfg``."""
    for fn in _CONFIG_CHECKS:
        fn(cfg)
