"""Convert released CAST, DINO and timm ViT weights to Detectron2 checkpoints.

Layouts read (command line: ``tools/convert_cast_checkpoint.py``):

* ``cast-moco``: the authors' MoCo-v3 ``checkpoint_0099.pth.tar`` = {epoch, arch, state_dict,
  optimizer, scaler}. ``module.base_encoder.*`` is kept without ``head``; the momentum encoder and
  the predictor are dropped. Classification variants store each block twice, ``blocks.{i}`` and
  ``blocks{k}.{i}`` (group k, original flat numbering): the flat copy is kept after checking that
  both are identical. The fixed sin-cos ``pos_embed`` is checked against ours and dropped.
* ``cast-deit``: the authors' DeiT ``best_checkpoint.pth`` = {model, optimizer, lr_scheduler,
  epoch, model_ema, scaler, args}; ``args`` is an ``argparse.Namespace``, allowed explicitly in a
  ``weights_only`` load (nothing else is unpickled). Its learned ``pos_embed`` (1, 1+HW, D) is
  split into ``pe_token`` and a (1, HW, D) grid: the model needs ``MODEL.CAST.POS_EMBED: learned``.
* ``dino`` / ``timm-vit``: plain ViT state dicts (``cls_token``, ``pos_embed``,
  ``patch_embed.proj``, ``blocks.i.*``, ``norm``; ``.pth`` or ``.safetensors``) for
  :class:`hiseg.modeling.ViTBackbone`, whose transformer sits at ``backbone.vit.*``.

CAST renames: ``patch_embed.proj.N`` -> ``stem.proj.N``, ``pool{k}.pool_block.X`` ->
``pools.{k-1}.X``; ``cls_token``, ``pe_token``, ``blocks.i``, ``norm`` keep their names. Every
converted state dict is checked against a freshly built encoder of the inferred size (missing /
unexpected keys, shapes), so a file that converts also loads.
"""
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "FORMATS", "MODELS", "DEFAULT_PREFIX", "CheckpointConversionError", "ConversionResult",
    "load_checkpoint_file", "detect_format", "extract_state_dict", "merge_duplicate_blocks",
    "convert_cast_state_dict", "convert_vit_state_dict", "convert_checkpoint", "add_prefix",
    "to_detectron2_checkpoint", "save_detectron2_checkpoint", "find_prefix", "verify_against_model",
    "describe_needed_config",
]

FORMATS = ("auto", "cast-moco", "cast-deit", "dino", "timm-vit")
MODELS = ("cast", "vit")
# where the weights live inside a detectron2 meta-architecture; a CAST backbone wrapped by
# detectron2's FPN (build_cast_fpn_backbone) is at "backbone.bottom_up.encoder."
DEFAULT_PREFIX = {"cast": "backbone.encoder.", "vit": "backbone.vit."}
_FORMAT_MODEL = {"cast-moco": "cast", "cast-deit": "cast", "dino": "vit", "timm-vit": "vit"}
_MOCO_PREFIXES = ("module.base_encoder.", "base_encoder.")
_DUP_BLOCK = re.compile(r"^blocks(\d+)\.(\d+)\.(.+)$")
_FLAT_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_POOL = re.compile(r"^pool(\d+)\.pool_block\.(.+)$")
_SINCOS_TOL = 1e-5


class CheckpointConversionError(ValueError):
    """A checkpoint that cannot be converted: unknown layout, missing keys, shape mismatch..."""


# what each layout was converted from, for messages and the checkpoint's stored config
_SOURCES = {"cast-moco": "official CAST MoCo-v3 weights (cast-moco)",
            "cast-deit": "official CAST DeiT weights (cast-deit)",
            "dino": "DINO ViT weights", "timm-vit": "timm ViT weights"}


