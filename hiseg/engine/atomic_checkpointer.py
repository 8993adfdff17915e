"""A DetectionCheckpointer that never leaves a broken checkpoint behind.

fvcore writes ``model_<iteration>.pth`` and then ``last_checkpoint`` in place: a run killed while
writing leaves a truncated file that ``--resume`` then fails to load. Here both are written to a
temporary file in the same folder, flushed to disk, and moved into place with ``os.replace``
(atomic on POSIX; :func:`hiseg.utils.atomic_io.atomic_write`), so ``last_checkpoint`` always
names a complete file.

Loading goes through :class:`hiseg.checkpoint.io.SafeDetectionCheckpointer`: no unrestricted
unpickling, a one-line error for a file that is not a checkpoint or belongs to another model.
Given the config (``cfg=``), loading also checks the config values a converted checkpoint stores
(``hiseg.checkpoint.weights_config``) and reports the model tensors such a file is not meant to hold
in one line, and checks that the part of the model a run uses was filled
(:func:`hiseg.checkpoint.io.check_part_filled`: the backbone when fine-tuning from
``MODEL.WEIGHTS``, the whole model when evaluating or resuming).

Saving never loses the last complete checkpoint: weights that are not finite (a diverged run)
are not saved; a full disk is reported as "no space left on device" with the path, and the
previous checkpoint stays; temporary files of a save that was killed are removed at the next
save and at ``--resume``. Checkpoints get the mode of other new files (the umask), not 0600.
"""
import errno
import glob
import logging
import os
import shutil
from typing import Optional

import torch

from ..checkpoint.io import SafeDetectionCheckpointer, check_part_filled
from ..checkpoint.weights_config import WEIGHTS_CONFIG_KEY, check_weights_config, summarize_expected_missing
from ..errors import CheckpointError, OutputError, TrainingDivergedError
from ..utils.atomic_io import atomic_write, temp_file_pattern

__all__ = ["AtomicDetectionCheckpointer", "read_last_checkpoint", "remove_stale_temp_files"]

# the temporary files atomic_write makes for checkpoints and last_checkpoint (and no others)
_STALE_TEMP = temp_file_pattern(r"model_.*\.pth|last_checkpoint")


def read_last_checkpoint(save_dir: str) -> Optional[str]:
    """The file name stored in ``<save_dir>/last_checkpoint``, or None without that file.
    Raises :class:`CheckpointError` (naming the file and the fix) when it holds no file name."""
    path = os.path.join(save_dir, "last_checkpoint")
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        raw = f.read(4097)
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        name = None
    if not name or len(raw) > 4096 or "\n" in name or "\x00" in name or not name.isprintable():
        found = sorted(glob.glob(os.path.join(save_dir, "model_*.pth")))
        hint = (f"write the name of the checkpoint to resume from into it (e.g. "
                f"{os.path.basename(found[-1])}), or delete it to start from MODEL.WEIGHTS") if found else \
            "delete it to start from MODEL.WEIGHTS (no model_*.pth is in that folder)"
        what = "empty" if not raw.strip() else f"{len(raw)} bytes that are not a file name"
        raise CheckpointError(f"{path}: damaged: it should hold the file name of the last checkpoint but "
                              f"holds {what}; {hint}")
    return name


def remove_stale_temp_files(save_dir: str, logger: Optional[logging.Logger] = None) -> int:
    """Remove the temporary files that a killed checkpoint save left in ``save_dir`` (only
    this module's own ``.tmp-model_*.pth-*`` / ``.tmp-last_checkpoint-*``); returns how many."""
    removed = 0
    try:
        names = os.listdir(save_dir)
    except OSError:
        return 0
    for name in names:
        if _STALE_TEMP.match(name):
            try:
                os.unlink(os.path.join(save_dir, name))
                removed += 1
            except OSError:
                pass
    if removed and logger is not None:
        logger.info(f"removed {removed} temporary file(s) left in {save_dir} by an interrupted checkpoint save")
    return removed


def _nonfinite_tensor(state) -> Optional[str]:
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return k
    return None


def _state_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v) for v in obj)
    return 0


