"""Batched PyTorch implementation of Online Agglomerative Pooling (CPU and CUDA).

Same algorithm, equations and choices as :mod:`hiseg_oap.pooling.reference` (read its docstring); the
two give the same partitions (the tests check it in float64). What differs is the data layout
and which quantities are recomputed:

* The ``B`` images are one disjoint graph: their supernodes are stacked in one flat list, image
  by image, each image's supernodes numbered by their first token, so a node's index never mixes
  images and connected components of the union are the components of each image.
* ``M`` is never stored as a matrix. Each token keeps the index of its supernode, and each
  supernode keeps the row ``M_i A`` (``s x N``): at layer 0 it is ``A`` itself, afterwards
  ``M^{t+1} A = Omega^T (M^t A)`` is a scatter-add of rows, so beyond ``A`` the memory is linear
  in tokens x supernodes.
* Connected components run on the device: minimum-label hooking of component roots plus pointer
  jumping (see :func:`connected_components`), a fixed number of tensor ops per round and a few
  rounds in all; no Python loop over nodes or edges.
* Semantic pooling considers every pair of supernodes of an image. Since ``S^s <= 1``, a pair
  can only be contracted if ``w_f S^f + w_s > tau``; ``S^f`` for all pairs is one matrix product,
  and the ``N``-long spatial term is computed only for the pairs that pass this bound, most
  promising first, skipping the pairs whose ends are already joined (only the components
  matter). The bound uses the very ``S^f`` values of the final test and ``S^s <= 1`` holds in
  floating point too, so no pair that would pass is ever skipped: the result is exact.
* A supernode that did not merge keeps its mask, so Eq. 6 gives it the same feature again, and
  an edge between two such supernodes keeps its similarity: these are carried over instead of
  recomputed (and an image's all-pairs ``S^f`` when none of its supernodes merged), which
  matters when few nodes merge.

The only Python loops are over layers and, for the dense products, over images.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ._assemble import assemble_result
from .features import flatten_normalized
from .types import OAPConfig, PseudoMasks

__all__ = ["oap_fast", "connected_components", "grid_edges"]


def grid_edges(h: int, w: int, device=None) -> torch.Tensor:
    """``(2, E)`` long: the 4-neighbour edges ``(i, j)``, ``i < j``, of an ``h x w`` grid
    (horizontal edges, then vertical ones, each in raster order)."""
    idx = torch.arange(h * w, device=device).view(h, w)
    src = torch.cat([idx[:, :-1].reshape(-1), idx[:-1, :].reshape(-1)])
    dst = torch.cat([idx[:, 1:].reshape(-1), idx[1:, :].reshape(-1)])
    return torch.stack([src, dst])


def connected_components(
    num_nodes: int, u: torch.Tensor, v: torch.Tensor, init: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Connected components of an undirected graph on the tensors' device.

    Returns ``(num_nodes,)`` long, the smallest node index of each node's component.
    ``init`` (optional) is a previous result of this function: the components are then those of
    the union of the earlier edges and ``(u, v)`` (incremental use).

    Each round hooks every current root onto the smallest root it shares an edge with
    (``scatter_reduce`` with ``amin``), then compresses the pointers to roots by pointer jumping
    (``label = label[label]`` until stable). Pointers only ever go to smaller indices, so no
    cycle can form; when a round changes nothing both ends of every edge have the same root, and
    that root is the smallest index of its component.
    """
    if init is None:
        label = torch.arange(num_nodes, device=u.device)
    else:
        label = init.clone()
    if u.numel() == 0:
        return label
    while True:
        lu, lv = label[u], label[v]
        low = torch.minimum(lu, lv)
        new = label.scatter_reduce(0, lu, low, reduce="amin")
        new = new.scatter_reduce(0, lv, low, reduce="amin")
        while True:
            jumped = new[new]
            if torch.equal(jumped, new):
                break
            new = jumped
        if torch.equal(new, label):
            return label
        label = new


