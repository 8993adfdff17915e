"""UniAP, the pooling the OAP authors released with S2-UniSeg (``hiseg_oap.pooling.uniap``): the fast
batched form and the literal reference against a small independent implementation written here
(from the release's description: raw features summed per node, cosine edge scores, repeated
contraction within each threshold, clusters of >= 4 tokens, only nodes with an edge emitted), in
float32 and float64, alone and batched; the generator options, the segmenter's targets and a
training step with ``MODEL.OAP.POOLING.VARIANT: uniap``; every thread pool pinned."""
import os

import numpy as np
import pytest
import torch

from hiseg_oap.pooling import (
    OAP_VARIANTS, OAPGenerator, UniAPConfig, UniAPGenerator, build_oap_generator, uniap_fast, uniap_reference,
)
from hiseg_oap.pooling.uniap import release_grid_edges
from helpers import REPO, load_tool

THRESHOLDS = (0.8, 0.7, 0.6, 0.5, 0.4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- independent model
def independent_uniap(feat: np.ndarray, thresholds, min_size):
    """Per threshold, the set of emitted clusters (frozensets of raster token indices).

    Dictionaries of nodes: raw summed feature, member tokens, neighbour set; merge by union-find
    over all edges whose cosine exceeds the threshold; repeat until none does.
    """
    c, h, w = feat.shape
    eps = feat.dtype.type(1e-10)
    x = {y * w + i: feat[:, y, i].copy() for y in range(h) for i in range(w)}
    members = {k: {k} for k in x}
    nbrs = {k: set() for k in x}
    for y in range(h):
        for i in range(w):
            k = y * w + i
            if i + 1 < w:
                nbrs[k].add(k + 1)
                nbrs[k + 1].add(k)
            if y + 1 < h:
                nbrs[k].add(k + w)
                nbrs[k + w].add(k)

    def cos(a, b):
        return float(np.dot(a / max(np.linalg.norm(a), eps), b / max(np.linalg.norm(b), eps)))

    out = []
    for tau in thresholds:
        while True:
            hot = [(a, b) for a in x for b in nbrs[a] if a < b and cos(x[a], x[b]) > tau]
            if not hot:
                break
            parent = {k: k for k in x}

            def find(k):
                while parent[k] != k:
                    k = parent[k]
                return k

            for a, b in hot:
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
            groups = {}
            for k in x:
                groups.setdefault(find(k), []).append(k)
            x = {r: np.sum([x[k] for k in ks], axis=0, dtype=feat.dtype) for r, ks in groups.items()}
            members = {r: set().union(*(members[k] for k in ks)) for r, ks in groups.items()}
            nbrs = {r: {find(n) for k in ks for n in nbrs[k]} - {r} for r, ks in groups.items()}
        out.append({frozenset(members[k]) for k in x if nbrs[k] and len(members[k]) >= min_size})
    return out


def maps(n, h=10, w=12, d=6, seed=0, dtype=torch.float64):
    """``(n, d, h, w)`` raw features with a hierarchy: blocks of related directions (parents with
    children at various similarities), random per-token magnitudes 0.5-2 (the release sums raw
    features, so magnitudes matter) and per-token noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        parents = rng.standard_normal((3, d))
        lab = np.zeros((h, w), dtype=np.int64)
        dirs = []
        for k in range(9):
            dirs.append(parents[k % 3] + rng.uniform(0.2, 1.2) * rng.standard_normal(d))
        r = rng.integers(2, h - 2, size=2)
        cc = rng.integers(2, w - 2, size=2)
        rows = np.digitize(np.arange(h), np.sort(r))
        cols = np.digitize(np.arange(w), np.sort(cc))
        lab = rows[:, None] * 3 + cols[None, :]
        f = np.stack(dirs)[lab]
        f = f / np.linalg.norm(f, axis=-1, keepdims=True)
        f = f + 0.25 * rng.standard_normal((h, w, d))
        f = f * rng.uniform(0.5, 2.0, size=(h, w, 1))
        out.append(f.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out)).to(dtype)


def clusters(res):
    """Per layer, the set of instance masks as frozensets of raster token indices."""
    return [{frozenset(np.flatnonzero(m.flatten().numpy()).tolist()) for m in lay.instance.masks}
            for lay in res.layers]


def assert_same(a, b, exact_features=True):
    for la, lb in zip(a.layers, b.layers):
        for name in ("instance", "semantic"):
            x, y = la.level(name), lb.level(name)
            assert torch.equal(x.partition, y.partition)
            assert torch.equal(x.masks, y.masks)
            assert torch.equal(x.parents, y.parents)
            if exact_features:
                assert torch.equal(x.features, y.features)
            else:
                torch.testing.assert_close(x.features, y.features)


# ----------------------------------------------------------------------------- equality
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_and_reference_equal_the_independent_model_alone_and_batched(dtype):
    x = maps(4, dtype=dtype, seed=1)
    cfg = UniAPConfig()
    batched = uniap_fast(x, cfg)
    ref = uniap_reference(x, cfg)
    nonempty = 0
    for i in range(x.shape[0]):
        expect = independent_uniap(x[i].numpy(), cfg.thresholds, cfg.min_size)
        alone = uniap_fast(x[i:i + 1], cfg)[0]
        for got in (batched[i], ref[i], alone):
            assert clusters(got) == expect
            assert got.method == "uniap" and len(got.layers) == len(cfg.thresholds)
        assert_same(batched[i], alone)  # an image's result does not depend on the batch
        assert_same(batched[i], ref[i], exact_features=False)
        assert batched[i].layers[0].instance.features.dtype == dtype
        nonempty += sum(len(lay.instance) > 0 for lay in batched[i].layers)
        # several distinct partitions along the thresholds: the maps exercise the hierarchy
        assert len({len(c) for c in expect}) > 1 or len(expect[0]) > 1
    assert nonempty >= 8
    # the order of a batch does not matter either
    rev = uniap_fast(x.flip(0), cfg)
    for i in range(x.shape[0]):
        assert_same(rev[x.shape[0] - 1 - i], batched[i])


def test_repeated_contraction_and_raw_sums():
    """A row t0 t1 t2 t3 (threshold 0.8): cos(t0, t1) = cos 35 deg passes, cos(t1, t2) = cos 60 deg
    does not; t0 has norm 10, so the *sum* t0 + t1 points at 28 deg and passes with t2 in a second
    round within the same threshold. Unit features (a mean at 42.5 deg) or a single round would
    leave t2 apart. t3 is orthogonal to everything and stays alone (below min_size)."""
    def u(deg, norm=1.0):
        return norm * np.array([np.cos(np.radians(deg)), np.sin(np.radians(deg))])

    f = np.stack([u(25, 10.0), u(60), u(0), u(-90)], axis=1)[:, None, :]  # (2, 1, 4)
    x = torch.from_numpy(f)[None]
    cfg = UniAPConfig(thresholds=(0.8,), min_size=2)
    expect = [{frozenset({0, 1, 2})}]
    assert independent_uniap(f, (0.8,), 2) == expect
    for res in (uniap_fast(x, cfg)[0], uniap_reference(x, cfg)[0]):
        assert clusters(res) == expect
    unit = torch.nn.functional.normalize(x, dim=1)
    assert clusters(uniap_fast(unit, cfg)[0]) == [{frozenset({0, 1})}]


def test_image_merged_into_one_node_emits_nothing_and_min_size():
    """Constant features: the whole grid merges at the first threshold and, having no edge left,
    is never emitted (the release's aggo_merge_graph raises on torch.cat here; we emit nothing)."""
    x = torch.ones(1, 4, 6, 5, dtype=torch.float64)
    for res in (uniap_fast(x)[0], uniap_reference(x)[0]):
        assert all(len(lay.instance) == 0 and len(lay.semantic) == 0 for lay in res.layers)
        assert int(res.layers[0].instance.partition.max()) == 0
    # two halves with orthogonal features: both emitted while they have an edge (size >= 4)
    x = torch.zeros(1, 2, 4, 6, dtype=torch.float64)
    x[0, 0, :, :3] = 1
    x[0, 1, :, 3:] = 1
    res = uniap_fast(x)[0]
    assert [len(lay.instance) for lay in res.layers] == [2] * 5
    res = uniap_fast(x, UniAPConfig(min_size=13))[0]
    assert [len(lay.instance) for lay in res.layers] == [0] * 5


def test_release_edge_order_and_non_square_grid():
    e = release_grid_edges(3, 4)
    # token (y, x) = y * W + x; per token: left edge, then upper edge
    assert e[:, :4].T.tolist() == [[0, 1], [1, 2], [2, 3], [0, 4]]
    assert e.shape == (2, 3 * 3 + 2 * 4)
    x = maps(1, h=7, w=13, seed=3)
    assert clusters(uniap_fast(x)[0]) == clusters(uniap_reference(x)[0]) == independent_uniap(
        x[0].numpy(), THRESHOLDS, 4)


# ----------------------------------------------------------------------------- levels, targets
def test_semantic_level_is_the_instance_level_and_targets():
    from hiseg_oap.modeling.pseudo_targets import pseudo_mask_targets

    res = uniap_fast(maps(1, seed=2))[0]
    for lay in res.layers:
        assert torch.equal(lay.semantic.masks, lay.instance.masks)
        assert torch.equal(lay.instance_to_semantic, torch.arange(len(lay.instance)))
        f = lay.instance.features
        torch.testing.assert_close(f.norm(dim=1), torch.ones(len(f), dtype=f.dtype))
        # instance masks nest in the next layer's (parents contain them)
        assert bool(lay.instance.nested[lay.instance.parents >= 0].all())
    t = pseudo_mask_targets(res)
    assert torch.equal(t["semantic"].masks, t["instance"].masks)
    n_unique = len(set().union(*clusters(res)))
    assert t["instance"].masks.shape[0] == n_unique > 0


# ----------------------------------------------------------------------------- options
def test_generator_options():
    g = build_oap_generator("uniap")
    assert isinstance(g, UniAPGenerator) and g.config == UniAPConfig() and g.config.min_size == 4
    assert build_oap_generator("uniap", phi=7, thresholds=[0.9, 0.5]).config == UniAPConfig((0.9, 0.5), 7)
    g = build_oap_generator("alg1")
    assert isinstance(g, OAPGenerator) and g.config.phi == 5
    assert OAP_VARIANTS == ("alg1", "uniap")
    with pytest.raises(ValueError, match="variant"):
        build_oap_generator("uniAP")
    with pytest.raises(ValueError, match="min_size"):
        UniAPConfig(min_size=0)
    x = maps(2, seed=4, dtype=torch.float32)
    for a, b in zip(build_oap_generator("uniap", impl="reference")(x), build_oap_generator("uniap")(x)):
        assert clusters(a) == clusters(b)


def test_tool_variant_flag(capsys):
    tool = load_tool("generate_pseudo_masks")
    args = tool.parse_args(["--images", "x.jpg", "--variant", "uniap", "--thresholds", "0.8", "0.6"])
    gen, layers, kinds = tool.build_generator_from_args(args)
    assert isinstance(gen, UniAPGenerator) and layers == 2 and gen.config == UniAPConfig((0.8, 0.6), 4)
    args = tool.parse_args(["--images", "x.jpg"])
    assert isinstance(tool.build_generator_from_args(args)[0], OAPGenerator)  # default stays Alg. 1
    with pytest.raises(SystemExit) as e:
        tool.parse_args(["--images", "x.jpg", "--variant", "released"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_segmenter_training_step_with_uniap(tmp_path):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from helpers import add_all_configs
    from train_check import oap_skimage_batch

    cfg = add_all_configs(get_cfg())
    assert cfg.MODEL.OAP.POOLING.VARIANT == "alg1"
    cfg.merge_from_file(os.path.join(REPO, "configs", "OAP", "quick", "oap_vit_tiny_coco_sample_cpu.yaml"))
    cfg.merge_from_list(["MODEL.OAP.POOLING.VARIANT", "uniap", "MODEL.OAP.POOLING.THRESHOLDS", "[0.6, 0.3]"])
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model.generator, UniAPGenerator)
    assert model.generator.config == UniAPConfig((0.6, 0.3), 4)
    model.train()
    with EventStorage(0) as storage:
        batch = oap_skimage_batch(cfg, tmp_path)
        losses = model(batch)
        total = sum(losses.values())
        assert torch.isfinite(total)
        total.backward()
        lat = storage.latest()
        assert lat["oap/instance_targets_per_view"][0] == lat["oap/semantic_targets_per_view"][0]
    bad = cfg.clone()
    bad.merge_from_list(["MODEL.OAP.POOLING.VARIANT", "released"])
    with pytest.raises(ValueError, match="variant"):
        build_model(bad)


# ----------------------------------------------------------------------------- thread pools
def test_pinned_threads_sets_every_pool_and_restores():
    import scipy.linalg  # noqa: F401  (loads the BLAS library)
    from threadpoolctl import threadpool_info

    from hiseg.threads import pinned_threads

    torch.set_num_threads(2)  # not the module's 1, so that a missing restore shows
    before = [p["num_threads"] for p in threadpool_info()], torch.get_num_threads()
    with pinned_threads(1) as pools:
        assert {p["num_threads"] for p in pools} == {1}
        assert any(p["api"] == "blas" for p in pools)
        assert {p["num_threads"] for p in threadpool_info()} == {1} and torch.get_num_threads() == 1
    after = [p["num_threads"] for p in threadpool_info()], torch.get_num_threads()
    torch.set_num_threads(1)
    assert after == before
