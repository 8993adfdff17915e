"""The 2-layer 1x1-convolution head of CAST's semantic segmentation transfer (Appx. E.5: "we
replace the 3-layer MLP head with 2-layer 1x1 convolutional layers"), runnable on segment tokens
with pixel-weighted BatchNorm, and its per-pixel loss computed from the tokens
(:func:`superpixel_cross_entropy`, also used by ``CASTSegmenter``)."""
import torch
import torch.nn.functional as F
from torch import nn

from hiseg.modeling.sync_batchnorm import SyncBatchNorm2d, differentiable_all_reduce

__all__ = ["PixelHead", "superpixel_cross_entropy"]


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over workers (identity on one worker)."""
    return differentiable_all_reduce(x)


class PixelHead(nn.Module):
    """The 2-layer 1x1-conv classifier: conv(D -> hidden) - norm - ReLU - conv(hidden -> classes).

    ``forward_grid`` runs it on a (B, D, h, w) map. ``forward_tokens`` runs it on (B, N, D)
    tokens that stand for ``weights`` (B, N) pixels each; it equals ``forward_grid`` on the map
    where every pixel carries its token, BatchNorm statistics included (pixel-weighted).
    ``norm``: "BN", "SyncBN" (statistics summed over all workers) or "" (no norm, conv1 biased).
    """

    def __init__(self, in_dim: int, hidden_dim: int, num_classes: int, norm: str = "BN"):
        super().__init__()
        if norm not in ("BN", "SyncBN", ""):
            raise ValueError(f"MODEL.CAST_SEM_SEG.HEAD_NORM must be 'BN', 'SyncBN' or '', got {norm!r}")
        self.sync = norm == "SyncBN"
        self.conv1 = nn.Conv2d(in_dim, hidden_dim, 1, bias=not norm)
        self.norm = None
        if norm:
            # SyncBN: full-batch statistics, running variance unbiased as nn.BatchNorm2d's (not
            # detectron2's NaiveSyncBatchNorm, whose running variance is biased)
            self.norm = SyncBatchNorm2d(hidden_dim) if self.sync else nn.BatchNorm2d(hidden_dim)
        self.conv2 = nn.Conv2d(hidden_dim, num_classes, 1)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        if self.conv1.bias is not None:
            nn.init.zeros_(self.conv1.bias)
        nn.init.normal_(self.conv2.weight, std=0.01)
        nn.init.zeros_(self.conv2.bias)

    def forward_grid(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        if self.norm is not None:
            h = self.norm(h)
        return self.conv2(F.relu(h))

    def forward_tokens(self, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        h = F.linear(tokens, self.conv1.weight.flatten(1), self.conv1.bias)
        if self.norm is not None:
            h = self._weighted_batch_norm(h, weights)
        return F.linear(F.relu(h), self.conv2.weight.flatten(1), self.conv2.bias)

    def _weighted_batch_norm(self, h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        bn = self.norm
        k = h.shape[-1]
        if not (self.training and bn.training):
            flat = F.batch_norm(h.reshape(-1, k), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                False, 0.0, bn.eps)
            return flat.view_as(h)
        w = weights.to(h.dtype).unsqueeze(-1)  # (B, N, 1)
        reduce = _all_reduce if self.sync else (lambda t: t)
        sums = reduce(torch.cat([w.sum((0, 1)), (w * h).sum((0, 1))]))
        n = sums[0].clamp(min=1.0)
        mean = sums[1:] / n
        var = reduce((w * (h - mean) ** 2).sum((0, 1))) / n
        with torch.no_grad():
            m = bn.momentum if bn.momentum is not None else 0.1
            unbiased = var * (n / (n - 1).clamp(min=1.0))
            bn.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            bn.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
            bn.num_batches_tracked.add_(1)
        return (h - mean) * torch.rsqrt(var + bn.eps) * bn.weight + bn.bias


def superpixel_cross_entropy(token_logits: torch.Tensor, superpixels: torch.Tensor, targets: torch.Tensor,
                             ignore_value: int = 255) -> torch.Tensor:
    """Per-pixel softmax cross-entropy when every pixel takes its superpixel's logits.

    Args:
        token_logits: (B, N, C) class logits of the N superpixel tokens.
        superpixels: (B, H, W) int64 token index of each pixel (-1 = padding).
        targets: (B, H, W) int64 labels in [0, C) or ``ignore_value``.
    Returns the mean NLL over the labelled pixels, computed from a (token, class) histogram of
    the labelled pixels instead of an (B, C, H, W) logit map (same value, a fraction of the
    memory). A batch without labelled pixels gives a zero that still touches the graph.
    """
    b, n, c = token_logits.shape
    valid = targets != ignore_value
    if bool((targets[valid] >= c).any()) or bool((targets[valid] < 0).any()):
        raise ValueError(f"sem_seg labels must be in [0, {c}) or {ignore_value}")
    logp = F.log_softmax(token_logits, dim=-1)
    bidx = torch.arange(b, device=superpixels.device)[:, None, None].expand_as(superpixels)
    idx = ((bidx * n + superpixels.clamp(min=0)) * c + targets.clamp(min=0))[valid]
    hist = torch.bincount(idx, minlength=b * n * c).view(b, n, c).to(logp.dtype)
    return -(hist * logp).sum() / hist.sum().clamp(min=1.0)
