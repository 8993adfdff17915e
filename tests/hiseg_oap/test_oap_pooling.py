"""Tests of the OAP pseudo-mask generator (reference and fast) and the MaskCut baseline.

All on CPU with synthetic feature maps (no pretrained weights are needed).
"""
import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components as scipy_cc

from hiseg.modeling.vit import make_timm_vit
from hiseg_oap.pooling import (
    MaskCutConfig, OAPConfig, connected_components, generate_pseudo_masks, maskcut, oap_fast, oap_reference,
    vit_key_features,
)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Graphs here are small: one intra-op thread avoids thread wake-ups dominating (and being
    slow on a busy machine). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- feature makers
def planted(h, w, d, rects, noise=0.02, seed=0, same=(), orthogonal=False):
    """Background (region 0) plus rectangles ``(r0, r1, c0, c1)`` (regions 1..), each region with
    its own random direction plus small per-token noise; ``same`` lists region pairs that share
    a direction. Returns ``(1, d, h, w)`` features and the ``(h, w)`` region map."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(len(rects) + 1, d, generator=g, dtype=F64)
    if orthogonal:
        dirs = torch.linalg.qr(dirs.T)[0].T
    for a, b in same:
        dirs[b] = dirs[a]
    regions = torch.zeros(h, w, dtype=torch.long)
    for k, (r0, r1, c0, c1) in enumerate(rects):
        regions[r0:r1, c0:c1] = k + 1
    f = dirs[regions] + noise * torch.randn(h, w, d, generator=g, dtype=F64)
    return f.permute(2, 0, 1)[None].contiguous(), regions


def smooth_random(h, w, d, sigma=1.0, noise=0.3, seed=0):
    """Spatially correlated random features (Gaussian-filtered noise, unit variance, plus white
    noise): supernodes merge gradually over the layers."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((d, h, w))
    x = np.stack([ndimage.gaussian_filter(c, sigma) for c in x])
    x = x / x.std() + noise * rng.standard_normal((d, h, w))
    return torch.from_numpy(x)[None]


def random_feats(h, w, d, seed=0):
    return torch.randn(1, d, h, w, generator=torch.Generator().manual_seed(seed), dtype=F64)


def region_masks(regions):
    return {tuple(np.flatnonzero(regions.numpy().ravel() == k)) for k in regions.unique().tolist()}


def mask_set(level):
    return {tuple(np.flatnonzero(m.numpy().ravel())) for m in level.masks}


def canonical(partition):
    """Relabel a partition by order of first appearance (label-order independent comparison)."""
    flat = partition.reshape(-1).tolist()
    seen = {}
    return torch.tensor([seen.setdefault(v, len(seen)) for v in flat]).view(partition.shape)


def assert_same(ra, rb, features_atol=1e-9):
    assert len(ra.layers) == len(rb.layers)
    for la, lb in zip(ra.layers, rb.layers):
        for name in ("instance", "semantic"):
            a, b = la.level(name), lb.level(name)
            assert torch.equal(canonical(a.partition), canonical(b.partition)), (la.threshold, name)
            assert torch.equal(a.masks, b.masks)
            assert torch.equal(a.parents, b.parents)
            assert torch.equal(a.nested, b.nested)
            torch.testing.assert_close(a.features.double(), b.features.double(),
                                       atol=features_atol, rtol=0)
        assert torch.equal(la.instance_to_semantic, lb.instance_to_semantic)


# ----------------------------------------------------------------------------- planted regions
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_planted_rectangles_recovered(impl):
    x, regions = planted(16, 20, 32, [(1, 6, 2, 8), (8, 14, 3, 9), (4, 12, 12, 18)])
    res = oap_fast(x)[0] if impl == "fast" else oap_reference(x)[0]
    truth = region_masks(regions)
    assert len(res.layers) == 5
    for layer in res.layers:
        assert mask_set(layer.instance) == truth
        assert mask_set(layer.semantic) == truth
        assert layer.instance.masks.shape[1:] == (16, 20)
        norms = layer.instance.features.norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms))


