"""UniAP: the agglomerative pooling the OAP authors released with S2-UniSeg (AAAI 2026).

Source: github bio-mlhui/S2-UniSeg, commit 9049574 ("semi-release"), ``FastUniAP.py``:
``aggo_merge_graph`` (one image), ``aggo_whole_batch`` (a batch as one disjoint graph, what its
training code ``AggSample`` calls) and ``hc_graph`` (one contraction). It is not the seed paper's
Alg. 1 (:mod:`hiseg_oap.pooling.reference`); this module implements the release's semantics as an
option of our pooling (``MODEL.OAP.POOLING.VARIANT: "uniap"``, ``--variant uniap``):

* Nodes start as the tokens, with their **raw** features (not L2-normalised); a merged node's
  feature is the **sum** of its members' (``x_out = C^T x``), its size the sum of their sizes.
* Edges: the 4-neighbour token grid (left and upper neighbour of each token, raster order).
* Edge score: cosine of the two nodes' features (``F.normalize(..., eps=1e-10)`` of each, then
  the dot product); no spatial term, no Eq. 6 vote.
* For each threshold (the release: ``[0.8, 0.7, 0.6, 0.5, 0.4]``): while some edge scores
  strictly above it, contract *all* such edges at once (connected components), sum features and
  sizes, rebuild the edges between the new nodes (no self-loops) and recompute every score.
* After each threshold, emit the nodes of at least ``min_size`` tokens (the release: 4) that
  **still have an edge** (the release walks its edge list and emits each end once): the grid
  graph stays connected, so an image merged into one node emits nothing at this and every later
  threshold.

Where the release crashes, we do what it evidently means:

* ``assert cluster_idx == y * H + x`` (in ``aggo_merge_graph`` and in ``AggSample``) fails on
  every grid with ``H != W``; token ``(y, x)`` is number ``y * W + x`` (what the loop computes).
* ``aggo_merge_graph`` ends with ``torch.cat`` over the thresholds, which raises when a threshold
  emitted nothing (its entry is an empty Python list); that threshold emits no mask here.
  (``aggo_whole_batch`` skips such a threshold instead; it does not crash.)
* The release's ``hc_graph`` builds dense ``N x N`` matrices over the whole batch; we contract
  with sparse / index operations (same result).
* Thresholds and the minimum size are hard-coded in the release; here they are
  :class:`~hiseg_oap.pooling.types.UniAPConfig` fields (defaults = the release's values).

What the result holds (our :class:`~hiseg_oap.pooling.types.PseudoMasks`, one layer per threshold):

* **Instance level**: the emitted clusters of that threshold, ordered by their first token in
  raster order. The release emits the same set in the order the nodes first appear in its edge
  list, which after a contraction is row-major over the sorted edge pairs and, in
  ``aggo_whole_batch``, depends on whether *any* image of the batch contracted; our order does
  not depend on the batch. ``features`` is the L2-normalised summed feature: the direction of
  the release's cluster feature (the release hands the raw sum to its DINO head; our teacher head
  takes unit vectors, as Eq. 6 gives them for Alg. 1).
* **Semantic level**: the release has none (no semantic pooling; S2-UniSeg distils all clusters
  through one head). Our segmenter has semantic queries, so the semantic level of a UniAP layer
  is **its instance level** (the same masks and features; ``instance_to_semantic`` is the
  identity), so that the semantic queries learn from the masks UniAP makes rather than from none
  (as with MaskCut, whose semantic level is empty and whose semantic queries only learn
  "no object"). Training targets (:func:`hiseg_oap.modeling.pseudo_targets.pseudo_mask_targets`) are
  then the same for both levels: every emitted cluster of every threshold, a cluster that
  survives unchanged to later thresholds kept once (at its first).

``uniap_reference`` follows the release step by step for one image (its edge order, SciPy's
connected components on the contracted edges, ``C^T x`` with a one-hot ``C``, its emission loop)
in NumPy / SciPy in the input's precision; ``uniap_fast`` runs a batch as one disjoint graph in
PyTorch on the features' device (as ``aggo_whole_batch``), with the device connected components
of :mod:`hiseg_oap.pooling.fast`. The tests check that both give the same result, alone and batched.
In float32 the two add in different orders (as the release's dense ``C^T x`` differs from
both), so an edge whose cosine is within rounding of a threshold may be decided differently;
float64 removes that in practice.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components as scipy_components

from ._assemble import assemble_result
from .fast import connected_components, grid_edges
from .types import PseudoMasks, UniAPConfig

__all__ = ["uniap_reference", "uniap_fast", "release_grid_edges"]

#: ``F.normalize``'s floor on the norm in the release's edge score
_EPS = 1e-10


def _assemble(h, w, cfg: UniAPConfig, parts, feats, emitted) -> PseudoMasks:
    """One image's result; the semantic level is the instance level (see the module docstring)."""
    unit = [f / f.norm(dim=1, keepdim=True).clamp_min(_EPS) for f in feats]
    return assemble_result(h, w, cfg.thresholds, cfg.min_size, parts, unit, parts, unit,
                           inst_eligible=emitted, sem_eligible=emitted, method="uniap")


