from .atomic_checkpointer import AtomicDetectionCheckpointer
from .optim import build_hiseg_lr_scheduler, build_hiseg_optimizer, param_groups
from .trainer import HisegTrainer, build_evaluators