def test_same_feature_rectangles_two_instances_one_semantic():
    x, regions = planted(16, 20, 32, [(1, 6, 2, 8), (9, 14, 12, 18)], same=[(1, 2)])
    res = oap_fast(x, dtype=F64)[0]
    bg = regions == 0
    union = regions > 0
    for layer in res.layers:
        assert mask_set(layer.instance) == region_masks(regions)   # 3 instances
        sem = mask_set(layer.semantic)
        assert len(sem) == 2
        assert sem == {tuple(np.flatnonzero(bg.numpy().ravel())),
                       tuple(np.flatnonzero(union.numpy().ravel()))}
        # the two rectangles map to the same semantic mask, the background to the other
        i2s = layer.instance_to_semantic.tolist()
        order = [int(regions.view(-1)[m.view(-1)][0]) for m in layer.instance.masks]
        by_region = dict(zip(order, i2s))
        assert by_region[1] == by_region[2] != by_region[0]


# ----------------------------------------------------------------------------- structure
STRUCTURE_CASES = [
    ("smooth", lambda: smooth_random(20, 24, 16, seed=1)),
    ("random", lambda: random_feats(14, 17, 8, seed=2)),
    ("planted", lambda: planted(12, 18, 16, [(0, 5, 0, 6), (6, 12, 9, 15)], noise=0.3)[0]),
]


@pytest.fixture(scope="module")
def structure_results():
    cfg = OAPConfig(phi=3)
    return {name: oap_fast(make(), cfg, dtype=F64)[0] for name, make in STRUCTURE_CASES}


@pytest.mark.parametrize("case", [c[0] for c in STRUCTURE_CASES])
def test_instance_masks_connected(structure_results, case):
    res = structure_results[case]
    total = 0
    for layer in res.layers:
        part = layer.instance.partition.numpy()
        for k in np.unique(part):  # every supernode, kept or not
            _, ncomp = ndimage.label(part == k)  # 4-connectivity
            assert ncomp == 1
        for m in layer.instance.masks:
            assert ndimage.label(m.numpy())[1] == 1
        total += len(layer.instance)
    assert total > 0


@pytest.mark.parametrize("case", [c[0] for c in STRUCTURE_CASES])
def test_semantic_masks_are_unions_of_instance_masks(structure_results, case):
    res = structure_results[case]
    for layer in res.layers:
        ip, sp = layer.instance.partition.view(-1), layer.semantic.partition.view(-1)
        for k in ip.unique():  # semantic partition constant on every instance supernode
            assert sp[ip == k].unique().numel() == 1
        for s_idx, m in enumerate(layer.semantic.masks):
            inst_ids = ip[m.view(-1)].unique()
            assert torch.equal(torch.isin(ip, inst_ids), m.view(-1))
        for k, m in enumerate(layer.instance.masks):
            sem = layer.semantic.masks[layer.instance_to_semantic[k]]
            assert bool((sem | ~m).all())
        # (counting all supernodes: kept semantic masks may outnumber the kept instance masks,
        # since instance supernodes below phi can join into a semantic mask above it)
        assert sp.unique().numel() <= ip.unique().numel()


@pytest.mark.parametrize("case", [c[0] for c in STRUCTURE_CASES])
def test_every_mask_inside_exactly_one_mask_of_next_layer(structure_results, case):
    res = structure_results[case]
    for t in range(len(res.layers) - 1):
        cur, nxt = res.layers[t].instance, res.layers[t + 1].instance
        # full partitions refine each other
        cp, np_ = cur.partition.view(-1), nxt.partition.view(-1)
        for k in cp.unique():
            assert np_[cp == k].unique().numel() == 1
        for k, m in enumerate(cur.masks):
            inside = [j for j, mm in enumerate(nxt.masks) if bool((mm | ~m).all())]
            touching = [j for j, mm in enumerate(nxt.masks) if bool((mm & m).any())]
            assert inside == touching == [int(cur.parents[k])]
        assert bool(cur.nested.all())
    last = res.layers[-1]
    assert bool((last.instance.parents == -1).all()) and bool((last.semantic.parents == -1).all())


def test_higher_threshold_gives_finer_partition():
    x = smooth_random(18, 22, 16, seed=3)
    taus = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    parts = [oap_fast(x, OAPConfig(thresholds=[t], phi=1), dtype=F64)[0].layers[0].instance
             for t in taus]
    counts = [len(p) for p in parts]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    for fine, coarse in zip(parts[:-1], parts[1:]):  # each partition refines the next
        fp, cp = fine.partition.view(-1), coarse.partition.view(-1)
        for k in fp.unique():
            assert cp[fp == k].unique().numel() == 1
    # across the layers of one run, the supernodes only merge
    res = oap_fast(x, OAPConfig(phi=1), dtype=F64)[0]
    n = [len(layer.instance) for layer in res.layers]
    assert n == sorted(n, reverse=True)


