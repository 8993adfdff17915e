"""Config keys of CAST image classification (``add_cast_classification_config``): the DeiT recipe
of Table 12 (``CASTClassifier``) and the linear probe of Appx. E.5 (``CASTLinearProbe``)."""
from detectron2.config import CfgNode as CN

__all__ = ["add_cast_classification_config"]


def add_cast_classification_config(cfg):
    """Add ``MODEL.CLS.*`` (defaults: DeiT / Table 12). Idempotent."""
    if "CLS" in cfg.MODEL:
        return cfg
    cfg.MODEL.CLS = CN()
    c = cfg.MODEL.CLS
    c.NUM_CLASSES = 1000
    # --- supervised training (Table 12, DeiT defaults) ---
    c.LABEL_SMOOTHING = 0.1
    c.MIXUP_ALPHA = 0.8  # 0 disables mixup
    c.CUTMIX_ALPHA = 1.0  # 0 disables cutmix
    c.MIXUP_PROB = 1.0  # probability of mixing a batch (or element) at all
    c.MIXUP_SWITCH_PROB = 0.5  # probability of cutmix instead of mixup when both are on
    c.MIXUP_MODE = "batch"  # "batch" (one lambda per batch, timm's default) or "elem"
    # superpixels of a mixup (pixel blend) image: "dominant" (those of the image with weight
    # >= 0.5), "overlay" (intersection of both images' superpixels) or "recompute" (SEEDS on the
    # blended uint8 image, in the model's forward). CutMix always pastes the box's superpixels.
    c.MIXUP_SUPERPIXELS = "dominant"
    c.HEAD_INIT_STD = 0.02  # trunc-normal init of the classifier (timm / DeiT)
    # --- data (CASTClassificationMapper); the crop size is INPUT.CROP.SIZE ---
    # timm RandAugment string (DeiT: rand-m9-mstd0.5-inc1 = Table 12's "RandAug(9, 0.5)"),
    # "torchvision" for torchvision's RandAugment(num_ops=2, magnitude=9), "" for none
    c.AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
    c.CROP_MIN_SCALE = 0.08  # RandomResizedCrop scale range (CROP_MIN_SCALE, 1)
    c.TEST_CROP_PCT = 0.875  # test: resize to size / pct, then centre crop (224 <- 256)
    c.INTERPOLATION = "bicubic"  # "bicubic" (DeiT) or "bilinear" (MoCo-v3 linear probe)
    # --- linear probing (Appx. E.5, MoCo-v3) ---
    c.PROBE_BN = True  # BatchNorm1d(affine=False) on the frozen features before the linear layer
    c.PROBE_INIT_STD = 0.01  # normal init of the probe's linear layer (MoCo-v3 main_lincls)
    return cfg
