"""CAST weights under the released names -> our ``CASTEncoder``."""
import math
import re
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from .common import (_DUP_BLOCK, _FLAT_BLOCK, _POOL, _SINCOS_TOL, CheckpointConversionError, ConversionResult,
                     _compare, _count_indices, _first_keys,
                     _require)


# ----------------------------------------------------------------------------------------------
# CAST
def merge_duplicate_blocks(sd: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Optional[List[int]]]:
    """Drop the per-group block copies (``blocks{k}.{i}.*``) after checking them against the flat
    ``blocks.{i}.*``. Returns the state dict and the group depths (None without copies)."""
    groups: Dict[int, set] = {}
    for k in sd:
        m = _DUP_BLOCK.match(k)
        if m:
            groups.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not groups:
        return dict(sd), None
    order = sorted(groups)
    if min(groups[order[0]]) == 0 and all(min(groups[b]) == max(groups[a]) + 1 for a, b in zip(order, order[1:])):
        offsets = {g: 0 for g in order}  # released layout: blocks2.3 is flat block 3
    elif all(min(groups[g]) == 0 for g in order):  # numbered within each group
        offsets, start = {}, 0
        for g in order:
            offsets[g] = start
            start += max(groups[g]) + 1
    else:
        raise CheckpointConversionError(
            "cannot tell how the grouped block copies are numbered: "
            + ", ".join(f"blocks{g}.{sorted(groups[g])}" for g in order))
    out = {k: v for k, v in sd.items() if not _DUP_BLOCK.match(k)}
    for k, v in sd.items():
        m = _DUP_BLOCK.match(k)
        if not m:
            continue
        flat = f"blocks.{offsets[int(m.group(1))] + int(m.group(2))}.{m.group(3)}"
        if flat not in sd:
            out[flat] = v  # only the grouped copy exists
            continue
        ref = sd[flat]
        if ref.shape != v.shape:
            raise CheckpointConversionError(
                f"duplicated block weights differ in shape: {k!r} {tuple(v.shape)} vs {flat!r} {tuple(ref.shape)}")
        if not torch.equal(ref, v):
            diff = (ref.double() - v.double()).abs().max().item() if ref.is_floating_point() else float("nan")
            raise CheckpointConversionError(
                f"duplicated block weights differ: {k!r} is not equal to {flat!r} (max abs difference {diff:.3g}); "
                f"the checkpoint is inconsistent, refusing to pick one")
    return out, [len(groups[g]) for g in order]


def _sincos_table(n: int, dim: int, row_first: bool) -> torch.Tensor:
    from ..modeling.stem import sincos_position_embedding

    s = math.isqrt(n)
    return sincos_position_embedding((s, s), dim, row_first=row_first)


