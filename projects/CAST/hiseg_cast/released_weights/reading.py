"""Reading a released checkpoint file and telling its layout."""
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from hiseg.checkpoint.prefixes import first_prefix_present, strip_common_prefix, strip_prefix

from .common import _MOCO_PREFIXES, FORMATS, CheckpointConversionError, _first_keys, _is_state_dict


# ----------------------------------------------------------------------------------------------
# reading
def load_checkpoint_file(path: str) -> Any:
    """Load a ``.pth`` / ``.pth.tar`` / ``.pt`` / ``.pkl`` / ``.safetensors`` file with
    :func:`hiseg.checkpoint.io.read_checkpoint`: ``weights_only`` unpickling with only
    ``argparse.Namespace`` allowed besides torch's defaults (NumPy arrays for plain pickles); a
    file that is not a checkpoint, truncated or damaged is named in one line, and
    ``weights_only=False`` is never suggested."""
    from hiseg.checkpoint.io import read_checkpoint
    from hiseg.errors import CheckpointError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    try:
        return read_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointConversionError(str(e)) from None


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
        sd = strip_common_prefix(inner, "module.")
        if any(k.startswith("backbone.") for k in sd):  # DINO full checkpoint: backbone + head
            sd = strip_prefix(sd, "backbone.")
        if _looks_vit(sd):
            return sd
    return None


def detect_format(obj: Any, path: Optional[str] = None) -> str:
    """Name the layout of a loaded checkpoint (one of ``FORMATS`` without ``auto``)."""
    if not isinstance(obj, Mapping):
        raise CheckpointConversionError(f"unknown checkpoint layout: expected a dict, got {type(obj).__name__}")
    sd = obj.get("state_dict")
    if _is_state_dict(sd) and any(k.startswith(_MOCO_PREFIXES) for k in sd):
        if any(k.endswith("base_encoder.patch_embed.proj.0.weight") for k in sd) and \
                not any(".pool_block." in k for k in sd):
            raise CheckpointConversionError(
                f"{path or 'this file'} is a MoCo-v3 ViT with a convolutional stem (moco-v3 vit_conv_small / "
                f"vit_conv_base: 'patch_embed.proj.0..12' convolutions before the blocks); our ViT backbone "
                f"(hiseg.modeling.ViTBackbone) has a linear patch embedding, so it cannot be converted")
        if _looks_cast(sd.keys()):
            return "cast-seg-moco" if any(".block_fusion." in k for k in sd) else "cast-moco"
    elif _is_state_dict(sd) and _looks_cast(strip_common_prefix(sd, "module.")):
        return "cast-lincls"  # main_lincls_suppix.py: the whole (DDP) classifier under 'state_dict'
    for key in ("model", "model_ema"):
        inner = obj.get(key)
        if not _is_state_dict(inner):
            continue
        inner = strip_common_prefix(inner, "module.")
        if any(k.startswith("decoder.") for k in inner) and _looks_cast(inner):
            return "cast-segmenter"
        if _looks_cast(inner):
            return "cast-deit"
    if _is_state_dict(obj):
        keys = list(obj.keys())
        if any(k.startswith(_MOCO_PREFIXES) for k in keys) and _looks_cast(keys):
            return "cast-seg-moco" if any(".block_fusion." in k for k in keys) else "cast-moco"
        if _looks_cast(keys):  # an already unwrapped CAST state dict
            if any(k.startswith("decoder.") for k in keys):
                return "cast-segmenter"
            if any(k.startswith("block_fusion.") for k in keys):
                return "cast-seg-moco" if "pe_token" in obj else "cast-segmenter"
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
        f"Expected a CAST MoCo checkpoint (state_dict with 'module.base_encoder.*'), a CAST DeiT or "
        f"Segmenter checkpoint ('model' with 'patch_embed.proj.12.*' / 'encoder.patch_embed.proj.12.*', "
        f"'pool1.pool_block.*'), a CAST linear-probe checkpoint (state_dict with 'module.pool1.*'), or a DINO / timm "
        f"ViT state dict ('patch_embed.proj.weight', 'blocks.0.attn.qkv.weight').")


def _state_dict_under(obj: Mapping, key: str, fmt: str, fallback_to_obj: bool = True) -> Mapping:
    """``obj[key]`` (or ``obj`` itself when the key is absent and ``fallback_to_obj``), which must
    be a state dict; else one line naming the layout and the file's first keys."""
    sd = obj.get(key, obj if fallback_to_obj else None)
    if not _is_state_dict(sd):
        raise CheckpointConversionError(f"{fmt}: expected a state dict under {key!r}; first keys {_first_keys(obj)}")
    return sd


def extract_state_dict(obj: Any, fmt: str, use_ema: bool = False) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The backbone's tensors under the original names, and messages on what was left out."""
    msgs: List[str] = []
    if not isinstance(obj, Mapping):
        raise CheckpointConversionError(f"unknown checkpoint layout: expected a dict, got {type(obj).__name__}")
    if fmt in ("cast-moco", "cast-seg-moco"):
        sd = _state_dict_under(obj, "state_dict", fmt)
        prefix = first_prefix_present(sd, _MOCO_PREFIXES)
        if prefix is None:
            if not _looks_cast(sd):
                raise CheckpointConversionError(
                    f"{fmt}: no 'module.base_encoder.*' keys and no CAST keys; first keys {_first_keys(sd)}")
            return dict(sd), msgs
        kept = strip_prefix(sd, prefix)
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
        sd = _state_dict_under(obj, key, fmt, fallback_to_obj=key == "model")
        if use_ema:
            msgs.append("using the EMA weights ('model_ema')")
        return strip_common_prefix(sd, "module."), msgs
    if fmt == "cast-lincls":
        sd = _state_dict_under(obj, "state_dict", fmt)
        return strip_common_prefix(sd, "module."), msgs
    if fmt == "cast-segmenter":
        sd = strip_common_prefix(_state_dict_under(obj, "model", fmt), "module.")
        other = sorted({k.split(".")[0] for k in sd if not k.startswith(("encoder.", "decoder."))})
        if other:
            raise CheckpointConversionError(
                f"cast-segmenter: expected only 'encoder.*' and 'decoder.*' keys under 'model', also found {other}")
        # the encoder's tensors under their released names; the decoder keeps its 'decoder.' prefix
        return {(k[len("encoder."):] if k.startswith("encoder.") else k): v for k, v in sd.items()}, msgs
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
