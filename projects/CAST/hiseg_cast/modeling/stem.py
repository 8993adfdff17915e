"""Convolutional stem and 2-D sin-cos position encodings of the segment tokens (Sec. 3.1)."""
from typing import Tuple

import torch
from torch import nn

__all__ = ["ConvStem", "sincos_position_embedding"]


class ConvStem(nn.Module):
    """Early convolutions (Xiao et al. 2021) giving stride-8 pixel features X_cnn.

    Four 3x3 convolutions (strides 2, 2, 2, 1; no bias; BatchNorm + ReLU; widths D/8, D/4, D/2,
    D) and a 1x1 convolution with bias, as in the released CAST code. ``proj`` keeps the released
    module indices (0, 3, 6, 9 convs; 1, 4, 7, 10 norms; 12 the 1x1 conv) so weights map 1:1.
    """

    stride = 8

    def __init__(self, embed_dim: int, in_chans: int = 3):
        super().__init__()
        if embed_dim % 8:
            raise ValueError(f"the conv stem needs an embedding width divisible by 8, got {embed_dim}")
        layers, cin, cout = [], in_chans, embed_dim // 8
        for i in range(4):
            layers += [nn.Conv2d(cin, cout, 3, stride=2 if i < 3 else 1, padding=1, bias=False),
                       nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin, cout = cout, cout * 2
        layers.append(nn.Conv2d(cin, embed_dim, 1))
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def sincos_position_embedding(grid: Tuple[int, int], dim: int, temperature: float = 1e4,
                              row_first: bool = True, device=None) -> torch.Tensor:
    """(h*w, dim) fixed 2-D sin-cos encodings of a row-major (h, w) grid.

    Each coordinate gets ``dim/2`` channels ``[sin(p*omega), cos(p*omega)]`` with
    ``omega_k = temperature^(-k/(dim/4))``. The released CAST weights were trained with the first
    half of the channels encoding the *row* (their meshgrid is transposed); ``row_first=False``
    gives the MAE / MoCo-v3 layout (column first). For square grids the released layout equals
    ours exactly; for other grids theirs is not defined geometrically, so we keep rows first.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position encodings need dim divisible by 4, got {dim}")
    h, w = grid
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
    rows = torch.arange(h, dtype=torch.float32, device=device).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float32, device=device).repeat(h)
    def enc(p):
        out = p[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)
    first, second = (rows, cols) if row_first else (cols, rows)
    return torch.cat([enc(first), enc(second)], dim=1)
