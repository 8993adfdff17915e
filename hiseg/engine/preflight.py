"""Checks of a ``tools/train_net.py`` run made in the launching process, before any worker is
started or any model built, so that a bad request is one ``error:`` line (exit status 2) at
once instead of a traceback minutes later, or a silent wrong result:

* the datasets are registered and their files present (``hiseg.dataset_checks``);
* devices: ``MODEL.DEVICE cuda`` without a visible GPU; more than one process
  (``--num-gpus`` x ``--num-machines``) without CUDA (detectron2 v0.6's ``launch`` starts its
  workers on GPUs only, with NCCL);
* the batch: ``SOLVER.IMS_PER_BATCH`` must split evenly over the processes (and over
  ``SOLVER.ACCUMULATION_STEPS``: ``hiseg.engine.accumulation.check_accumulation``);
* what is evaluated: ``--eval-only`` needs test sets (``DATASETS.TEST``) and weights
  (``MODEL.WEIGHTS``, or ``--resume`` with a checkpoint in ``OUTPUT_DIR``); evaluating a randomly
  initialised model takes an explicit ``--eval-random-weights``;
* where weights come from: a local file; a URL is refused before anything tries to download it
  (nothing is downloaded at run time);
* ``OUTPUT_DIR`` can be written (created if needed); with ``--resume`` its ``last_checkpoint``
  holds a file name.
"""
import torch

from ..cli import check_device, check_output_dir
from ..dataset_checks import check_datasets
from ..errors import ConfigError
from .accumulation import check_accumulation
from .atomic_checkpointer import read_last_checkpoint

__all__ = ["check_run"]


def _check_devices(cfg, world_size: int) -> None:
    check_device(cfg.MODEL.DEVICE, "MODEL.DEVICE")
    if world_size > 1 and not torch.cuda.is_available():
        raise ConfigError(f"a run of {world_size} processes (--num-gpus x --num-machines) needs CUDA GPUs (detectron2's launch "
                          f"starts one process per GPU with NCCL), and none is available here; use --num-gpus 1 "
                          f"--num-machines 1 on a CPU")


def _check_batch(cfg, world_size: int) -> None:
    batch = cfg.SOLVER.IMS_PER_BATCH
    if batch < 1 or batch % world_size:
        fix = max(world_size, batch - batch % world_size)
        raise ConfigError(f"SOLVER.IMS_PER_BATCH {batch}: the batch is split evenly over the {world_size} "
                          f"process(es) (--num-gpus x --num-machines), so it must be a positive multiple of "
                          f"{world_size}; e.g. SOLVER.IMS_PER_BATCH {fix}")


def _check_weights(cfg, eval_only: bool, resume: bool, eval_random_weights: bool) -> None:
    resuming = resume and read_last_checkpoint(cfg.OUTPUT_DIR) is not None
    weights = str(cfg.MODEL.WEIGHTS)
    if resuming:
        return  # the last checkpoint of OUTPUT_DIR is loaded, not MODEL.WEIGHTS
    if "://" in weights:
        raise ConfigError(f"MODEL.WEIGHTS {weights}: weights are read from a local file only (nothing is downloaded "
                          f"at run time); download the file yourself (e.g. wget or curl) or convert released weights "
                          f"with tools/convert_cast_checkpoint.py, then give MODEL.WEIGHTS /path/to/the/file.pth")
    if eval_only and not weights and not eval_random_weights:
        raise ConfigError("--eval-only without MODEL.WEIGHTS would evaluate a randomly initialised model; give the "
                          "weights to evaluate (MODEL.WEIGHTS path/to/model_final.pth, or --resume to evaluate "
                          "OUTPUT_DIR's last checkpoint), or add --eval-random-weights to evaluate random weights "
                          "on purpose")


def check_run(cfg, *, world_size: int = 1, eval_only: bool = False, resume: bool = False,
              eval_random_weights: bool = False) -> None:
    """Raise a :class:`~hiseg.errors.UserError` (one line) for the problems of the module
    docstring; ``world_size``: the number of processes the run will start."""
    check_datasets(cfg.DATASETS.TEST if eval_only else (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST))
    if eval_only and not len(cfg.DATASETS.TEST):
        raise ConfigError("--eval-only with an empty DATASETS.TEST: there is nothing to evaluate; name the test "
                          "sets, e.g. DATASETS.TEST \"('bsds500_val',)\" (datasets/README.md lists them)")
    if not eval_only:
        _check_batch(cfg, world_size)
        check_accumulation(cfg, world_size)  # SOLVER.ACCUMULATION_STEPS and AMP, as the trainer checks them
    _check_devices(cfg, world_size)
    check_output_dir(cfg.OUTPUT_DIR, "OUTPUT_DIR")
    _check_weights(cfg, eval_only, resume, eval_random_weights)