@dataclass
class ConversionResult:
    """``state_dict``: converted, without prefix. ``config``: the config values the weights need
    (e.g. ``{"MODEL.CAST.POS_EMBED": "learned"}``): shapes and layouts, without which the tensors
    do not mean what they meant. ``trained_with``: the runtime settings the weights were trained
    with (for the released CAST models: nearest token pooling, empty tokens attended, 12 heads,
    kappa 5); other values give another function than the released one. Both are stored in the
    Detectron2 checkpoint (:func:`to_detectron2_checkpoint`) and checked when it is loaded
    (``hiseg.engine.weights_config``). ``messages``: what was dropped / checked."""

    state_dict: "OrderedDict[str, torch.Tensor]"
    model: str
    format: str
    config: Dict[str, Any] = field(default_factory=dict)
    messages: List[str] = field(default_factory=list)
    trained_with: Dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return _SOURCES.get(self.format, f"{self.format} weights")


# ----------------------------------------------------------------------------------------------
# reading
def load_checkpoint_file(path: str) -> Any:
    """Load a ``.pth`` / ``.pth.tar`` / ``.pt`` / ``.pkl`` / ``.safetensors`` file with
    :func:`hiseg.checkpoint_io.read_checkpoint`: ``weights_only`` unpickling with only
    ``argparse.Namespace`` allowed besides torch's defaults (NumPy arrays for plain pickles); a
    file that is not a checkpoint, truncated or damaged is named in one line, and
    ``weights_only=False`` is never suggested."""
    from hiseg.checkpoint_io import read_checkpoint
    from hiseg.errors import CheckpointError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    try:
        return read_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointConversionError(str(e)) from None


def _first_keys(obj: Any, n: int = 8) -> str:
    if not isinstance(obj, Mapping):
        return f"<{type(obj).__name__}, not a dict>"
    keys = list(obj.keys())
    more = f", ... ({len(keys)} keys)" if len(keys) > n else ""
    return ", ".join(repr(k) for k in keys[:n]) + more


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip_common_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return dict(sd)


def _looks_cast(keys) -> bool:
    return any(k.endswith("patch_embed.proj.12.weight") or ".pool_block." in k or k.startswith("pool1.")
               for k in keys)


def _looks_vit(keys) -> bool:
    keys = set(keys)
    return "patch_embed.proj.weight" in keys and any(k.startswith("blocks.0.attn.qkv.") for k in keys)


def _vit_candidates(obj: Mapping) -> Optional[Dict[str, torch.Tensor]]:
    """The ViT weights in a plain dict or a (DINO / timm) training-checkpoint wrapper."""
    for key in ("teacher", "state_dict", "model", None):
        inner = obj if key is None else obj.get(key)
        if not _is_state_dict(inner):
            continue
        sd = _strip_common_prefix(inner, "module.")
        if any(k.startswith("backbone.") for k in sd):  # DINO full checkpoint: backbone + head
            sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        if _looks_vit(sd):
            return sd
    return None


def detect_format(obj: Any, path: Optional[str] = None) -> str:
    """Name the layout of a loaded checkpoint (one of ``FORMATS`` without ``auto``)."""
    if not isinstance(obj, Mapping):
        raise CheckpointConversionError(f"unknown checkpoint layout: expected a dict, got {type(obj).__name__}")
    sd = obj.get("state_dict")
    if _is_state_dict(sd) and any(k.startswith(_MOCO_PREFIXES) for k in sd):
        return "cast-moco"
    for key in ("model", "model_ema"):
        inner = obj.get(key)
        if _is_state_dict(inner) and _looks_cast(_strip_common_prefix(inner, "module.")):
            return "cast-deit"
    if _is_state_dict(obj):
        keys = list(obj.keys())
        if any(k.startswith(_MOCO_PREFIXES) for k in keys):
            return "cast-moco"
        if _looks_cast(keys):  # an already unwrapped CAST state dict
            return "cast-moco" if "pe_token" in obj else "cast-deit"
    if _vit_candidates(obj) is not None:
        plain_dino = _is_state_dict(obj) and not any(k.startswith(("head", "fc_norm", "reg_token")) for k in obj)
        is_st = path is not None and path.endswith(".safetensors")
        return "dino" if ("teacher" in obj or plain_dino) and not is_st else "timm-vit"
    inner = ""
    for key in ("state_dict", "model", "teacher"):
        if isinstance(obj.get(key), Mapping):
            inner += f"; under {key!r}: {_first_keys(obj[key])}"
    raise CheckpointConversionError(
        f"unknown checkpoint layout{' in ' + path if path else ''}: first keys {_first_keys(obj)}{inner}. "
        f"Expected a CAST MoCo checkpoint (state_dict with 'module.base_encoder.*'), a CAST DeiT "
        f"checkpoint ('model' with 'patch_embed.proj.12.*', 'pool1.pool_block.*'), or a DINO / timm "
        f"ViT state dict ('patch_embed.proj.weight', 'blocks.0.attn.qkv.weight').")


