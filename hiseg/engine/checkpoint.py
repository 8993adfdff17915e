"""A DetectionCheckpointer that never leaves a broken checkpoint behind.

fvcore writes ``model_<iteration>.pth`` and then ``last_checkpoint`` in place: a run killed while
writing leaves a truncated file that ``--resume`` then fails to load. Here both are written to a
temporary file in the same folder, flushed to disk, and moved into place with ``os.replace``
(atomic on POSIX), so ``last_checkpoint`` always names a complete file.

Loading goes through :class:`hiseg.checkpoint_io.SafeDetectionCheckpointer`: no unrestricted
unpickling, a one-line error for a file that is not a checkpoint or belongs to another model.
Given the config (``cfg=``), loading also checks the config values a converted checkpoint stores
(``hiseg.engine.weights_config``) and reports the model tensors such a file is not meant to hold
in one line.
"""
import os
import tempfile

import torch

from ..checkpoint_io import SafeDetectionCheckpointer
from .weights_config import WEIGHTS_CONFIG_KEY, check_weights_config, summarize_expected_missing

__all__ = ["AtomicDetectionCheckpointer", "atomic_write"]


def atomic_write(path: str, write_fn, binary: bool = True) -> None:
    """Call ``write_fn(f)`` on a temporary file next to ``path`` and move it to ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class AtomicDetectionCheckpointer(SafeDetectionCheckpointer):
    def __init__(self, model, save_dir: str = "", *, cfg=None, evaluating: bool = False, **checkpointables):
        """``cfg``: check a converted checkpoint's stored config values against it;
        ``evaluating``: the weights are loaded to be evaluated, which makes the check of the
        settings they were trained with strict (:func:`~hiseg.engine.weights_config.check_weights_config`)."""
        super().__init__(model, save_dir, **checkpointables)
        self._cfg = cfg
        self._evaluating = evaluating
        self._weights_meta = None

    def _load_model(self, checkpoint):
        meta = checkpoint.pop(WEIGHTS_CONFIG_KEY, None) if isinstance(checkpoint, dict) else None
        self._weights_meta = meta
        if meta and self._cfg is not None:
            path = getattr(self, "_loading_path", "") or "checkpoint"
            check_weights_config(self._cfg, meta, path, self._evaluating, self.logger)
        return super()._load_model(checkpoint)

    def _log_incompatible_keys(self, incompatible) -> None:
        """One line for the tensors a converted file never held; the rest as detectron2 does."""
        if self._weights_meta and incompatible.missing_keys:
            line, rest = summarize_expected_missing(incompatible.missing_keys, self._weights_meta)
            if line:
                self.logger.info(line)
            incompatible = incompatible._replace(missing_keys=rest)
        super()._log_incompatible_keys(incompatible)

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(path, lambda f: f.write(last_filename_basename), binary=False)
