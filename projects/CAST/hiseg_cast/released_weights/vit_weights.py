"""DINO / timm ViT weights -> ``hiseg.modeling.ViTBackbone``."""
import math
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .common import (_FLAT_BLOCK, CheckpointConversionError, ConversionResult, _compare, _count_indices, _first_keys,
                     _require)


# ----------------------------------------------------------------------------------------------
# ViT
def _resample_pos_embed(pe: torch.Tensor, old: Tuple[int, int], new: Tuple[int, int], prefix: int) -> torch.Tensor:
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(pe, new_size=list(new), old_size=list(old), num_prefix_tokens=prefix)


def convert_vit_state_dict(sd: Mapping[str, torch.Tensor], fmt: str = "dino",
                           img_size: Optional[Union[int, Sequence[int]]] = None) -> ConversionResult:
    """DINO / timm ViT weights -> the timm ViT inside ``hiseg.modeling.ViTBackbone`` (no prefix).

    ``img_size``: resample the position embedding to ``img_size / patch`` (default: keep the
    trained grid and report the matching ``MODEL.VIT.IMG_SIZE``)."""
    msgs: List[str] = []
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    dropped = []
    for k, v in sd.items():
        if k.startswith(("head.", "head_dist.", "fc_norm.", "attn_pool.")) or k in ("head", "dist_token"):
            dropped.append(k)
            continue
        out[k] = v
    if dropped:
        msgs.append(f"dropped {len(dropped)} classifier / pooling tensors ({', '.join(dropped[:4])}"
                    f"{', ...' if len(dropped) > 4 else ''})")
    proj = _require(out, "patch_embed.proj.weight", 4)
    dim, in_chans, ph, pw = (int(s) for s in proj.shape)
    if ph != pw:
        raise CheckpointConversionError(
            f"'patch_embed.proj.weight' {tuple(proj.shape)}: non-square patches are not supported")
    depth = _count_indices(out, _FLAT_BLOCK)
    if depth == 0:
        raise CheckpointConversionError(f"missing keys 'blocks.0.*'; first keys {_first_keys(out)}")
    mlp_ratio = _require(out, "blocks.0.mlp.fc1.weight", 2).shape[0] / dim
    class_token = "cls_token" in out
    reg_tokens = int(out["reg_token"].shape[1]) if "reg_token" in out else 0
    prefix = int(class_token) + reg_tokens
    layer_scale = any(k.startswith("blocks.0.ls1.") for k in out)
    final_norm = "norm.weight" in out

    pe = _require(out, "pos_embed", 3)
    n = pe.shape[1]
    if prefix and math.isqrt(n - prefix) ** 2 == n - prefix and n > prefix:
        no_embed_class, s = False, math.isqrt(n - prefix)
    elif math.isqrt(n) ** 2 == n:
        no_embed_class, s = True, math.isqrt(n)
    else:
        raise CheckpointConversionError(
            f"'pos_embed' {tuple(pe.shape)} with {prefix} prefix token(s) is not a square grid")
    grid = (s, s)
    if img_size is not None:
        size = (int(img_size), int(img_size)) if isinstance(img_size, int) else tuple(int(x) for x in img_size)
        if size[0] % ph or size[1] % ph:
            raise CheckpointConversionError(f"image size {size} is not a multiple of the patch size {ph}")
        new_grid = (size[0] // ph, size[1] // ph)
        if new_grid != grid:
            n_prefix = 0 if no_embed_class else prefix
            out["pos_embed"] = _resample_pos_embed(pe.float(), grid, new_grid, n_prefix).to(pe.dtype)
            msgs.append(f"position embedding resampled from a {grid[0]}x{grid[1]} to a "
                        f"{new_grid[0]}x{new_grid[1]} grid")
            grid = new_grid
    config: Dict[str, Any] = {
        "MODEL.VIT.EMBED_DIM": dim, "MODEL.VIT.DEPTH": depth,
        "MODEL.VIT.NUM_HEADS": max(1, dim // 64), "MODEL.VIT.PATCH_SIZE": ph,
        "MODEL.VIT.MLP_RATIO": float(mlp_ratio),
        "MODEL.VIT.IMG_SIZE": grid[0] * ph if grid[0] == grid[1] else [grid[0] * ph, grid[1] * ph],
        "MODEL.VIT.CLASS_TOKEN": class_token, "MODEL.VIT.REG_TOKENS": reg_tokens,
        "MODEL.VIT.NO_EMBED_CLASS": no_embed_class,
    }
    trained_with = {"MODEL.VIT.NUM_HEADS": config.pop("MODEL.VIT.NUM_HEADS")}
    msgs.append(f"NUM_HEADS is not stored in the weights: {trained_with['MODEL.VIT.NUM_HEADS']} assumed (64-d heads, "
                f"true for DINO / DeiT ViT-S and ViT-B); check it")
    if layer_scale:
        config["MODEL.VIT.LAYER_SCALE"] = 1e-5
    if not final_norm:
        config["MODEL.VIT.FINAL_NORM"] = False

    from hiseg.modeling.vit import make_timm_vit

    try:
        with torch.device("meta"):
            ref = make_timm_vit(embed_dim=dim, depth=depth, num_heads=1, patch_size=ph, mlp_ratio=mlp_ratio,
                                img_size=(grid[0] * ph, grid[1] * ph), class_token=class_token,
                                reg_tokens=reg_tokens, no_embed_class=no_embed_class,
                                layer_scale=1e-5 if layer_scale else None, in_chans=in_chans)
    except Exception:  # pragma: no cover - a timm version that cannot build on "meta"
        ref = make_timm_vit(embed_dim=dim, depth=depth, num_heads=1, patch_size=ph, mlp_ratio=mlp_ratio,
                            img_size=(grid[0] * ph, grid[1] * ph), class_token=class_token,
                            reg_tokens=reg_tokens, no_embed_class=no_embed_class,
                            layer_scale=1e-5 if layer_scale else None, in_chans=in_chans)
    expected = ref.state_dict()
    if not final_norm:
        expected = {k: v for k, v in expected.items() if not k.startswith("norm.")}
        msgs.append("no final 'norm' in the checkpoint: set MODEL.VIT.FINAL_NORM: False")
    _compare(out, expected, "ViT checkpoint does not fit our ViT backbone")
    return ConversionResult(out, "vit", fmt, config, msgs, trained_with)
