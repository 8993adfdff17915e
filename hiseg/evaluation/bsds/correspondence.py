"""One-to-one correspondence of boundary pixels within a distance tolerance: the benchmark's
``correspondPixels`` / ``match.cc`` (Martin et al. 2004), with an exact and a fast deterministic
solver (see :func:`correspond_pixels`)."""
from typing import Tuple

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import breadth_first_order, min_weight_full_bipartite_matching

__all__ = ["DEFAULT_MAX_DIST", "DEFAULT_OUTLIER_COST", "MATCHING_METHODS", "correspond_pixels"]

#: Matching tolerance as a fraction of the image diagonal (benchmark default ``maxDist``).
DEFAULT_MAX_DIST = 0.0075
#: Cost of leaving a pixel unmatched, in units of the matching radius (``correspondPixels``).
DEFAULT_OUTLIER_COST = 100.0
# correspondPixels converts distances to integers with this multiplier before running CSA.
_COST_MULTIPLIER = 100

MATCHING_METHODS = ("optimal", "greedy")


def _disk_offsets(radius: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer offsets within ``radius``, sorted by distance, and their costs (distance in 1/100
    pixel, rounded, as the integer weights of match.cc)."""
    r = int(np.ceil(radius))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    keep = (dy * dy + dx * dx) <= radius * radius
    dy, dx = dy[keep].astype(np.int64), dx[keep].astype(np.int64)
    cost = np.rint(np.sqrt(dy * dy + dx * dx) * _COST_MULTIPLIER).astype(np.int64)
    order = np.lexsort((dx, dy, cost))
    return dy[order], dx[order], cost[order]


class _HumanBoundary:
    """One human boundary map, prepared once per image and reused across thresholds.

    Holds the pixel list, a padded flat pixel -> index map (so that neighbour look-ups need no
    bounds checks) and the mask of the pixels within the matching radius of a human pixel.
    """

    __slots__ = ("shape", "count", "ys", "xs", "pad", "stride", "index", "near", "offsets", "costs")

    def __init__(self, bmap: np.ndarray, radius: float):
        bmap = np.asarray(bmap, dtype=bool)
        self.shape = bmap.shape
        h, w = bmap.shape
        dy, dx, self.costs = _disk_offsets(radius)
        self.pad = int(np.ceil(radius))
        self.stride = w + 2 * self.pad
        self.offsets = dy * self.stride + dx
        self.ys, self.xs = np.nonzero(bmap)
        self.count = int(self.ys.size)
        self.index = np.full((h + 2 * self.pad) * self.stride, -1, dtype=np.int64)
        flat = self.flat(self.ys, self.xs)
        self.index[flat] = np.arange(self.count)
        near = np.zeros(self.index.size, dtype=bool)
        if self.count:
            near[(flat[:, None] + self.offsets[None, :]).ravel()] = True
        self.near = near

    def flat(self, ys, xs):
        return (ys + self.pad) * self.stride + (xs + self.pad)


def _match_radius(shape, max_dist: float) -> float:
    h, w = shape
    return float(max_dist) * float(np.hypot(h, w))


def _compact(ids: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """Distinct values of ``ids`` (sorted) and the position of each element among them."""
    present = np.zeros(n, dtype=bool)
    present[ids] = True
    lut = np.cumsum(present) - 1
    return np.flatnonzero(present), lut[ids]


def _candidate_pairs(ys1, xs1, human: _HumanBoundary):
    """All (machine, human) pixel pairs within the radius, in order of increasing cost: indices
    into ``ys1``, indices into the human pixel list, and integer costs."""
    flat = human.flat(ys1, xs1)
    cand = np.flatnonzero(human.near[flat])
    # offset-major layout: pairs come out sorted by cost, then offset, then machine pixel
    jj = human.index[human.offsets[:, None] + flat[None, cand]]
    off, col = np.nonzero(jj >= 0)
    return cand[col], jj[off, col], human.costs[off]


def _solve_optimal(a, b, cost, n1, n2, outlier):
    """Exact minimum of match.cc's objective (see :func:`correspond_pixels`)."""
    # Rows: the smaller side; columns: the other side plus one private "outlier" column per row.
    # Every row must be matched (always possible through the outlier columns), so the cost is
    # sum(distances) + outlier * (rows left unmatched), which equals match.cc's objective
    # sum(distances) + outlier * (n1 + n2 - matched) up to a constant.
    swap = n1 > n2
    rows, cols, nr, nc = (b, a, n2, n1) if swap else (a, b, n1, n2)
    ar = np.arange(nr)
    # +1 on every edge: a full matching has nr edges so the optimum is unchanged, and the sparse
    # solver needs non-zero weights
    weights = np.concatenate([cost.astype(np.float64), np.full(nr, float(outlier))]) + 1.0
    ij = (np.concatenate([rows, ar]), np.concatenate([cols, nc + ar]))
    graph = csr_matrix((weights, ij), shape=(nr, nc + nr))
    r_ind, c_ind = min_weight_full_bipartite_matching(graph)
    real = c_ind < nc
    r_ind, c_ind = r_ind[real], c_ind[real]
    return (c_ind, r_ind) if swap else (r_ind, c_ind)


def _greedy_by_cost(a, b, cost, n1, n2):
    """Greedy matching in order of increasing distance, computed in parallel rounds: within a
    distance level every free machine pixel proposes its first free candidate and every human
    pixel accepts its lowest-numbered proposer. ``cost`` must be sorted (non-decreasing)."""
    mate1 = np.full(n1, -1, dtype=np.int64)
    mate2 = np.full(n2, -1, dtype=np.int64)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(cost)) + 1, [cost.size]])
    first = np.empty(n1, dtype=np.int64)
    best = np.empty(n2, dtype=np.int64)
    for s, e in zip(bounds[:-1], bounds[1:]):
        ra, rb = a[s:e], b[s:e]
        while ra.size:
            act = (mate1[ra] < 0) & (mate2[rb] < 0)
            ra, rb = ra[act], rb[act]
            if ra.size == 0:
                break
            # first remaining candidate of each machine pixel
            pos = np.arange(ra.size)
            first.fill(ra.size)
            np.minimum.at(first, ra, pos)
            prop = pos[first[ra] == pos]
            pa, pb = ra[prop], rb[prop]
            # each human pixel accepts its lowest-numbered proposer
            best.fill(n1)
            np.minimum.at(best, pb, pa)
            win = best[pb] == pa
            mate1[pa[win]] = pb[win]
            mate2[pb[win]] = pa[win]
    return mate1, mate2


