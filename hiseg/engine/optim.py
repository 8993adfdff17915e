"""Optimizers and schedules used by the two papers.

* Parameter groups: no weight decay on normalisation layers, biases, position embeddings and
  class-like tokens (``cls_token``, ``pe_token``, ``pos_embed``, ``query_embed``, level tokens, and
  every ``nn.Embedding``: learnable queries),
  as DeiT / MoCo-v3 / Mask2Former do; ``SOLVER.WEIGHT_DECAY_EMBED`` sets the latter's decay.
* ``SOLVER.OPTIMIZER``: ``SGD`` (momentum ``SOLVER.MOMENTUM``, Nesterov ``SOLVER.NESTEROV``) or
  ``ADAMW`` (betas ``SOLVER.BETAS``): CAST's MoCo/DeiT runs and OAP use AdamW (Tables 11-12,
  OAP Sec. 5.1); CAST's VOC fine-tuning uses SGD with the poly schedule (Appx. E.5).
* ``SOLVER.CLIP_GRADIENTS``: detectron2's types plus ``full_model`` (one norm over all grads).
* ``SOLVER.LR_SCHEDULER_NAME``: detectron2's ``WarmupMultiStepLR`` / ``WarmupCosineLR`` (cosine
  to 0, as the papers) plus ``WarmupPolyLR`` (lr x (1 - it/max_it)^POLY_LR_POWER).
"""
import torch
from detectron2.solver import build_lr_scheduler as d2_build_lr_scheduler
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.solver.lr_scheduler import LRMultiplier, WarmupParamScheduler
from fvcore.common.param_scheduler import PolynomialDecayParamScheduler
from torch import nn

__all__ = ["param_groups", "build_hiseg_optimizer", "build_hiseg_lr_scheduler"]

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
          nn.InstanceNorm2d, nn.LayerNorm, nn.LocalResponseNorm)
_EMBED_NAMES = ("cls_token", "pe_token", "pos_embed", "query_embed", "query_feat", "level_embed",
                "sem_token", "ins_token", "mask_token", "reg_token")


def param_groups(model: nn.Module, base_lr: float, weight_decay: float, weight_decay_norm: float = 0.0,
                 weight_decay_bias: float = 0.0, weight_decay_embed: float = 0.0):
    """One group per distinct (lr, weight decay); frozen parameters are skipped."""
    groups = {}
    seen = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(module, _NORMS):
                wd = weight_decay_norm
            elif isinstance(module, nn.Embedding) or any(k in full.split(".")[-1] for k in _EMBED_NAMES):
                # learnable queries / level tokens held in nn.Embedding (Mask2Former's convention)
                wd = weight_decay_embed
            elif p_name == "bias" or p.ndim <= 1:
                wd = weight_decay_bias
            else:
                wd = weight_decay
            groups.setdefault(wd, []).append(p)
    return [{"params": ps, "lr": base_lr, "weight_decay": wd} for wd, ps in groups.items()]


def build_hiseg_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    s = cfg.SOLVER
    wd_bias = s.WEIGHT_DECAY_BIAS if s.WEIGHT_DECAY_BIAS is not None else 0.0
    groups = param_groups(model, s.BASE_LR, s.WEIGHT_DECAY, s.WEIGHT_DECAY_NORM, wd_bias, s.WEIGHT_DECAY_EMBED)
    name = s.OPTIMIZER.upper()
    if name == "SGD":
        cls, kwargs = torch.optim.SGD, {"momentum": s.MOMENTUM, "nesterov": s.NESTEROV}
    elif name == "ADAMW":
        cls, kwargs = torch.optim.AdamW, {"betas": tuple(s.BETAS)}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be 'SGD' or 'ADAMW', got {s.OPTIMIZER!r}")
    clip = s.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        cls = _with_full_model_clipping(cls, clip.CLIP_VALUE, clip.NORM_TYPE)
    else:  # detectron2's per-parameter "value" / "norm" clipping (a no-op when disabled)
        cls = maybe_add_gradient_clipping(cfg, cls)
    return cls(groups, lr=s.BASE_LR, **kwargs)


def _with_full_model_clipping(optim_cls, max_norm: float, norm_type: float):
    """``CLIP_TYPE: full_model``: clip the norm of all gradients together (as Mask2Former)."""

    class FullModelClipping(optim_cls):
        def step(self, closure=None):
            params = [p for g in self.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            return super().step(closure)

    FullModelClipping.__name__ = optim_cls.__name__ + "WithFullModelClipping"
    return FullModelClipping


def build_hiseg_lr_scheduler(cfg, optimizer):
    s = cfg.SOLVER
    if s.LR_SCHEDULER_NAME != "WarmupPolyLR":
        return d2_build_lr_scheduler(cfg, optimizer)
    sched = WarmupParamScheduler(PolynomialDecayParamScheduler(1.0, s.POLY_LR_POWER), s.WARMUP_FACTOR,
                                 min(s.WARMUP_ITERS / max(s.MAX_ITER, 1), 1.0), s.WARMUP_METHOD)
    return LRMultiplier(optimizer, multiplier=sched, max_iter=s.MAX_ITER)
