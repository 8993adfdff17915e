"""Farthest point sampling (FPS) of graph-pooling centroids (Sec. 3.2, Alg. 1; Qi et al. 2017).

Semantics follow the released CAST code (DGL's ``farthest_point_sampler``): squared Euclidean
distance in float64, a running minimum over the samples taken so far, and the next sample is the
*first* index of the maximum. :func:`farthest_point_sampling` is batched and runs on any device
(one float64 Gram matrix, then a (B, M) update per sample; no Python loop over points);
:func:`farthest_point_sampling_reference` is the plain sequential algorithm the tests compare to. The two agree exactly except where two
candidate distances differ by less than float64 rounding of the Gram form (~1e-12 relative).
"""
import numpy as np
import torch

__all__ = ["farthest_point_sampling", "farthest_point_sampling_reference"]


@torch.no_grad()
def farthest_point_sampling(points: torch.Tensor, num_samples: int, start: int = 0) -> torch.Tensor:
    """Sample ``num_samples`` indices per batch element.

    Args:
        points: (B, M, D) tensor (computed in float64).
        num_samples: number of samples (may exceed M: then repeats follow the same rule).
        start: index of the first sample.
    Returns:
        (B, num_samples) int64 indices.
    """
    if points.dim() != 3:
        raise ValueError(f"points must be (B, M, D), got {tuple(points.shape)}")
    b, m, _ = points.shape
    if not 0 <= start < m:
        raise ValueError(f"start index {start} out of range for {m} points")
    pts = points.detach().to(torch.float64)
    # ||a - b||^2 = |a|^2 + |b|^2 - 2 a.b from one float64 Gram matrix: the loop then only
    # touches (B, M) numbers per sample. Identical points get exactly 0 (clamped).
    gram = torch.bmm(pts, pts.transpose(1, 2))
    sq = gram.diagonal(dim1=1, dim2=2)
    out = torch.empty(b, num_samples, dtype=torch.long, device=pts.device)
    min_dist = torch.full((b, m), float("inf"), dtype=torch.float64, device=pts.device)
    cur = torch.full((b,), start, dtype=torch.long, device=pts.device)
    rows = torch.arange(b, device=pts.device)
    for i in range(num_samples):
        out[:, i] = cur
        d = (sq + sq[rows, cur].unsqueeze(1) - 2.0 * gram[rows, cur]).clamp_(min=0.0)
        min_dist = torch.minimum(min_dist, d)
        cur = min_dist.argmax(dim=1)  # documented to return the first maximal index
    return out


def farthest_point_sampling_reference(points: np.ndarray, num_samples: int, start: int = 0) -> np.ndarray:
    """Sequential FPS of one point set (M, D): the textbook loop, for tests."""
    pts = np.asarray(points, dtype=np.float64)
    chosen = [start]
    dist = np.full(len(pts), np.inf)
    for _ in range(num_samples - 1):
        last = pts[chosen[-1]]
        for j in range(len(pts)):
            d = float(np.sum((pts[j] - last) ** 2))
            if d < dist[j]:
                dist[j] = d
        best, best_j = -1.0, 0
        for j in range(len(pts)):
            if dist[j] > best:
                best, best_j = dist[j], j
        chosen.append(best_j)
    return np.array(chosen[:num_samples], dtype=np.int64)
