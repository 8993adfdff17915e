"""Config values a converted checkpoint needs, stored in the checkpoint and checked at load.

Converted official weights (``tools/convert_cast_checkpoint.py``) carry, under
``WEIGHTS_CONFIG_KEY``, a small dict:

* ``source``: what they were converted from (e.g. ``"official CAST MoCo-v3 (cast-moco)"``);
* ``required``: config values without which the tensors do not mean what they meant (widths,
  depths, position-embedding layout). A config that differs fails to load, always.
* ``trained_with``: runtime settings the weights were trained with (CAST: token pooling mode,
  handling of empty tokens, head count, assignment scale). With other values the model computes
  a different function than the released one. Evaluating (``--eval-only``, the demo) with other
  values fails unless ``HISEG.WEIGHTS_CONFIG_CHECK`` is ``"warn"``; training from them (fine-tuning,
  where changing e.g. the token pooling is a deliberate choice: the authors' own segmentation code
  fine-tunes MoCo weights with bilinear pooling) logs one warning line per difference.
* ``holds``: the key prefix of the tensors the file holds (e.g. ``"backbone.encoder."``). Model
  tensors outside it are expected to be missing and are summarised in one log line. Heads a
  converter wrote beside the encoder (``backbone.fuse.*``, ``head.*``) load like any tensor.
* ``not_held`` (optional): model keys under ``holds`` that the released model does not have
  (e.g. the final norm of a model without one); also expected, and summarised.

Nothing here imports a project: keys are dotted config paths compared with the config's values.
"""
import logging
from collections import Counter
from typing import Any, Iterable, List, Mapping, Optional, Tuple

from ..errors import ConfigError

__all__ = ["WEIGHTS_CONFIG_KEY", "WeightsConfigError", "config_value", "weights_config_mismatches",
           "check_weights_config", "summarize_expected_missing", "command_line_overrides"]

WEIGHTS_CONFIG_KEY = "hiseg_weights_config"
_MISSING = object()


class WeightsConfigError(ConfigError, ValueError):
    """A checkpoint's stored config values disagree with the config it is loaded into (a user
    error: the entry points print it as one line)."""


def config_value(cfg, dotted: str) -> Any:
    """``cfg.A.B.C`` for ``"A.B.C"``, or a private sentinel when a part is absent."""
    node = cfg
    for part in dotted.split("."):
        if not hasattr(node, part) and not (isinstance(node, Mapping) and part in node):
            return _MISSING
        node = node[part] if isinstance(node, Mapping) else getattr(node, part)
    return node


def _same(a: Any, b: Any) -> bool:
    """Config equality: lists equal tuples, ints equal floats, booleans only booleans."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def weights_config_mismatches(cfg, values: Mapping[str, Any]) -> List[Tuple[str, Any, Any]]:
    """``(key, needed, in config)`` for every stored value the config differs from (keys the
    config does not have are reported with ``in config = "<absent>"``)."""
    out = []
    for key, needed in values.items():
        have = config_value(cfg, key)
        if have is _MISSING:
            out.append((key, needed, "<absent>"))
        elif not _same(needed, have):
            out.append((key, needed, have))
    return out


def _fmt(mismatches: Iterable[Tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{k}: {need!r} (this config: {have!r})" for k, need, have in mismatches)


def command_line_overrides(values: Mapping[str, Any]) -> str:
    """``KEY VALUE ...`` for detectron2's command line (lists without spaces, strings unquoted)."""
    return " ".join(f"{k} {str(v).replace(', ', ',').replace(chr(39), '')}" for k, v in values.items())


def _fix(mismatches: Iterable[Tuple[str, Any, Any]]) -> str:
    return command_line_overrides({k: need for k, need, _ in mismatches})


def check_weights_config(cfg, meta: Optional[Mapping[str, Any]], path: str, evaluating: bool,
                         logger: Optional[logging.Logger] = None) -> None:
    """Raise :class:`WeightsConfigError` or log warnings as described in the module docstring."""
    if not meta:
        return
    logger = logger or logging.getLogger(__name__)
    source = meta.get("source", "converted weights")
    required = weights_config_mismatches(cfg, meta.get("required", {}))
    if required:
        raise WeightsConfigError(
            f"{path} holds {source} that need {_fmt(required)}. The tensors would not mean what they "
            f"were trained to mean. Set these values in the config or on the command line: {_fix(required)}")
    trained = weights_config_mismatches(cfg, meta.get("trained_with", {}))
    if not trained:
        return
    policy = str(config_value(cfg, "HISEG.WEIGHTS_CONFIG_CHECK"))
    if evaluating and policy != "warn":
        raise WeightsConfigError(
            f"{path} holds {source} trained with {_fmt(trained)}: with this config the model computes "
            f"another function than the released one, so its outputs are not the released model's. "
            f"Add to the command line {_fix(trained)}, or HISEG.WEIGHTS_CONFIG_CHECK warn to "
            f"evaluate these weights with other settings on purpose")
    for key, need, have in trained:
        logger.warning(f"{path} holds {source} trained with {key}: {need!r}; this config uses {have!r} "
                       f"(a deliberate change when fine-tuning; the outputs are not the released model's)")


def summarize_expected_missing(missing: Iterable[str], meta: Optional[Mapping[str, Any]]
                               ) -> Tuple[Optional[str], List[str]]:
    """Split missing model keys into one summary line for those outside ``meta["holds"]`` (the
    file never held them) and the list of the others (really missing: log them in full)."""
    missing = list(missing)
    holds = (meta or {}).get("holds")
    if not holds:
        return None, missing
    not_held = set((meta or {}).get("not_held", ()))
    outside = [k for k in missing if not k.startswith(holds) or k in not_held]
    inside = [k for k in missing if k.startswith(holds) and k not in not_held]
    if not outside:
        return None, inside
    groups = Counter(".".join(k.split(".")[:2]) if k.startswith("backbone.") else k.split(".")[0]
                     for k in outside if k not in not_held)
    listed = ", ".join([f"{g} ({n})" for g, n in sorted(groups.items())]
                       + [f"{k} (the released model has none)" for k in outside if k in not_held])
    line = (f"{len(outside)} model tensors are not in the checkpoint, as expected: it holds only "
            f"{meta.get('source', 'converted weights')} under '{holds}*', so these are not loaded from it "
            f"(they start from their own initialisation): {listed}")
    return line, inside
