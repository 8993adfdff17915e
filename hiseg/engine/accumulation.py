"""Gradient accumulation (``SOLVER.ACCUMULATION_STEPS``): one optimizer step from N micro-batches.

``SOLVER.IMS_PER_BATCH`` stays the **total** batch of one optimizer step, summed over processes
and micro-batches; each process loads ``IMS_PER_BATCH / (num_processes * N)`` images per
micro-batch. So learning rate, iterations and schedule of a config need no change, and
``--num-gpus G`` with ``ACCUMULATION_STEPS N`` computes what ``G * N`` processes compute with the
same per-process batch (detectron2's convention: every loss is averaged per process, BatchNorm
statistics are per process).

One iteration is one optimizer step: N forward / backward passes, then one ``optimizer.step()``.
The iteration counter, ``SOLVER.MAX_ITER``, the LR scheduler (stepped by its hook after each
iteration), warm-up, checkpoint and evaluation periods all count optimizer steps. Each micro-batch's
loss is divided by N before its backward pass, so the summed gradient is the mean over the
micro-batches; with DistributedDataParallel the gradients are all-reduced once, in the last
micro-batch's backward pass (``no_sync`` before). Gradient clipping (inside ``optimizer.step``)
sees the accumulated gradient; AMP scales every micro-batch's loss with one ``GradScaler`` and
unscales, steps and updates it once. Logged losses are the mean over the micro-batches.

**When it is the same as a larger batch, and when it is refused.** Accumulating N micro-batches
of b images equals one batch of N * b exactly when every loss is a mean over images whose
per-image terms do not depend on the other images of the batch, and nothing in the forward pass
changes state per call. Per meta-architecture:

* detectron2's ``GeneralizedRCNN`` (Mask R-CNN), ``SemanticSegmentor`` (Semantic FPN), and CAST's
  ``CASTSemanticSegmentor``, ``CASTSegmenter``, ``CASTClassifier`` (DeiT), ``CASTLinearProbe``:
  **allowed**. Their losses are means per process (per micro-batch here) exactly as under
  DistributedDataParallel, where detectron2 averages the processes' gradients. With BatchNorm
  (CAST's conv stem, a ``BN`` head, the linear probe's BatchNorm) the statistics are those of each
  micro-batch, as per-GPU BatchNorm's are those of each GPU's images: ``--num-gpus 1`` with N = 8
  and the configs' total batch equals the papers' 8-GPU run (2 images a GPU for the dense
  configs), not one 16-image BatchNorm batch. Running statistics get N updates per iteration
  instead of one (they track the same weights). Mixup / CutMix pairs images within each
  micro-batch, as it does within each GPU's batch.
* any model with synchronised BatchNorm (``SyncBN``, e.g. ``HEAD_NORM: SyncBN``): **refused**.
  Its statistics are meant to be those of the total batch; with accumulation they would be
  those of one micro-batch.
* ``CASTMoCo`` (and its ViT baseline): **refused**. InfoNCE takes the negatives of each query
  from the batch (keys of all processes gathered), so a micro-batch of b images gives a different,
  easier loss than the batch of N * b; the momentum encoder would also be updated N times per
  optimizer step. Use a smaller total batch with the scaling rule instead (docs/distributed.md).
* ``OAPSegmentor``: **refused**. The teacher EMA (and its momentum schedule) and the DINO centre
  are updated in every forward pass (N times per optimizer step), and the loss normalisers
  (matched masks, objectness weights, views with a match) are global over the batch.

A meta-architecture states that it must not be accumulated by a class attribute
``GRADIENT_ACCUMULATION_REFUSAL`` (one sentence saying why); the check runs before the model is
built, the SyncBN check right after (both before any data is read).
"""
import contextlib
import logging
import time
from typing import Optional

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.modeling import META_ARCH_REGISTRY

from ..errors import ConfigError

__all__ = ["accumulation_steps", "check_accumulation", "refusal", "micro_batch_cfg", "check_model_accumulation",
           "build_step_trainer", "AccumulatingTrainer", "AccumulatingAMPTrainer"]

logger = logging.getLogger(__name__)


def accumulation_steps(cfg) -> int:
    return int(cfg.SOLVER.get("ACCUMULATION_STEPS", 1))


def check_accumulation(cfg, world_size: int) -> None:
    """Raise a one-line :class:`ConfigError` when ``SOLVER.ACCUMULATION_STEPS`` cannot be used
    with this config (bad value, batch not divisible, or a meta-architecture that refuses it), or
    when ``SOLVER.AMP.ENABLED`` is set without CUDA (detectron2's AMPTrainer would stop at its
    first step)."""
    if cfg.SOLVER.AMP.ENABLED and not torch.cuda.is_available():
        raise ConfigError("SOLVER.AMP.ENABLED True needs a CUDA GPU (detectron2's AMPTrainer); "
                          "set SOLVER.AMP.ENABLED False on a CPU")
    n = accumulation_steps(cfg)
    if n < 1:
        raise ConfigError(f"SOLVER.ACCUMULATION_STEPS must be >= 1, got {n}")
    if n == 1:
        return
    batch = int(cfg.SOLVER.IMS_PER_BATCH)
    if batch % (n * world_size):
        raise ConfigError(
            f"SOLVER.IMS_PER_BATCH {batch} (the total batch of one optimizer step) is not divisible by "
            f"SOLVER.ACCUMULATION_STEPS {n} x {world_size} process(es); choose ACCUMULATION_STEPS so that "
            f"IMS_PER_BATCH / (processes x ACCUMULATION_STEPS) is a whole number of images")
    arch = cfg.MODEL.META_ARCHITECTURE
    reason = refusal(META_ARCH_REGISTRY.get(arch)) if arch in META_ARCH_REGISTRY else None
    if reason:
        raise ConfigError(f"SOLVER.ACCUMULATION_STEPS {n} is not supported by {arch}: {reason}; set it to 1 "
                          f"and lower the total batch with the scaling rule (docs/distributed.md) instead")


