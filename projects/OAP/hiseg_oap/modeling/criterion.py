"""OAP's training losses (Sec. 4.3): cropped bipartite matching per level, mask and objectness
losses, and the query-wise self-distillation of Eq. 7 with DINO's SD of Eq. 1.

For every student view (a local crop of the image, Sec. 4.1) the teacher gives semantic- and
instance-level pseudo-masks (already cropped to the view and resized to the student's mask grid)
with their teacher-head codes. :class:`OAPCriterion` then

1. **matches** (Sec. 4.3 "Cropped Bipartite Matching") each level separately with
   :class:`~hiseg_oap.modeling.matcher.DiceMatcher`: the S semantic queries (first S outputs) against
   the semantic pseudo-masks, the I instance queries (next I outputs) against the instance
   pseudo-masks, so a query never takes a target of the other level;
2. supervises the matched **masks** with sigmoid BCE + Dice on point samples (Mask2Former's
   point-sampled mask losses, since Sec. 5.1 uses "the official setting of Mask2Former" for the
   decoder; the paper does not list its mask losses);
3. trains the **objectness** logits ``[object, no-object]`` with a cross-entropy in which matched
   queries are "object" and all others "no-object", the no-object class down-weighted
   (Mask2Former's class loss with a single class and its ``eos_coef``; the paper is silent, the
   score is needed to rank instance masks at inference);
4. repeats 1-3 for every auxiliary decoder layer (deep supervision, Mask2Former), re-matching per
   layer;
5. adds the **query-wise self-distillation** (Eq. 7) on the final layer's matches: for every
   matched pair (student query i, teacher pseudo-mask i) ``SD(p_t, p_s) = -sum_k p_t^k log p_s^k``
   (Eq. 1) with DINO's codes ``p_t = softmax((z_t - c) / tau_t)`` (teacher, centred, no gradient)
   and ``p_s = softmax(z_s / tau_s)`` (student);
6. updates DINO's **centre** ``c <- m c + (1 - m) mean(z_t)`` over all teacher codes of the batch.

Every loss is returned already multiplied by its weight, so the trainer sums the dict.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils import comm
from torch import Tensor, nn

from .matcher import DiceMatcher, point_sample

__all__ = [
    "OAPCriterion", "sigmoid_ce_loss", "dice_loss", "uncertain_point_coords", "self_distillation",
]


# ----------------------------------------------------------------------------------- loss terms
def sigmoid_ce_loss(logits: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Sigmoid BCE of ``(N, P)`` point logits vs ``(N, P)`` targets in [0, 1]: mean over the P
    points of each mask, summed over masks, divided by ``num_masks``."""
    per_mask = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1)
    return per_mask.sum() / num_masks


