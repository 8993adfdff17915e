"""The ViT of :class:`~hiseg_oap.pseudo_labels.feature_sources.ViTKeySource`: randomly initialised
(:func:`random_vit`, with a warning: its masks only test the pipeline) or built for converted
weights (:func:`vit_from_converted`).

Weights come as a DINO / timm checkpoint or a detectron2 checkpoint holding a ViT under
``...vit.`` (:func:`vit_state_dict_from_detectron2`); the caller converts them with the ViT weight
converters (those of ``tools/convert_cast_checkpoint.py --model vit``) and the architecture then
comes from the weights. Every ViT is :func:`hiseg.modeling.vit.make_timm_vit`; ``arch`` names one of
:data:`hiseg.modeling.vit.VIT_PRESETS`.
"""
from __future__ import annotations

import os
import sys
from typing import Mapping, Optional, Tuple

import torch

from hiseg.errors import CheckpointError, UsageError
from hiseg.checkpoint.prefixes import find_vit_prefix
from hiseg.modeling.vit import VIT_PRESETS, make_timm_vit

from .feature_sources import random_init_warning

__all__ = ["random_vit", "vit_state_dict_from_detectron2", "read_vit_weights", "vit_from_converted"]


def _preset(arch: str) -> Tuple[int, int, int]:
    p = VIT_PRESETS[arch]
    return p["embed_dim"], p["depth"], p["num_heads"]


def random_vit(arch: str = "vit_base", patch: Optional[int] = None, embed_dim: Optional[int] = None,
               depth: Optional[int] = None, heads: Optional[int] = None, seed: int = 0):
    """(timm ViT, patch size, description) of a random initialisation (seeded with ``seed``,
    without touching the caller's RNG): ``arch`` with the given overrides, patch 8 by default."""
    arch_dim, arch_depth, arch_heads = _preset(arch)
    fix = "Pass e.g. DINO's dino_vitbase8_pretrain.pth with --vit-weights for meaningful masks."
    print(random_init_warning("the ViT (no --vit-weights given)", fix), file=sys.stderr, flush=True)
    dim = embed_dim or arch_dim
    depth = depth or arch_depth
    heads = heads or arch_heads
    patch = patch or 8
    if dim % heads:
        raise UsageError(f"--embed-dim {dim} is not divisible by --heads {heads}")
    with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG
        torch.manual_seed(seed)
        model = make_timm_vit(embed_dim=dim, depth=depth, num_heads=heads, patch_size=patch, img_size=224)
    desc = f"random-init ViT ({dim}-d, {depth} blocks, {heads} heads, patch {patch}; seed {seed})"
    return model, patch, desc


def vit_state_dict_from_detectron2(obj) -> Optional[dict]:
    """The ViT weights of a detectron2 checkpoint (``{"model": {"backbone.vit.*": ...}}``), with
    the prefix up to ``vit.`` removed (:func:`hiseg.checkpoint.prefixes.find_vit_prefix`: the online
    encoder of a MoCo checkpoint, the student of an OAP one); None if the file is not one."""
    inner = obj.get("model") if isinstance(obj, Mapping) else None
    if not isinstance(inner, Mapping) or not all(isinstance(k, str) for k in inner):
        return None
    prefix = find_vit_prefix(inner)
    if prefix is None or not (prefix == "vit." or prefix.endswith(".vit.")):
        return None
    return {k[len(prefix):]: v for k, v in inner.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)}


def read_vit_weights(path: str, weights_format: str = "auto"):
    """(the loaded checkpoint, its ViT state dict if it is a detectron2 checkpoint holding one, else
    None; only looked for with ``weights_format`` ``auto``). A file that is not a checkpoint raises
    UsageError."""
    from hiseg.checkpoint.io import read_checkpoint

    try:
        obj = read_checkpoint(path)  # not a checkpoint / damaged: one-line CheckpointError
    except CheckpointError as e:
        raise UsageError(f"--vit-weights {e}") from e
    return obj, (vit_state_dict_from_detectron2(obj) if weights_format == "auto" else None)


def vit_from_converted(result, weights: str, arch: str = "vit_base", patch: Optional[int] = None,
                       embed_dim: Optional[int] = None, depth: Optional[int] = None, heads: Optional[int] = None):
    """(timm ViT, patch size, description) holding converted ViT weights (``result``: a
    ``ConversionResult`` with the ``MODEL.VIT.*`` values in ``config``, read from the file
    ``weights``). ``patch`` / ``embed_dim`` / ``depth``, when given, must agree with the weights;
    the head count is not stored in them: ``heads``, else the ``arch``'s when the width is its
    own, else the one the weights were trained with."""
    arch_dim, _, arch_heads = _preset(arch)
    c = result.config
    dim, n_blocks, size = c["MODEL.VIT.EMBED_DIM"], c["MODEL.VIT.DEPTH"], c["MODEL.VIT.PATCH_SIZE"]
    for flag, given, actual in (("--patch", patch, size), ("--embed-dim", embed_dim, dim),
                                ("--depth", depth, n_blocks)):
        if given is not None and int(given) != int(actual):
            raise UsageError(f"{flag} {given} contradicts --vit-weights, which hold {actual}")
    # the head count is not stored in the weights (it only splits the attention)
    heads = heads or (arch_heads if dim == arch_dim else result.trained_with["MODEL.VIT.NUM_HEADS"])
    if dim % heads:
        raise UsageError(f"the weights' embed dim {dim} is not divisible by --heads {heads}")
    img = c["MODEL.VIT.IMG_SIZE"]
    model = make_timm_vit(
        embed_dim=dim, depth=n_blocks, num_heads=heads, patch_size=size, mlp_ratio=c["MODEL.VIT.MLP_RATIO"],
        img_size=tuple(img) if isinstance(img, (list, tuple)) else int(img),
        class_token=c["MODEL.VIT.CLASS_TOKEN"], reg_tokens=c["MODEL.VIT.REG_TOKENS"],
        no_embed_class=c["MODEL.VIT.NO_EMBED_CLASS"], layer_scale=c.get("MODEL.VIT.LAYER_SCALE"))
    missing, unexpected = model.load_state_dict(result.state_dict, strict=False)
    missing = [k for k in missing if not k.startswith("norm.")]  # the final norm is not used for keys
    if missing or unexpected:
        raise UsageError(f"--vit-weights {weights}: missing {missing[:6]}, unexpected {unexpected[:6]}")
    desc = (f"ViT from {os.path.basename(weights)} ({result.format}; {dim}-d, {n_blocks} blocks, "
            f"{heads} heads, patch {size})")
    return model, size, desc
