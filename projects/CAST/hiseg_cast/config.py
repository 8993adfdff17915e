"""Config keys of the CAST project (``add_cast_config``)."""
import math

from detectron2.config import CfgNode as CN

from hiseg.config import add_hiseg_config, register_config_check
from hiseg.errors import ConfigError

__all__ = ["add_cast_config", "check_cast_config"]


def add_cast_config(cfg):
    """Add every key of the CAST project: the backbone (``MODEL.CAST.*``, defaults: CAST-S of the
    paper, Sec. 3.3, with ``MODEL.CAST.SUPERPIXEL.*``), MoCo pre-training (``MODEL.MOCO``), the
    semantic heads (``MODEL.CAST_SEM_SEG``, ``MODEL.CAST_SEGMENTER``), classification
    (``MODEL.CLS``), and the shared keys (:func:`hiseg.config.add_hiseg_config`), so this one call
    is enough to load any ``configs/CAST`` yaml, also in another project. Idempotent: a second
    call changes nothing, not even merged values."""
    add_hiseg_config(cfg)
    if "CAST" not in cfg.MODEL:
        _add_backbone_keys(cfg)
    from .classification_config import add_cast_classification_config
    from .segmenter import add_cast_segmenter_config
    from .semantic_config import add_cast_semantic_config

    for key, add in (("CAST_SEM_SEG", add_cast_semantic_config), ("CLS", add_cast_classification_config),
                     ("CAST_SEGMENTER", add_cast_segmenter_config)):
        if key not in cfg.MODEL:
            add(cfg)
    return cfg


def _add_backbone_keys(cfg):
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
    # Batch padding is masked either way. See cast/modeling/encoder.py EMPTY_TOKEN_MODES.
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

    cfg.MODEL.MOCO = CN()  # MoCo-v3 pre-training (Table 11)
    cfg.MODEL.MOCO.DIM = 256
    cfg.MODEL.MOCO.MLP_DIM = 4096
    cfg.MODEL.MOCO.TEMPERATURE = 0.2
    cfg.MODEL.MOCO.MOMENTUM = 0.99
    cfg.MODEL.MOCO.CROP_MIN_SCALE = 0.08

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
    s.METHOD = "seeds"  # "seeds" | "slic" | "grid"
    s.NUM_SUPERPIXELS = 196  # <= 0: H*W / PIXELS_PER_SUPERPIXEL (dense tasks)
    s.PIXELS_PER_SUPERPIXEL = 256
    s.HISTOGRAM_BINS = 5  # 15 for MoCo training, 5 for supervised / dense (released code)
    s.ITERATIONS = 15  # 20 for MoCo training, 15 for supervised / dense
    s.PRIOR = 2
    # "rgb": SEEDS on the image. "released_segmenter": on (image * 255) in uint8 arithmetic, i.e.
    # (-v) mod 256 per channel, as the authors' Segmenter code does in training and evaluation
    # (segm/data/utils.py generate_superpixels); Segmenter weights trained with it need it.
    s.SEEDS_INPUT = "rgb"
    return cfg


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
