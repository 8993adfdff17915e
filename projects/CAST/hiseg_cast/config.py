"""Config keys of the CAST project: one function, ``add_cast_config``, adds all of them.

Sections (each added once; a second call changes nothing, not even merged values):

* ``MODEL.CAST.*``: the backbone (defaults: CAST-S of the paper, Sec. 3.3), with
  ``MODEL.CAST.SUPERPIXEL.*`` (S_0, Sec. 3.1 / Appx. A.2) and ``MODEL.CAST.FIGURE_GROUND.*``
  (Table 5);
* ``MODEL.MOCO.*``: MoCo-v3 pre-training (Table 11);
* ``MODEL.CAST_SEM_SEG.*``: ``CASTSemanticSegmentor``, transfer learning on PASCAL VOC
  (Appx. E.5: 21 classes, 2-layer 1x1-conv head, per-pixel softmax) and its segment-retrieval
  protocol (Hwang et al. 2019: 20 nearest segments);
* ``MODEL.CLS.*``: image classification, the DeiT recipe of Table 12 (``CASTClassifier``) and
  the linear probe of Appx. E.5 (``CASTLinearProbe``);
* ``MODEL.CAST_SEGMENTER.*``: ``CASTSegmenter``, Segmenter's mask transformer on CAST-S for
  ADE20K / Pascal Context (Table 3b/c, Appx. E.3);
* the shared keys of :func:`hiseg.config.add_hiseg_config`.
"""
import math

from detectron2.config import CfgNode as CN

from hiseg.config import add_hiseg_config, register_config_check
from hiseg.errors import ConfigError

__all__ = ["add_cast_config", "check_cast_config"]


def add_cast_config(cfg):
    """Add every key of the CAST project (see the module docstring) and the shared keys
    (:func:`hiseg.config.add_hiseg_config`), so this one call is enough to load any
    ``configs/CAST`` yaml, also in another project. Idempotent: a second call changes nothing,
    not even merged values."""
    add_hiseg_config(cfg)
    for key, add in _SECTIONS:
        if key not in cfg.MODEL:
            add(cfg)
    return cfg


def _add_backbone_keys(cfg):
    """The backbone, its superpixels and the figure-ground output (defaults: CAST-S, Sec. 3.3)."""
    cfg.MODEL.CAST = CN()
    c = cfg.MODEL.CAST
    c.EMBED_DIM = 384
    c.DEPTHS = [3, 3, 3, 2]
    c.NUM_HEADS = 12
    # segments after each block group; the last is used only for the hierarchy read-out
    c.NUM_SEGMENTS = [64, 32, 16, 8]
    # test-time override of NUM_SEGMENTS (Table 6d); empty = same as training
    c.TEST_NUM_SEGMENTS = []
    c.MLP_RATIO = 4.0
    c.DROP_PATH_RATE = 0.0
    c.POOL_DROPOUT = 0.1
    c.KAPPA = 5.0  # softmax scale of the cosine assignment (released code)
    c.POOLING = True  # Table 3a: graph pooling on/off
    c.TOKENS = "segment"  # Table 3a: "segment" (superpixels) or "patch" (square cells)
    c.PATCH_SIZE = 16  # cell size for TOKENS="patch"
    c.TOKEN_POOL_MODE = "bilinear"  # "bilinear" (segmentation code, any size) or "nearest"
    # a segment with no cell on the feature grid (vanished in the nearest resize, or a label no
    # pixel carries): "attend" = the released code (an all-zero token that takes part in
    # attention and pooling; official weights need it), "mask" = masked out (our option).
    # Batch padding is masked either way. See hiseg_cast/modeling/encoder.py EMPTY_TOKEN_MODES.
    c.EMPTY_TOKENS = "attend"
    # bilinear token pooling: "stretch" = the released segmentation code (the POS_GRID table
    # resized bicubically over each image, averaged per segment; official weights need it),
    # "grid" = the encoding of the image's own stem grid (our option). See POS_RESIZE_MODES.
    c.POS_RESIZE = "stretch"
    c.POS_EMBED = "sincos"  # "sincos" (MoCo) or "learned" (DeiT)
    c.POS_GRID = [28, 28]  # grid of the position table (224 / 8): learned, or sin-cos stretched (POS_RESIZE)
    c.POS_ROW_FIRST = True  # released weights: first half of the channels encodes the row
    c.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # recompute each ViT block's activations in the backward pass instead of storing them (less
    # GPU memory, ~30% more step time; same loss and gradients): hiseg.modeling.activation_checkpointing
    c.ACTIVATION_CHECKPOINTING = False
    c.FROZEN_STEM_CONV1 = False  # MoCo-v3 --stop-grad-conv1
    # True when only the dense outputs res2..res5 feed a loss (a detectron2 head on
    # build_cast_backbone): freezes what they never read (class-token norm, last graph pooling)
    # so that DDP needs no find_unused_parameters. build_cast_fpn_backbone, CAST's semantic
    # meta-architectures and OAPSegmentor do this themselves; MoCo / classification read the
    # class token and must keep it False.
    c.DENSE_OUTPUTS_ONLY = False

    # CASTMoCo's optional test output "figure_ground" (CAST Table 5, Appx. F.4; DINO's procedure):
    # the class token's attention in block BLOCK (heads averaged) keeping MASS of its mass, scored
    # by TEST.EVALUATORS ["figure_ground"]. Also for the ViT baseline (its blocks, -1 = last).
    c.FIGURE_GROUND = CN()
    c.FIGURE_GROUND.ENABLED = False
    # python index into all blocks; -1 = the last. CAST Appx. F.4 reads CAST-S's 9th block (32
    # segment tokens, DEPTHS [3, 3, 3, 2]): BLOCK 8
    c.FIGURE_GROUND.BLOCK = -1
    c.FIGURE_GROUND.MASS = 0.6

    c.SUPERPIXEL = CN()
    s = c.SUPERPIXEL
    s.METHOD = "seeds"  # "seeds" | "slic" | "slic_torch" (on the model's device) | "grid"
    s.NUM_SUPERPIXELS = 196  # <= 0: H*W / PIXELS_PER_SUPERPIXEL (dense tasks)
    s.PIXELS_PER_SUPERPIXEL = 256
    s.HISTOGRAM_BINS = 5  # 15 for MoCo training, 5 for supervised / dense (released code)
    s.ITERATIONS = 15  # 20 for MoCo training, 15 for supervised / dense
    s.PRIOR = 2
    # "rgb": SEEDS on the image. "released_segmenter": on (image * 255) in uint8 arithmetic, i.e.
    # (-v) mod 256 per channel, as the authors' Segmenter code does in training and evaluation
    # (segm/data/utils.py generate_superpixels); Segmenter weights trained with it need it.
    s.SEEDS_INPUT = "rgb"