def extract_state_dict(obj: Any, fmt: str, use_ema: bool = False) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The backbone's tensors under the original names, and messages on what was left out."""
    msgs: List[str] = []
    if not isinstance(obj, Mapping):
        raise CheckpointConversionError(f"unknown checkpoint layout: expected a dict, got {type(obj).__name__}")
    if fmt == "cast-moco":
        sd = obj.get("state_dict", obj)
        if not _is_state_dict(sd):
            raise CheckpointConversionError(
                f"cast-moco: expected a state dict under 'state_dict'; first keys {_first_keys(obj)}")
        prefix = next((p for p in _MOCO_PREFIXES if any(k.startswith(p) for k in sd)), None)
        if prefix is None:
            if not _looks_cast(sd):
                raise CheckpointConversionError(
                    f"cast-moco: no 'module.base_encoder.*' keys and no CAST keys; first keys {_first_keys(sd)}")
            return dict(sd), msgs
        kept = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        dropped: Dict[str, int] = {}
        for k in sd:
            if not k.startswith(prefix):
                group = k.split(".")[1] if k.startswith("module.") else k.split(".")[0]
                dropped[group] = dropped.get(group, 0) + 1
        if dropped:
            msgs.append("dropped " + ", ".join(f"{n} '{g}' tensors" for g, n in sorted(dropped.items()))
                        + f" (only '{prefix}*' is the backbone)")
        return kept, msgs
    if fmt == "cast-deit":
        key = "model_ema" if use_ema else "model"
        sd = obj.get(key, obj if key == "model" else None)
        if not _is_state_dict(sd):
            raise CheckpointConversionError(
                f"cast-deit: expected a state dict under {key!r}; first keys {_first_keys(obj)}")
        if use_ema:
            msgs.append("using the EMA weights ('model_ema')")
        return _strip_common_prefix(sd, "module."), msgs
    if fmt in ("dino", "timm-vit"):
        if use_ema:
            key = next((k for k in ("state_dict_ema", "model_ema") if _is_state_dict(obj.get(k))), None)
            if key is None:
                raise CheckpointConversionError(f"{fmt}: no EMA weights ('state_dict_ema' / 'model_ema'); "
                                                f"first keys {_first_keys(obj)}")
            obj = {"state_dict": obj[key]}
            msgs.append(f"using the EMA weights ({key!r})")
        sd = _vit_candidates(obj)
        if sd is None:
            raise CheckpointConversionError(
                f"{fmt}: no ViT state dict found (need 'patch_embed.proj.weight' and 'blocks.0.attn.qkv.*'); "
                f"first keys {_first_keys(obj)}")
        if "teacher" in obj:
            msgs.append("DINO training checkpoint: using the teacher's backbone")
        return sd, msgs
    raise CheckpointConversionError(f"unknown format {fmt!r}; choose from {FORMATS}")


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


def _count_indices(keys, pattern) -> int:
    idx = {int(m.group(1)) for m in map(pattern.match, keys) if m}
    if idx and idx != set(range(len(idx))):
        raise CheckpointConversionError(f"non-consecutive indices {sorted(idx)} for {pattern.pattern!r}")
    return len(idx)


def _require(sd, key, ndim=None):
    if key not in sd:
        raise CheckpointConversionError(f"missing key {key!r}; first keys {_first_keys(sd)}")
    t = sd[key]
    if ndim is not None and t.dim() != ndim:
        raise CheckpointConversionError(f"{key!r} has shape {tuple(t.shape)}, expected {ndim} dimensions")
    return t