# ---------------------------------------------------------------------------------------------
# literal reference (one image)
def release_grid_edges(h: int, w: int) -> np.ndarray:
    """``(2, E)`` grid edges in the release's order: for each token in raster order, the edge to
    its left neighbour, then to its upper one (``aggo_merge_graph``), with ``y * W + x``."""
    edges = []
    idx = 0
    for y in range(h):
        for x in range(w):
            assert idx == y * w + x  # the release writes y * H, which fails when H != W
            if idx % w != 0:
                edges.append((idx - 1, idx))
            if idx - w >= 0:
                edges.append((idx - w, idx))
            idx += 1
    return np.asarray(edges, dtype=np.int64).reshape(-1, 2).T


def _edge_score(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """``get_edge_score``: cosine of the two ends' features, each normalised with eps 1e-10."""
    def unit(a):
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), np.asarray(_EPS, a.dtype))

    return (unit(x[edges[0]]) * unit(x[edges[1]])).sum(axis=1)


def _hc_graph(x, edges, sizes, threshold, score):
    """``hc_graph``: contract every edge scoring above ``threshold`` (their connected components),
    sum the features and sizes of each component, and rebuild the edges between components
    (upper triangle of ``C^T A C`` without its diagonal, in row-major order as
    ``dense_to_sparse`` lists them). Returns the new features, edges, sizes and the component of
    every old node (SciPy numbers components by their smallest member)."""
    n = x.shape[0]
    chosen = edges[:, score > threshold]
    adj = sp.coo_matrix((np.ones(chosen.shape[1]), (chosen[0], chosen[1])), shape=(n, n))
    _, cluster = scipy_components((adj + adj.T).tocsr(), directed=False)
    k = int(cluster.max()) + 1
    C = sp.csr_matrix((np.ones(n, dtype=x.dtype), (np.arange(n), cluster)), shape=(n, k))
    x_out = np.asarray(C.T @ x, dtype=x.dtype)
    sizes_out = np.bincount(cluster, weights=sizes, minlength=k).astype(np.int64)
    A = sp.coo_matrix((np.ones(edges.shape[1]), (edges[0], edges[1])), shape=(n, n))
    A = (A + A.T).tocsr()
    new_adj = sp.triu(C.T @ A @ C, k=1).tocoo()
    order = np.lexsort((new_adj.col, new_adj.row))
    edges_out = np.stack([new_adj.row[order], new_adj.col[order]]).astype(np.int64)
    return x_out, edges_out, sizes_out, cluster


def _emit(edges: np.ndarray, sizes: np.ndarray, min_size: int) -> List[int]:
    """The release's emission loop: each end of each edge, once, if its size is ``>= min_size``."""
    counted, emitted = set(), []
    for m, n in edges.T.tolist():
        for node in (m, n):
            if node not in counted:
                counted.add(node)
                if sizes[node] >= min_size:
                    emitted.append(node)
    return emitted


def _uniap_single(feat: np.ndarray, cfg: UniAPConfig) -> PseudoMasks:
    c, h, w = feat.shape
    x = np.ascontiguousarray(feat.reshape(c, h * w).T)  # (N, c) raw token features
    edges = release_grid_edges(h, w)
    sizes = np.ones(h * w, dtype=np.int64)
    token = np.arange(h * w)  # token -> current node
    score = _edge_score(x, edges)
    parts, feats, emitted = [], [], []
    for threshold in cfg.thresholds:
        while (score > threshold).any():
            x, edges, sizes, cluster = _hc_graph(x, edges, sizes, threshold, score)
            token = cluster[token]
            score = _edge_score(x, edges)
        ok = np.zeros(x.shape[0], dtype=bool)
        ok[_emit(edges, sizes, cfg.min_size)] = True
        parts.append(torch.from_numpy(token.copy()))
        feats.append(torch.from_numpy(x.copy()))
        emitted.append(torch.from_numpy(ok))
    return _assemble(h, w, cfg, parts, feats, emitted)