def _add_moco_keys(cfg):
    """``CASTMoCo``: MoCo-v3 pre-training (Table 11)."""
    cfg.MODEL.MOCO = CN()
    cfg.MODEL.MOCO.DIM = 256
    cfg.MODEL.MOCO.MLP_DIM = 4096
    cfg.MODEL.MOCO.TEMPERATURE = 0.2
    cfg.MODEL.MOCO.MOMENTUM = 0.99
    cfg.MODEL.MOCO.CROP_MIN_SCALE = 0.08


def _add_semantic_keys(cfg):
    """``CASTSemanticSegmentor`` (Appx. E.5)."""
    cfg.MODEL.CAST_SEM_SEG = CN()
    c = cfg.MODEL.CAST_SEM_SEG
    c.NUM_CLASSES = 21  # PASCAL VOC: background + 20 classes
    c.IGNORE_VALUE = 255
    c.LOSS_WEIGHT = 1.0
    # The 2-layer 1x1-conv head (Appx. E.5): conv(D -> HEAD_DIM) - norm - ReLU - conv(-> classes).
    # The paper does not give the hidden width; 256 is our choice.
    c.HEAD_DIM = 256
    c.HEAD_NORM = "BN"  # "BN" | "SyncBN" | "" (none)
    # Where the head sees the fused tokens f_seg:
    #   1: every pixel takes the token of its superpixel (the paper's "scatter segment tokens to
    #      per-pixel features using superpixel indices"), logits at full input resolution;
    #   s > 1: tokens averaged over s x s cells (exact area weights), head on the stride-s grid,
    #      logits upsampled bilinearly (cheaper, blurs the superpixel boundaries).
    c.FEATURE_STRIDE = 1
    # Segment retrieval (Appx. E.5, unsupervised evaluation): also output one hierarchy level's
    # label map and the L2-normalised mean fused token of each of its segments.
    c.RETRIEVAL_OUTPUT = False
    c.RETRIEVAL_LEVEL = -1  # hierarchy level (0 = superpixels); -1: the level nearest the count below
    c.RETRIEVAL_NUM_SEGMENTS = 40  # as the 40 K-means segments of the ViT baseline
    c.RETRIEVAL_K = 20  # neighbours voting for a segment's label (SegmentRetrievalEvaluator, Appx. E.5)