def _csr_graph_sorted(src: np.ndarray, dst: np.ndarray, n: int) -> csr_matrix:
    """Unweighted directed graph ``src -> dst`` as CSR; ``src`` must be sorted (non-decreasing).
    Duplicate edges are kept (harmless for a breadth-first search)."""
    indptr = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(np.bincount(src, minlength=n), out=indptr[1:])
    data = np.ones(src.size, dtype=np.float64)
    return csr_matrix((data, dst.astype(np.int32), indptr), shape=(n, n))


def _first_per_group(groups: np.ndarray) -> np.ndarray:
    """Positions of the first element of each distinct value of ``groups``."""
    _, idx = np.unique(groups, return_index=True)
    return np.sort(idx)


def _augment_to_maximum(a, b, n1, n2, mate1, mate2):
    """Grow a matching to maximum cardinality with vertex-disjoint shortest augmenting paths,
    repeated until none is left (Berge's theorem: the matching is then maximum).

    Alternating paths are searched breadth first from all free machine pixels at once, on the
    machine pixels: machine ``i`` leads to machine ``mate(j)`` for every matched candidate ``j``
    of ``i``; a path ends at a machine pixel that has a free candidate. Paths of the search tree
    that start at different free pixels are vertex-disjoint, so one path per start (and per free
    human pixel) is flipped in each round, all at once.
    """
    source = n1  # the search starts from a virtual node linked to every free machine pixel
    by_machine = np.argsort(a, kind="stable")
    a, b = a[by_machine], b[by_machine]
    while True:
        free1 = np.flatnonzero(mate1 < 0)
        if free1.size == 0 or not (mate2 < 0).any():
            break
        mb = mate2[b]
        to_free = mb < 0
        if not to_free.any():
            break  # no machine pixel has a free candidate: no augmenting path can end anywhere
        step = (~to_free) & (mb != a)
        src = np.concatenate([a[step], np.full(free1.size, source)])
        dst = np.concatenate([mb[step], free1])
        order, pred = breadth_first_order(
            _csr_graph_sorted(src, dst, n1 + 1), source, directed=True, return_predecessors=True
        )
        is_end = np.zeros(n1 + 1, dtype=bool)
        is_end[a[to_free]] = True
        ends = order[is_end[order]]  # breadth-first order: shortest paths first
        if ends.size == 0:
            break
        partner = np.full(n1, -1, dtype=np.int64)
        partner[a[to_free]] = b[to_free]  # any free candidate will do
        # start (free machine pixel) of every node's path, by pointer jumping
        up = np.arange(n1 + 1)
        reached = pred >= 0
        up[reached] = pred[reached]
        up[free1] = free1
        up[source] = source
        while True:
            nxt = up[up]
            if np.array_equal(nxt, up):
                break
            up = nxt
        ends = ends[_first_per_group(up[ends])]
        ends = ends[_first_per_group(partner[ends])]
        # mark the chosen paths
        on_path = np.zeros(n1 + 1, dtype=bool)
        cur = ends
        while cur.size:
            on_path[cur] = True
            cur = pred[cur]
            cur = cur[cur != source]
        nodes = np.flatnonzero(on_path[:n1])
        parents = pred[nodes]
        inner = parents != source
        old = mate1.copy()
        # every node hands its human pixel to its predecessor; path ends take a free one
        mate1[parents[inner]] = old[nodes[inner]]
        mate1[ends] = partner[ends]
        mate2[mate1[nodes]] = nodes
    return mate1, mate2


