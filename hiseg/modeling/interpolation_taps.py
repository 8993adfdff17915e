"""Source taps of ``torch.nn.functional.interpolate`` along one axis, as index / weight tables.

Resizing is linear, so ``interpolate`` followed by any linear read-out (a segment mean, one row
of pixels) can be computed from these tables without materialising the resized map. Both modes
follow PyTorch's kernels with ``align_corners=False``:

* ``bilinear``: source coordinate ``(i + 0.5) * in / out - 0.5`` clamped at 0; two taps.
* ``bicubic``: the same coordinate, not clamped; four taps ``floor - 1 .. floor + 2`` whose
  indices are clamped to the border; Keys' cubic convolution weights with ``A = -0.75``.

The tests compare both against ``F.interpolate``.
"""
from typing import Tuple

import torch

__all__ = ["interpolation_taps", "taps_matrix"]

_CUBIC_A = -0.75


def _cubic_near(x: torch.Tensor) -> torch.Tensor:  # |x| <= 1
    return ((_CUBIC_A + 2) * x - (_CUBIC_A + 3)) * x * x + 1


def _cubic_far(x: torch.Tensor) -> torch.Tensor:  # 1 < |x| < 2
    return ((_CUBIC_A * x - 5 * _CUBIC_A) * x + 8 * _CUBIC_A) * x - 4 * _CUBIC_A


def interpolation_taps(mode: str, out_size: int, in_size: int, device=None,
                       dtype=torch.float64) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(index, weight)``, each (K, out_size): output position ``i`` is
    ``sum_k weight[k, i] * input[index[k, i]]`` (K = 2 bilinear, 4 bicubic)."""
    if out_size <= 0 or in_size <= 0:
        raise ValueError(f"sizes must be positive, got out {out_size}, in {in_size}")
    scale = in_size / out_size
    src = (torch.arange(out_size, device=device, dtype=torch.float64) + 0.5) * scale - 0.5
    if mode == "bilinear":
        src = src.clamp(min=0)
        i0 = src.floor().long().clamp(max=in_size - 1)
        i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
        w1 = src - i0.to(src.dtype)
        index, weight = torch.stack([i0, i1]), torch.stack([1.0 - w1, w1])
    elif mode == "bicubic":
        base = src.floor()
        t = src - base
        base = base.long()
        index = torch.stack([(base + k).clamp(0, in_size - 1) for k in (-1, 0, 1, 2)])
        weight = torch.stack([_cubic_far(t + 1), _cubic_near(t), _cubic_near(1 - t), _cubic_far(2 - t)])
    else:
        raise ValueError(f"unknown interpolation mode {mode!r}: 'bilinear' or 'bicubic'")
    return index, weight.to(dtype)


def taps_matrix(index: torch.Tensor, weight: torch.Tensor, in_size: int) -> torch.Tensor:
    """Dense (out, in) interpolation matrix of one axis from :func:`interpolation_taps`."""
    out = torch.zeros(index.shape[1], in_size, dtype=weight.dtype, device=index.device)
    rows = torch.arange(index.shape[1], device=index.device)
    for k in range(index.shape[0]):
        out.index_put_((rows, index[k]), weight[k], accumulate=True)
    return out