def _add_classification_keys(cfg):
    """Image classification (defaults: DeiT / Table 12; linear probe: Appx. E.5)."""
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


def _add_segmenter_keys(cfg):
    """``CASTSegmenter`` (defaults: Segmenter's mask transformer on CAST-S, ADE20K)."""
    cfg.MODEL.CAST_SEGMENTER = CN()
    c = cfg.MODEL.CAST_SEGMENTER
    c.NUM_CLASSES = 150  # ADE20K-150 (Table 3b)
    c.IGNORE_VALUE = 255
    c.LOSS_WEIGHT = 1.0
    c.DECODER = "mask"  # "mask": Segmenter's mask transformer; "linear": Segmenter-Linear
    # Segmenter's mask transformer on a ViT encoder: 2 layers, width = encoder width,
    # heads = width / 64, MLP ratio 4, dropout 0.1, drop-path 0.
    c.NUM_LAYERS = 2
    c.HIDDEN_DIM = 0  # 0: the encoder width (MODEL.CAST.EMBED_DIM)
    c.NUM_HEADS = 0  # 0: HIDDEN_DIM // 64 (at least 1)
    c.MLP_RATIO = 4.0
    c.DROPOUT = 0.1
    c.DROP_PATH_RATE = 0.0
    # Sliding-window inference (Appx. E.3): ADE20K 512 / 512, Pascal Context 480 / 320.
    # 0: the whole image at once. Stride 0: the window size.
    c.TEST_WINDOW_SIZE = 0
    c.TEST_WINDOW_STRIDE = 0
    c.TEST_WINDOW_BATCH_SIZE = 4  # windows encoded together (memory only, results unchanged)
    # CASTSegmenterMapper (training): a random crop in which one class covers at most this
    # fraction of the labelled pixels (mmseg's cat_max_ratio 0.75; 10 tries, then any crop;
    # 1.0 = plain random crop), and mmseg's PhotoMetricDistortion.
    c.CROP_SINGLE_CATEGORY_MAX_AREA = 0.75
    c.COLOR_AUG = True


_SECTIONS = (("CAST", _add_backbone_keys), ("MOCO", _add_moco_keys), ("CAST_SEM_SEG", _add_semantic_keys),
             ("CLS", _add_classification_keys), ("CAST_SEGMENTER", _add_segmenter_keys))


@register_config_check
def check_cast_config(cfg) -> None:
    """The widths a CAST encoder can be built with (configs whose ``MODEL.BACKBONE.NAME`` is a
    CAST backbone): ``MODEL.CAST.EMBED_DIM`` a multiple of 8 (the convolutional stem's channels
    are EMBED_DIM / 8, / 4, / 2, Appx. B of the paper; the 2-D sin-cos position encoding needs a
    multiple of 4) and of ``MODEL.CAST.NUM_HEADS`` (attention splits the width into equal
    heads). Raises :class:`~hiseg.errors.ConfigError` naming the keys and the rule."""
    model = cfg.get("MODEL", {})
    if "CAST" not in model or "cast" not in str(model.get("BACKBONE", {}).get("NAME", "")).lower():
        return
    dim, heads = model.CAST.EMBED_DIM, model.CAST.NUM_HEADS
    if not isinstance(heads, int) or heads < 1:
        raise ConfigError(f"MODEL.CAST.NUM_HEADS {heads!r}: the number of attention heads must be a positive "
                          f"integer that divides MODEL.CAST.EMBED_DIM ({dim}); e.g. 6 or 12 for 384")
    if not isinstance(dim, int) or dim < 8 or dim % 8 or dim % heads:
        step = 8 * heads // math.gcd(8, heads)
        near = sorted({max(step, dim - dim % step), max(step, dim - dim % step) + step}) if isinstance(dim, int) else []
        divisors = [h for h in range(1, 33) if isinstance(dim, int) and dim > 0 and dim % h == 0]
        hint = f"e.g. MODEL.CAST.EMBED_DIM {' or '.join(map(str, near))}" if near else "e.g. 384 (CAST-S)"
        if isinstance(dim, int) and dim >= 8 and dim % 8 == 0 and divisors:
            hint += f", or MODEL.CAST.NUM_HEADS one of {', '.join(map(str, divisors[-6:]))}"
        raise ConfigError(
            f"MODEL.CAST.EMBED_DIM {dim!r} with MODEL.CAST.NUM_HEADS {heads}: the width must be a multiple of 8 "
            f"(the convolutional stem) and of NUM_HEADS (attention splits it into equal heads); {hint}")
