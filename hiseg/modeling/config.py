"""Config keys of the shared plain-ViT backbone (``add_vit_config``)."""
from detectron2.config import CfgNode as CN

__all__ = ["add_vit_config"]


def add_vit_config(cfg):
    """Add ``MODEL.VIT.*`` (defaults: ViT-S/16, DINO's ``dino_deitsmall16``). Idempotent."""
    if "VIT" in cfg.MODEL:
        return cfg
    cfg.MODEL.VIT = CN()
    v = cfg.MODEL.VIT
    v.EMBED_DIM = 384
    v.DEPTH = 12
    v.NUM_HEADS = 6
    v.PATCH_SIZE = 16
    v.MLP_RATIO = 4.0
    v.DROP_PATH_RATE = 0.0
    # size the learned position embedding was trained at (grid = IMG_SIZE / PATCH_SIZE); any
    # input size works, the embedding is interpolated. An int or [height, width].
    v.IMG_SIZE = 224
    v.CLASS_TOKEN = True
    v.REG_TOKENS = 0  # register tokens (timm ``reg_tokens``)
    v.NO_EMBED_CLASS = False  # True: the position embedding has no class-token entry (DeiT-3)
    v.LAYER_SCALE = 0.0  # > 0: LayerScale with this init value (timm ``init_values``)
    v.FINAL_NORM = True  # apply the final LayerNorm before the pyramid
    # recompute each block's activations in the backward pass instead of storing them (less GPU
    # memory, ~30% more step time; same loss and gradients). Also the ViT inside OAP's ViT-Adapter.
    v.ACTIVATION_CHECKPOINTING = False
    v.FROZEN = False  # freeze the ViT (patch embedding, tokens, blocks, norm); the pyramid trains
    # simple feature pyramid (ViTDet): any of p2..p6 / res2..res5 (strides 4..64)
    v.OUT_FEATURES = ["p2", "p3", "p4", "p5"]
    v.OUT_CHANNELS = 256
    v.NORM = "LN"  # "LN" (channel LayerNorm), "" (none), or any detectron2 norm ("GN", "BN", ...)
    return cfg
