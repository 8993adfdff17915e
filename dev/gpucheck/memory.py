"""Peak GPU memory of one training step per config family, at the per-GPU batch of the 1- and
2-GPU commands in docs/distributed.md ("Fitting on one or two GPUs").

Each row builds the config's model (random weights) with the command's settings (AMP, activation
checkpointing), its optimizer (``hiseg.engine.build_hiseg_optimizer``: the config's AdamW / SGD),
and runs two full training steps (forward, loss, backward, optimizer step) on a synthetic batch of
the images one GPU holds in one forward pass (with ``SOLVER.ACCUMULATION_STEPS`` that is one
micro-batch). The figure is ``torch.cuda.max_memory_allocated`` over both steps, counted from
just before the first: weights, gradients, the optimizer state (created in the first step, alive
in the second) and the activations. It is what PyTorch's allocator handed out; ``nvidia-smi`` shows
more (the CUDA context, about 0.5 GiB, and the allocator's cache). A step that does not fit is
reported as ``out of memory`` (not a failure). AMP here is ``torch.autocast`` with the check's AMP
dtype (bf16 on GPUs that have it); detectron2's ``SOLVER.AMP.ENABLED`` trainer uses fp16 with a
loss scaler, which needs the same activation memory.

On the CPU the same steps run (tiny sizes in the quick profile) and the memory column says
``not measured (CPU)``: there is no allocator peak to read, and the process's RSS high-water mark
would count everything the process ever held, not the step.
"""
from __future__ import annotations

import time
from typing import Dict, List

import torch

from .precision import precision_name, train_step
from .report import ERROR, SKIP, Report, error_text
from .correctness import build_cfg, moco_batch, oap_batch, sample_images, semantic_batch

COLUMNS = ("family", "command", "config", "images per GPU per forward", "precision", "activation checkpointing",
           "peak memory", "2nd step s", "status")


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2 ** 30:.2f} GiB"


def _semantic_node(cfg):
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "CASTSemanticSegmentor":
        return cfg.MODEL.CAST_SEM_SEG
    if arch == "CASTSegmenter":
        return cfg.MODEL.CAST_SEGMENTER
    return cfg.MODEL.SEM_SEG_HEAD


def rcnn_batch(n: int, height: int, width: int, num_classes: int) -> List[Dict]:
    """Pictures with four rectangular instances each (boxes, classes, bitmask masks)."""
    from detectron2.structures import BitMasks, Boxes, Instances

    imgs = sample_images(n, max(height, width))[:, :, :height, :width].contiguous()
    out = []
    for i in range(n):
        boxes, masks = [], torch.zeros(4, height, width, dtype=torch.bool)
        for k in range(4):
            y0, x0 = (k * height) // 5, ((k + i) % 4) * width // 5
            y1, x1 = y0 + height // 3, x0 + width // 3
            boxes.append([x0, y0, x1, y1])
            masks[k, y0:y1, x0:x1] = True
        inst = Instances((height, width), gt_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)),
                         gt_classes=torch.arange(4) % num_classes, gt_masks=BitMasks(masks))
        out.append({"image": imgs[i], "instances": inst, "height": height, "width": width})
    return out


def make_batch(kind: str, cfg, n: int, size) -> List[Dict]:
    h, w = size
    if kind == "moco":
        return moco_batch(n, h)
    if kind == "semantic":
        node = _semantic_node(cfg)
        return semantic_batch([(h, w)] * n, node.NUM_CLASSES, node.IGNORE_VALUE)
    if kind == "classification":
        return [{"image": im, "label": i % cfg.MODEL.CLS.NUM_CLASSES} for i, im in enumerate(sample_images(n, h))]
    if kind == "rcnn":
        return rcnn_batch(n, h, w, cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    if kind == "oap":
        o = cfg.INPUT.OAP
        return oap_batch(n, h, o.NUM_LOCAL_CROPS, o.LOCAL_SIZE)
    raise ValueError(f"unknown batch kind {kind!r}")


def _two_steps(model, optimizer, batch, device, dtype) -> float:
    """Two training steps; seconds of the second."""
    from detectron2.utils.events import EventStorage

    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    seconds = 0.0
    with EventStorage(0) as storage:
        for it in range(2):
            storage.iter = it
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            loss = train_step(model, optimizer, batch, device, dtype, scaler)
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"non-finite loss {float(loss)} at step {it}")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
    return seconds


def measure_row(row, device: torch.device, amp: torch.dtype):
    """(peak memory cell, second-step seconds cell, status) of one row."""
    from detectron2.modeling import build_model

    from hiseg.engine import build_hiseg_optimizer

    opts = tuple(row.opts) + ((row.checkpoint_key, "True") if row.checkpointing else ())
    cfg = build_cfg(row.config, opts, device)
    dtype = amp if row.amp else None
    model = optimizer = batch = None
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        torch.manual_seed(0)
        model = build_model(cfg)
        model.train()
        optimizer = build_hiseg_optimizer(cfg, model)
        batch = make_batch(row.kind, cfg, row.batch, row.size)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # weights are counted (allocated now), building is not
        sec = _two_steps(model, optimizer, batch, device, dtype)
        if device.type != "cuda":
            return "not measured (CPU)", f"{sec:.2f}", "ran"
        return _gib(torch.cuda.max_memory_allocated(device)), f"{sec:.2f}", "measured"
    except torch.cuda.OutOfMemoryError:
        if device.type == "cuda":
            return f"> {_gib(torch.cuda.get_device_properties(device).total_memory)}", "-", "out of memory"
        return "-", "-", "out of memory"
    finally:
        model = optimizer = batch = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()


def memory_per_config(report: Report, device: torch.device, prof, amp: torch.dtype, allot_s: float) -> None:
    where = "GPU" if device.type == "cuda" else "CPU (memory not measured)"
    table = report.table(
        "Peak memory of one training step per config family, at the commands' per-GPU batch", COLUMNS,
        intro=f"On the {where}. `torch.cuda.max_memory_allocated` over two training steps (weights, gradients, "
              "optimizer state, activations; random weights, synthetic batches), with the command's AMP and "
              "activation-checkpointing settings (docs/distributed.md, \"Fitting on one or two GPUs\"). "
              "`out of memory` means the step does not fit this GPU. Rows in order of priority: the commands' "
              "settings first, then the same batch without checkpointing / AMP for comparison.")
    deadline = time.perf_counter() + allot_s
    last = 0.0
    for row in prof.memory_rows:
        cells = (row.family, row.command, f"`{row.config}`", str(row.batch),
                 precision_name(amp if row.amp else None), "on" if row.checkpointing else "off")
        if time.perf_counter() + last > deadline:
            table.add(*cells, "-", "-", f"{SKIP} (time budget)")
            continue
        t0 = time.perf_counter()
        try:
            table.add(*cells, *measure_row(row, device, amp))
        except Exception as exc:  # noqa: BLE001  (reported as a row; the other rows still run)
            table.add(*cells, "-", "-", f"{ERROR}: {error_text(exc)}")
        last = time.perf_counter() - t0
        report.write()
