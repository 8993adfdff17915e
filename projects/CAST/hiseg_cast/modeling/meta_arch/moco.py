"""Self-supervised MoCo-v3 pre-training of CAST (Sec. 3.3, Table 11; Chen et al. 2021).

``CASTMoCo`` (``MODEL.META_ARCHITECTURE: CASTMoCo``): a base encoder (CAST class token ->
3-layer projector, hidden 4096, out 256, BN) with a 2-layer predictor, and a momentum copy of
encoder + projector updated with m following a cosine schedule from ``MODEL.MOCO.MOMENTUM``
(0.99) to 1. Loss: symmetric InfoNCE with temperature 0.2 over keys gathered from all GPUs,
scaled by 2T as MoCo-v3. At test time it returns the segmentation hierarchy of each image
(resized back to the input's height x width), which the hierarchical evaluator scores.

The same meta-architecture pre-trains the ViT baseline (``MODEL.BACKBONE.NAME:
build_vit_backbone``): its class token feeds the projector, and its hierarchy at test time is
the nested K-means of its output tokens (Appx. D.4) with CAST's segment counts.

With ``MODEL.CAST.FIGURE_GROUND.ENABLED`` the test-time output also holds ``"figure_ground"``,
the attention-based figure-ground mask of CAST Table 5 / Appx. F.4 (DINO's procedure): the
class token's attention in block ``FIGURE_GROUND.BLOCK`` (heads averaged), thresholded to keep
``FIGURE_GROUND.MASS`` (60%) of its mass; :class:`~hiseg.evaluation.FigureGroundEvaluator`
(``TEST.EVALUATORS: ["figure_ground"]``) scores it against VOC's foreground.

Both backbones are read through their public outputs (``backbone(images, features=())``: the
class token ``cls``, CAST's ``hierarchy`` / ``num_segments``, the ViT's ``patch_tokens``) and
their attention taps (``class_attention``, :mod:`hiseg.modeling.attention_taps`); superpixels
follow :mod:`hiseg_cast.superpixels.policy`. At test time the hierarchy has the backbone's test
segment counts (``MODEL.CAST.TEST_NUM_SEGMENTS`` when set, Table 6d).
"""
import copy

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import nn

from hiseg.evaluation.figure_ground import attention_maps, figure_ground_mask
from hiseg.modeling.ema import copy_once_, cosine_momentum, ema_update_
from hiseg.modeling.sync_batchnorm import convert_to_sync_batchnorm

from ...superpixels import input_superpixels
from ..backbone import CASTBackbone

__all__ = ["CASTMoCo", "build_mlp", "moco_momentum", "concat_all_gather"]


def build_mlp(num_layers, in_dim, hidden_dim, out_dim, last_bn=True):
    """MoCo-v3 MLP: Linear-BN-ReLU blocks, last Linear without bias, optional affine-free BN."""
    layers = []
    for i in range(num_layers):
        d1 = in_dim if i == 0 else hidden_dim
        d2 = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d1, d2, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d2), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d2, affine=False))
    return nn.Sequential(*layers)


def moco_momentum(base: float, it: int, max_iter: int) -> float:
    """Cosine increase of the momentum from ``base`` to 1 (MoCo-v3's ``adjust_moco_momentum``)."""
    return cosine_momentum(base, it, max_iter)


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    if comm.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(comm.get_world_size())]
    torch.distributed.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