# ----------------------------------------------------------------------------- reference == fast
EQUALITY_CASES = {
    "random_d8": lambda: random_feats(9, 13, 8, seed=4),
    "random_d32_square": lambda: random_feats(12, 12, 32, seed=5),
    "smooth": lambda: smooth_random(15, 11, 12, sigma=0.7, seed=6),
    "smooth_d32": lambda: smooth_random(15, 11, 32, noise=0.6, seed=6),
    "random_d96": lambda: random_feats(12, 14, 96, seed=20),  # few merges: carried values
    "planted_noisy": lambda: planted(10, 16, 16, [(0, 4, 0, 5), (5, 10, 8, 14)], noise=0.4,
                                     seed=7)[0],
    "one_row": lambda: smooth_random(1, 23, 8, sigma=0.7, seed=8),
}


@pytest.mark.parametrize("case", list(EQUALITY_CASES))
def test_reference_equals_fast(case):
    x = EQUALITY_CASES[case]()
    cfg = OAPConfig(phi=2)
    assert_same(oap_reference(x, cfg)[0], oap_fast(x, cfg, dtype=F64)[0])


def test_reference_equals_fast_batch_with_different_content():
    xs = [random_feats(11, 14, 12, seed=9), smooth_random(11, 14, 12, seed=10),
          planted(11, 14, 12, [(2, 8, 3, 9)], noise=0.2, seed=11)[0]]
    x = torch.cat(xs)
    cfg = OAPConfig(phi=2)
    fast = oap_fast(x, cfg, dtype=F64)
    ref = oap_reference(x, cfg)
    assert len(fast) == 3
    for b in range(3):
        assert_same(ref[b], fast[b])
        assert_same(fast[b], oap_fast(xs[b], cfg, dtype=F64)[0])  # batch-independent


@pytest.mark.parametrize("cfg", [
    OAPConfig(vote_normalize=True, phi=2),
    OAPConfig(thresholds=[0.9, 0.75, 0.6, 0.45, 0.3, 0.15], w_f=0.4, w_s=0.6, sigma=0.2, phi=1),
])
def test_reference_equals_fast_other_settings(cfg):
    for x in (random_feats(10, 12, 8, seed=12), smooth_random(10, 12, 8, seed=13)):
        assert_same(oap_reference(x, cfg)[0], oap_fast(x, cfg, dtype=F64)[0])


def test_reference_skipping_equals_exhaustive():
    cfg = OAPConfig(phi=1)
    for x in (random_feats(8, 10, 8, seed=14), smooth_random(9, 9, 8, seed=15)):
        assert_same(oap_reference(x, cfg)[0], oap_reference(x, cfg, exhaustive=True)[0],
                    features_atol=0)


def test_fast_float32_matches_reference_on_planted():
    x, _ = planted(16, 20, 32, [(1, 6, 2, 8), (8, 14, 3, 9), (4, 12, 12, 18)], noise=0.05)
    assert_same(oap_reference(x)[0], oap_fast(x.float())[0], features_atol=1e-5)


def test_degenerate_inputs():
    # a single token
    r = oap_fast(torch.randn(1, 4, 1, 1), OAPConfig(phi=1))[0]
    assert all(len(lay.instance) == 1 and len(lay.semantic) == 1 for lay in r.layers)
    # identical features everywhere: one mask from the first layer on
    x = torch.ones(2, 6, 5, 7)
    for r in oap_fast(x) + oap_reference(x):
        assert all(lay.instance.masks.shape == (1, 5, 7) for lay in r.layers)
        assert bool(r.layers[0].instance.masks.all())