class _Graph:
    """The flat state of B graphs.

    ma (S, N): rows ``M_i A``; area (S,); feats (S, d); batch (S,): image of each supernode
    (non-decreasing); prev (S,): index of the same supernode in the previous graph when it did
    not merge and its feature was carried, else -1; voted: feats come from Eq. 6 (False only for
    ``V^0 = F``). Instance graphs also hold their edges u, v (E,) with their similarities esim
    (E,) and esim_known (E,) bool, and grams: per image, ``S^f`` of all pairs or None.
    """

    def __init__(self, ma, area, feats, batch, num_images, prev=None, voted=False):
        self.ma, self.area, self.feats, self.batch = ma, area, feats, batch
        self.prev, self.voted = prev, voted
        counts = torch.bincount(batch, minlength=num_images)
        self.counts = counts.tolist()
        self.starts = torch.cumsum(counts, 0) - counts
        self.u = self.v = self.esim = self.esim_known = None
        self.grams = [None] * num_images

    @property
    def num_nodes(self) -> int:
        return self.ma.shape[0]

    def ranges(self):
        start = 0
        for b, cnt in enumerate(self.counts):
            yield b, start, start + cnt
            start += cnt


def _rows_per_chunk(n_tokens: int, chunk_elems: int) -> int:
    return max(1, chunk_elems // max(1, n_tokens))


def _spatial_similarity(ma, area, i, j, n_tokens: int, chunk_elems: int) -> torch.Tensor:
    """Eq. 3 for the pairs ``(i[k], j[k])``, in chunks so that ``P`` is never stored whole."""
    out = torch.empty(i.numel(), dtype=ma.dtype, device=ma.device)
    step = _rows_per_chunk(n_tokens, chunk_elems)
    for a in range(0, i.numel(), step):
        ii, jj = i[a:a + step], j[a:a + step]
        pi = ma[ii] / area[ii, None]
        pj = ma[jj] / area[jj, None]
        out[a:a + step] = 1.0 - (pi - pj).abs_().sum(1) / n_tokens
    return out


def _grid_spatial_similarity(a: torch.Tensor, B: int, h: int, w: int) -> torch.Tensor:
    """Eq. 3 on the grid edges of layer 0, where ``P = M^0 A = A``: the rows of neighbouring
    tokens are compared through shifted views instead of gathered copies. Edge order as
    :func:`grid_edges`, image after image."""
    n = h * w
    a = a.view(B, h, w, n)
    horiz = (a[:, :, 1:] - a[:, :, :-1]).abs_().sum(-1).reshape(B, -1)
    vert = (a[:, 1:] - a[:, :-1]).abs_().sum(-1).reshape(B, -1)
    return 1.0 - torch.cat([horiz, vert], 1).reshape(-1) / n


def _vote_rows(g: _Graph, rows: torch.Tensor, Fb, cfg: OAPConfig, chunk_elems: int):
    """Eq. 6, ``L2N(softmax(M_i A / sigma) F_b)``, for the supernodes ``rows`` (sorted)."""
    out = torch.empty(rows.numel(), Fb.shape[2], dtype=g.ma.dtype, device=g.ma.device)
    step = _rows_per_chunk(g.ma.shape[1], chunk_elems)
    bounds = torch.searchsorted(rows, torch.tensor(
        [e for _, _, e in g.ranges()], device=rows.device)).tolist()
    lo = 0
    for b, hi in enumerate(bounds):
        for a in range(lo, hi, step):
            e = min(a + step, hi)
            r = rows[a:e]
            logits = g.ma[r] / g.area[r, None] if cfg.vote_normalize else g.ma[r]
            out[a:e] = torch.softmax(logits / cfg.sigma, dim=1) @ Fb[b]
        lo = hi
    return torch.nn.functional.normalize(out, p=2.0, dim=1, eps=1e-12)


def _merge(g: _Graph, root_of: torch.Tensor, Fb, cfg: OAPConfig, chunk_elems: int,
           with_edges: bool):
    """Eq. 5 and 6: contracts each component of ``root_of`` into one supernode.

    Returns the new graph and ``comp`` (old node -> new node). With ``with_edges`` the edge list
    is contracted too (``E^{t+1} = [Omega^T E^t Omega > 0]``, no self-loops).
    """
    s = g.num_nodes
    dev = root_of.device
    is_root = root_of == torch.arange(s, device=dev)
    root_idx = torch.nonzero(is_root).flatten()
    new_id = torch.cumsum(is_root, 0) - 1
    comp = new_id[root_of]
    s_new = root_idx.numel()
    if s_new == s:  # Omega = I
        ma, area = g.ma, g.area
        size = torch.ones(s, dtype=torch.long, device=dev)
    else:
        ma = g.ma.new_zeros((s_new, g.ma.shape[1])).index_add_(0, comp, g.ma)
        area = g.area.new_zeros(s_new).index_add_(0, comp, g.area)
        size = torch.bincount(comp, minlength=s_new)
    kept = (size == 1) & g.voted  # same mask and already an Eq. 6 feature
    new = _Graph(ma, area, None, g.batch[root_idx], len(g.counts),
                 prev=torch.where(kept, root_idx, torch.full_like(root_idx, -1)), voted=True)
    if bool(kept.all()):
        new.feats = g.feats
    else:
        feats = torch.empty(s_new, Fb.shape[2], dtype=g.ma.dtype, device=dev)
        feats[kept] = g.feats[root_idx[kept]]
        redo = torch.nonzero(~kept).flatten()
        feats[redo] = _vote_rows(new, redo, Fb, cfg, chunk_elems)
        new.feats = feats

    if with_edges:
        a, b = comp[g.u], comp[g.v]
        keep = a != b
        a, b, old_sim = a[keep], b[keep], g.esim[keep]
        lo, hi = torch.minimum(a, b), torch.maximum(a, b)
        key, inv = torch.unique(lo * s_new + hi, return_inverse=True)
        new.u, new.v = key // s_new, key % s_new
        # an edge between two unchanged supernodes maps from exactly one old edge: keep its S
        carry = kept[a] & kept[b]
        new.esim = torch.zeros(key.numel(), dtype=g.esim.dtype, device=dev)
        new.esim[inv[carry]] = old_sim[carry]
        new.esim_known = torch.zeros(key.numel(), dtype=torch.bool, device=dev)
        new.esim_known[inv[carry]] = True
    return new, comp


def _gram(g: _Graph, prev_grams, b: int, start: int, end: int) -> torch.Tensor:
    """``S^f`` (Eq. 2) of all pairs of image b; reused when none of its supernodes changed."""
    old = prev_grams[b] if prev_grams is not None else None
    if (old is not None and g.prev is not None and old.shape[0] == end - start
            and bool((g.prev[start:end] >= 0).all())):
        return old  # no merge in this image since the last semantic step: same features
    vb = g.feats[start:end]
    return vb @ vb.T


def _semantic_components(g: _Graph, tau: float, cfg: OAPConfig, n_tokens: int,
                         chunk_elems: int, prev_grams) -> torch.Tensor:
    """Components of the fully connected graph of each image's supernodes with edges S > tau.

    Only the components matter, not the edge set, so the candidate pairs are visited in chunks,
    most promising first (largest S^f), and a pair whose ends are already in one component is
    not evaluated. The result does not depend on the order.
    """
    ii_all, jj_all, sf_all = [], [], []
    for b, start, end in g.ranges():
        if end - start > 1:
            sf = _gram(g, prev_grams, b, start, end)
            g.grams[b] = sf
            bound = cfg.w_f * sf + cfg.w_s            # Eq. 4 with S^s at its maximum, 1
            ii, jj = torch.nonzero(torch.triu(bound > tau, diagonal=1), as_tuple=True)
            sf_all.append(sf[ii, jj])
            ii_all.append(ii + start)
            jj_all.append(jj + start)
    label = torch.arange(g.num_nodes, device=g.ma.device)
    if not ii_all:
        return label
    sf = torch.cat(sf_all)
    order = torch.argsort(sf, descending=True)
    ii, jj, sf = torch.cat(ii_all)[order], torch.cat(jj_all)[order], sf[order]
    step = _rows_per_chunk(n_tokens, chunk_elems)
    for a in range(0, ii.numel(), step):
        ic, jc, sc = ii[a:a + step], jj[a:a + step], sf[a:a + step]
        if a > 0:  # skip the pairs already joined (the first chunk has no component yet)
            open_ = label[ic] != label[jc]
            ic, jc, sc = ic[open_], jc[open_], sc[open_]
        if ic.numel() == 0:
            continue
        # Eq. 4, with the same S^f values as the bound so that the bound is never below S
        sim = cfg.w_f * sc + cfg.w_s * _spatial_similarity(g.ma, g.area, ic, jc, n_tokens,
                                                           chunk_elems)
        keep = sim > tau
        label = connected_components(g.num_nodes, ic[keep], jc[keep], init=label)
    return label


def _instance_similarity(g: _Graph, first: bool, B: int, h: int, w: int, cfg: OAPConfig,
                         chunk_elems: int) -> torch.Tensor:
    """Eq. 2-4 on the instance edges (the ones carried over from the last layer are reused)."""
    n = h * w
    if first:
        s_s = _grid_spatial_similarity(g.ma, B, h, w)
        return cfg.w_f * (g.feats[g.u] * g.feats[g.v]).sum(1) + cfg.w_s * s_s
    sim = g.esim.clone()
    todo = torch.nonzero(~g.esim_known).flatten()
    if todo.numel():
        u, v = g.u[todo], g.v[todo]
        s_s = _spatial_similarity(g.ma, g.area, u, v, n, chunk_elems)
        sim[todo] = cfg.w_f * (g.feats[u] * g.feats[v]).sum(1) + cfg.w_s * s_s
    return sim


@torch.no_grad()
def oap_fast(
    features: torch.Tensor, config: Optional[OAPConfig] = None, dtype: Optional[torch.dtype] = None,
    chunk_elems: int = 1 << 24,
) -> List[PseudoMasks]:
    """Online Agglomerative Pooling of a batch of feature maps.

    Args:
        features: ``(B, C, h, w)`` on any device, e.g. the ViT key features
            (:func:`hiseg_oap.pooling.features.vit_key_features`). Tokens are L2-normalised here.
        config: :class:`OAPConfig` (paper defaults if None).
        dtype: compute dtype (default: float32, or the input's float64).
        chunk_elems: size, in elements, of the temporary ``pairs x N`` blocks.
    Returns:
        one :class:`PseudoMasks` per image, tensors on the input's device.
    """
    if torch.is_autocast_enabled(features.device.type):
        # under AMP (e.g. the teacher of an autocast training step) the products below would run
        # in half precision and mix dtypes: OAP always computes in ``dtype``
        with torch.autocast(device_type=features.device.type, enabled=False):
            return oap_fast(features, config, dtype, chunk_elems)
    cfg = config or OAPConfig()
    Fb, h, w = flatten_normalized(features, dtype)
    B, n, d = Fb.shape
    dev = Fb.device
    A = torch.bmm(Fb, Fb.transpose(1, 2))  # spatial affinity, (B, N, N)

    # G^0: one node per token, V^0 = F, M^0 = I (so M^0 A = A), E^0 = the 4-neighbour grid
    batch = torch.arange(B, device=dev).repeat_interleave(n)
    g = _Graph(A.reshape(B * n, n), A.new_ones(B * n), Fb.reshape(B * n, d), batch, B)
    del A
    e = grid_edges(h, w, dev)
    offs = (torch.arange(B, device=dev) * n).view(B, 1, 1)
    g.u, g.v = (e.view(1, 2, -1) + offs).permute(1, 0, 2).reshape(2, -1)
    tok = torch.arange(B * n, device=dev).view(B, n)      # token -> global supernode
    tok_batch = torch.arange(B, device=dev).view(B, 1).expand(B, n)
    prev_grams = None

    inst_parts, inst_feats, sem_parts, sem_feats = [], [], [], []
    for t, tau in enumerate(cfg.thresholds):
        # ---- instance pooling: identify (Eq. 2-4 on the edges, threshold, components)
        g.esim = _instance_similarity(g, t == 0, B, h, w, cfg, chunk_elems)
        sel = g.esim > tau
        roots = connected_components(g.num_nodes, g.u[sel], g.v[sel])
        # ---- merge (Eq. 5, 6)
        g, comp = _merge(g, roots, Fb, cfg, chunk_elems, with_edges=True)
        tok = comp[tok]
        inst_parts.append(tok - g.starts[tok_batch])
        inst_feats.append((g.feats, list(g.counts)))

        # ---- semantic pooling on the fully connected graph of the supernodes
        roots_s = _semantic_components(g, tau, cfg, n, chunk_elems, prev_grams)
        prev_grams = g.grams
        gs, comp_s = _merge(g, roots_s, Fb, cfg, chunk_elems, with_edges=False)
        sem_parts.append(comp_s[tok] - gs.starts[tok_batch])
        sem_feats.append((gs.feats, list(gs.counts)))

    results = []
    for b in range(B):
        def split(feats_counts):
            feats, counts = feats_counts
            st = sum(counts[:b])
            return feats[st:st + counts[b]]

        results.append(assemble_result(
            h, w, cfg.thresholds, cfg.phi,
            [p[b] for p in inst_parts], [split(x) for x in inst_feats],
            [p[b] for p in sem_parts], [split(x) for x in sem_feats],
        ))
    return results
