"""Names shared by the converters: formats, the result type, errors and key checks."""
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping

import torch

# the released CAST layouts (github twke18/CAST, ec85adf), each named for the script that saves it:
#   cast-moco       moco-v3/main_moco_suppix.py -a cast_small / cast_base ... (ImageNet, classification model)
#   cast-seg-moco   moco-v3/main_moco_suppix.py -a cast_seg_small_pretrain (COCO, segmentation model)
#   cast-deit       deit/main_suppix.py (supervised ImageNet)
#   cast-lincls     moco-v3/main_lincls_suppix.py (frozen MoCo backbone + linear classifier)
#   cast-segmenter  segmenter/segm/train_cast.py (ADE20K / Pascal Context fine-tuning)
CAST_FORMATS = ("cast-moco", "cast-seg-moco", "cast-deit", "cast-lincls", "cast-segmenter")
FORMATS = ("auto",) + CAST_FORMATS + ("dino", "timm-vit")
MODELS = ("cast", "vit")
# where the weights live inside a detectron2 meta-architecture; a CAST backbone wrapped by
# detectron2's FPN (build_cast_fpn_backbone) is at "backbone.bottom_up.encoder."
DEFAULT_PREFIX = {"cast": "backbone.encoder.", "vit": "backbone.vit."}
_FORMAT_MODEL = {**{f: "cast" for f in CAST_FORMATS}, "dino": "vit", "timm-vit": "vit"}
_MOCO_PREFIXES = ("module.base_encoder.", "base_encoder.")
_DUP_BLOCK = re.compile(r"^blocks(\d+)\.(\d+)\.(.+)$")
_FLAT_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_POOL = re.compile(r"^pool(\d+)\.pool_block\.(.+)$")
_SINCOS_TOL = 1e-5


class CheckpointConversionError(ValueError):
    """A checkpoint that cannot be converted: unknown layout, missing keys, shape mismatch..."""


# what each layout was converted from, for messages and the checkpoint's stored config
_SOURCES = {"cast-moco": "official CAST MoCo-v3 weights (cast-moco)",
            "cast-seg-moco": "official CAST segmentation-model MoCo-v3 weights (cast-seg-moco)",
            "cast-deit": "official CAST DeiT weights (cast-deit)",
            "cast-lincls": "official CAST linear-probe weights (cast-lincls)",
            "cast-segmenter": "CAST + Segmenter weights of the authors' segm/train_cast.py (cast-segmenter)",
            "dino": "DINO ViT weights", "timm-vit": "timm ViT weights"}


@dataclass
class Part:
    """Weights beside the encoder that a released file also holds (a head, the block fusion),
    for a model that has the same module. ``anchor``: ``"backbone"`` (keys relative to the
    module that holds the encoder, e.g. ``backbone.fuse.*`` beside ``backbone.encoder.*``) or
    ``"model"`` (keys from the meta-architecture's root, e.g. ``head.*``). ``config``: config
    values the part's tensors need (checked like :attr:`ConversionResult.config`, only when the
    part is written). ``what``: one line for the converter's report."""

    state_dict: "OrderedDict[str, torch.Tensor]"
    anchor: str
    what: str
    config: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ConversionResult:
    """``state_dict``: the encoder's tensors, converted, without prefix. ``config``: the config values the weights need
    (e.g. ``{"MODEL.CAST.POS_EMBED": "learned"}``): shapes and layouts, without which the tensors
    do not mean what they meant. ``trained_with``: the runtime settings the weights were trained
    with (for the released CAST models: nearest token pooling, empty tokens attended, 12 heads,
    kappa 5); other values give another function than the released one. Both are stored in the
    Detectron2 checkpoint (:func:`to_detectron2_checkpoint`) and checked when it is loaded
    (``hiseg.checkpoint.weights_config``). ``messages``: what was dropped / checked."""

    state_dict: "OrderedDict[str, torch.Tensor]"
    model: str
    format: str
    config: Dict[str, Any] = field(default_factory=dict)
    messages: List[str] = field(default_factory=list)
    trained_with: Dict[str, Any] = field(default_factory=dict)
    # name -> Part: heads and the block fusion, written where the target model has the module
    parts: Dict[str, Part] = field(default_factory=dict)
    # encoder tensors the released model does not have (e.g. the final norm of the COCO MoCo
    # segmentation model): expected to be missing when the file is loaded
    not_held: List[str] = field(default_factory=list)

    @property
    def source(self) -> str:
        return _SOURCES.get(self.format, f"{self.format} weights")


def _first_keys(obj: Any, n: int = 8) -> str:
    if not isinstance(obj, Mapping):
        return f"<{type(obj).__name__}, not a dict>"
    keys = list(obj.keys())
    more = f", ... ({len(keys)} keys)" if len(keys) > n else ""
    return ", ".join(repr(k) for k in keys[:n]) + more


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


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
