"""OAP's online self-supervised universal segmenter (OAP paper, Sec. 4.1, 4.3, 5.1).

One training step (Fig. 2):

1. The teacher (an EMA of the student, cosine momentum 0.996 -> 1, Sec. 5.1) encodes the *global*
   view without gradients; OAP (Sec. 4.2, Alg. 1) pools the keys of its last ViT block into
   instance and semantic pseudo-masks with their Eq. 6 embeddings.
2. The student encodes the *local* multi-crop views (scale 0.05-0.4, Sec. 5.1) with the
   multi-scale encoder (ViT + ViT-Adapter, Sec. 4.3) and the Mask2Former decoder whose 50
   semantic and 150 instance queries are told apart by [SEM] / [INS] tokens.
3. The teacher's masks are cropped to each local view ("Cropped Bipartite Matching"), matched to
   the queries of their level by Dice, and supervise masks (BCE + Dice) and the query-wise
   self-distillation of Eq. 7 through the DINO head.

Inference uses "the final teacher network with the mask decoder" (Sec. 5.1): class-agnostic
instances with scores and prototype clusters, a semantic map of clusters, and a panoptic merge.

Choices where the paper is silent:

* Teacher embeddings live in the teacher's key space (``d`` = ViT width) while decoder queries have
  ``HIDDEN_DIM`` channels; the student's queries go through a linear projection to ``d`` before
  the DINO head, so that the teacher head, an EMA of the student head, reads the OAP embeddings
  directly (``teacher head(Q_t)`` and ``student head(Q_s)`` of Eq. 7).
* The EMA update runs at the start of each training step (MoCo-v3's order), with the momentum of
  that iteration; the first step copies the student into the teacher, so that weights loaded
  after the model is built (e.g. converted DINO weights) reach the teacher too.
* The teacher stays in eval mode (no drop path) as DINO's teacher does.
"""
from __future__ import annotations

import copy
import time
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import BitMasks, ImageList, Instances
from detectron2.utils.events import get_event_storage

from hiseg.modeling.ema import copy_once_, cosine_momentum, ema_update_

from ..data.crop_targets import crop_masks_to_views
from ..pooling.generators import build_generator, build_oap_generator
from ..pooling.types import MaskCutConfig
from .criterion import OAPCriterion
from .dino_head import DINOHead
from .pixel_decoder import MSDeformAttnPixelDecoder
from .pseudo_targets import LEVELS, pseudo_mask_targets
from .transformer_decoder import LevelQueryTransformerDecoder

__all__ = ["OAPSegmentor", "teacher_momentum"]

#: Modules of the student that the teacher mirrors (the whole network, Sec. 4.3).
_MIRRORED = ("backbone", "pixel_decoder", "transformer_decoder", "query_proj", "head")


def teacher_momentum(base: float, end: float, it: int, max_iter: int) -> float:
    """Cosine schedule of the EMA momentum from ``base`` (it = 0) to ``end`` (it = max_iter)
    (Sec. 5.1: "a cosine momentum schedule from 0.996 to 1"; DINO's form)."""
    return cosine_momentum(base, it, max_iter, end)


class _Network(nn.Module):
    """The parts one branch runs: encoder, pixel decoder, transformer decoder, projection, head."""

    def __init__(self, backbone, pixel_decoder, transformer_decoder, query_proj, head):
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder
        self.query_proj = query_proj
        self.head = head

    def decode(self, images: torch.Tensor) -> Dict:
        features = self.backbone(images)
        mask_features, multi_scale = self.pixel_decoder.forward_features(features)
        out = self.transformer_decoder(multi_scale, mask_features)
        q = out["query_embeds"]
        out["pred_codes"] = self.head(self.query_proj(q.flatten(0, 1))).view(q.shape[0], q.shape[1], -1)
        return out


