"""Graph pooling (Sec. 3.2, Eq. 1-3, Alg. 1).

Given tokens Z (B, M, D) and a target count N:
  C  = FPS(Z, N)                         farthest point sampling in token space (Eq. 1)
  U  = MSA(LN(Z)) + Z;  U = U - mean(U) + bias          (centroid refinement, Alg. 1)
  P  = softmax_c(kappa * cos(U_a, U_c)),  c in C        (Eq. 1; kappa = 5 in the released code)
  Z' = P^T MLP(Z) / P^T 1                               (Eq. 3, average pooling by P)
  Y  = Z[C] + fc2(Z')                                   (Eq. 3, f(a, b) = a + MLP(b))
The class token goes through the same MLP: cls <- cls + fc2(fc1(cls)).

Details from the released code: FPS runs on the raw tokens in float64, with padded tokens filled
by the mean of the valid tokens and that mean prepended as the first sample (N+1 samples, the first
dropped); the refinement's LayerNorm uses eps 1e-6, fc1/fc2's use 1e-5; the bias starts at
N(0, 1e-2). Module names (``centroid_fc``, ``fc1``, ``fc2``) match the released checkpoints.

Two masks per level. ``valid`` marks tokens with support (a segment that reaches at least one
cell of the feature grid); only FPS uses it, as in the released code (padded tokens are filled
with the valid mean). ``members`` marks the tokens that take part in the centroid block's
attention and mean and in the pooling sums (Eq. 3's P^T MLP(Z) / P^T 1). With the released
behaviour (``MODEL.CAST.EMPTY_TOKENS: attend``) ``members`` are all of an image's own segments,
including all-zero tokens of segments that vanished on the grid; with ``mask`` it equals
``valid``. Tokens of batch padding (labels beyond an image's own count) are never members, so an
image gives the same result alone or in a batch (the released code would let them take part).

An image with fewer valid tokens than N keeps all of them (the released code asserts and dies):
the extra centroid slots are marked invalid in ``valid_out`` and never assigned.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

from .fps import farthest_point_sampling

__all__ = ["GraphPool", "GraphPoolOutput", "masked_mean", "key_padding_bias"]


class GraphPoolOutput(NamedTuple):
    cls_token: torch.Tensor  # (B, 1, D)
    tokens: torch.Tensor  # (B, N, D) coarse tokens Z_l (zeros in invalid slots)
    valid: torch.Tensor  # (B, N) bool
    logits: torch.Tensor  # (B, M, N) kappa * cosine; invalid centroids at -inf
    sampled: torch.Tensor  # (B, N) indices into the M input tokens


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, 1, D) mean over the valid tokens of (B, M, D)."""
    w = valid.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)


def key_padding_bias(valid: torch.Tensor, dtype) -> torch.Tensor:
    """Additive attention mask (B, 1, 1, M): 0 for valid keys, -inf for padded ones."""
    bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
    return bias.masked_fill(~valid, float("-inf"))[:, None, None, :]


class CentroidRefiner(nn.Module):
    """Attention-only block, then mean-centring plus a learned bias (Alg. 1, lines 2-3)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.bias = nn.Parameter(torch.empty(dim).normal_(0, 1e-2))

    def forward(self, x: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        """``members`` (B, M) bool: the tokens attended to and averaged over."""
        mask = None if bool(members.all()) else key_padding_bias(members, x.dtype)
        u = x + self.attn(self.norm(x), attn_mask=mask)
        return u - masked_mean(u, members) + self.bias


class GraphPool(nn.Module):
    def __init__(self, dim: int, num_heads: int, kappa: float = 5.0, dropout: float = 0.1):
        super().__init__()
        self.kappa = kappa
        self.centroid_fc = CentroidRefiner(dim, num_heads)
        self.fc1 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout))
        self.fc2 = nn.Sequential(nn.LayerNorm(4 * dim), nn.Linear(4 * dim, dim))

    @staticmethod
    def sample_centroids(tokens: torch.Tensor, valid: torch.Tensor, num: int):
        """FPS indices (B, num) and their validity, following the released code's conventions."""
        with torch.no_grad():
            x = tokens.detach().to(torch.float64)
            mean = masked_mean(x, valid)
            filled = torch.where(valid.unsqueeze(-1), x, mean)
            idx = farthest_point_sampling(torch.cat([mean, filled], dim=1), num + 1, start=0)[:, 1:] - 1
            ok = idx >= 0
            idx = idx.clamp(min=0)
            ok &= valid.gather(1, idx)
            # an image with n < num valid tokens keeps n centroids
            ok &= torch.arange(num, device=idx.device)[None] < valid.sum(1, keepdim=True)
        return idx, ok

    def assignment_logits(self, tokens: torch.Tensor, valid: torch.Tensor, num_segments: int,
                          members: Optional[torch.Tensor] = None):
        """Eq. 1: FPS centroids and ``kappa * cos(U_a, U_c)`` logits (invalid centroids at -inf).
        ``members`` defaults to ``valid`` (see the module docstring).
        Returns (logits (B, M, N), sampled indices (B, N), valid centroids (B, N))."""
        members = valid if members is None else members
        idx, valid_out = self.sample_centroids(tokens, valid, num_segments)
        nodes = self.centroid_fc(tokens, members)
        centroids = nodes.gather(1, idx.unsqueeze(-1).expand(-1, -1, nodes.shape[-1]))
        logits = self.kappa * torch.einsum(
            "bmd,bnd->bmn", F.normalize(nodes, dim=-1), F.normalize(centroids, dim=-1))
        return logits.masked_fill(~valid_out[:, None, :], float("-inf")), idx, valid_out

    def forward(self, cls_token: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor,
                num_segments: int, members: Optional[torch.Tensor] = None) -> GraphPoolOutput:
        d = tokens.shape[-1]
        members = valid if members is None else members
        logits, idx, valid_out = self.assignment_logits(tokens, valid, num_segments, members)
        assign = logits.softmax(dim=-1) * members.unsqueeze(-1).to(logits.dtype)

        z = self.fc1(torch.cat([cls_token, tokens], dim=1))
        z_cls, z_tok = z[:, :1], z[:, 1:]
        pooled = torch.einsum("bmn,bmc->bnc", assign, z_tok) / assign.sum(1).unsqueeze(-1).clamp(min=1e-6)
        y = self.fc2(torch.cat([z_cls, pooled], dim=1))
        gather_idx = idx.unsqueeze(-1).expand(-1, -1, d)
        coarse = (y[:, 1:] + tokens.gather(1, gather_idx)) * valid_out.unsqueeze(-1).to(y.dtype)
        return GraphPoolOutput(cls_token + y[:, :1], coarse, valid_out, logits, idx)