def _compare(converted: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str,
             optional=("num_batches_tracked",)) -> None:
    missing = [k for k in expected if k not in converted and not k.endswith(optional)]
    unexpected = [k for k in converted if k not in expected]
    mismatched = [f"{k!r}: checkpoint {tuple(converted[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in converted if k in expected and tuple(converted[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:12]}{' ...' if len(missing) > 12 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:12]}{' ...' if len(unexpected) > 12 else ''}")
    if mismatched:
        problems.append("shape mismatch " + "; ".join(mismatched[:12]))
    if problems:
        raise CheckpointConversionError(f"{what}: " + "; ".join(problems))


def _sincos_table(n: int, dim: int, row_first: bool) -> torch.Tensor:
    from .modeling.stem import sincos_position_embedding

    s = math.isqrt(n)
    return sincos_position_embedding((s, s), dim, row_first=row_first)


def convert_cast_state_dict(sd: Mapping[str, torch.Tensor], fmt: str = "cast-moco",
                            num_heads: int = 12) -> ConversionResult:
    """CAST weights under the released names -> our ``CASTEncoder`` names (no prefix).

    ``num_heads`` is not stored in the weights (the released CAST-S and CAST-B use 12): it goes
    into ``trained_with`` with the released code's other runtime settings. Those are the ones
    of the released MoCo-v3 / DeiT training (and linear probing) code: the label map resized to
    the stem grid (``TOKEN_POOL_MODE: nearest``), a superpixel that vanishes there kept as an
    all-zero token that takes part in attention and pooling (``EMPTY_TOKENS: attend``), and
    assignment logits ``5 x cosine`` (``KAPPA: 5``)."""
    msgs: List[str] = []
    sd, group_depths = merge_duplicate_blocks(sd)
    if group_depths is not None:
        msgs.append(f"checked the duplicated block copies (groups {group_depths}) against blocks.i and dropped them")
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    head = [k for k in sd if k.startswith(("head.", "head_dist."))]
    if head:
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

    # check against a freshly built encoder of that size (the head count does not change shapes)
    from .modeling.encoder import CASTEncoder

    ref = CASTEncoder(embed_dim=dim, depths=depths, num_heads=1, num_segments=[1] * len(depths),
                      mlp_ratio=mlp_ratio, pooling=bool(num_pools), pos_embed=pos_mode, pos_grid=grid)
    _compare(out, ref.state_dict(), "CAST checkpoint does not fit our CASTEncoder")
    return ConversionResult(out, "cast", fmt, config, msgs, trained_with)


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


# ----------------------------------------------------------------------------------------------
def convert_checkpoint(src: Union[str, Mapping], fmt: str = "auto", model: Optional[str] = None,
                       use_ema: bool = False, img_size=None, num_heads: int = 12) -> ConversionResult:
    """Read ``src`` (a path or a loaded checkpoint) in layout ``fmt`` and convert it for
    ``model`` ("cast" or "vit"; default: the format's model). ``img_size`` is for ViT weights,
    ``num_heads`` for CAST weights (not stored in them)."""
    if fmt not in FORMATS:
        raise CheckpointConversionError(f"unknown format {fmt!r}; choose from {FORMATS}")
    if model is not None and model not in MODELS:
        raise CheckpointConversionError(f"unknown model {model!r}; choose from {MODELS}")
    path = src if isinstance(src, str) else None
    obj = load_checkpoint_file(src) if isinstance(src, str) else src
    if fmt == "auto":
        fmt = detect_format(obj, path)
    target = _FORMAT_MODEL[fmt]
    if model is not None and model != target:
        raise CheckpointConversionError(
            f"format {fmt!r} holds {target!r} weights; they cannot be converted for model {model!r}")
    sd, msgs = extract_state_dict(obj, fmt, use_ema=use_ema)
    if target == "cast":
        if img_size is not None:
            raise CheckpointConversionError("img_size resamples ViT position embeddings; CAST's sin-cos or "
                                            "learned grid is resized by the encoder itself")
        result = convert_cast_state_dict(sd, fmt, num_heads=num_heads)
    else:
        result = convert_vit_state_dict(sd, fmt, img_size=img_size)
    result.messages[:0] = [f"format: {fmt}"] + msgs
    return result


