"""Literal reference implementation of Online Agglomerative Pooling (OAP paper, Alg. 1).

One image at a time, on the CPU, in float64 with NumPy and ``scipy.sparse``; the matrices of the
paper are kept as matrices (``M``, ``E``, ``Omega`` sparse; ``M A``, ``V`` dense), the loop over
layers and the loop over the node pairs of the fully connected semantic graph are Python loops
(the per-supernode loop of Alg. 1 l.8-9 is one matrix expression, its rows being independent).
It is the yardstick of :mod:`hiseg_oap.pooling.fast`, not meant to be fast.

Equations (``N = h*w`` tokens, ``F`` the L2-normalised features, ``A = F F^T``):

* Eq. 2, feature similarity of nodes i, j:        ``S^f_ij = V_i V_j^T``
* Eq. 3, spatial similarity:                      ``S^s_ij = 1 - 1/N * sum_k |P_ik - P_jk|``,
  with ``P_i = M_i A / (M_i 1^T)`` the mean affinity of the tokens of node i to every token.
* Eq. 4:                                          ``S_ij = w_f S^f_ij + w_s S^s_ij``
* Alg. 1 l.4-5: the edges with ``S_ij > tau_t`` are contracted; the groups of nodes joined by
  contracted edges are the connected components (``scipy.sparse.csgraph.connected_components``;
  the contraction graph is symmetric, so its strongly connected components, the "SCC" of the
  paper, are its connected components), giving ``Omega`` (``s^t x s^{t+1}``, 0/1).
* Eq. 5: ``M^{t+1} = Omega^T M^t``; ``E^{t+1} = [Omega^T E^t Omega > 0]`` without self-loops.
* Eq. 6: ``V_i^{t+1} = L2N(softmax(M_i^{t+1} A / sigma) F)``.
* Semantic pooling (Alg. 1 l.14-15): the same identify/merge once more on the fully connected
  graph over the supernodes ``{V^{t+1}, M^{t+1}}``, with the same threshold ``tau_t``. Its result
  is emitted; the instance graph goes on to the next layer.

Choices where the paper is silent, inconsistent, or has an evident typo:

* ``V^0 = F`` (the graph is initialised with the key features).
* Eq. 5 as printed, ``E^{t+1} = Omega^T E^t (Omega^T E^t)^T = Omega^T E^t E^{tT} Omega``, joins
  supernodes whose members share a *common neighbour* (two hops) and would not join two adjacent
  tokens at all (a 4-neighbour grid is bipartite). The text says the update "ensures that edges
  are maintained only between adjacent supernodes" so that "each mask corresponds to a single
  connected region": we implement that, ``Omega^T E^t Omega`` binarised, diagonal removed.
* Alg. 1 l.10-11 test and append ``M_i^t, V_i^t`` inside a loop over the *new* supernodes
  ``i < s^{t+1}``; we emit ``M_i^{t+1}, V_i^{t+1}`` (the masks this layer produced), so layer
  ``t``'s output is the result of threshold ``tau_t`` and the last layer is not lost.
* "Larger than ``tau_t``" is taken strictly (``S_ij > tau_t``).
* Eq. 6 is used literally (``M_i A`` unnormalised) unless ``config.vote_normalize`` is set.
* The layer-``t`` semantic pooling uses the same ``tau_t`` ("Repeat steps 3-13").
* Supernodes are numbered by their first token in raster order (canonical: a partition has
  exactly one numbering, whatever order the component search visits nodes in).
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components

from ._assemble import assemble_result
from .types import OAPConfig, PseudoMasks

__all__ = ["oap_reference", "grid_adjacency"]


def grid_adjacency(h: int, w: int) -> sp.csr_matrix:
    """``E^0``: symmetric 0/1 adjacency of the 4-neighbour ``h x w`` grid, raster token order."""
    idx = np.arange(h * w).reshape(h, w)
    src = np.concatenate([idx[:, :-1].ravel(), idx[:-1, :].ravel()])
    dst = np.concatenate([idx[:, 1:].ravel(), idx[1:, :].ravel()])
    n = h * w
    e = sp.coo_matrix((np.ones(src.size), (src, dst)), shape=(n, n))
    return (e + e.T).tocsr()


def _similarity(i, j, V, P, cfg: OAPConfig, n_tokens: int, s_f=None, chunk: int = 4096):
    """Eq. 2-4 for the node pairs ``(i[k], j[k])`` (``s_f``: Eq. 2 if already computed)."""
    out = np.empty(len(i), dtype=np.float64)
    for a in range(0, len(i), chunk):
        ii, jj = i[a:a + chunk], j[a:a + chunk]
        if s_f is None:
            s_f_ = np.einsum("kd,kd->k", V[ii], V[jj])                  # Eq. 2
        else:
            s_f_ = s_f[a:a + chunk]
        s_s = 1.0 - np.abs(P[ii] - P[jj]).sum(axis=1) / n_tokens        # Eq. 3
        out[a:a + chunk] = cfg.w_f * s_f_ + cfg.w_s * s_s               # Eq. 4
    return out


def _scc(num_nodes: int, i: np.ndarray, j: np.ndarray) -> sp.csr_matrix:
    """Alg. 1 l.5: node -> supernode assignment ``Omega`` of the contracted edges ``(i, j)``."""
    g = sp.coo_matrix((np.ones(len(i)), (i, j)), shape=(num_nodes, num_nodes))
    g = (g + g.T).tocsr()
    _, labels = connected_components(g, directed=True, connection="strong")
    # canonical numbering: by the smallest member (= first token, see module docstring)
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    labels = rank[labels]
    n_new = order.size
    return sp.csr_matrix((np.ones(num_nodes), (np.arange(num_nodes), labels)),
                         shape=(num_nodes, n_new))


def _vote(ma: np.ndarray, area: np.ndarray, F: np.ndarray, cfg: OAPConfig) -> np.ndarray:
    """Eq. 6 for the supernodes whose rows ``M_i A`` are given: ``L2N(softmax(M_i A / sigma) F)``.

    (Alg. 1 l.8 loops over the supernodes; the rows are independent, so they are done as one
    matrix product.)
    """
    logits = ma / area[:, None] if cfg.vote_normalize else ma
    logits = logits / cfg.sigma
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    v = p @ F
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def _merge(Omega, M, A, F, cfg):
    """Eq. 5 (masks) and Eq. 6 (features): returns M^{t+1}, V^{t+1}."""
    M_new = (Omega.T @ M).tocsr()
    M_new.data[:] = 1.0
    MA = np.asarray(M_new @ A)
    area = np.asarray(M_new.sum(axis=1)).ravel()
    return M_new, _vote(MA, area, F, cfg)  # Alg. 1 l.8-9


def _token_labels(M: sp.csr_matrix) -> np.ndarray:
    return np.asarray(M.argmax(axis=0)).ravel().astype(np.int64)


def _oap_single(feat: np.ndarray, cfg: OAPConfig, exhaustive: bool) -> PseudoMasks:
    c, h, w = feat.shape
    n = h * w
    F = feat.reshape(c, n).T.astype(np.float64)
    F = F / np.maximum(np.linalg.norm(F, axis=1, keepdims=True), 1e-12)
    A = F @ F.T  # spatial affinity

    # G^0 = {V^0, M^0, E^0}
    V = F.copy()
    M = sp.identity(n, format="csr", dtype=np.float64)
    E = grid_adjacency(h, w)

    inst_parts, inst_feats, sem_parts, sem_feats = [], [], [], []
    for tau in cfg.thresholds:  # Alg. 1 l.2
        # ---- instance pooling: identify (l.3-5)
        s = M.shape[0]
        area = np.asarray(M.sum(axis=1)).ravel()
        P = np.asarray(M @ A) / area[:, None]
        ei, ej = sp.triu(E, k=1).nonzero()
        sim = _similarity(ei, ej, V, P, cfg, n)
        sel = sim > tau
        Omega = _scc(s, ei[sel], ej[sel])
        # ---- merge (l.6-9)
        E = (Omega.T @ E @ Omega).tocsr()
        E.setdiag(0)
        E.eliminate_zeros()
        E.data[:] = 1.0
        M, V = _merge(Omega, M, A, F, cfg)
        inst_parts.append(_token_labels(M))
        inst_feats.append(V)

        # ---- semantic pooling on the fully connected graph G^s = {V^{t+1}, M^{t+1}, E^s}
        s = M.shape[0]
        area = np.asarray(M.sum(axis=1)).ravel()
        P = np.asarray(M @ A) / area[:, None]
        pi, pj = [], []
        joined = np.arange(s)  # running component of each node (only used to skip work)
        for i in range(s - 1):  # every pair (i, j), i < j
            j = np.arange(i + 1, s)
            s_f = V[i + 1:] @ V[i]                                      # Eq. 2
            if not exhaustive:
                # Skipping changes no component: (a) S^s <= 1, so a pair with
                # w_f S^f + w_s <= tau cannot pass (same S^f values as below, so the test is
                # never stricter than Eq. 4); (b) a pair already joined adds nothing.
                j = j[(cfg.w_f * s_f + cfg.w_s > tau) & (joined[j] != joined[i])]
            sim = _similarity(np.full(j.size, i), j, V, P, cfg, n, s_f=s_f[j - i - 1])
            j = j[sim > tau]
            pi.append(np.full(j.size, i))
            pj.append(j)
            if j.size:
                merged = np.isin(joined, joined[np.append(j, i)])
                joined[merged] = joined[merged].min()
        pi = np.concatenate(pi) if pi else np.zeros(0, dtype=np.int64)
        pj = np.concatenate(pj) if pj else np.zeros(0, dtype=np.int64)
        Omega_s = _scc(s, pi, pj)
        Ms, Vs = _merge(Omega_s, M, A, F, cfg)
        sem_parts.append(_token_labels(Ms))
        sem_feats.append(Vs)

    t = torch.from_numpy
    return assemble_result(
        h, w, cfg.thresholds, cfg.phi,
        [t(p) for p in inst_parts], [t(v) for v in inst_feats],
        [t(p) for p in sem_parts], [t(v) for v in sem_feats],
    )


def oap_reference(
    features, config: Optional[OAPConfig] = None, exhaustive: bool = False,
) -> List[PseudoMasks]:
    """Literal OAP on a ``(B, C, h, w)`` (or ``(C, h, w)``) tensor or array; one result per image.

    ``exhaustive=True`` evaluates Eq. 2-4 for every pair of the semantic graph; by default the
    pairs that cannot change a component are skipped (same result, see the loop). Results are
    float64 CPU tensors.
    """
    cfg = config or OAPConfig()
    if torch.is_tensor(features):
        features = features.detach().cpu().double().numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim == 3:
        features = features[None]
    if features.ndim != 4:
        raise ValueError(f"expected (B, C, h, w) features, got shape {features.shape}")
    return [_oap_single(f, cfg, exhaustive) for f in features]