def _prefer_closer(a, b, cost, n1, n2, mate1, mate2, max_rounds: int = 20):
    """Local cost improvement that keeps the cardinality: an unmatched machine pixel takes a
    human pixel from its current partner when it is strictly closer to it (the alternating paths
    of length two of a min-cost matching), in parallel rounds."""
    for _ in range(max_rounds):
        cur = np.full(n2, np.iinfo(np.int64).max, dtype=np.int64)
        on = mate1[a] == b
        cur[b[on]] = cost[on]
        cand = (mate1[a] < 0) & (mate2[b] >= 0) & (cost < cur[b])
        if not cand.any():
            break
        ca, cb = a[cand], b[cand]
        gain = cur[cb] - cost[cand]
        o = np.lexsort((cb, -gain, ca))  # best gain per machine pixel
        ca, cb, gain = ca[o], cb[o], gain[o]
        first = np.ones(ca.size, dtype=bool)
        first[1:] = ca[1:] != ca[:-1]
        ca, cb, gain = ca[first], cb[first], gain[first]
        o = np.lexsort((ca, -gain, cb))  # best gain per human pixel
        ca, cb = ca[o], cb[o]
        first = np.ones(cb.size, dtype=bool)
        first[1:] = cb[1:] != cb[:-1]
        ca, cb = ca[first], cb[first]
        mate1[mate2[cb]] = -1
        mate1[ca] = cb
        mate2[cb] = ca
    return mate1, mate2