@META_ARCH_REGISTRY.register()
class OAPSegmentor(nn.Module):
    """Teacher-student universal segmenter trained with OAP pseudo-masks (``META_ARCHITECTURE:
    OAPSegmentor``). Inputs come from ``OAPMultiCropDatasetMapper``: ``image`` (global view) plus
    ``local_images``, ``local_boxes``, ``local_flips`` in training; ``image`` at test time."""

    #: read by hiseg.engine.accumulation: SOLVER.ACCUMULATION_STEPS > 1 is refused with this reason
    GRADIENT_ACCUMULATION_REFUSAL = (
        "the teacher EMA and the DINO centre are updated in every forward pass (once per micro-batch), and "
        "the loss normalisers (matched masks, objectness weights) are those of the total batch")

    @configurable
    def __init__(
        self,
        *,
        network: _Network,
        criterion: OAPCriterion,
        generator,
        teacher_features: str = "key",
        momentum: float = 0.996,
        momentum_end: float = 1.0,
        max_iter: int = 1,
        max_targets: int = 0,
        min_cropped_area: int = 1,
        pixel_mean=(123.675, 116.28, 103.53),
        pixel_std=(58.395, 57.12, 57.375),
        cluster_temp: float = 0.04,
        detections_per_image: int = 100,
        object_mask_threshold: float = 0.8,
        overlap_threshold: float = 0.8,
        instance_on: bool = True,
        semantic_on: bool = True,
        panoptic_on: bool = True,
    ):
        super().__init__()
        if hasattr(network.backbone, "freeze_unread_by_dense_outputs"):  # CAST standing in for the ViT
            network.backbone.freeze_unread_by_dense_outputs()
        self.student = network
        self.teacher = copy.deepcopy(network)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        # 0 until the teacher has been set from the student (first training step); saved in
        # checkpoints, so a resumed run keeps its teacher.
        self.register_buffer("teacher_synced", torch.zeros((), dtype=torch.long))
        self.criterion = criterion
        self.generator = generator
        self.teacher_features = teacher_features
        self.momentum, self.momentum_end, self.max_iter = momentum, momentum_end, max_iter
        self.max_targets, self.min_cropped_area = max_targets, min_cropped_area
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)
        self.cluster_temp = cluster_temp
        self.detections_per_image = detections_per_image
        self.object_mask_threshold, self.overlap_threshold = object_mask_threshold, overlap_threshold
        self.instance_on, self.semantic_on, self.panoptic_on = instance_on, semantic_on, panoptic_on
        dec = network.transformer_decoder
        self.num_sem_queries, self.num_ins_queries = dec.num_sem_queries, dec.num_ins_queries
        if teacher_features == "key" and not hasattr(network.backbone, "key_features"):
            raise ValueError(f"MODEL.OAP.TEACHER.FEATURES='key' needs a ViT backbone with key_features(); "
                             f"{type(network.backbone).__name__} has none: name one of its outputs "
                             f"{sorted(network.backbone.output_shape())} instead")
        if teacher_features != "key" and teacher_features not in network.backbone.output_shape():
            raise ValueError(f"MODEL.OAP.TEACHER.FEATURES={teacher_features!r} is not an output of the backbone "
                             f"(outputs: {sorted(network.backbone.output_shape())}; or 'key')")

    @classmethod
    def from_config(cls, cfg):
        o = cfg.MODEL.OAP
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        pixel_decoder = MSDeformAttnPixelDecoder(cfg, {k: v for k, v in shapes.items()
                                                       if k in o.PIXEL_DECODER.IN_FEATURES})
        transformer_decoder = LevelQueryTransformerDecoder(cfg, o.PIXEL_DECODER.CONV_DIM)
        if o.TEACHER.FEATURES == "key":
            teacher_dim = cfg.MODEL.VIT.EMBED_DIM
        elif o.TEACHER.FEATURES in shapes:
            teacher_dim = shapes[o.TEACHER.FEATURES].channels
        else:
            raise ValueError(f"MODEL.OAP.TEACHER.FEATURES={o.TEACHER.FEATURES!r} is neither 'key' nor a backbone "
                             f"output ({sorted(shapes)})")
        query_proj = nn.Linear(o.DECODER.HIDDEN_DIM, teacher_dim)
        head = DINOHead(teacher_dim, o.HEAD.OUT_DIM, o.HEAD.HIDDEN_DIM, o.HEAD.BOTTLENECK_DIM,
                        o.HEAD.NUM_LAYERS, o.HEAD.NORM_LAST_LAYER)
        p = o.POOLING
        if p.METHOD == "oap":
            generator = build_oap_generator(
                p.VARIANT, impl=p.IMPL, thresholds=tuple(p.THRESHOLDS),
                phi=p.UNIAP_MIN_SIZE if p.VARIANT == "uniap" else p.PHI, sigma=p.SIGMA, w_f=p.W_F,
                w_s=p.W_S, vote_normalize=p.VOTE_NORMALIZE)
        elif p.METHOD == "maskcut":
            generator = build_generator("maskcut", config=MaskCutConfig())
        else:
            raise ValueError(f"MODEL.OAP.POOLING.METHOD must be 'oap' or 'maskcut', got {p.METHOD!r}")
        t = o.TEST
        return {
            "network": _Network(backbone, pixel_decoder, transformer_decoder, query_proj, head),
            "criterion": OAPCriterion(cfg),
            "generator": generator,
            "teacher_features": o.TEACHER.FEATURES,
            "momentum": o.TEACHER.MOMENTUM,
            "momentum_end": o.TEACHER.MOMENTUM_END,
            "max_iter": cfg.SOLVER.MAX_ITER,
            "max_targets": p.MAX_TARGETS,
            "min_cropped_area": p.MIN_CROPPED_AREA,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "cluster_temp": o.LOSS.TEACHER_TEMP,
            "detections_per_image": t.DETECTIONS_PER_IMAGE,
            "object_mask_threshold": t.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": t.OVERLAP_THRESHOLD,
            "instance_on": t.INSTANCE_ON,
            "semantic_on": t.SEMANTIC_ON,
            "panoptic_on": t.PANOPTIC_ON,
        }

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-3] != self.pixel_mean.shape[0]:
            raise ValueError(f"images have {images.shape[-3]} channels, MODEL.PIXEL_MEAN has {self.pixel_mean.shape[0]}")
        return (images.to(self.device).float() - self.pixel_mean) / self.pixel_std

    def _clock(self) -> float:
        """Wall time, after the device's queued work (timings of the teacher in the event log)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @torch.no_grad()
    def update_teacher(self, m: float) -> None:
        """EMA ``teacher = m * teacher + (1 - m) * student`` (parameters); buffers are copied.
        Before the first update the teacher is set to the student."""
        pairs = ((self.student, self.teacher),)
        if not copy_once_(self.teacher_synced, pairs):
            ema_update_(pairs, m, copy_buffers=True)

    @torch.no_grad()
    def teacher_feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, d, h, w)`` features OAP pools (Sec. 4.2 "Graph Initialization"), from the teacher
        (the student before the teacher is first set)."""
        backbone = self._inference_network().backbone
        if self.teacher_features == "key":
            keys, (h, w) = backbone.key_features(images, return_grid=True)
            return keys.transpose(1, 2).reshape(keys.shape[0], keys.shape[2], h, w)
        return backbone(images)[self.teacher_features]

    # ------------------------------------------------------------------ training
    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.inference(batched_inputs)
        for key in ("image", "local_images", "local_boxes", "local_flips"):
            if key not in batched_inputs[0]:
                raise ValueError(f"OAPSegmentor training needs '{key}' in every input; use "
                                 f"INPUT.DATASET_MAPPER_NAME: OAPMultiCropDatasetMapper")
        storage = get_event_storage()
        m = teacher_momentum(self.momentum, self.momentum_end, storage.iter, self.max_iter)
        self.update_teacher(m)

        sizes = {tuple(x["image"].shape[-2:]) for x in batched_inputs}
        if len(sizes) != 1:
            raise ValueError(f"global views must share one size to be batched, got {sorted(sizes)}")
        global_images = self._normalize(torch.stack([x["image"] for x in batched_inputs]))
        tic = self._clock()
        with torch.no_grad():
            fmap = self.teacher_feature_map(global_images)
            tac = self._clock()
            pseudo = self.generator(fmap)
            pool_time = self._clock() - tac
            per_image = [pseudo_mask_targets(p, self.max_targets) for p in pseudo]
            codes = {}
            for name in LEVELS:
                embeds = [t[name].embeds for t in per_image]
                flat = torch.cat(embeds) if embeds else fmap.new_zeros((0, fmap.shape[1]))
                codes[name] = self.teacher.head(flat.to(fmap.dtype)).split([e.shape[0] for e in embeds])
        teacher_time = self._clock() - tic

        local = [x["local_images"] for x in batched_inputs]
        n_views = [v.shape[0] for v in local]
        outputs = self.student.decode(self._normalize(torch.cat(local)))
        grid = tuple(outputs["pred_masks"].shape[-2:])
        g_size = tuple(global_images.shape[-2:])
        targets = []
        for b, x in enumerate(batched_inputs):
            boxes = torch.as_tensor(x["local_boxes"], dtype=torch.float32, device=self.device)
            flips = torch.as_tensor(x["local_flips"], dtype=torch.bool, device=self.device)
            per_level = {}
            for name in LEVELS:
                crops = crop_masks_to_views(per_image[b][name].masks, g_size, boxes, flips, grid,
                                            min_area=self.min_cropped_area)
                per_level[name] = [(m_, codes[name][b][keep]) for m_, keep in crops]
            for v in range(n_views[b]):
                targets.append({name: {"masks": per_level[name][v][0], "codes": per_level[name][v][1]}
                                for name in LEVELS})
        # DINO's centre: over the teacher's outputs of the batch, each once (not once per view)
        center_codes = torch.cat([c for name in LEVELS for c in codes[name]])
        losses = self.criterion(outputs, targets, center_codes=center_codes)
        storage.put_scalar("oap/teacher_momentum", m, smoothing_hint=False)
        storage.put_scalar("oap/teacher_seconds", teacher_time)  # teacher encoder + OAP + head
        storage.put_scalar("oap/pooling_seconds", pool_time)  # OAP alone
        for name in LEVELS:
            storage.put_scalar(f"oap/{name}_targets_per_view",
                               sum(t[name]["masks"].shape[0] for t in targets) / max(len(targets), 1))
        return losses

    # ------------------------------------------------------------------ inference
    def _inference_network(self) -> _Network:
        return self.teacher if int(self.teacher_synced) else self.student

    @torch.no_grad()
    def inference(self, batched_inputs: List[Dict]) -> List[Dict]:
        net = self._inference_network()
        images = [self._normalize(x["image"]) for x in batched_inputs]
        div = getattr(net.backbone, "size_divisibility", 32) or 32
        image_list = ImageList.from_tensors(images, div)
        out = net.decode(image_list.tensor)
        results = []
        for i, x in enumerate(batched_inputs):
            h, w = image_list.image_sizes[i]
            out_h, out_w = x.get("height", h), x.get("width", w)
            logits = F.interpolate(out["pred_masks"][i:i + 1], size=image_list.tensor.shape[-2:],
                                   mode="bilinear", align_corners=False)[:, :, :h, :w]
            logits = F.interpolate(logits, size=(out_h, out_w), mode="bilinear", align_corners=False)[0]
            results.append(self._postprocess(logits, out["pred_objectness"][i], out["pred_codes"][i]))
        return results

    def _postprocess(self, mask_logits, objectness, codes) -> Dict:
        prob = mask_logits.sigmoid()
        obj = objectness.softmax(-1)[:, 0]
        clusters = codes.argmax(-1)
        s, i = self.num_sem_queries, self.num_ins_queries
        res = {}
        if self.instance_on:
            res["instances"] = self._instances(prob[s:s + i], obj[s:s + i], clusters[s:s + i])
        if self.semantic_on:
            res["sem_seg_clusters"] = self._semantic(prob[:s], codes[:s], obj[:s])
        if self.panoptic_on:
            res["panoptic_seg"] = self._panoptic(prob, obj, clusters)
        return res

    def _instances(self, prob, obj, clusters) -> Instances:
        """Mask2Former's instance inference with one class: score = objectness x mean mask
        probability inside the mask, top ``detections_per_image``."""
        h, w = prob.shape[-2:]
        masks = prob > 0.5
        mask_score = (prob * masks).flatten(1).sum(1) / masks.flatten(1).sum(1).clamp(min=1)
        scores = obj * mask_score
        k = min(self.detections_per_image, scores.numel())
        top = scores.topk(k).indices
        inst = Instances((h, w))
        inst.pred_masks = masks[top]
        inst.pred_boxes = BitMasks(inst.pred_masks).get_bounding_boxes()
        inst.scores = scores[top]
        inst.pred_classes = torch.zeros(k, dtype=torch.long, device=prob.device)
        inst.pred_clusters = clusters[top]
        return inst

    def _semantic(self, prob, codes, obj, chunk: int = 65536) -> torch.Tensor:
        """Cluster of each pixel: argmax_c sum_q o_q p(c | q) m_q. This is Mask2Former's semantic
        inference (class probabilities without no-object, times masks) with the class
        probability of cluster c taken as objectness o_q times the prototype distribution
        p(c | q) = softmax(code_q / tau_t), so that queries trained as "no object" hardly vote.
        Computed in pixel chunks so that the (K, H, W) score volume is never stored."""
        p = (codes / self.cluster_temp).softmax(-1) * obj[:, None]  # (S, K)
        h, w = prob.shape[-2:]
        flat = prob.flatten(1)  # (S, HW)
        out = torch.empty(h * w, dtype=torch.long, device=prob.device)
        for start in range(0, h * w, chunk):
            out[start:start + chunk] = (p.t() @ flat[:, start:start + chunk]).argmax(0)
        return out.view(h, w)

    def _panoptic(self, prob, obj, clusters):
        """Mask2Former's panoptic merge over both query groups: instance queries give "things",
        semantic queries "stuff" (same-cluster stuff segments merged), category = prototype cluster."""
        h, w = prob.shape[-2:]
        s = self.num_sem_queries
        keep = obj > self.object_mask_threshold
        idx = keep.nonzero().flatten()
        panoptic = torch.zeros((h, w), dtype=torch.int32, device=prob.device)
        segments = []
        if idx.numel() == 0:
            return panoptic, segments
        weighted = obj[idx].view(-1, 1, 1) * prob[idx]
        owner = weighted.argmax(0)
        stuff_ids = {}
        for j, q in enumerate(idx.tolist()):
            isthing = q >= s
            cluster = int(clusters[q])
            owned = owner == j
            original = prob[q] >= 0.5
            region = owned & original
            area, orig_area = int(owned.sum()), int(original.sum())
            if area == 0 or orig_area == 0 or not bool(region.any()):
                continue
            if area / orig_area < self.overlap_threshold:  # mostly covered by other queries
                continue
            if not isthing and cluster in stuff_ids:
                panoptic[region] = stuff_ids[cluster]
                continue
            seg_id = len(segments) + 1
            panoptic[region] = seg_id
            segments.append({"id": seg_id, "isthing": bool(isthing), "category_id": cluster,
                             "score": float(obj[q])})
            if not isthing:
                stuff_ids[cluster] = seg_id
        return panoptic, segments
