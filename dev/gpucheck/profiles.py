"""Sizes of the GPU check: ``FULL`` (the papers' settings, for a CUDA machine) and ``QUICK``
(tiny models and images: the same code paths on a CPU in about a minute, for the test suite).

Config files are the project's own (paths relative to the repository root); ``*_opts`` are
detectron2 ``KEY VALUE`` overrides applied after them. Every model computes its superpixels with
``slic_torch`` on its own device (the device image's OpenCV has no ``ximgproc``, so no SEEDS).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

#: no dropout / stochastic depth in the fp32-vs-AMP step comparison: both steps must compute the
#: same function, and dropout masks drawn in different dtypes are not guaranteed to coincide
_NO_DROPOUT_CAST = ("MODEL.CAST.POOL_DROPOUT", "0.0", "MODEL.CAST.DROP_PATH_RATE", "0.0")
_SLIC_TORCH = ("MODEL.CAST.SUPERPIXEL.METHOD", "slic_torch")
_NEAREST = ("MODEL.CAST.TOKEN_POOL_MODE", "nearest")


@dataclass(frozen=True)
class SpeedModel:
    label: str  # e.g. "CAST-S / ViT-S"
    cast_name: str
    vit_name: str
    cast_config: str
    cast_opts: Tuple[str, ...]
    vit_embed_dim: int
    vit_depth: int
    vit_num_heads: int
    vit_patch: int = 16


_CAST_CKPT = "MODEL.CAST.ACTIVATION_CHECKPOINTING"
_VIT_CKPT = "MODEL.VIT.ACTIVATION_CHECKPOINTING"


@dataclass(frozen=True)
class MemoryRow:
    """One peak-memory measurement (``memory.py``): a config at the images one GPU holds in one
    forward pass under a command of docs/distributed.md, with its AMP / checkpointing settings."""
    family: str
    command: str  # which command of docs/distributed.md ("Fitting on one or two GPUs") this row is
    config: str
    opts: Tuple[str, ...]
    kind: str  # batch builder: moco / semantic / classification / rcnn / oap
    batch: int  # images per GPU per forward pass (per micro-batch with accumulation)
    size: Tuple[int, int]  # (height, width) of each image (OAP: the global view)
    amp: bool
    checkpointing: bool
    checkpoint_key: str = _CAST_CKPT


@dataclass(frozen=True)
class Profile:
    name: str
    budget_s: float  # wall-time budget of the whole run, imports and warm-up included
    # slic_torch, CUDA vs CPU
    slic_images: int
    slic_size: int
    slic_k: int
    # OAP fast vs reference: (B, C, h, w) of the structured and the random feature maps
    oap_structured: Tuple[int, int, int, int]
    oap_random: Tuple[int, int, int, int]
    # CAST forward, CUDA vs CPU
    cast_config: str
    cast_opts: Tuple[str, ...]
    cast_batch: int
    cast_size: int
    cast_k: int
    # one AMP training step per meta-architecture
    moco_config: str
    moco_opts: Tuple[str, ...]
    moco_batch: int
    moco_size: int
    sem_config: str
    sem_opts: Tuple[str, ...]
    sem_sizes: Tuple[Tuple[int, int], ...]
    oap_config: str
    oap_opts: Tuple[str, ...]
    oap_batch: int
    oap_size: int
    oap_local_crops: int
    oap_local_size: int
    # speed: CAST vs ViT
    speed_models: Tuple[SpeedModel, ...]
    speed_batch: int
    speed_size: int
    speed_k: int
    speed_reps: Tuple[int, int]  # at least, at most (the budget decides in between)
    # speed: OAP vs MaskCut on (B, C, h, w) maps; ViT keys from images of ``oap_image_size``
    oap_speed: Tuple[int, int, int, int]
    oap_image_size: int
    oap_vit: Tuple[int, int, int, int]  # patch, embed_dim, depth, heads
    maskcut_images: Tuple[int, int]  # at least, at most per feature kind
    # speed: OAP's share of an OAPSegmentor training step
    step_config: str
    step_opts: Tuple[str, ...]
    step_batch: int
    step_size: int
    step_local_crops: int
    step_local_size: int
    step_steps: Tuple[int, int]
    # peak memory per config family at the per-GPU batch of the 1- and 2-GPU commands
    memory_rows: Tuple[MemoryRow, ...] = ()


_MOCO = "configs/CAST/moco_cast_s_in1k.yaml"
_SEMSEG = "configs/CAST/semseg_cast_s_voc_finetune.yaml"
_SEGMENTER = "configs/CAST/segmenter_cast_s_ade20k.yaml"
_DEIT = "configs/CAST/deit_cast_s_in1k.yaml"
_LINPROBE = "configs/CAST/linprobe_cast_s_in1k.yaml"
_RCNN = "configs/CAST/mask_rcnn_cast_s_fpn_coco.yaml"
_OAP = "configs/OAP/oap_vit_b8_in1k.yaml"
_ACC = "1 or 2 GPUs (ACCUMULATION_STEPS 8 / 4)"

#: the commands' settings first (docs/distributed.md), then comparisons at the same batch
FULL_MEMORY_ROWS = (
    MemoryRow("CAST MoCo", "1 GPU", _MOCO, _SLIC_TORCH, "moco", 256, (224, 224), True, True),
    MemoryRow("CAST semantic (VOC fine-tuning)", _ACC, _SEMSEG, _SLIC_TORCH, "semantic", 2, (512, 512), False, False),
    MemoryRow("CAST Segmenter (ADE20K)", _ACC, _SEGMENTER, _SLIC_TORCH, "semantic", 1, (512, 512), False, False),
    MemoryRow("CAST DeiT", _ACC, _DEIT, _SLIC_TORCH, "classification", 128, (224, 224), True, False),
    MemoryRow("CAST linear probe", _ACC, _LINPROBE, _SLIC_TORCH, "classification", 128, (224, 224), False, False),
    MemoryRow("Mask R-CNN on CAST", _ACC, _RCNN, _SLIC_TORCH, "rcnn", 2, (800, 1088), False, False),
    MemoryRow("OAP", "1 GPU", _OAP, (), "oap", 16, (448, 448), True, True, _VIT_CKPT),
    MemoryRow("OAP", "2 GPUs", _OAP, (), "oap", 8, (448, 448), True, True, _VIT_CKPT),
    MemoryRow("CAST MoCo", "2 GPUs", _MOCO, _SLIC_TORCH, "moco", 128, (224, 224), True, True),
    MemoryRow("CAST MoCo", "1 GPU without checkpointing", _MOCO, _SLIC_TORCH, "moco", 256, (224, 224), True, False),
    MemoryRow("CAST MoCo", "1 GPU, fp32, no checkpointing", _MOCO, _SLIC_TORCH, "moco", 256, (224, 224), False, False),
    MemoryRow("OAP", "1 GPU without checkpointing", _OAP, (), "oap", 16, (448, 448), True, False, _VIT_CKPT),
    MemoryRow("OAP", "2 GPUs, fp32, no checkpointing", _OAP, (), "oap", 8, (448, 448), False, False, _VIT_CKPT),
    MemoryRow("CAST semantic (VOC fine-tuning)", _ACC + " with AMP", _SEMSEG, _SLIC_TORCH, "semantic", 2, (512, 512),
              True, False),
    MemoryRow("Mask R-CNN on CAST", _ACC + " with AMP", _RCNN, _SLIC_TORCH, "rcnn", 2, (800, 1088), True, False),
    MemoryRow("CAST DeiT", _ACC + " in fp32", _DEIT, _SLIC_TORCH, "classification", 128, (224, 224), False, False),
)

FULL = Profile(
    name="full",
    budget_s=400.0,
    slic_images=16, slic_size=224, slic_k=196,
    oap_structured=(2, 768, 56, 56), oap_random=(2, 64, 24, 24),
    cast_config="configs/CAST/Base-CAST-S.yaml", cast_opts=(), cast_batch=4, cast_size=224, cast_k=196,
    moco_config="configs/CAST/moco_cast_s_in1k.yaml", moco_opts=_SLIC_TORCH + _NO_DROPOUT_CAST,
    moco_batch=8, moco_size=224,
    sem_config="configs/CAST/semseg_cast_s_voc_finetune.yaml",
    sem_opts=_SLIC_TORCH + _NO_DROPOUT_CAST + ("MODEL.WEIGHTS", ""),
    sem_sizes=((512, 512), (448, 512)),
    oap_config="configs/OAP/oap_vit_b8_in1k.yaml", oap_opts=("MODEL.WEIGHTS", "", "MODEL.VIT.DROP_PATH_RATE", "0.0"),
    oap_batch=2, oap_size=448, oap_local_crops=2, oap_local_size=224,
    # nearest token pooling: the paper's timings are of its ImageNet models (released classification code)
    speed_models=(
        SpeedModel("CAST-S / ViT-S", "CAST-S", "ViT-S/16", "configs/CAST/Base-CAST-S.yaml", _NEAREST, 384, 12, 6),
        SpeedModel("CAST-B / ViT-B", "CAST-B", "ViT-B/16", "configs/CAST/Base-CAST-B.yaml", _NEAREST, 768, 12, 12),
    ),
    speed_batch=64, speed_size=224, speed_k=196, speed_reps=(3, 15),
    oap_speed=(16, 768, 56, 56), oap_image_size=448, oap_vit=(8, 768, 12, 12), maskcut_images=(1, 2),
    step_config="configs/OAP/oap_vit_b8_in1k.yaml", step_opts=("MODEL.WEIGHTS", ""),
    step_batch=16, step_size=448, step_local_crops=4, step_local_size=224, step_steps=(2, 5),
    memory_rows=FULL_MEMORY_ROWS,
)

_TINY_CAST = ("MODEL.CAST.EMBED_DIM", "48", "MODEL.CAST.NUM_HEADS", "4", "MODEL.CAST.DEPTHS", "[1, 1, 1, 1]",
              "MODEL.CAST.NUM_SEGMENTS", "[16, 8, 4, 2]")

QUICK = Profile(
    name="quick",
    budget_s=110.0,
    slic_images=2, slic_size=48, slic_k=24,
    oap_structured=(1, 32, 12, 12), oap_random=(2, 16, 8, 10),
    cast_config="configs/CAST/Base-CAST-S.yaml", cast_opts=_TINY_CAST, cast_batch=2, cast_size=64, cast_k=32,
    moco_config="configs/CAST/quick/moco_cast_tiny_skimage_cpu.yaml",
    # batch 8 and the quick config's 512-d projector: smaller ones make the random-init InfoNCE so
    # ill-conditioned (batch norm over near-identical embeddings) that bf16 moves the loss by 2-4%
    moco_opts=_SLIC_TORCH + _NO_DROPOUT_CAST + _TINY_CAST,
    moco_batch=8, moco_size=64,
    sem_config="configs/CAST/quick/semseg_cast_tiny_voc_cpu.yaml", sem_opts=_SLIC_TORCH + _NO_DROPOUT_CAST,
    sem_sizes=((64, 64), (48, 64)),
    oap_config="configs/OAP/quick/oap_vit_tiny_coco_sample_cpu.yaml",
    oap_opts=("MODEL.VIT.DROP_PATH_RATE", "0.0"),
    oap_batch=2, oap_size=64, oap_local_crops=1, oap_local_size=64,
    speed_models=(
        SpeedModel("CAST-S / ViT-S (tiny: 48-d)", "CAST-S (48-d)", "ViT (48-d)", "configs/CAST/Base-CAST-S.yaml",
                   _TINY_CAST + _NEAREST, 48, 4, 4),
    ),
    speed_batch=2, speed_size=64, speed_k=32, speed_reps=(2, 2),
    oap_speed=(2, 32, 8, 8), oap_image_size=64, oap_vit=(8, 32, 2, 2), maskcut_images=(1, 1),
    step_config="configs/OAP/quick/oap_vit_tiny_coco_sample_cpu.yaml", step_opts=(),
    step_batch=2, step_size=64, step_local_crops=1, step_local_size=64, step_steps=(1, 1),
    # one tiny row per family (the code paths of the full rows; memory is not measured on a CPU)
    memory_rows=(
        MemoryRow("CAST MoCo", "1 GPU", "configs/CAST/quick/moco_cast_tiny_skimage_cpu.yaml",
                  _SLIC_TORCH + _TINY_CAST, "moco", 4, (64, 64), False, True),  # CPU bf16 is slow
        MemoryRow("CAST semantic (VOC fine-tuning)", _ACC, "configs/CAST/quick/semseg_cast_tiny_voc_cpu.yaml",
                  _SLIC_TORCH, "semantic", 2, (64, 64), False, False),
        MemoryRow("CAST DeiT", _ACC, "configs/CAST/quick/deit_cast_tiny_skimage_cpu.yaml", _SLIC_TORCH,
                  "classification", 4, (64, 64), False, False),
        MemoryRow("Mask R-CNN on CAST", _ACC, "configs/CAST/quick/mask_rcnn_cast_tiny_coco_sample_cpu.yaml",
                  _SLIC_TORCH, "rcnn", 1, (64, 96), False, False),
        MemoryRow("OAP", "1 GPU", "configs/OAP/quick/oap_vit_tiny_coco_sample_cpu.yaml", (), "oap", 2, (64, 64),
                  False, True, _VIT_CKPT),
    ),
)

PROFILES = {"full": FULL, "quick": QUICK}