def _solve_greedy(a, b, cost, n1, n2):
    mate1, mate2 = _greedy_by_cost(a, b, cost, n1, n2)
    mate1, mate2 = _augment_to_maximum(a, b, n1, n2, mate1, mate2)
    # swaps keep every human pixel matched, so the matching stays maximum
    mate1, mate2 = _prefer_closer(a, b, cost, n1, n2, mate1, mate2)
    i = np.flatnonzero(mate1 >= 0)
    return i, mate1[i]


def _correspond(ys1, xs1, human: _HumanBoundary, radius: float, outlier_cost: float, matching: str):
    """Matched machine pixels (indices into ``ys1``) and human pixels (indices into the human's
    pixel list); see :func:`correspond_pixels`."""
    empty = np.zeros(0, dtype=np.int64)
    if ys1.size == 0 or human.count == 0:
        return empty, empty
    ii, jj, cost = _candidate_pairs(ys1, xs1, human)
    if ii.size == 0:
        return empty, empty
    u1, a = _compact(ii, ys1.size)
    u2, b = _compact(jj, human.count)
    if matching == "optimal":
        outlier = np.ceil(outlier_cost * radius * _COST_MULTIPLIER)
        i, j = _solve_optimal(a, b, cost, u1.size, u2.size, outlier)
    elif matching == "greedy":
        i, j = _solve_greedy(a, b, cost, u1.size, u2.size)
    else:
        raise ValueError(f"unknown matching {matching!r}, expected one of {MATCHING_METHODS}")
    return u1[i], u2[j]


def correspond_pixels(
    bmap1: np.ndarray,
    bmap2: np.ndarray,
    max_dist: float = DEFAULT_MAX_DIST,
    outlier_cost: float = DEFAULT_OUTLIER_COST,
    matching: str = "optimal",
) -> Tuple[np.ndarray, np.ndarray]:
    """One-to-one correspondence of two boundary maps, as BSDS ``correspondPixels`` (Martin et al.
    2004; Arbelaez et al. 2011).

    Two boundary pixels may correspond when their Euclidean distance is at most
    ``max_dist * hypot(H, W)`` pixels. The benchmark (``match.cc``) picks the correspondence of
    minimum cost, where a pair costs its distance (in 1/100 pixel, rounded) and every unmatched
    pixel ``outlier_cost`` times the tolerance; as the outlier cost dwarfs distances, this is a
    maximum-cardinality matching that, among those, prefers short distances.

    ``matching="optimal"`` minimises exactly that cost (a sparse rectangular assignment problem
    solved with scipy's LAPJVsp). The benchmark's CSA solver only sees a random subset of the
    outlier edges, so it is slightly sub-optimal and not deterministic: on the benchmark sample
    this implementation matches a few more pixels (at most 0.3% of the counts).

    ``matching="greedy"`` is 3-5x faster on typical maps: a greedy matching by increasing
    distance, grown to maximum cardinality with augmenting paths (so the number of matched pixels
    is exactly that of the optimum), then locally improved so that unmatched pixels take partners
    they are closer to. Only the choice among equally large matchings is approximate, which
    moves the precision counts by well under 1%.

    Returns boolean maps ``(match1, match2)``: which pixels of ``bmap1`` / ``bmap2`` are matched.
    """
    bmap1 = np.asarray(bmap1, dtype=bool)
    bmap2 = np.asarray(bmap2, dtype=bool)
    if bmap1.shape != bmap2.shape:
        raise ValueError(f"boundary maps differ in shape: {bmap1.shape} vs {bmap2.shape}")
    radius = _match_radius(bmap1.shape, max_dist)
    human = _HumanBoundary(bmap2, radius)
    ys1, xs1 = np.nonzero(bmap1)
    i1, i2 = _correspond(ys1, xs1, human, radius, outlier_cost, matching)
    m1 = np.zeros(bmap1.shape, dtype=bool)
    m2 = np.zeros(bmap2.shape, dtype=bool)
    m1[ys1[i1], xs1[i1]] = True
    m2[human.ys[i2], human.xs[i2]] = True
    return m1, m2