def convert_cast_state_dict(sd: Mapping[str, torch.Tensor], fmt: str = "cast-moco",
                            num_heads: int = 12) -> ConversionResult:
    """CAST weights under the released names -> our ``CASTEncoder`` names (no prefix), and the
    modules beside the encoder that ours has too (:mod:`.released_heads`) as parts.

    ``num_heads`` is not stored in the weights (the released CAST-S and CAST-B use 12): it goes
    into ``trained_with`` with the released code's other runtime settings. For the MoCo-v3, DeiT
    and linear-probe files (``cast-moco``, ``cast-seg-moco``, ``cast-deit``, ``cast-lincls``)
    those are the ones of the released training code: the label map resized to the stem grid
    (``TOKEN_POOL_MODE: nearest``; the COCO model's ``model_stage='pretrain'`` does the same), a
    superpixel that vanishes there kept as an all-zero token that takes part in attention and
    pooling (``EMPTY_TOKENS: attend``), and assignment logits ``5 x cosine`` (``KAPPA: 5``). The
    Segmenter files (``cast-segmenter``) were trained with the segmentation code's pooling: stem
    features upsampled bilinearly to the label map and the position table resized bicubically
    over the image (``TOKEN_POOL_MODE: bilinear``, ``POS_RESIZE: stretch``), on SEEDS superpixels
    of the wrapped image ``(uint8 * 255) mod 256`` (``SUPERPIXEL.SEEDS_INPUT: released_segmenter``).

    Per layout: the classifier ``head`` of ``cast-deit`` / ``cast-lincls`` becomes a part; the
    MoCo projector ``head.*`` of ``cast-moco`` / ``cast-seg-moco`` and the unused 1000-class
    ``head`` of the Segmenter encoder are dropped; ``block_fusion.*`` (segmentation models) is
    folded into the ``fuse`` part; ``decoder.*`` (Segmenter) becomes the ``head`` part. The
    COCO model has no final ``norm`` (the class-token LayerNorm): it is listed in
    ``not_held`` and the model keeps its own (nothing in the segmentation configs reads it)."""
    from .released_heads import classifier_part, fold_block_fusion, segmenter_decoder_part

    msgs: List[str] = []
    had_flat = any(_FLAT_BLOCK.match(k) for k in sd)
    sd, group_depths = merge_duplicate_blocks(sd)
    if group_depths is not None:
        msgs.append(f"checked the duplicated block copies (groups {group_depths}) against blocks.i and dropped them"
                    if had_flat else f"blocks numbered per group {group_depths} renumbered to blocks.0-"
                                     f"{sum(group_depths) - 1}")
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    parts = {}
    if any(k.startswith("decoder.") for k in sd):
        parts["head"] = segmenter_decoder_part(sd)
    if any(k.startswith("block_fusion.") for k in sd):
        parts["fuse"] = fold_block_fusion(sd)
    sd = {k: v for k, v in sd.items() if not k.startswith(("decoder.", "block_fusion."))}
    head = [k for k in sd if k.startswith(("head.", "head_dist."))]
    if head:
        part = None
        if fmt in ("cast-deit", "cast-lincls") and "head" not in parts:
            part = classifier_part(sd, "DeiT classifier" if fmt == "cast-deit" else "linear-probe classifier")
        if part is not None:
            parts["head"] = part
        elif fmt in ("cast-moco", "cast-seg-moco"):
            msgs.append(f"dropped the MoCo projector ({len(head)} 'head.*' tensors)")
        elif fmt == "cast-segmenter":
            msgs.append(f"dropped the encoder's classifier ({', '.join(head)}): the released Segmenter never reads it")
        else:
            msgs.append(f"dropped the classifier ({', '.join(head)})")
    pos = None
    for k, v in sd.items():
        if k in head:
            continue
        if k == "pos_embed":
            pos = v
            continue
        m = _POOL.match(k)
        if k.startswith("patch_embed.proj."):
            k = "stem.proj." + k[len("patch_embed.proj."):]
        elif m:
            k = f"pools.{int(m.group(1)) - 1}.{m.group(2)}"
        out[k] = v

    cls = _require(out, "cls_token", 3)
    dim = cls.shape[-1]
    config: Dict[str, Any] = {"MODEL.CAST.EMBED_DIM": int(dim)}
    pos_mode, grid = "sincos", (28, 28)
    if pos is not None:
        if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[2] != dim:
            raise CheckpointConversionError(f"'pos_embed' has shape {tuple(pos.shape)}, expected (1, N, {dim})")
        n = pos.shape[1]
        if math.isqrt(n) ** 2 == n and "pe_token" in out:
            s = math.isqrt(n)
            err = (pos[0].double() - _sincos_table(n, dim, True).double()).abs().max().item()
            if err > _SINCOS_TOL:
                col = (pos[0].double() - _sincos_table(n, dim, False).double()).abs().max().item()
                hint = (" It matches the column-first layout (MODEL.CAST.POS_ROW_FIRST: False) instead; "
                        "convert it by hand if that is intended." if col <= _SINCOS_TOL else
                        " It is not a fixed sin-cos table (a learned embedding?).")
                raise CheckpointConversionError(
                    f"'pos_embed' {tuple(pos.shape)} differs from our fixed 2-D sin-cos table "
                    f"sincos_position_embedding(({s}, {s}), {dim}, row_first=True) by up to {err:.3g} "
                    f"(tolerance {_SINCOS_TOL}); our encoder would not reproduce it.{hint}")
            msgs.append(f"'pos_embed' equals our fixed sin-cos table on a {s}x{s} grid (max difference "
                        f"{err:.1e}): dropped, the encoder recomputes it")
            config["MODEL.CAST.POS_EMBED"] = "sincos"
        elif math.isqrt(n - 1) ** 2 == n - 1 and n > 1 and "pe_token" not in out:
            s = math.isqrt(n - 1)
            pos_mode, grid = "learned", (s, s)
            out["pe_token"] = pos[:, :1].clone()
            out["pos_embed"] = pos[:, 1:].clone()
            config["MODEL.CAST.POS_EMBED"] = "learned"
            config["MODEL.CAST.POS_GRID"] = [s, s]
            msgs.append(f"learned 'pos_embed' {tuple(pos.shape)} split into 'pe_token' (1, 1, {dim}) and a "
                        f"{s}x{s} grid: set MODEL.CAST.POS_EMBED: learned and MODEL.CAST.POS_GRID: [{s}, {s}]")
        else:
            raise CheckpointConversionError(
                f"'pos_embed' {tuple(pos.shape)} with{'' if 'pe_token' in out else 'out'} 'pe_token' is neither "
                f"a fixed square sin-cos grid (with pe_token) nor a learned class entry + square grid "
                f"(without pe_token)")
    elif "pe_token" not in out:
        raise CheckpointConversionError("missing keys ['pe_token', 'pos_embed']: no position embedding at all")

    num_blocks = _count_indices(out, _FLAT_BLOCK)
    num_pools = _count_indices(out, re.compile(r"^pools\.(\d+)\."))
    if num_blocks == 0:
        raise CheckpointConversionError(
            f"missing keys 'blocks.0.*': no transformer blocks; first keys {_first_keys(out)}")
    fc1 = _require(out, "blocks.0.mlp.fc1.weight", 2)
    mlp_ratio = fc1.shape[0] / dim
    if group_depths is not None and sum(group_depths) == num_blocks and (num_pools in (0, len(group_depths))):
        depths = group_depths
        config["MODEL.CAST.DEPTHS"] = list(depths)
    elif num_pools:
        if num_blocks < num_pools:
            raise CheckpointConversionError(f"{num_blocks} blocks cannot make {num_pools} block groups")
        depths = [num_blocks - num_pools + 1] + [1] * (num_pools - 1)  # only shapes matter here
        msgs.append(f"{num_blocks} blocks in {num_pools} groups: set MODEL.CAST.DEPTHS to the model's "
                    f"split (not stored in this checkpoint)")
    else:
        depths = [num_blocks]
    if not num_pools:
        config["MODEL.CAST.POOLING"] = False
    config["MODEL.CAST.MLP_RATIO"] = float(mlp_ratio)
    if pos_mode == "sincos":
        config["MODEL.CAST.POS_ROW_FIRST"] = True  # the table was checked against this layout
    msgs.append(f"MODEL.CAST.NUM_HEADS is not stored in the weights: {num_heads} assumed (the released "
                f"CAST-S and CAST-B use 12)")
    trained_with = {"MODEL.CAST.TOKEN_POOL_MODE": "nearest", "MODEL.CAST.EMPTY_TOKENS": "attend",
                    "MODEL.CAST.NUM_HEADS": int(num_heads), "MODEL.CAST.KAPPA": 5.0}
    if fmt == "cast-segmenter":
        trained_with["MODEL.CAST.TOKEN_POOL_MODE"] = "bilinear"
        trained_with["MODEL.CAST.POS_RESIZE"] = "stretch"
        # the released Segmenter code runs SEEDS on (uint8 image * 255) mod 256, in training and
        # in evaluation (hiseg_cast.superpixels module docstring)
        trained_with["MODEL.CAST.SUPERPIXEL.SEEDS_INPUT"] = "released_segmenter"
    not_held = []
    if "norm.weight" not in out and "norm.bias" not in out:
        not_held = ["norm.weight", "norm.bias"]
        msgs.append("no final 'norm' (the released segmentation model has none): the model keeps its own "
                    "class-token LayerNorm, which the segmentation meta-architectures never read")
    for name, part in parts.items():
        msgs.append(f"{part.what}")

    # check against a freshly built encoder of that size (the head count does not change shapes)
    from ..modeling.encoder import CASTEncoder

    ref = CASTEncoder(embed_dim=dim, depths=depths, num_heads=1, num_segments=[1] * len(depths),
                      mlp_ratio=mlp_ratio, pooling=bool(num_pools), pos_embed=pos_mode, pos_grid=grid)
    expected = {k: v for k, v in ref.state_dict().items() if k not in not_held}
    _compare(out, expected, "CAST checkpoint does not fit our CASTEncoder")
    return ConversionResult(out, "cast", fmt, config, msgs, trained_with, parts=parts, not_held=not_held)