# ----------------------------------------------------------------------------- components
def test_connected_components_matches_scipy():
    rng = np.random.default_rng(0)
    for n, m in [(1, 0), (50, 0), (200, 150), (300, 600), (500, 2000)]:
        u = torch.from_numpy(rng.integers(0, n, m))
        v = torch.from_numpy(rng.integers(0, n, m))
        lab = connected_components(n, u, v)
        g = coo_matrix((np.ones(m), (u.numpy(), v.numpy())), shape=(n, n))
        _, ref = scipy_cc(g, directed=False)
        assert torch.equal(canonical(lab), canonical(torch.from_numpy(ref)))
        # label = smallest member of the component
        for c in np.unique(ref):
            members = np.flatnonzero(ref == c)
            assert bool((lab[members] == members.min()).all())
    # long path in scrambled order, and incremental use
    n = 1000
    perm = torch.from_numpy(rng.permutation(n))
    u, v = perm[:-1], perm[1:]
    assert bool((connected_components(n, u, v) == 0).all())
    half = connected_components(n, u[:500], v[:500])
    assert bool((connected_components(n, u[500:], v[500:], init=half) == 0).all())


# ----------------------------------------------------------------------------- MaskCut
def test_maskcut_finds_planted_square():
    x, regions = planted(16, 18, 32, [(5, 11, 4, 10)], noise=0.1, seed=16, orthogonal=True)
    res = maskcut(x)[0]
    assert res.method == "maskcut" and len(res.layers) == 1
    inst = res.layers[0].instance
    assert len(inst) >= 1
    assert torch.equal(inst.masks[0], regions == 1)
    assert bool((inst.masks.sum(0) <= 1).all())  # later masks exclude earlier tokens
    assert len(res.layers[0].semantic) == 0


def test_maskcut_drops_repeated_and_tiny_masks():
    # a single object: the second cut cannot find a new large object
    x, regions = planted(16, 16, 16, [(4, 12, 4, 12)], noise=0.05, seed=17, orthogonal=True)
    inst = maskcut(x, MaskCutConfig(num_masks=3))[0].layers[0].instance
    assert torch.equal(inst.masks[0], regions == 1)
    # the second cut separates the zeroed tokens of the first mask again (IoU 1): dropped
    assert len(inst) == 1


def test_maskcut_two_objects():
    x, regions = planted(16, 18, 32, [(6, 12, 5, 11), (1, 4, 1, 15)], noise=0.1, seed=16,
                         orthogonal=True)
    inst = maskcut(x)[0].layers[0].instance
    assert len(inst) == 2
    found = {tuple(np.flatnonzero(m.numpy().ravel())) for m in inst.masks}
    assert found == {tuple(np.flatnonzero((regions == k).numpy().ravel())) for k in (1, 2)}


# ----------------------------------------------------------------------------- features / API
@pytest.mark.parametrize("patch,img", [(8, (40, 56)), (14, (42, 70))])
def test_vit_key_features_and_pipeline(patch, img):
    torch.manual_seed(0)
    vit = make_timm_vit(patch_size=patch, embed_dim=48, depth=2, num_heads=4).eval()
    images = torch.randn(2, 3, *img)
    keys = vit_key_features(vit, images)
    h, w = img[0] // patch, img[1] // patch
    assert keys.shape == (2, 48, h, w)
    # the same k computed by hand from the last block's normalised input
    store = {}
    hk = vit.blocks[-1].norm1.register_forward_hook(lambda m, i, o: store.setdefault("x", o))
    with torch.no_grad():
        vit.forward_features(images)
    hk.remove()
    qkv = vit.blocks[-1].attn.qkv
    k = store["x"] @ qkv.weight[48:96].T + qkv.bias[48:96]
    k = k[:, vit.num_prefix_tokens:].transpose(1, 2).reshape(2, 48, h, w)
    torch.testing.assert_close(keys, k)
    for method in ("oap", "maskcut"):
        res = generate_pseudo_masks(keys, method=method)
        assert len(res) == 2
        for r in res:
            assert r.feature_size == (h, w)
            up = r.upsample(img, "instance")
            assert up.shape[1:] == img and up.dtype == torch.bool


def test_upsample_keeps_partition():
    x = smooth_random(7, 9, 8, seed=18)
    r = oap_fast(x, OAPConfig(phi=1))[0]
    level = r.layers[0].instance
    up = level.upsample((56, 72))
    assert up.shape == (len(level), 56, 72)
    assert bool((up.sum(0) == 1).all())  # phi=1: the masks tile the image
    assert torch.equal(up[:, ::8, ::8], level.masks)
    soft = level.upsample((50, 61), mode="bilinear")
    assert soft.shape == (len(level), 50, 61)
    assert torch.equal(level.label_map(), level.partition)  # phi=1 keeps every supernode
