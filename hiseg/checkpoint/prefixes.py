"""Key prefixes of state dicts: where a checkpoint or a built model holds a part, and that
part's tensors without the prefix.

A part is found by its own names, never by position: a ViT by ``<prefix>patch_embed.proj.weight``
(:func:`find_vit_prefix`), a submodule of a built model by its type (:func:`find_module_prefix`),
a released wrapper (MoCo's ``module.base_encoder.``) by the first of its known prefixes that
occurs (:func:`first_prefix_present`); DistributedDataParallel's ``module.`` is removed only when
every key has it (:func:`strip_common_prefix`). Prefixes end with ``"."`` (:func:`as_prefix`), so
that ``backbone.vit.`` never matches ``backbone.vit2.*``.
"""
from typing import Dict, Iterable, Mapping, Optional, Sequence, TypeVar

from torch import nn

__all__ = ["as_prefix", "first_prefix_present", "find_vit_prefix", "find_module_prefix", "strip_prefix",
           "strip_common_prefix"]

V = TypeVar("V")


def as_prefix(name: str) -> str:
    """``name`` as a key prefix: ``"backbone.vit"`` -> ``"backbone.vit."``; ``""`` (the whole
    state dict) and names that already end with ``"."`` stay as they are."""
    return name + "." if name and not name.endswith(".") else name


def first_prefix_present(keys: Iterable[str], candidates: Sequence[str]) -> Optional[str]:
    """The first of ``candidates`` that some key starts with, or None."""
    keys = [k for k in keys if isinstance(k, str)]
    return next((p for p in candidates if any(k.startswith(p) for k in keys)), None)


def find_vit_prefix(state_dict, preferred: Sequence[str] = ("backbone.vit.", "student.backbone.vit.")) -> Optional[str]:
    """The key prefix under which a state dict holds a timm ViT (``<prefix>patch_embed.proj.weight``):
    the first of ``preferred`` present, else the shortest found (ties: alphabetical), else None.
    A MoCo checkpoint also holds ``momentum_backbone.vit.`` and an OAP one ``teacher.backbone.vit.``;
    the online encoder / the student is the one ``preferred`` picks."""
    end = "patch_embed.proj.weight"
    found = sorted({k[: -len(end)] for k in state_dict if isinstance(k, str) and k.endswith(end)},
                   key=lambda p: (len(p), p))
    return next((p for p in preferred if p in found), found[0] if found else None)


def find_module_prefix(model: nn.Module, module_type: type) -> Optional[str]:
    """The state-dict prefix of the first submodule of ``model`` (in ``named_modules`` order, the
    model itself first) that is a ``module_type``: e.g. ``"backbone.encoder."``, or ``""`` for
    the model itself; None if it holds none."""
    for name, module in model.named_modules():
        if isinstance(module, module_type):
            return as_prefix(name)
    return None


def strip_prefix(state_dict: Mapping[str, V], prefix: str) -> Dict[str, V]:
    """The entries whose key starts with ``prefix``, with it removed; the others are left out."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def strip_common_prefix(state_dict: Mapping[str, V], prefix: str) -> Dict[str, V]:
    """``state_dict`` with ``prefix`` removed when every key starts with it (e.g. the ``module.``
    of a DistributedDataParallel model), else a copy of it as it is."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return strip_prefix(state_dict, prefix)
    return dict(state_dict)
