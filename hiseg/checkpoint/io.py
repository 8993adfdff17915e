"""Reading weights files without unrestricted unpickling, and loading them only into the model
they belong to.

:func:`read_checkpoint` looks at a file's first bytes before handing it to a reader, so that a
file that is not a checkpoint is named for what it is (random bytes, text, HTML, a Git LFS
pointer, a NumPy archive, ...) and a truncated zip archive (a partial download or copy) is told
apart from a damaged one. Objects are never unpickled beyond an allow-list:

* ``.pth`` / ``.pt`` / ``.pth.tar`` / ``.pyth``: ``torch.load(weights_only=True)`` with
  :data:`ALLOWED_GLOBALS` (``argparse.Namespace``, which DeiT / timm training checkpoints store
  under ``args``); a file that holds anything else is refused, naming the type it holds;
* ``.pkl`` (Detectron / Caffe2 model zoo): a pickle reader that only builds NumPy arrays,
  dtypes and containers;
* ``.safetensors``: the safetensors package.

No message ever suggests ``weights_only=False``.

:class:`SafeDetectionCheckpointer` is detectron2's ``DetectionCheckpointer`` reading files this
way. It also refuses a checkpoint of another model: detectron2 only logs missing and unexpected
keys, so a wrong file left the model silently at its random initialisation. The rule: loading
fails when the tensors that fit the model (same name, same shape) hold less than
:attr:`SafeDetectionCheckpointer.MIN_FILLED` (1 %) of the model's weights (``state_dict``
elements; ``pixel_mean`` / ``pixel_std`` and BatchNorm's ``num_batches_tracked`` not counted).
The message names a few missing and a few unexpected keys, and tensors of another shape.
Expected partial loads keep working with detectron2's usual warning: a converted backbone
without detection heads or decoder (``tools/convert_cast_checkpoint.py`` output), a MoCo encoder
under a linear probe, an ImageNet backbone under Mask R-CNN all fill far more than 1 %.
That floor is the same for every use; :func:`check_part_filled` then checks the part a run
uses (the backbone to fine-tune, the whole model to evaluate or resume), which
``hiseg.engine.AtomicDetectionCheckpointer`` applies for ``tools/train_net.py``.

:func:`load_model` is the model of a config with a weights file loaded that way, ready for
inference (the demo, the main job's pictures, the experiments' evaluations).
"""
import argparse
import importlib
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Mapping

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..errors import CheckpointError
from ..image_io import describe_file_start

__all__ = [
    "ALLOWED_GLOBALS",
    "read_checkpoint",
    "read_detectron2_checkpoint",
    "check_weights_fit",
    "check_part_filled",
    "SafeDetectionCheckpointer",
    "load_model",
]

#: Python types a checkpoint may hold besides tensors, numbers, strings and containers.
ALLOWED_GLOBALS = [argparse.Namespace]

_WHAT_TO_DO = ("give a checkpoint written by tools/train_net.py, or convert released weights with "
               "tools/convert_cast_checkpoint.py")