def uniap_reference(features, config: Optional[UniAPConfig] = None) -> List[PseudoMasks]:
    """UniAP of a ``(B, C, h, w)`` (or ``(C, h, w)``) tensor or array, one image at a time, as the
    release computes it (NumPy / SciPy on the CPU, in the input's float32 or float64; other
    dtypes are computed in float32). Results are CPU tensors."""
    cfg = config or UniAPConfig()
    if torch.is_tensor(features):
        features = features.detach().cpu().numpy()
    features = np.asarray(features)
    if features.dtype not in (np.float32, np.float64):
        features = features.astype(np.float32)
    if features.ndim == 3:
        features = features[None]
    if features.ndim != 4:
        raise ValueError(f"expected (B, C, h, w) features, got shape {features.shape}")
    return [_uniap_single(f, cfg) for f in features]


# ---------------------------------------------------------------------------------------------
# batched PyTorch
def _cosine(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    a = torch.nn.functional.normalize(x[u], dim=1, eps=_EPS)
    b = torch.nn.functional.normalize(x[v], dim=1, eps=_EPS)
    return (a * b).sum(1)


@torch.no_grad()
def uniap_fast(features: torch.Tensor, config: Optional[UniAPConfig] = None,
               dtype: Optional[torch.dtype] = None) -> List[PseudoMasks]:
    """UniAP of a batch of ``(B, C, h, w)`` feature maps as one disjoint graph (CPU or CUDA).

    Args:
        features: raw features, e.g. ViT keys; they are *not* normalised (the release sums them
            as they are).
        config: :class:`UniAPConfig` (the release's values if None).
        dtype: compute dtype (default: float32, or the input's float64).
    Returns:
        one :class:`PseudoMasks` per image; an image's result does not depend on the batch
        (its nodes are never mixed with another image's, and a contraction round changes
        nothing in an image that has no edge above the threshold).
    """
    if torch.is_autocast_enabled(features.device.type):
        with torch.autocast(device_type=features.device.type, enabled=False):
            return uniap_fast(features, config, dtype)
    cfg = config or UniAPConfig()
    if features.dim() == 3:
        features = features[None]
    if features.dim() != 4:
        raise ValueError(f"expected (B, C, h, w) features, got shape {tuple(features.shape)}")
    if dtype is None:
        dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    B, c, h, w = features.shape
    n = h * w
    dev = features.device
    x = features.detach().to(dtype).permute(0, 2, 3, 1).reshape(B * n, c)
    e = grid_edges(h, w, dev)
    offs = (torch.arange(B, device=dev) * n).view(B, 1, 1)
    u, v = (e.view(1, 2, -1) + offs).permute(1, 0, 2).reshape(2, -1)
    sizes = torch.ones(B * n, dtype=torch.long, device=dev)
    batch = torch.arange(B, device=dev).repeat_interleave(n)  # image of each node
    token = torch.arange(B * n, device=dev).view(B, n)        # token -> node
    score = _cosine(x, u, v)
    layers = []
    for threshold in cfg.thresholds:
        while True:
            sel = score > threshold
            if not bool(sel.any()):
                break
            s = x.shape[0]
            root = connected_components(s, u[sel], v[sel])
            is_root = root == torch.arange(s, device=dev)
            comp = (torch.cumsum(is_root, 0) - 1)[root]  # nodes stay ordered by first token
            k = int(is_root.sum())
            x = x.new_zeros((k, c)).index_add_(0, comp, x)
            sizes = sizes.new_zeros(k).index_add_(0, comp, sizes)
            batch = batch[is_root]
            token = comp[token]
            a, b = comp[u], comp[v]
            keep = a != b
            key = torch.unique(torch.minimum(a[keep], b[keep]) * k + torch.maximum(a[keep], b[keep]))
            u, v = key // k, key % k
            score = _cosine(x, u, v)
        has_edge = torch.zeros(x.shape[0], dtype=torch.bool, device=dev)
        has_edge[u] = True
        has_edge[v] = True
        counts = torch.bincount(batch, minlength=B)
        layers.append((token, x, has_edge & (sizes >= cfg.min_size), counts.tolist(),
                       torch.cumsum(counts, 0) - counts))
    results = []
    for i in range(B):
        parts, feats, emitted = [], [], []
        for token_t, x_t, ok_t, counts_t, starts_t in layers:
            st = int(starts_t[i])
            parts.append(token_t[i] - st)
            feats.append(x_t[st:st + counts_t[i]])
            emitted.append(ok_t[st:st + counts_t[i]])
        results.append(_assemble(h, w, cfg, parts, feats, emitted))
    return results