def dice_loss(logits: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """``1 - soft Dice`` with +1 smoothing per mask (``(N, P)`` logits vs targets), summed over
    masks, divided by ``num_masks``. Same Dice as :class:`~hiseg_oap.modeling.matcher.DiceMatcher`."""
    probs = logits.sigmoid()
    numerator = 2.0 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return (1.0 - (numerator + 1.0) / (denominator + 1.0)).sum() / num_masks


@torch.no_grad()
def uncertain_point_coords(mask_logits: Tensor, num_points: int, oversample_ratio: float,
                           importance_sample_ratio: float) -> Tensor:
    """Mask2Former / PointRend importance sampling of ``num_points`` points per mask.

    Draws ``int(num_points * oversample_ratio)`` uniform random points per mask, keeps the
    ``int(importance_sample_ratio * num_points)`` most uncertain ones (smallest ``|logit|``, i.e.
    closest to the decision boundary) and fills the rest with fresh uniform random points.

    Args:
        mask_logits: ``(N, 1, H, W)`` predicted mask logits.

    Returns:
        ``(N, num_points, 2)`` points in ``[0, 1]^2`` as ``(x, y)`` for :func:`point_sample`.
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0.0 <= importance_sample_ratio <= 1.0:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    n = mask_logits.shape[0]
    device = mask_logits.device
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    parts = []
    if num_uncertain > 0:
        candidates = torch.rand(n, num_candidates, 2, device=device)
        uncertainty = -point_sample(mask_logits.float(), candidates)[:, 0].abs()  # (N, num_candidates)
        keep = uncertainty.topk(num_uncertain, dim=1).indices  # (N, num_uncertain)
        parts.append(torch.gather(candidates, 1, keep[..., None].expand(-1, -1, 2)))
    if num_random > 0:
        parts.append(torch.rand(n, num_random, 2, device=device))
    return torch.cat(parts, dim=1)


def _mean_over_processes(value: float, device) -> float:
    """``value`` averaged over all processes (itself on one); collective when distributed."""
    world = comm.get_world_size()
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / world


def self_distillation(student_logits: Tensor, teacher_logits: Tensor, center: Tensor, student_temp: float,
                      teacher_temp: float) -> Tensor:
    """Per-pair SD of Eq. 1 with DINO's codes: ``(L, K)`` student and teacher logits -> ``(L,)``.

    ``p_t = softmax((teacher_logits - center) / teacher_temp)`` (no gradient),
    ``log p_s = log_softmax(student_logits / student_temp)``, ``SD = -sum_k p_t^k log p_s^k``.
    """
    with torch.no_grad():
        p_t = F.softmax((teacher_logits.detach().float() - center.float()) / teacher_temp, dim=-1)
    log_p_s = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(p_t * log_p_s).sum(-1)


# ------------------------------------------------------------------------------- input checking
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_level_target(tgt, where: str, grid: Tuple[int, int],
                        out_dim: Optional[int]) -> Tuple[Tensor, Optional[Tensor]]:
    if not isinstance(tgt, dict) or "masks" not in tgt:
        raise ValueError(f"{where} must be a dict with 'masks' (T, Hm, Wm) bool and 'codes' (T, K)")
    masks = tgt["masks"]
    if not isinstance(masks, Tensor) or masks.dim() != 3:
        raise ValueError(f"{where}['masks'] must be a (T, Hm, Wm) tensor, got "
                         f"{tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__}")
    if masks.dtype != torch.bool:
        raise ValueError(f"{where}['masks'] must be bool, got dtype {masks.dtype}")
    if tuple(masks.shape[-2:]) != tuple(grid):
        raise ValueError(f"{where}['masks'] grid {tuple(masks.shape[-2:])} != predicted mask grid {tuple(grid)}")
    if out_dim is None:
        return masks, None
    if "codes" not in tgt:
        raise ValueError(f"{where} lacks 'codes' (T, K) teacher-head logits")
    codes = tgt["codes"]
    if not isinstance(codes, Tensor) or codes.dim() != 2 or not codes.is_floating_point():
        raise ValueError(f"{where}['codes'] must be a floating (T, K) tensor, got "
                         f"{(tuple(codes.shape), codes.dtype) if isinstance(codes, Tensor) else type(codes).__name__}")
    if codes.shape[0] != masks.shape[0]:
        raise ValueError(f"{where}: {codes.shape[0]} codes for {masks.shape[0]} masks")
    if codes.shape[1] != out_dim:
        raise ValueError(f"{where}['codes'] dim {codes.shape[1]} != K={out_dim} (the criterion's out_dim)")
    return masks, codes


def _check_layer(layer: dict, where: str, shape: Optional[Tuple[int, ...]] = None) -> Tuple[int, ...]:
    for key in ("pred_masks", "pred_objectness"):
        if not isinstance(layer, dict) or key not in layer:
            raise ValueError(f"{where} lacks '{key}'")
    masks, obj = layer["pred_masks"], layer["pred_objectness"]
    if not isinstance(masks, Tensor) or masks.dim() != 4 or not masks.is_floating_point():
        raise ValueError(f"{where}['pred_masks'] must be floating (V, Q, Hm, Wm) logits, got "
                         f"{tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__}")
    if shape is not None and tuple(masks.shape) != tuple(shape):
        raise ValueError(f"{where}['pred_masks'] shape {tuple(masks.shape)} != final layer's {tuple(shape)}")
    v, q = masks.shape[:2]
    if not isinstance(obj, Tensor) or tuple(obj.shape) != (v, q, 2) or not obj.is_floating_point():
        raise ValueError(f"{where}['pred_objectness'] must be floating (V, Q, 2) = {(v, q, 2)} "
                         f"[object, no-object] logits, got "
                         f"{tuple(obj.shape) if isinstance(obj, Tensor) else type(obj).__name__}")
    return tuple(masks.shape)


# ---------------------------------------------------------------------------------- criterion
class OAPCriterion(nn.Module):
    """Losses of OAP's student (Sec. 4.3, Eq. 7 with Eq. 1). See the module docstring.

    Args:
        num_sem_queries: S, semantic queries (first S decoder outputs; Sec. 5.1: 50).
        num_ins_queries: I, instance queries (next I outputs; Sec. 5.1: 150).
        out_dim: K, dimension of the DINO-head codes (Sec. 5.1: 512).
        mask_weight, dice_weight, objectness_weight, sd_weight: loss weights (applied here).
        no_object_weight: weight of the no-object class in the objectness cross-entropy.
        sd_reduction: ``"sum"`` sums SD over the L matched pairs of a view (Eq. 7 literally);
            ``"mean"`` divides that sum by L. Either is then averaged over the views with L > 0.
        student_temp, teacher_temp: DINO's softmax temperatures tau_s, tau_t.
        center_momentum: m of DINO's centre update.
        deep_supervision: also supervise every ``outputs["aux_outputs"]`` layer (keys ``_0``...).
        num_points, oversample_ratio, importance_sample_ratio: point sampling of the mask losses
            (``num_points`` also sets the matcher's number of points).

    Buffer ``center`` (1, K): DINO's running mean of the teacher codes, saved in checkpoints.
    """

    @configurable
    def __init__(self, *, num_sem_queries: int, num_ins_queries: int, out_dim: int, mask_weight: float = 5.0,
                 dice_weight: float = 5.0, objectness_weight: float = 2.0, no_object_weight: float = 0.1,
                 sd_weight: float = 1.0, sd_reduction: str = "mean", student_temp: float = 0.1,
                 teacher_temp: float = 0.04, center_momentum: float = 0.9, deep_supervision: bool = True,
                 num_points: int = 12544, oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75):
        super().__init__()
        if not _is_int(num_sem_queries) or num_sem_queries < 0:
            raise ValueError(f"num_sem_queries must be an int >= 0, got {num_sem_queries!r}")
        if not _is_int(num_ins_queries) or num_ins_queries < 0:
            raise ValueError(f"num_ins_queries must be an int >= 0, got {num_ins_queries!r}")
        if num_sem_queries + num_ins_queries == 0:
            raise ValueError("num_sem_queries + num_ins_queries must be > 0")
        if not _is_int(out_dim) or out_dim < 1:
            raise ValueError(f"out_dim must be a positive int, got {out_dim!r}")
        for name, value in (("mask_weight", mask_weight), ("dice_weight", dice_weight),
                            ("objectness_weight", objectness_weight), ("no_object_weight", no_object_weight),
                            ("sd_weight", sd_weight)):
            if not math.isfinite(float(value)) or float(value) < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if sd_reduction not in ("mean", "sum"):
            raise ValueError(f"sd_reduction must be 'mean' or 'sum', got {sd_reduction!r}")
        for name, value in (("student_temp", student_temp), ("teacher_temp", teacher_temp)):
            if not float(value) > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if not 0.0 <= float(center_momentum) <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum!r}")
        if not _is_int(num_points) or num_points < 1:
            raise ValueError(f"num_points must be a positive int, got {num_points!r}")
        if not float(oversample_ratio) >= 1.0:
            raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio!r}")
        if not 0.0 <= float(importance_sample_ratio) <= 1.0:
            raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio!r}")

        self.num_sem_queries = num_sem_queries
        self.num_ins_queries = num_ins_queries
        self.out_dim = out_dim
        self.mask_weight = float(mask_weight)
        self.dice_weight = float(dice_weight)
        self.objectness_weight = float(objectness_weight)
        self.no_object_weight = float(no_object_weight)
        self.sd_weight = float(sd_weight)
        self.sd_reduction = sd_reduction
        self.student_temp = float(student_temp)
        self.teacher_temp = float(teacher_temp)
        self.center_momentum = float(center_momentum)
        self.deep_supervision = bool(deep_supervision)
        self.num_points = num_points
        self.oversample_ratio = float(oversample_ratio)
        self.importance_sample_ratio = float(importance_sample_ratio)
        self.matcher = DiceMatcher(num_points=num_points)

        self.register_buffer("center", torch.zeros(1, out_dim))
        # Class weights of the objectness cross-entropy; derived from a hyper-parameter, so not
        # saved in checkpoints.
        self.register_buffer("objectness_class_weight", torch.tensor([1.0, self.no_object_weight]), persistent=False)

    @classmethod
    def from_config(cls, cfg):
        o = cfg.MODEL.OAP
        return {
            "num_sem_queries": o.DECODER.NUM_SEM_QUERIES,
            "num_ins_queries": o.DECODER.NUM_INS_QUERIES,
            "out_dim": o.HEAD.OUT_DIM,
            "mask_weight": o.LOSS.MASK_WEIGHT,
            "dice_weight": o.LOSS.DICE_WEIGHT,
            "objectness_weight": o.LOSS.OBJECTNESS_WEIGHT,
            "no_object_weight": o.LOSS.NO_OBJECT_WEIGHT,
            "sd_weight": o.LOSS.SD_WEIGHT,
            "sd_reduction": o.LOSS.SD_REDUCTION,
            "student_temp": o.LOSS.STUDENT_TEMP,
            "teacher_temp": o.LOSS.TEACHER_TEMP,
            "center_momentum": o.LOSS.CENTER_MOMENTUM,
            "deep_supervision": o.LOSS.DEEP_SUPERVISION,
            "num_points": o.LOSS.TRAIN_NUM_POINTS,
            "oversample_ratio": o.LOSS.OVERSAMPLE_RATIO,
            "importance_sample_ratio": o.LOSS.IMPORTANCE_SAMPLE_RATIO,
        }

    def extra_repr(self) -> str:
        return (f"S={self.num_sem_queries}, I={self.num_ins_queries}, K={self.out_dim}, "
                f"weights(mask={self.mask_weight}, dice={self.dice_weight}, obj={self.objectness_weight}, "
                f"no_object={self.no_object_weight}, sd={self.sd_weight}), sd_reduction={self.sd_reduction!r}, "
                f"temps(student={self.student_temp}, teacher={self.teacher_temp}), "
                f"center_momentum={self.center_momentum}, deep_supervision={self.deep_supervision}")

    # ---------------------------------------------------------------------------- inputs
    def _check_targets(self, targets, num_views: int, grid: Tuple[int, int], with_codes: bool):
        """-> per view ``(masks (Ts+Ti, Hm, Wm) bool, codes (Ts+Ti, K) or None, Ts, Ti)``:
        the semantic targets first, then the instance ones."""
        if not isinstance(targets, (list, tuple)):
            raise ValueError(f"targets must be a list with one dict per view, got {type(targets).__name__}")
        if len(targets) != num_views:
            raise ValueError(f"{len(targets)} target dicts for {num_views} student views (pred_masks' first dim)")
        per_view = []
        for v, tgt in enumerate(targets):
            if not isinstance(tgt, dict) or "semantic" not in tgt or "instance" not in tgt:
                raise ValueError(f"targets[{v}] must be a dict with 'semantic' and 'instance' entries")
            k = self.out_dim if with_codes else None
            sem_masks, sem_codes = _check_level_target(tgt["semantic"], f"targets[{v}]['semantic']", grid, k)
            ins_masks, ins_codes = _check_level_target(tgt["instance"], f"targets[{v}]['instance']", grid, k)
            masks = torch.cat([sem_masks, ins_masks.to(sem_masks.device)], dim=0)
            codes = None
            if with_codes:
                codes = torch.cat([sem_codes.detach(), ins_codes.detach().to(sem_codes)], dim=0)
            per_view.append((masks, codes, sem_masks.shape[0], ins_masks.shape[0]))
        return per_view

    def _check_outputs(self, outputs) -> Tuple[int, ...]:
        if not isinstance(outputs, dict):
            raise ValueError(f"outputs must be a dict, got {type(outputs).__name__}")
        shape = _check_layer(outputs, "outputs")
        v, q = shape[:2]
        if v == 0:
            raise ValueError("outputs['pred_masks'] has no student view (V = 0)")
        s, i = self.num_sem_queries, self.num_ins_queries
        if q != s + i:
            raise ValueError(f"outputs have Q={q} queries but the criterion expects S + I = {s} + {i} = {s + i}")
        if "pred_codes" not in outputs:
            raise ValueError("outputs lacks 'pred_codes' (V, Q, K) student DINO-head logits")
        codes = outputs["pred_codes"]
        if not isinstance(codes, Tensor) or codes.dim() != 3 or not codes.is_floating_point():
            raise ValueError("outputs['pred_codes'] must be floating (V, Q, K) logits, got "
                             f"{tuple(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__}")
        if tuple(codes.shape[:2]) != (v, q):
            raise ValueError(f"outputs['pred_codes'] shape {tuple(codes.shape)} does not start with (V, Q) = {(v, q)}")
        if codes.shape[2] != self.out_dim:
            raise ValueError(f"outputs['pred_codes'] dim {codes.shape[2]} != K={self.out_dim} "
                             "(the criterion's out_dim)")
        aux = outputs.get("aux_outputs", [])
        if aux is None:
            aux = []
        if not isinstance(aux, (list, tuple)):
            raise ValueError(f"outputs['aux_outputs'] must be a list of dicts, got {type(aux).__name__}")
        if self.deep_supervision:
            for j, layer in enumerate(aux):
                _check_layer(layer, f"outputs['aux_outputs'][{j}]", shape)
        return shape

    # --------------------------------------------------------------------------- matching
    @torch.no_grad()
    def match(self, pred_masks: Tensor, targets: Sequence[dict]) -> List[Tuple[Tensor, Tensor]]:
        """Cropped bipartite matching per view and per level (Sec. 4.3).

        Args:
            pred_masks: ``(V, Q, Hm, Wm)`` logits, the S semantic queries first.
            targets: one dict per view as in :meth:`forward` (only the masks are read).

        Returns:
            per view ``(query_idx, target_idx)`` int64 tensors on ``pred_masks``' device, sorted by
            ``query_idx``. ``target_idx`` indexes the view's targets concatenated as
            ``[semantic..., instance...]``; semantic pairs have ``query_idx < S`` and
            ``target_idx < Ts``, instance pairs ``query_idx >= S`` and ``target_idx >= Ts``.
        """
        if not isinstance(pred_masks, Tensor) or pred_masks.dim() != 4:
            raise ValueError("pred_masks must be (V, Q, Hm, Wm) logits")
        s, i = self.num_sem_queries, self.num_ins_queries
        if pred_masks.shape[1] != s + i:
            raise ValueError(f"pred_masks have Q={pred_masks.shape[1]} queries but S + I = {s} + {i} = {s + i}")
        per_view = self._check_targets(targets, pred_masks.shape[0], tuple(pred_masks.shape[-2:]), with_codes=False)
        return self._match(pred_masks, per_view)

    def _match(self, pred_masks: Tensor, per_view) -> List[Tuple[Tensor, Tensor]]:
        s = self.num_sem_queries
        device = pred_masks.device
        indices = []
        with torch.no_grad():
            for v, (masks, _, ts, _) in enumerate(per_view):
                sem_q, sem_t = self.matcher(pred_masks[v, :s].detach(), masks[:ts])
                ins_q, ins_t = self.matcher(pred_masks[v, s:].detach(), masks[ts:])
                query_idx = torch.cat([sem_q, ins_q + s]).to(device)
                target_idx = torch.cat([sem_t, ins_t + ts]).to(device)
                indices.append((query_idx, target_idx))
        return indices

    def _num_masks(self, per_view, device) -> float:
        """Matched masks in the batch (the same for every layer: ``min(S, Ts) + min(I, Ti)`` per
        view), averaged over processes (Mask2Former: DDP averages the gradients, so the per-process
        normaliser is the global count / world size), at least 1."""
        s, i = self.num_sem_queries, self.num_ins_queries
        local = float(sum(min(s, ts) + min(i, ti) for _, _, ts, ti in per_view))
        world = comm.get_world_size()
        if world > 1:
            count = torch.tensor([local], dtype=torch.float32, device=device)
            dist.all_reduce(count)
            local = count.item() / world
        return max(local, 1.0)

    # ----------------------------------------------------------------------------- losses
    def _layer_losses(self, layer: dict, per_view, indices, num_masks: float, suffix: str) -> Dict[str, Tensor]:
        pred_masks = layer["pred_masks"]
        pred_obj = layer["pred_objectness"]
        views = torch.cat([torch.full_like(q, v) for v, (q, _) in enumerate(indices)])
        queries = torch.cat([q for q, _ in indices])

        # Objectness: matched queries -> class 0 (object), the others -> class 1 (no-object).
        obj_target = torch.ones(pred_obj.shape[:2], dtype=torch.int64, device=pred_obj.device)
        obj_target[views, queries] = 0
        # Weighted mean over all queries (= F.cross_entropy with ``weight``), written out so that
        # no_object_weight = 0 with no match anywhere gives 0 instead of 0 / 0.
        ce = F.cross_entropy(pred_obj.float().transpose(1, 2), obj_target, reduction="none")  # (V, Q)
        w = self.objectness_class_weight.to(pred_obj.device)[obj_target]
        # The normaliser is the weight of the whole batch over all processes / world size (as
        # num_masks), so that W processes x B views give the loss and gradient of 1 x W*B views.
        loss_obj = (w * ce).sum() / max(_mean_over_processes(float(w.sum()), pred_obj.device), 1e-12)

        if queries.numel() == 0:
            zero = pred_masks.sum() * 0.0
            loss_mask, loss_dice = zero, zero.clone()
        else:
            src = pred_masks[views, queries].float()[:, None]  # (N, 1, Hm, Wm)
            tgt = torch.cat([masks[t.to(masks.device)] for (masks, _, _, _), (_, t) in zip(per_view, indices)])
            tgt = tgt.to(device=src.device, dtype=torch.float32)[:, None]
            coords = uncertain_point_coords(src.detach(), self.num_points, self.oversample_ratio,
                                            self.importance_sample_ratio)
            with torch.no_grad():
                point_labels = point_sample(tgt, coords)[:, 0]
            point_logits = point_sample(src, coords)[:, 0]
            loss_mask = sigmoid_ce_loss(point_logits, point_labels, num_masks)
            loss_dice = dice_loss(point_logits, point_labels, num_masks)
        return {
            "loss_mask" + suffix: loss_mask * self.mask_weight,
            "loss_dice" + suffix: loss_dice * self.dice_weight,
            "loss_objectness" + suffix: loss_obj * self.objectness_weight,
        }

    def _sd_loss(self, pred_codes: Tensor, per_view, indices) -> Tensor:
        """Eq. 7 per view (sum or mean over its L matched pairs), averaged over the views with L > 0 of all processes."""
        per_view_losses = []
        for v, ((_, codes, _, _), (q, t)) in enumerate(zip(per_view, indices)):
            if q.numel() == 0:
                continue
            student = pred_codes[v, q]
            teacher = codes[t.to(codes.device)].to(student.device)
            sd = self_distillation(student, teacher, self.center, self.student_temp, self.teacher_temp)
            per_view_losses.append(sd.sum() if self.sd_reduction == "sum" else sd.mean())
        # mean over the views with a match in the whole batch of all processes (collective)
        count = _mean_over_processes(float(len(per_view_losses)), pred_codes.device)
        if not per_view_losses:
            return pred_codes.sum() * 0.0
        return torch.stack(per_view_losses).sum() / count

    @torch.no_grad()
    def update_center(self, teacher_codes: Tensor) -> None:
        """DINO's centre update ``c <- m c + (1 - m) mean(teacher_codes)`` with the mean over all
        ``(N, K)`` codes of all processes (sum and count all-reduced, so processes may hold
        different N). No update when there is no code anywhere. Collective when distributed:
        every process must call it."""
        if teacher_codes.dim() != 2 or teacher_codes.shape[1] != self.out_dim:
            raise ValueError(f"teacher_codes must be (N, K={self.out_dim}), got {tuple(teacher_codes.shape)}")
        codes = teacher_codes.detach().to(device=self.center.device, dtype=torch.float32)
        stats = torch.cat([codes.sum(0), codes.new_tensor([codes.shape[0]])])
        if comm.get_world_size() > 1:
            dist.all_reduce(stats)
        count = stats[-1].item()
        if count <= 0:
            return
        batch_center = (stats[:-1] / count)[None]
        self.center.mul_(self.center_momentum)
        self.center.add_(batch_center.to(self.center.dtype), alpha=1.0 - self.center_momentum)

    def forward(self, outputs: Dict, targets: List[Dict], center_codes: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Weighted losses of a batch of V student views.

        Args:
            outputs: the student's ``"pred_masks"`` (V, Q, Hm, Wm) logits (S semantic queries
                first), ``"pred_objectness"`` (V, Q, 2) ``[object, no-object]`` logits,
                ``"pred_codes"`` (V, Q, K) DINO-head logits and ``"aux_outputs"`` (a list of dicts
                with ``"pred_masks"`` and ``"pred_objectness"``, one per earlier decoder layer).
            targets: per view ``{"semantic": {"masks": (Ts, Hm, Wm) bool, "codes": (Ts, K)},
                "instance": {"masks": (Ti, Hm, Wm) bool, "codes": (Ti, K)}}``, the teacher's
                cropped pseudo-masks and teacher-head logits (no gradient is taken through them).
            center_codes: ``(N, K)`` the teacher outputs the centre is updated with, each counted
                once (DINO centres over the teacher's outputs of the batch). ``None``: the codes of
                ``targets``, where a teacher mask seen by several views counts once per view.

        Returns:
            ``loss_mask``, ``loss_dice``, ``loss_objectness``, ``loss_sd`` and, with deep
            supervision, ``loss_mask_j``, ``loss_dice_j``, ``loss_objectness_j`` for every aux
            layer j; each already multiplied by its weight. In training mode the centre is updated
            afterwards (the loss uses the centre from before the update).
        """
        shape = self._check_outputs(outputs)
        pred_masks = outputs["pred_masks"]
        per_view = self._check_targets(targets, shape[0], tuple(shape[-2:]), with_codes=True)
        num_masks = self._num_masks(per_view, pred_masks.device)

        indices = self._match(pred_masks, per_view)
        losses = self._layer_losses(outputs, per_view, indices, num_masks, "")
        losses["loss_sd"] = self._sd_loss(outputs["pred_codes"], per_view, indices) * self.sd_weight
        if self.deep_supervision:
            for j, layer in enumerate(outputs.get("aux_outputs") or []):
                aux_indices = self._match(layer["pred_masks"], per_view)
                losses.update(self._layer_losses(layer, per_view, aux_indices, num_masks, f"_{j}"))

        if self.training:
            if center_codes is None:
                center_codes = torch.cat([codes for _, codes, _, _ in per_view])
            self.update_center(center_codes.detach().to(self.center.device, torch.float32))
        return losses