# (module, name) pairs that a NumPy pickle needs; NumPy 2 moved numpy.core to numpy._core.
_NUMPY_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles (as torch's weights_only reader allows)
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds containers, numbers, strings and NumPy arrays; refuses every other global."""

    def find_class(self, module, name):
        if (module, name) not in _NUMPY_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed")
        if module.startswith("numpy.core") or module.startswith("numpy._core"):
            import numpy as np

            core = getattr(np, "_core", None) or np.core
            return getattr(core.multiarray, name)
        return getattr(importlib.import_module(module), name)


def _kind(head: bytes, size: int, path: str) -> str:
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if len(head) >= 9:
        n = struct.unpack("<Q", head[:8])[0]
        if 0 < n < size and head[8:9] == b"{":
            return "safetensors"
    if path.endswith(".safetensors"):
        return "safetensors"
    return "other"


def _not_a_checkpoint(path: str, head: bytes) -> CheckpointError:
    if head.startswith(b"\x93NUMPY"):
        what = "a NumPy .npy array"
    elif head.startswith(b"\x89HDF\r\n\x1a\n"):
        what = "an HDF5 file (Keras / MATLAB weights?)"
    elif head.startswith((b"\xff\xd8\xff", b"\x89PNG")):
        what = "an image"
    else:
        what = describe_file_start(head)
    return CheckpointError(f"{path}: not a checkpoint: {what}, neither a PyTorch file, a pickle nor "
                           f"safetensors; {_WHAT_TO_DO}")


def _refused_global(message: str) -> str:
    m = re.search(r"GLOBAL ([\w.]+)", message)
    return m.group(1) if m else ""


# the modules the allowed globals live in: a refused name there that resolves to nothing was cut
_ALLOWED_ROOTS = ("torch", "numpy", "collections", "builtins", "argparse", "_codecs")


def _names_nothing(name: str) -> bool:
    """True when ``name`` lies in an imported module but names nothing there: a global name cut
    off by truncation (nothing is imported to find out)."""
    import sys

    parts = name.split(".")
    if parts[0] not in _ALLOWED_ROOTS:  # e.g. __main__.Net: a real type of the program that saved it
        return False
    for i in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is not None:
            obj = module
            for attr in parts[i:]:
                if not hasattr(obj, attr):
                    return True
                obj = getattr(obj, attr)
            return False
    return False


def _truncated(path: str, size: int) -> CheckpointError:
    return CheckpointError(f"{path}: truncated or damaged checkpoint ({size} bytes; its data ends early): "
                           f"a partial download or copy? copy it again")


def _refused(path: str, name: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: refused to unpickle it: it holds a Python object of type {name}, and only tensors, NumPy "
        f"arrays, numbers, strings, containers and argparse.Namespace are unpickled here, never arbitrary "
        f"objects (unpickling them can run code); save the weights alone (e.g. "
        f"torch.save({{'model': model.state_dict()}}, ...)) where the file was made")


def _read_numpy_pickle(path: str, size: int) -> Any:
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        name = _refused_global(str(e))
        if name and not _names_nothing(name):
            raise _refused(path, name) from None
        raise _truncated(path, size) from None
    except (EOFError, struct.error, ValueError, TypeError, KeyError, IndexError):
        raise _truncated(path, size) from None


def _torch_load(path: str, size: int) -> Any:
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # handled below
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        name = _refused_global(text)
        if name and not _names_nothing(name):
            raise _refused(path, name) from None
        if "Unsupported operand" in text and _kind_of(path) == "pickle":
            # a plain pickle (protocol 4+, not torch.save's); NumPy arrays and containers only
            return _read_numpy_pickle(path, size)
        if name or "truncated" in text:
            raise _truncated(path, size) from None
        raise CheckpointError(f"{path}: not a checkpoint: a damaged or foreign pickle stream; "
                              f"{_WHAT_TO_DO}") from None
    except (EOFError, struct.error):
        raise _truncated(path, size) from None
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, OSError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: damaged checkpoint, torch cannot read it ({first}); "
                              f"copy it again or re-create it") from None


def _kind_of(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(64)
    return _kind(head, os.path.getsize(path), path)


def read_checkpoint(path: str) -> Any:
    """The object stored in the weights file ``path`` (see the module docstring), or
    :class:`CheckpointError` saying why it cannot be read."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no checkpoint file at this path (not found); check the path")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: not a file (a folder?); give the checkpoint file itself")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint; copy it again")
    with open(path, "rb") as f:
        head = f.read(64)
    kind = _kind(head, size, path)
    if kind == "safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(f"{path}: reading .safetensors needs the 'safetensors' package "
                                  f"(pip install safetensors)") from None
        try:
            return load_file(path, device="cpu")
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
            raise CheckpointError(f"{path}: damaged .safetensors file ({e}); copy it again") from None
    if kind == "zip":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            raise CheckpointError(f"{path}: truncated or damaged checkpoint ({size} bytes; the end of "
                                  f"its zip archive is missing): a partial download or copy? copy it "
                                  f"again") from None
        if not any(n.endswith("data.pkl") for n in names):
            what = ("a NumPy .npz archive" if names and all(n.endswith(".npy") for n in names)
                    else f"a zip archive of {len(names)} file(s) such as {names[:3]}")
            raise CheckpointError(f"{path}: not a checkpoint: {what}, not a PyTorch file; {_WHAT_TO_DO}")
        return _torch_load(path, size)
    if kind == "pickle":
        if path.endswith(".pkl"):
            return _read_numpy_pickle(path, size)
        return _torch_load(path, size)
    raise _not_a_checkpoint(path, head)


