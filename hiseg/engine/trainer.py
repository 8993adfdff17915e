"""The trainer behind ``tools/train_net.py``: detectron2's DefaultTrainer with

* evaluators chosen from each test dataset's ``metadata.evaluator_type`` (or TEST.EVALUATORS);
* AdamW / SGD with parameter groups and warmup + cosine / poly schedules (``optim.py``);
* atomic checkpoints (``checkpoint.py``), so ``--resume`` always finds a complete file, and the
  optimizer state inside them on detectron2 v0.6 too (v0.6 forgot it);
* gradient accumulation, ``SOLVER.ACCUMULATION_STEPS`` (``accumulation.py``);
* dataset mappers chosen by ``INPUT.DATASET_MAPPER_NAME`` (projects register theirs in
  ``MAPPER_REGISTRY``), wrapped so that a bad image is named in one line
  (``hiseg.image_io.ImageCheckingMapper``), and an empty dataset too (``hiseg.dataset_checks``).
"""
import logging
import os
import re
import weakref
from datetime import timedelta
from typing import Callable, Dict, List

from detectron2.data import DatasetMapper, MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, TrainerBase
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.evaluation import (COCOEvaluator, COCOPanopticEvaluator, DatasetEvaluators, SemSegEvaluator)
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from detectron2.utils.registry import Registry
from torch.nn.parallel import DistributedDataParallel

from ..compat import coco_evaluator_kwargs
from ..dataset_checks import dataset_errors
from ..errors import TrainingDivergedError
from ..image_io import ImageCheckingMapper
from .accumulation import build_step_trainer, check_accumulation, check_model_accumulation, micro_batch_cfg
from .checkpoint import AtomicDetectionCheckpointer
from .optim import build_hiseg_lr_scheduler, build_hiseg_optimizer

__all__ = ["HisegTrainer", "build_evaluators", "create_ddp_model", "distributed_timeout", "MAPPER_REGISTRY",
           "EVALUATOR_FACTORIES"]

logger = logging.getLogger(__name__)

MAPPER_REGISTRY = Registry("HISEG_MAPPER")
MAPPER_REGISTRY.__doc__ = "Dataset mappers selectable with INPUT.DATASET_MAPPER_NAME: cls(cfg, is_train)."


def _coco(cfg, name, out):
    from ..evaluation.no_predictions import ExplainNoPredictions  # "AP nan": says why

    return [ExplainNoPredictions(COCOEvaluator(name, output_dir=out, **coco_evaluator_kwargs()), name, cfg)]


def _panoptic(cfg, name, out):
    evs = [COCOPanopticEvaluator(name, out)]
    if getattr(MetadataCatalog.get(name), "json_file", None):
        evs.append(COCOEvaluator(name, output_dir=out, **coco_evaluator_kwargs()))
    return evs


def _sem_seg(cfg, name, out):
    return [SemSegEvaluator(name, distributed=True, output_dir=out)]


def _bsds(cfg, name, out):
    from ..evaluation import HierarchicalSegEvaluator

    return [HierarchicalSegEvaluator(name, output_dir=out)]


def _classification(cfg, name, out):
    from ..evaluation.classification import ClassificationEvaluator

    return [ClassificationEvaluator(name, distributed=True, output_dir=out)]


def _sem_seg_boundary(cfg, name, out):
    from ..evaluation.boundary_fscore import boundary_fscore_factory

    return boundary_fscore_factory(cfg, name, out)


def _sem_seg_retrieval(cfg, name, out):
    from ..evaluation.segment_retrieval import segment_retrieval_factory

    return segment_retrieval_factory(cfg, name, out)


def _figure_ground(cfg, name, out):
    """CAST Table 5: IoU of the model's ``"figure_ground"`` mask with the true foreground,
    scored on the dataset's original label maps (the test mapper's ``"sem_seg"`` is resized)."""
    import numpy as np
    from PIL import Image

    from detectron2.data import DatasetCatalog

    from ..evaluation.figure_ground import FigureGroundEvaluator

    gt_files = {d["file_name"]: d["sem_seg_file_name"] for d in DatasetCatalog.get(name) if "sem_seg_file_name" in d}

    def gt_loader(inp):
        path = gt_files.get(inp.get("file_name")) or inp.get("sem_seg_file_name")
        if path:
            with Image.open(path) as im:
                return np.asarray(im)
        if "sem_seg" in inp:
            return inp["sem_seg"]
        raise ValueError(f"figure_ground: no label map for {inp.get('file_name')!r} in dataset {name!r}")

    ignore = getattr(MetadataCatalog.get(name), "ignore_label", 255)
    return [FigureGroundEvaluator(distributed=True, ignore_label=ignore, gt_loader=gt_loader)]


# evaluator_type -> factory(cfg, dataset_name, output_folder) -> list of evaluators.
# Projects add their own (e.g. "classification").
EVALUATOR_FACTORIES: Dict[str, Callable] = {
    "coco": _coco,
    "coco_panoptic_seg": _panoptic,
    "sem_seg": _sem_seg,
    "sem_seg_boundary": _sem_seg_boundary,  # Table 3 boundary F-score
    "sem_seg_retrieval": _sem_seg_retrieval,  # SegSort segment retrieval (Appx. E.5)
    "bsds_hierarchical": _bsds,
    "classification": _classification,  # top-1 / top-5
    "figure_ground": _figure_ground,  # CAST Table 5 attention figure-ground mIoU
}


def evaluator_types(cfg, dataset_name: str) -> List[str]:
    """The evaluator types for one test dataset.

    ``TEST.EVALUATORS`` entries are either ``"<type>"`` (every test dataset) or
    ``"<dataset>:<type>"`` (that dataset only); without an entry that applies, the dataset's
    ``metadata.evaluator_type`` is used.
    """
    types = []
    for entry in cfg.TEST.EVALUATORS:
        name, sep, t = entry.rpartition(":")
        if not sep:
            types.append(entry)
        elif name == dataset_name:
            types.append(t)
        elif name not in cfg.DATASETS.TEST:
            raise ValueError(f"TEST.EVALUATORS entry {entry!r} names dataset {name!r}, which is not in "
                             f"DATASETS.TEST {tuple(cfg.DATASETS.TEST)}")
    return types or [getattr(MetadataCatalog.get(dataset_name), "evaluator_type", None)]


def build_evaluators(cfg, dataset_name: str, output_folder: str = None):
    # a name such as "coco:ann.json:images" (hiseg.data.datasets.user_data) as one folder name
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", re.sub(r"[^\w.-]+", "_", dataset_name))
    types = evaluator_types(cfg, dataset_name)
    evaluators = []
    for t in types:
        if t not in EVALUATOR_FACTORIES:
            raise ValueError(f"no evaluator for evaluator_type {t!r} of dataset {dataset_name!r}; "
                             f"known: {sorted(EVALUATOR_FACTORIES)} (set TEST.EVALUATORS or the metadata)")
        evaluators += EVALUATOR_FACTORIES[t](cfg, dataset_name, output_folder)
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)


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