class AtomicDetectionCheckpointer(SafeDetectionCheckpointer):
    def __init__(self, model, save_dir: str = "", *, cfg=None, evaluating: bool = False, **checkpointables):
        """``cfg``: check a converted checkpoint's stored config values against it;
        ``evaluating``: the weights are loaded to be evaluated, which makes the check of the
        settings they were trained with strict (:func:`~hiseg.checkpoint.weights_config.check_weights_config`)."""
        super().__init__(model, save_dir, **checkpointables)
        self._cfg = cfg
        self._evaluating = evaluating
        self._weights_meta = None
        self._resuming = False

    def get_checkpoint_file(self) -> str:
        """The checkpoint ``last_checkpoint`` names (see :func:`read_last_checkpoint`)."""
        name = read_last_checkpoint(self.save_dir)
        return os.path.join(self.save_dir, name) if name else ""

    def resume_or_load(self, path: str, *, resume: bool = True):
        """fvcore's ``resume_or_load``; a resume first removes temporary files of a killed save."""
        self._resuming = bool(resume and self.has_checkpoint())
        if self._resuming and self.save_to_disk:
            remove_stale_temp_files(self.save_dir, self.logger)
        try:
            return super().resume_or_load(path, resume=resume)
        finally:
            self._resuming = False

    def _load_model(self, checkpoint):
        meta = checkpoint.pop(WEIGHTS_CONFIG_KEY, None) if isinstance(checkpoint, dict) else None
        self._weights_meta = meta
        if meta and self._cfg is not None:
            path = getattr(self, "_loading_path", "") or "checkpoint"
            check_weights_config(self._cfg, meta, path, self._evaluating, self.logger)
        incompatible = super()._load_model(checkpoint)
        purpose = "resume" if self._resuming else "evaluate" if self._evaluating else "finetune"
        declared = (meta or {}) if purpose == "evaluate" else {}
        check_part_filled(self.model, incompatible, getattr(self, "_loading_path", "") or "checkpoint", purpose,
                          declared.get("holds", ""), declared.get("not_held", ()))
        return incompatible

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
        self._check_finite(data["model"], save_file, kwargs.get("iteration"))
        remove_stale_temp_files(self.save_dir, self.logger)
        self.logger.info(f"Saving checkpoint to {save_file}")
        need = _state_bytes(data)
        self._check_space(save_file, need)
        try:
            with atomic_write(save_file, "wb") as f:
                torch.save(data, f)
        except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as "unexpected pos"
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or self._short_of(save_file, need):
                raise self._no_space(save_file, need) from None
            raise
        self.tag_last_checkpoint(basename)

    def last_complete(self) -> str:
        """Where the last complete checkpoint is (or that there is none), for error messages."""
        try:
            name = read_last_checkpoint(self.save_dir)
        except CheckpointError:
            name = None
        return (f"the last complete checkpoint, {os.path.join(self.save_dir, name)}, is intact" if name
                else "no checkpoint was written before")

    def _short_of(self, save_file: str, need: int) -> bool:
        try:
            return shutil.disk_usage(os.path.dirname(os.path.abspath(save_file))).free < need
        except OSError:
            return False

    def _no_space(self, save_file: str, need: int) -> OutputError:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(save_file))).free
        return OutputError(f"{save_file}: no space left on device to save the checkpoint (about "
                           f"{need / 2 ** 20:.0f} MiB needed, {free / 2 ** 20:.0f} MiB free); {self.last_complete()}; "
                           f"free some space (or set OUTPUT_DIR to another disk) and restart with --resume")

    def _check_space(self, save_file: str, need: int) -> None:
        if self._short_of(save_file, need):
            raise self._no_space(save_file, need)

    def _check_finite(self, state, save_file: str, iteration) -> None:
        key = _nonfinite_tensor(state)
        if key is None:
            return
        at = f" at iteration {iteration}" if iteration is not None else ""
        lr = f" (now {self._cfg.SOLVER.BASE_LR:g})" if self._cfg is not None else ""
        raise TrainingDivergedError(
            f"training diverged{at}: the weights are no longer finite (e.g. {key!r}), so {save_file} was not "
            f"written and {self.last_complete()}; lower SOLVER.BASE_LR{lr}, e.g. by 10x, and train again")

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        with atomic_write(path, "w") as f:
            f.write(last_filename_basename)