def _top_keys(obj: Mapping, n: int = 5) -> str:
    keys = [repr(k) for k in list(obj)[:n]]
    return ", ".join(keys) + (", ..." if len(obj) > n else "")


def read_detectron2_checkpoint(path: str) -> Dict[str, Any]:
    """``read_checkpoint`` shaped as detectron2's ``DetectionCheckpointer._load_file`` returns
    it: a dict with ``"model"`` (and ``matching_heuristics`` for Caffe2 / pycls files)."""
    data = read_checkpoint(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a {type(data).__name__}, not a dict of tensors; {_WHAT_TO_DO}")
    if path.endswith(".pkl"):
        if "model" in data and "__author__" in data:
            return data  # detectron2 model zoo format
        if "blobs" in data:
            data = data["blobs"]
        data = {k: v for k, v in data.items() if not str(k).endswith("_momentum")}
        return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
    if path.endswith(".pyth"):
        if "model_state" not in data:
            raise CheckpointError(f"{path}: a .pyth file without 'model_state' (keys {_top_keys(data)}); "
                                  f"pycls checkpoints hold their weights there")
        state = {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")}
        return {"model": state, "__author__": "pycls", "matching_heuristics": True}
    if "model" not in data:
        data = {"model": data}
    return data


def _check_tensors(path: str, checkpoint: Mapping) -> None:
    import numpy as np

    state = checkpoint.get("model")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: its 'model' entry is a {type(state).__name__}, not a dict of "
                              f"tensors; {_WHAT_TO_DO}")
    bad = [k for k, v in state.items() if not isinstance(v, (torch.Tensor, np.ndarray))]
    if bad:
        raise CheckpointError(
            f"{path}: not a detectron2 checkpoint: its weights dict also holds non-tensors (e.g. "
            f"{', '.join(repr(k) for k in bad[:4])}; keys {_top_keys(state)}), as training checkpoints "
            f"of other code bases do; convert it with tools/convert_cast_checkpoint.py")


def _spread(keys: Iterable[str], n: int = 3) -> List[str]:
    """Up to ``n`` of ``keys``, taken in turn from each top-level part (``backbone.``,
    ``roi_heads.``, ...), so that the examples show where the mismatch is."""
    groups: "OrderedDict[str, List[str]]" = OrderedDict()
    for k in keys:
        groups.setdefault(k.split(".")[0], []).append(k)
    out: List[str] = []
    while len(out) < n and any(groups.values()):
        for part in list(groups):
            if groups[part] and len(out) < n:
                out.append(groups[part].pop(0))
    return out


def check_weights_fit(model: torch.nn.Module, incompatible, path: str, min_filled: float = 0.01) -> None:
    """Raise :class:`CheckpointError` when the load that gave ``incompatible`` (fvcore's
    ``_IncompatibleKeys``) filled less than ``min_filled`` of ``model``'s weights."""
    # pixel_mean / pixel_std come from the config; torch never reports num_batches_tracked missing
    state = _counted_state(model)
    total = sum(v.numel() for v in state.values())
    if total == 0:
        return
    missing = [k for k in incompatible.missing_keys if k in state]
    missing_set = set(missing)
    filled_keys = [k for k in state if k not in missing_set]
    filled = sum(state[k].numel() for k in filled_keys)
    if filled >= min_filled * total:
        return
    name = type(model).__name__
    parts = [f"{path}: not a checkpoint of this model ({name}): it fills {len(filled_keys)} of the "
             f"model's {len(state)} tensors ({100.0 * filled / total:.1f}% of its weights)"]
    wrong = list(getattr(incompatible, "incorrect_shapes", []) or [])
    if wrong:
        k, shape_ckpt, shape_model = wrong[0]
        parts.append(f"{len(wrong)} tensors have another shape, e.g. {k!r} {tuple(shape_ckpt)} in the file "
                     f"but {tuple(shape_model)} in the model (weights of another model size?)")
    wrong_names = {w[0] for w in wrong}
    need = [k for k in missing if k not in wrong_names]
    if need:
        parts.append("the model needs keys such as " + ", ".join(repr(k) for k in _spread(need)))
    unexpected = list(incompatible.unexpected_keys)
    if unexpected:
        parts.append(f"the file has {len(unexpected)} keys the model lacks, such as "
                     + ", ".join(repr(k) for k in _spread(unexpected)))
    elif not wrong:
        parts.append("the file holds no tensors")
    parts.append("give a checkpoint of this config (tools/train_net.py output), or convert released weights "
                 "with tools/convert_cast_checkpoint.py --config-file <this config>")
    raise CheckpointError("; ".join(parts))


#: share of the backbone's weights a checkpoint must fill when a run is fine-tuned from it. Low on
#: purpose: modules new on top of a pretrained encoder start from their initialisation (an FPN:
#: 18% of the tiny Mask R-CNN backbone of configs/CAST/quick; the ViT's simple feature pyramid: 83%
#: of configs/CAST/quick/moco_vit_tiny_skimage_cpu.yaml's backbone), while a file that does not fit
#: the backbone fills nothing of it.
MIN_BACKBONE_FILLED = 0.1


def _counted_state(model: torch.nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The model tensors a checkpoint is expected to fill: all but ``pixel_mean`` / ``pixel_std``
    (from the config) and BatchNorm's ``num_batches_tracked``."""
    return OrderedDict((k, v) for k, v in model.state_dict().items()
                       if k not in ("pixel_mean", "pixel_std") and not k.endswith("num_batches_tracked"))


def check_part_filled(model: torch.nn.Module, incompatible, path: str, purpose: str, holds: str = "",
                      not_held: Iterable[str] = ()) -> None:
    """Raise :class:`CheckpointError` when a load (fvcore's ``_IncompatibleKeys``) left the part
    of ``model`` that ``purpose`` uses unfilled, naming the first tensor that did not load:

    * ``"resume"``: every tensor, with its shape (a resumed run continues the same model; a
      changed config would otherwise fail inside the optimizer step, or train a half-random
      model);
    * ``"evaluate"``: every tensor the model uses at inference: all but those under the model's
      ``eval_unused_prefixes`` (e.g. CASTMoCo's projector, predictor and momentum copies) and,
      for a converted file that declares it holds only ``holds`` (``hiseg.checkpoint.weights_config``),
      nothing outside that prefix is required, nor the keys it declares ``not_held`` (tensors the
      released model does not have; the one-line summary names all of those);
    * ``"finetune"`` (training from ``MODEL.WEIGHTS``): the backbone: no backbone tensor of
      another shape, and at least :data:`MIN_BACKBONE_FILLED` of its weights loaded. Heads may
      differ (e.g. another class count); a model without a ``backbone`` is left to
      :func:`check_weights_fit`.

    The whole-model 1% rule of :func:`check_weights_fit` alone let a checkpoint of another width
    through when its heads (e.g. a MoCo predictor, whose shapes do not depend on the width) filled
    a few percent of the model while the backbone stayed random.
    """
    state = _counted_state(model)
    if purpose == "finetune":
        if not isinstance(getattr(model, "backbone", None), torch.nn.Module):
            return
        required = [k for k in state if k.startswith("backbone.")]
    elif purpose == "evaluate":
        skip = tuple(getattr(model, "eval_unused_prefixes", ()) or ())
        not_held = set(not_held)
        required = [k for k in state if not (skip and k.startswith(skip)) and (not holds or k.startswith(holds))
                    and k not in not_held]
    elif purpose == "resume":
        required = list(state)
    else:
        raise ValueError(f"purpose must be 'finetune', 'evaluate' or 'resume', got {purpose!r}")
    if not required:
        return
    wrong = {k: (tuple(a), tuple(b)) for k, a, b in (getattr(incompatible, "incorrect_shapes", None) or [])}
    missing = set(incompatible.missing_keys) | set(wrong)
    bad = [k for k in required if k in missing]
    if not bad:
        return
    total = sum(state[k].numel() for k in required)
    filled = sum(state[k].numel() for k in required if k not in missing)
    if purpose == "finetune" and not any(k in wrong for k in bad) and filled >= MIN_BACKBONE_FILLED * total:
        return  # e.g. an FPN or a decoder on top of a pretrained encoder starts from its initialisation
    first = bad[0]
    what = (f"{first!r} is {wrong[first][0]} in the file but {wrong[first][1]} in this model" if first in wrong
            else f"{first!r} is not in the file")
    n_wrong = sum(1 for k in bad if k in wrong)
    part = {"finetune": "backbone", "evaluate": "model (as used at inference)", "resume": "model"}[purpose]
    counts = (f"{len(bad)} of the {part}'s {len(required)} tensors do not load ({n_wrong} of another shape), "
              f"{100.0 * filled / max(total, 1):.1f}% of its weights would come from the file")
    size_hint = "a checkpoint of another model size or config" if n_wrong else "a checkpoint of another model"
    if purpose == "resume":
        fix = ("resume with the config the run was started with (its OUTPUT_DIR/config.yaml), or start a new run "
               f"in another OUTPUT_DIR with MODEL.WEIGHTS {path} to fine-tune from it")
        raise CheckpointError(f"{path}: cannot resume this run with this config: {what}; {counts}; {fix}")
    doing = "fine-tuning would start from a random backbone" if purpose == "finetune" else \
        "the evaluation would score randomly initialised weights"
    raise CheckpointError(
        f"{path}: does not fit this {type(model).__name__} ({size_hint}?): {what}; {counts}, so {doing}; "
        f"use the config the checkpoint was trained with (its OUTPUT_DIR/config.yaml, e.g. the same "
        f"MODEL.CAST.EMBED_DIM / DEPTHS / NUM_HEADS), or convert released weights with "
        f"tools/convert_cast_checkpoint.py --config-file <this config>")


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that reads files with :func:`read_detectron2_checkpoint` and
    refuses a checkpoint of another model (see the module docstring for the rule)."""

    #: the share of the model's weights a checkpoint must fill (see the module docstring)
    MIN_FILLED = 0.01

    def load(self, path: str, checkpointables=None):
        if path and "://" not in path and not os.path.isfile(path):
            if os.path.isdir(path):
                raise CheckpointError(f"{path}: a folder, not a checkpoint file; give the .pth file itself "
                                      f"(e.g. {os.path.join(path, 'model_final.pth')})")
            raise CheckpointError(f"{path}: checkpoint file not found; check MODEL.WEIGHTS (or, with "
                                  f"--resume, the last_checkpoint file of OUTPUT_DIR)")
        self._loading_path = path
        return super().load(path, checkpointables=checkpointables)

    def _load_file(self, filename: str) -> Dict[str, Any]:
        return read_detectron2_checkpoint(filename)

    def _load_model(self, checkpoint: Any):
        path = getattr(self, "_loading_path", "") or "checkpoint"
        _check_tensors(path, checkpoint)
        incompatible = super()._load_model(checkpoint)
        check_weights_fit(self.model, incompatible, path, self.MIN_FILLED)
        return incompatible


def load_model(cfg, weights: str = "", device=None) -> torch.nn.Module:
    """detectron2's ``build_model(cfg)``, moved to ``device`` when given, with ``weights`` loaded
    by :class:`SafeDetectionCheckpointer` (``""``: the model keeps its initialisation), in eval
    mode."""
    from detectron2.modeling import build_model

    model = build_model(cfg)
    if device is not None:
        model = model.to(torch.device(device))
    if weights:
        SafeDetectionCheckpointer(model).load(weights)
    return model.eval()