@META_ARCH_REGISTRY.register()
class CASTMoCo(nn.Module):
    #: read by hiseg.engine.accumulation: SOLVER.ACCUMULATION_STEPS > 1 is refused with this reason
    GRADIENT_ACCUMULATION_REFUSAL = (
        "MoCo's InfoNCE takes each query's negatives from the batch, so micro-batches give a different "
        "loss than the total batch, and the momentum encoder would be updated once per micro-batch")

    @configurable
    def __init__(self, *, backbone, dim=256, mlp_dim=4096, temperature=0.2, momentum=0.99,
                 max_iter=1, pixel_mean, pixel_std, kmeans_counts=(64, 32, 16, 8),
                 figure_ground=False, figure_ground_block=-1, figure_ground_mass=0.6):
        """``figure_ground*``: the optional ``"figure_ground"`` test output (CAST Table 5):
        on / off, the block whose class-token attention is read (python index, -1 = last; CAST
        Appx. F.4 reads CAST-S's 9th block, ``8``) and the mass the mask keeps (DINO's 0.6).
        The block is checked against the backbone's depth at the first inference."""
        super().__init__()
        if not isinstance(figure_ground_block, int) or isinstance(figure_ground_block, bool):
            raise ValueError(f"MODEL.CAST.FIGURE_GROUND.BLOCK must be an int, got {figure_ground_block!r}")
        if not 0.0 < float(figure_ground_mass) <= 1.0:
            raise ValueError(f"MODEL.CAST.FIGURE_GROUND.MASS must be in (0, 1], got {figure_ground_mass}")
        self.figure_ground = bool(figure_ground)
        self.figure_ground_block = figure_ground_block
        self.figure_ground_mass = float(figure_ground_mass)
        # SyncBN everywhere, as MoCo-v3 (its statistics span the batch of all processes)
        self.backbone = convert_to_sync_batchnorm(backbone)
        self.projector = convert_to_sync_batchnorm(build_mlp(3, backbone.embed_dim, mlp_dim, dim))
        self.predictor = convert_to_sync_batchnorm(build_mlp(2, dim, mlp_dim, dim, last_bn=False))
        # No gradient reaches from the class token: CAST's dense read-out and its last graph
        # pooling (it only reads out the hierarchy's coarsest level, by argmax), the ViT's
        # feature pyramid. Frozen, so that DistributedDataParallel without find_unused_parameters
        # (detectron2's) does not stop at the second step (as CASTClassifier does).
        self.backbone.freeze_unread_by_class_token()
        self.momentum_backbone = copy.deepcopy(self.backbone)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in list(self.momentum_backbone.parameters()) + list(self.momentum_projector.parameters()):
            p.requires_grad_(False)
        # 0 until the first training step copies the (possibly just loaded) backbone and projector
        # into the momentum copies: weights loaded after construction (converted official
        # backbones) would otherwise be averaged into a random momentum encoder. Saved with the
        # checkpoint, so a resumed run keeps its momentum encoder.
        self.register_buffer("momentum_synced", torch.zeros((), dtype=torch.long))
        self.temperature = temperature
        self.base_momentum = momentum
        self.max_iter = max_iter
        self.kmeans_counts = tuple(kmeans_counts)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @property
    def is_cast(self) -> bool:
        """True for CAST's backbone (the hierarchy comes from its graph pooling), False for the ViT
        baseline (nested K-means of its patch tokens)."""
        return isinstance(self.backbone, CASTBackbone)

    @property
    def eval_unused_prefixes(self):
        """State-dict prefixes inference never reads (the training-only MoCo parts, and the
        backbone's dense read-out, ``DENSE_READOUT``: CAST's fuse / out_norms, the ViT's pyramid;
        the hierarchy and the figure-ground mask come from the encoder's tokens): an evaluated
        checkpoint need not fill them (``hiseg.checkpoint.io.check_part_filled``)."""
        unused = ("projector.", "predictor.", "momentum_backbone.", "momentum_projector.")
        return unused + tuple(f"backbone.{name}." for name in self.backbone.DENSE_READOUT)

    @classmethod
    def from_config(cls, cfg):
        m, fg = cfg.MODEL.MOCO, cfg.MODEL.CAST.FIGURE_GROUND
        return {"backbone": build_backbone(cfg), "dim": m.DIM, "mlp_dim": m.MLP_DIM,
                "kmeans_counts": tuple(cfg.MODEL.CAST.NUM_SEGMENTS),
                "temperature": m.TEMPERATURE, "momentum": m.MOMENTUM, "max_iter": cfg.SOLVER.MAX_ITER,
                "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD,
                "figure_ground": fg.ENABLED, "figure_ground_block": fg.BLOCK, "figure_ground_mass": fg.MASS}

    @property
    def device(self):
        return self.pixel_mean.device

    def _normalize(self, images):
        return (torch.stack([im.to(self.device).float() for im in images]) - self.pixel_mean) / self.pixel_std

    @torch.no_grad()
    def _update_momentum_encoder(self, m: float):
        pairs = ((self.backbone, self.momentum_backbone), (self.projector, self.momentum_projector))
        copy_once_(self.momentum_synced, pairs)
        ema_update_(pairs, m)

    def _contrastive(self, q, k):
        q = F.normalize(q, dim=1)
        k = F.normalize(concat_all_gather(k), dim=1)
        logits = q @ k.t() / self.temperature
        labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * comm.get_rank()
        return F.cross_entropy(logits, labels) * (2 * self.temperature)

    @staticmethod
    def _inputs(superpixels):
        """The backbone's forward inputs besides the images (superpixels for CAST, when known)."""
        return {} if superpixels is None else {"superpixels": superpixels}

    def _embed(self, backbone, projector, images, sps):
        return projector(backbone(images, features=(), **self._inputs(sps))["cls"])

    def forward(self, batched_inputs):
        if not self.training:
            return self.inference(batched_inputs)
        x1, x2 = (self._normalize([d[f"view{k}"] for d in batched_inputs]) for k in (1, 2))
        # each view's S_0 from the mapper, or computed by the backbone (hiseg_cast.superpixels.policy)
        s1, s2 = (input_superpixels(self.backbone, batched_inputs, x, key=f"superpixels{k}")
                  for k, x in ((1, x1), (2, x2)))
        it = get_event_storage().iter
        m = moco_momentum(self.base_momentum, it, self.max_iter)
        q1 = self.predictor(self._embed(self.backbone, self.projector, x1, s1))
        q2 = self.predictor(self._embed(self.backbone, self.projector, x2, s2))
        with torch.no_grad():
            self._update_momentum_encoder(m)
            k1 = self._embed(self.momentum_backbone, self.momentum_projector, x1, s1)
            k2 = self._embed(self.momentum_backbone, self.momentum_projector, x2, s2)
        get_event_storage().put_scalar("moco_momentum", m, smoothing_hint=False)
        return {"loss_moco": self._contrastive(q1, k2) + self._contrastive(q2, k1)}

    def _check_figure_ground_block(self):
        n = len(self.backbone.attention_blocks())
        b = self.figure_ground_block
        if not -n <= b < n:
            raise ValueError(f"MODEL.CAST.FIGURE_GROUND.BLOCK {b} is out of range for {type(self.backbone).__name__}'s "
                             f"{n} blocks (valid: {-n} .. {n - 1}); CAST-S's 9th block (Appx. F.4) is 8")

    def _figure_ground_mask(self, attn_map, height, width):
        """(H, W) class attention -> (height, width) bool: DINO's mass rule, then nearest resize."""
        mask = figure_ground_mask(attn_map, mass=self.figure_ground_mass)
        if tuple(mask.shape) != (height, width):
            mask = F.interpolate(mask[None, None].float(), size=(height, width), mode="nearest")[0, 0] > 0.5
        return mask

    def _encode(self, img, sp):
        """The backbone's outputs for one image; with figure-ground on, also the head-averaged
        class-token attention map of the chosen block, from the same forward pass."""
        if not self.figure_ground:
            return self.backbone(img, features=(), **self._inputs(sp)), None
        res = self.backbone.class_attention(img, block=self.figure_ground_block, features=(), **self._inputs(sp))
        return res["output"], attention_maps(res)[0]

    def _hierarchy(self, out, height, width):
        """(L+1, height, width) int64 hierarchy and (L+1,) segment counts of one image: CAST's
        own (resized nearest), or for the ViT the nested K-means of its patch tokens (Appx. D.4)
        with CAST's segment counts."""
        if "hierarchy" in out:
            h = out["hierarchy"][0]
            if (height, width) != tuple(h.shape[-2:]):
                h = F.interpolate(h[None].float(), size=(height, width), mode="nearest")[0].long()
            return h, out["num_segments"][0]
        from hiseg.modeling.vit_kmeans import vit_kmeans_hierarchy

        h = vit_kmeans_hierarchy(out["patch_tokens"], (height, width), counts=self.kmeans_counts)
        return h, torch.tensor([int(level.max()) + 1 for level in h])

    @torch.no_grad()
    def inference(self, batched_inputs):
        """Hierarchy per image: ``{"hierarchy": (L+1, height, width) int64, "num_segments": ...,
        "cls": ...}``, plus ``"figure_ground"`` ((height, width) bool, CAST Table 5) when
        ``MODEL.CAST.FIGURE_GROUND.ENABLED``."""
        if self.figure_ground:
            self._check_figure_ground_block()
        results = []
        for d in batched_inputs:
            img = self._normalize([d["image"]])
            out, attn = self._encode(img, input_superpixels(self.backbone, [d], img))
            height, width = d.get("height", img.shape[-2]), d.get("width", img.shape[-1])
            h, counts = self._hierarchy(out, height, width)
            results.append({"hierarchy": h, "num_segments": counts, "cls": out["cls"][0]})
            if attn is not None:
                results[-1]["figure_ground"] = self._figure_ground_mask(attn, height, width)
        return results