def refusal(meta_arch_cls) -> Optional[str]:
    return getattr(meta_arch_cls, "GRADIENT_ACCUMULATION_REFUSAL", None)


def check_model_accumulation(cfg, model) -> None:
    """The built model's part of the check: synchronised BatchNorm (see the module docstring)."""
    n = accumulation_steps(cfg)
    if n == 1:
        return
    sync = sorted({type(m).__name__ for m in model.modules() if "SyncBatchNorm" in type(m).__name__})
    if sync:
        raise ConfigError(
            f"SOLVER.ACCUMULATION_STEPS {n} with synchronised BatchNorm ({', '.join(sync)}): its statistics would be "
            f"those of one micro-batch, not of the total batch; use a non-synchronised norm (e.g. BN, GN) or set "
            f"ACCUMULATION_STEPS to 1")
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        logger.info("gradient accumulation: BatchNorm statistics are those of each micro-batch of %d image(s), "
                    "as per-GPU BatchNorm's are those of each GPU's images", int(cfg.SOLVER.IMS_PER_BATCH) // n)


def micro_batch_cfg(cfg):
    """``cfg`` for the training data loader: ``IMS_PER_BATCH`` divided by ``ACCUMULATION_STEPS``
    (``cfg`` itself when there is no accumulation)."""
    n = accumulation_steps(cfg)
    if n == 1:
        return cfg
    out = cfg.clone()
    out.defrost()
    out.SOLVER.IMS_PER_BATCH = int(cfg.SOLVER.IMS_PER_BATCH) // n
    out.freeze()
    return out


class _Accumulating:
    """``run_step`` of detectron2's SimpleTrainer / AMPTrainer over ``accumulation_steps``
    micro-batches (see the module docstring)."""

    accumulation_steps = 1

    def _autocast(self):
        return contextlib.nullcontext()

    def _backward(self, loss):
        loss.backward()

    def _optimizer_step(self):
        self.optimizer.step()

    def run_step(self):
        assert self.model.training, f"[{type(self).__name__}] model was changed to eval mode!"
        n = self.accumulation_steps
        self.optimizer.zero_grad()
        data_time = 0.0
        totals = {}
        for i in range(n):
            start = time.perf_counter()
            data = next(self._data_loader_iter)
            data_time += time.perf_counter() - start
            last = i == n - 1
            # DDP: all-reduce the gradients once, in the last backward pass
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                with self._autocast():
                    loss_dict = self.model(data)
                    if isinstance(loss_dict, torch.Tensor):
                        loss_dict = {"total_loss": loss_dict}
                    losses = sum(loss_dict.values())
                self._backward(losses / n)
            for k, v in loss_dict.items():
                totals[k] = totals.get(k, 0.0) + v.detach() / n
        if hasattr(self, "after_backward"):  # detectron2 main's hook point; v0.6 has none
            self.after_backward()
        self._write_metrics(totals, data_time)
        self._optimizer_step()


class AccumulatingTrainer(_Accumulating, SimpleTrainer):
    def __init__(self, model, data_loader, optimizer, accumulation_steps: int):
        SimpleTrainer.__init__(self, model, data_loader, optimizer)
        self.accumulation_steps = int(accumulation_steps)


class AccumulatingAMPTrainer(_Accumulating, AMPTrainer):
    def __init__(self, model, data_loader, optimizer, accumulation_steps: int):
        AMPTrainer.__init__(self, model, data_loader, optimizer)
        self.accumulation_steps = int(accumulation_steps)

    def _autocast(self):
        dtype = getattr(self, "precision", torch.float16)  # detectron2 main: AMPTrainer(precision=...)
        return torch.autocast("cuda", dtype=dtype)

    def _backward(self, loss):
        self.grad_scaler.scale(loss).backward()

    def _optimizer_step(self):
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()


def build_step_trainer(cfg, model, data_loader, optimizer):
    """detectron2's SimpleTrainer / AMPTrainer (``SOLVER.AMP.ENABLED``), or their accumulating
    versions when ``SOLVER.ACCUMULATION_STEPS`` > 1."""
    n = accumulation_steps(cfg)
    if n == 1:
        return (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)
    cls = AccumulatingAMPTrainer if cfg.SOLVER.AMP.ENABLED else AccumulatingTrainer
    return cls(model, data_loader, optimizer, n)
