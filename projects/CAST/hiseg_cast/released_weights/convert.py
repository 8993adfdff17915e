"""One call from a file to a converted result, and writing / checking Detectron2 checkpoints."""
import os
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from hiseg.checkpoint.prefixes import as_prefix, find_module_prefix

from .cast_weights import convert_cast_state_dict
from .common import (DEFAULT_PREFIX, FORMATS, MODELS, CheckpointConversionError, ConversionResult, Part,
                     _FORMAT_MODEL, _compare)
from .reading import detect_format, extract_state_dict, load_checkpoint_file
from .released_heads import fit_parts, part_prefix
from .vit_weights import convert_vit_state_dict


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
    from hiseg.checkpoint.weights_config import command_line_overrides

    out = ["config values these weights need (stored in the output; loading them into a config with "
           "other values fails):"]
    out += [f"  {k}: {v}" for k, v in result.config.items()]
    for part in result.parts.values():
        out += [f"  {k}: {v}  (for the {part.what.split(' -> ')[0]}, where the model has it)"
                for k, v in part.config.items()]
    if result.trained_with:
        out.append("settings they were trained with (stored too; evaluating with other values fails unless "
                   "HISEG.WEIGHTS_CONFIG_CHECK warn, fine-tuning with them logs a warning):")
        out += [f"  {k}: {v}" for k, v in result.trained_with.items()]
    out.append("on the command line: " + command_line_overrides({**result.config, **result.trained_with}))
    return "\n".join(out)


def add_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> "OrderedDict[str, torch.Tensor]":
    prefix = as_prefix(prefix)
    return OrderedDict((prefix + k, v.detach().clone().contiguous()) for k, v in sd.items())


def to_detectron2_checkpoint(result: Union[ConversionResult, Mapping[str, torch.Tensor]],
                             prefix: Optional[str] = None, author: Optional[str] = None,
                             parts: Optional[Mapping[str, Part]] = None) -> Dict[str, Any]:
    """``{"model": prefixed state dict, "__author__": ..., "matching_heuristics": False}`` and,
    for a :class:`ConversionResult`, the config values the weights need under
    ``hiseg.checkpoint.weights_config.WEIGHTS_CONFIG_KEY`` (checked when the file is loaded).
    ``prefix`` defaults to ``DEFAULT_PREFIX[result.model]`` (a bare state dict: CAST's).
    ``parts``: which of ``result.parts`` to write (default: all; :func:`parts_for_model` picks
    those a built model has), each under :func:`part_prefix`; their config values are required
    too. The encoder tensors the file lacks on purpose (``result.not_held``) are stored, prefixed,
    as ``not_held``: loading reports them as expected."""
    from hiseg.checkpoint.weights_config import WEIGHTS_CONFIG_KEY

    if isinstance(result, ConversionResult):
        sd, model, fmt = result.state_dict, result.model, result.format
    else:
        sd, model, fmt = result, "cast", "state dict"
    if prefix is None:
        prefix = DEFAULT_PREFIX[model]
    prefix = as_prefix(prefix)
    data = {"model": add_prefix(sd, prefix),
            "__author__": author or f"hiseg convert_cast_checkpoint ({fmt})",
            "matching_heuristics": False}
    if isinstance(result, ConversionResult):
        required = dict(result.config)
        parts = result.parts if parts is None else parts
        for part in parts.values():
            data["model"].update(add_prefix(part.state_dict, part_prefix(part, prefix)))
            required.update(part.config)
        data[WEIGHTS_CONFIG_KEY] = {"source": result.source, "required": required,
                                    "trained_with": dict(result.trained_with), "holds": prefix}
        if result.not_held:
            data[WEIGHTS_CONFIG_KEY]["not_held"] = [prefix + k for k in result.not_held]
    return data


def parts_for_model(result: ConversionResult, model: torch.nn.Module, prefix: str
                    ) -> Tuple[Dict[str, Part], List[str]]:
    """The parts of ``result`` that ``model`` has (same keys and shapes), and one line for each
    part left out (e.g. DeiT's classifier when converting for a segmentation config)."""
    prefix = as_prefix(prefix)
    return fit_parts(result.parts, model.state_dict(), prefix)


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
        from ..modeling.encoder import CASTEncoder as target
    elif kind == "vit":
        from timm.models.vision_transformer import VisionTransformer as target
    else:
        raise CheckpointConversionError(f"unknown model {kind!r}; choose from {MODELS}")
    prefix = find_module_prefix(model, target)
    if prefix is not None:
        return prefix
    raise CheckpointConversionError(f"the model holds no {target.__name__} (is its backbone a {kind} backbone?)")


def verify_against_model(model: torch.nn.Module, state_dict: Mapping[str, Any], prefix: str) -> None:
    """Check a prefixed state dict (or a whole :func:`to_detectron2_checkpoint` dict) against a
    built model: every key must exist with the same shape, and every model tensor under
    ``prefix`` must be provided, except those the file lacks on purpose (``not_held``)."""
    from hiseg.checkpoint.weights_config import WEIGHTS_CONFIG_KEY

    not_held = ()
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        not_held = tuple((state_dict.get(WEIGHTS_CONFIG_KEY) or {}).get("not_held", ()))
        state_dict = state_dict["model"]
    prefix = as_prefix(prefix)
    model_sd = model.state_dict()
    expected = {k: v for k, v in model_sd.items() if k.startswith(prefix) and k not in not_held}
    if not expected:
        roots = sorted({k.split(".")[0] + "." + k.split(".")[1] for k in model_sd if "." in k})[:10]
        raise CheckpointConversionError(f"the model has no parameters under {prefix!r}; it has e.g. {roots}")
    expected.update({k: model_sd[k] for k in state_dict if not k.startswith(prefix) and k in model_sd})
    _compare(state_dict, expected, f"converted weights do not fit the model under {prefix!r}")
