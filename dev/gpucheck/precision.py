"""Precision of the GPU check's runs: the AMP dtype of the device, autocast, one training step
under it, true fp32 (TF32 off) for the correctness rows, and the relative error they report."""
import contextlib
from typing import Optional

import torch

__all__ = ["amp_dtype", "autocast", "train_step", "precision_name", "strict_fp32", "rel_err"]


def amp_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device supports it (CPU autocast, Ampere and later), else fp16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` on ``device`` with ``dtype``; a no-op context for ``None`` (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(model, optimizer, batch, device: torch.device, dtype: Optional[torch.dtype], scaler=None):
    """One training step: forward under ``autocast(device, dtype)``, the summed losses, backward
    (through ``scaler``, a ``torch.amp.GradScaler``, for fp16) and the optimizer step. Returns the
    loss."""
    with autocast(device, dtype):
        losses = model(batch)
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss


def precision_name(dtype: Optional[torch.dtype]) -> str:
    if dtype is None:
        return "fp32"
    return "AMP " + {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype).replace("torch.", ""))


@contextlib.contextmanager
def strict_fp32():
    """TF32 off for matrix products and cuDNN convolutions (a true fp32 comparison); restored."""
    mm, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = mm
        torch.backends.cudnn.allow_tf32 = cudnn


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 on the CPU (inf when shapes differ or values are not finite)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        return float("inf")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
