"""The trainer behind ``tools/train_net.py``: detectron2's DefaultTrainer with

* evaluators chosen from each test dataset's ``metadata.evaluator_type`` (or TEST.EVALUATORS),
  by the factories of ``hiseg.evaluation.registry``;
* AdamW / SGD with parameter groups and warmup + cosine / poly schedules (``optim.py``);
* atomic checkpoints (``checkpoint.py``), so ``--resume`` always finds a complete file, and the
  optimizer state inside them on detectron2 v0.6 too (v0.6 forgot it);
* gradient accumulation, ``SOLVER.ACCUMULATION_STEPS`` (``accumulation.py``);
* dataset mappers chosen by ``INPUT.DATASET_MAPPER_NAME`` (projects register theirs in
  ``hiseg.data.mapper_registry.MAPPER_REGISTRY``), wrapped so that a bad image is named in one line
  (``hiseg.image_io.ImageCheckingMapper``), and an empty dataset too (``hiseg.dataset_checks``).
"""
import logging
import os
import weakref
from datetime import timedelta

from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, TrainerBase
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from ..data.mapper_registry import MAPPER_REGISTRY
from ..dataset_checks import dataset_errors
from ..errors import TrainingDivergedError
from ..evaluation.registry import build_evaluators
from ..image_io import ImageCheckingMapper
from .accumulation import build_step_trainer, check_accumulation, check_model_accumulation, micro_batch_cfg
from .atomic_checkpointer import AtomicDetectionCheckpointer
from .optim import build_hiseg_lr_scheduler, build_hiseg_optimizer

__all__ = ["HisegTrainer", "create_ddp_model", "distributed_timeout"]

logger = logging.getLogger(__name__)

#: seconds a collective waits for the other processes before it fails (unset: detectron2's 30 min)
DIST_TIMEOUT_ENV = "HISEG_DIST_TIMEOUT_S"


def distributed_timeout() -> timedelta:
    """The process-group timeout ``tools/train_net.py`` passes to ``launch``: ``$HISEG_DIST_TIMEOUT_S``
    seconds, else detectron2's ``DEFAULT_TIMEOUT`` (30 minutes). A process whose peer hangs
    (rather than dies, which closes the connection at once) fails after this long instead of
    waiting forever (NCCL: with PyTorch's default async error handling)."""
    value = os.environ.get(DIST_TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"${DIST_TIMEOUT_ENV} must be a positive number of seconds, got {value!r}")
    return timedelta(seconds=seconds)


def create_ddp_model(model, **kwargs):
    """detectron2's ``create_ddp_model`` (DistributedDataParallel when there is more than one
    process, without ``find_unused_parameters``) that also takes a CPU model: detectron2 passes
    ``device_ids=[local rank]``, which DistributedDataParallel refuses for a CPU module (gloo
    training with ``MODEL.DEVICE cpu``)."""
    if comm.get_world_size() == 1:
        return model
    if "device_ids" not in kwargs:
        device = next(model.parameters()).device
        kwargs["device_ids"] = None if device.type == "cpu" else [comm.get_local_rank()]
    return DistributedDataParallel(model, **kwargs)


class HisegTrainer(DefaultTrainer):
    def __init__(self, cfg):
        # DefaultTrainer.__init__ (v0.6 and upstream main do the same steps), with our
        # create_ddp_model (CPU models too) and the atomic checkpointer (also in the hook).
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        check_accumulation(cfg, comm.get_world_size())  # SOLVER.ACCUMULATION_STEPS, AMP (accumulation.py)
        model = self.build_model(cfg)
        check_model_accumulation(cfg, model)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(micro_batch_cfg(cfg))  # IMS_PER_BATCH / ACCUMULATION_STEPS
        model = create_ddp_model(model, broadcast_buffers=False)
        self._trainer = build_step_trainer(cfg, model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicDetectionCheckpointer(model, cfg.OUTPUT_DIR, cfg=cfg, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def train(self):
        """DefaultTrainer.train; a loss that is not finite stops it with one line naming the
        iteration (:class:`~hiseg.errors.TrainingDivergedError`); when another process of a
        multi-process run died, the collective this one waited in fails (gloo: at once, the peer's connection closes; NCCL:
        after the process group's timeout) and this says so before re-raising."""
        try:
            return super().train()
        except FloatingPointError as e:  # SimpleTrainer: "Loss became infinite or NaN at iteration=..."
            detail = " ".join(str(e).split("\n")[1:]).strip() or str(e)
            raise TrainingDivergedError(
                f"training diverged at iteration {self.iter}: the loss is not finite ({detail}); lower "
                f"SOLVER.BASE_LR (now {self.cfg.SOLVER.BASE_LR:g}), e.g. by 10x, and train again; "
                f"{self.checkpointer.last_complete()}") from None
        except Exception as e:
            if comm.get_world_size() > 1 and isinstance(e, RuntimeError):  # incl. torch's DistError
                last = os.path.join(self.cfg.OUTPUT_DIR, "last_checkpoint")
                tag = open(last).read().strip() if os.path.isfile(last) else None
                logging.getLogger("detectron2").error(  # the logger default_setup sends to log.txt
                    f"rank {comm.get_rank()}/{comm.get_world_size()}: training stopped at iteration {self.iter}: "
                    f"a collective failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                    "another process has probably died or hangs. "
                    + (f"Last complete checkpoint: {os.path.join(self.cfg.OUTPUT_DIR, tag)}; restart with --resume."
                       if tag else "No checkpoint was written yet."))
            raise

    # detectron2 v0.6's DefaultTrainer does not checkpoint its inner trainer, so the optimizer
    # state was lost on --resume; upstream main saves it under "_trainer". Do the same on v0.6.
    _D2_SAVES_INNER_TRAINER = "state_dict" in DefaultTrainer.__dict__

    def state_dict(self):
        ret = super().state_dict()
        if not self._D2_SAVES_INNER_TRAINER:
            ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if not self._D2_SAVES_INNER_TRAINER and "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """DefaultTrainer.test, with the box predictors' scores watched so that an evaluation
        without predictions says why (:mod:`hiseg.evaluation.no_predictions`)."""
        from ..evaluation.no_predictions import ScoreProbe

        with ScoreProbe(model):
            return super().test(cfg, model, evaluators)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluators(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_hiseg_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_hiseg_lr_scheduler(cfg, optimizer)

    @classmethod
    def _mapper(cls, cfg, is_train):
        name = cfg.INPUT.DATASET_MAPPER_NAME
        mapper = MAPPER_REGISTRY.get(name)(cfg, is_train) if name else DatasetMapper(cfg, is_train)
        return ImageCheckingMapper(mapper)

    @classmethod
    def build_train_loader(cls, cfg):
        with dataset_errors():
            return build_detection_train_loader(cfg, mapper=cls._mapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        with dataset_errors():
            batch = int(cfg.TEST.get("IMS_PER_BATCH", 1))
            if batch > 1 and not cfg.MODEL.LOAD_PROPOSALS:
                from ..data.test_loader import build_batched_test_loader

                return build_batched_test_loader(dataset_name, cls._mapper(cfg, False), batch,
                                                 cfg.DATALOADER.NUM_WORKERS)
            return build_detection_test_loader(cfg, dataset_name, mapper=cls._mapper(cfg, False))