def describe_needed_config(result: ConversionResult) -> str:
    """The converter's report of the config values the weights need (stored in the output)."""
    from hiseg.engine.weights_config import command_line_overrides

    out = ["config values these weights need (stored in the output; loading them into a config with "
           "other values fails):"]
    out += [f"  {k}: {v}" for k, v in result.config.items()]
    if result.trained_with:
        out.append("settings they were trained with (stored too; evaluating with other values fails unless "
                   "HISEG.WEIGHTS_CONFIG_CHECK warn, fine-tuning with them logs a warning):")
        out += [f"  {k}: {v}" for k, v in result.trained_with.items()]
    out.append("on the command line: " + command_line_overrides({**result.config, **result.trained_with}))
    return "\n".join(out)


def add_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> "OrderedDict[str, torch.Tensor]":
    if prefix and not prefix.endswith("."):
        prefix += "."
    return OrderedDict((prefix + k, v.detach().clone().contiguous()) for k, v in sd.items())


def to_detectron2_checkpoint(result: Union[ConversionResult, Mapping[str, torch.Tensor]],
                             prefix: Optional[str] = None, author: Optional[str] = None) -> Dict[str, Any]:
    """``{"model": prefixed state dict, "__author__": ..., "matching_heuristics": False}`` and,
    for a :class:`ConversionResult`, the config values the weights need under
    ``hiseg.engine.weights_config.WEIGHTS_CONFIG_KEY`` (checked when the file is loaded).
    ``prefix`` defaults to ``DEFAULT_PREFIX[result.model]`` (a bare state dict: CAST's)."""
    from hiseg.engine.weights_config import WEIGHTS_CONFIG_KEY

    if isinstance(result, ConversionResult):
        sd, model, fmt = result.state_dict, result.model, result.format
    else:
        sd, model, fmt = result, "cast", "state dict"
    if prefix is None:
        prefix = DEFAULT_PREFIX[model]
    if prefix and not prefix.endswith("."):
        prefix += "."
    data = {"model": add_prefix(sd, prefix),
            "__author__": author or f"hiseg convert_cast_checkpoint ({fmt})",
            "matching_heuristics": False}
    if isinstance(result, ConversionResult):
        data[WEIGHTS_CONFIG_KEY] = {"source": result.source, "required": dict(result.config),
                                    "trained_with": dict(result.trained_with), "holds": prefix}
    return data


def save_detectron2_checkpoint(result: Union[ConversionResult, Mapping[str, torch.Tensor]], path: str,
                               prefix: Optional[str] = None, author: Optional[str] = None) -> Dict[str, Any]:
    """Save :func:`to_detectron2_checkpoint` with ``torch.save`` for ``MODEL.WEIGHTS``; returns it."""
    data = result if isinstance(result, dict) and "model" in result and "matching_heuristics" in result \
        else to_detectron2_checkpoint(result, prefix, author)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    torch.save(data, path)
    return data


def find_prefix(model: torch.nn.Module, kind: str) -> str:
    """Where a built model holds the CAST encoder (``kind="cast"``) or the ViT (``"vit"``), e.g.
    ``"backbone.encoder."`` or ``"backbone.bottom_up.encoder."``."""
    if kind == "cast":
        from .modeling.encoder import CASTEncoder as target
    elif kind == "vit":
        from timm.models.vision_transformer import VisionTransformer as target
    else:
        raise CheckpointConversionError(f"unknown model {kind!r}; choose from {MODELS}")
    for name, module in model.named_modules():
        if isinstance(module, target):
            return name + "." if name else ""
    raise CheckpointConversionError(f"the model holds no {target.__name__} (is its backbone a {kind} backbone?)")


def verify_against_model(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str) -> None:
    """Check a prefixed state dict against a built model: every key must exist with the same
    shape, and every model tensor under ``prefix`` must be provided."""
    if prefix and not prefix.endswith("."):
        prefix += "."
    expected = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    if not expected:
        roots = sorted({k.split(".")[0] + "." + k.split(".")[1] for k in model.state_dict() if "." in k})[:10]
        raise CheckpointConversionError(f"the model has no parameters under {prefix!r}; it has e.g. {roots}")
    _compare(state_dict, expected, f"converted weights do not fit the model under {prefix!r}")
