"""Hierarchical K-means segments of a ViT (CAST Appx. D.4): the upsampling, K-means, nesting and
counts of the hierarchy, recovery of planted clusters, and the meta-architecture scored by the
hierarchical evaluator on real BSDS500 images."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model

import hiseg.data  # noqa: F401  (registers the datasets)
from hiseg.modeling.vit_kmeans import _Upsampled, add_vit_kmeans_config, kmeans, vit_kmeans_hierarchy
from helpers import add_all_configs


def same_partition(a, b) -> bool:
    """Two label maps induce the same partition (labels may differ)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def nested(fine, coarse) -> bool:
    """Every fine segment lies inside one coarse segment."""
    fine, coarse = np.asarray(fine).ravel(), np.asarray(coarse).ravel()
    pairs = set(zip(fine.tolist(), coarse.tolist()))
    return len(pairs) == len(set(fine.tolist()))


def planted_map(h=16, w=16, d=16, noise=0.05, seed=0, scales=(4.0, 2.0, 1.0)):
    """A (d, h, w) token map with 8 leaf clusters in 4 x 2 blocks, grouped in pairs (4 mid-level
    groups) and in 2 top groups (centre = sum of orthogonal offsets scaled by ``scales`` for the
    top / mid / leaf group). Returns the map and the (leaf, mid, top) label grids."""
    g = torch.Generator().manual_seed(seed)
    e = torch.eye(d)
    leaf = torch.zeros(h, w, dtype=torch.long)
    for r in range(4):
        for c in range(2):
            leaf[r * h // 4:(r + 1) * h // 4, c * w // 2:(c + 1) * w // 2] = r * 2 + c
    st, sm, sl = scales
    centres = torch.stack([st * e[k // 4] + sm * e[2 + k // 2] + sl * e[6 + k] for k in range(8)])
    feats = centres[leaf] + noise * torch.randn(h, w, d, generator=g)
    return feats.permute(2, 0, 1).contiguous(), (leaf, leaf // 2, leaf // 4)


@pytest.mark.parametrize("patch", [None, 16])
def test_band_upsampling_equals_interpolate(patch):
    f = torch.randn(24, 5, 7)
    size = (70, 100)
    up = _Upsampled(f, size, patch, normalize=False)
    if patch:
        ref = F.interpolate(f[None], size=(5 * patch, 7 * patch), mode="bilinear", align_corners=False)[0]
        ref = ref[:, :size[0], :size[1]]
    else:
        ref = F.interpolate(f[None], size=size, mode="bilinear", align_corners=False)[0]
    ref = ref.permute(1, 2, 0).reshape(-1, 24)
    rows = torch.cat([up.rows(y, min(size[0], y + 16)) for y in range(0, size[0], 16)])
    assert torch.allclose(rows, ref, atol=1e-5)
    idx = torch.tensor([0, 1, 99, 100, 3456, 70 * 100 - 1])
    assert torch.allclose(up.pixels(idx), ref[idx], atol=1e-5)


@pytest.mark.parametrize("spherical", [True, False])
def test_kmeans_recovers_separated_clusters(spherical):
    g = torch.Generator().manual_seed(1)
    centres = 5 * torch.eye(8)[:6]
    truth = torch.arange(6).repeat_interleave(40)
    x = centres[truth] + 0.1 * torch.randn(240, 8, generator=g)
    c, labels = kmeans(x, 6, spherical=spherical, seed=3)
    assert c.shape == (6, 8) and labels.shape == (240,)
    assert same_partition(labels, truth)
    if spherical:
        assert torch.allclose(c.norm(dim=1), torch.ones(6), atol=1e-5)
    # deterministic
    c2, labels2 = kmeans(x, 6, spherical=spherical, seed=3)
    assert torch.equal(labels, labels2) and torch.equal(c, c2)
    # weights: a zero-weight point does not move its centroid
    w = torch.ones(240)
    w[0] = 0.0
    x2 = x.clone()
    x2[0] = 1000.0 * x2[0]
    _, lab_w = kmeans(x2, 6, weights=w, spherical=False, seed=3)
    assert same_partition(lab_w[1:], truth[1:])


@pytest.mark.parametrize("spherical", [True, False])
def test_hierarchy_recovers_planted_clusters_nested(spherical):
    fmap, (leaf, mid, top) = planted_map()
    h = vit_kmeans_hierarchy(fmap, (16, 16), counts=(8, 4, 2), spherical=spherical, seed=0, level0="none", n_init=3)
    assert h.shape == (3, 16, 16) and h.dtype == torch.int64
    assert [int(l.max()) + 1 for l in h] == [8, 4, 2]
    for lvl, truth in zip(h, (leaf, mid, top)):
        assert same_partition(lvl, truth)
        assert sorted(torch.unique(lvl).tolist()) == list(range(int(lvl.max()) + 1))
    for fine, coarse in zip(h[:-1], h[1:]):
        assert nested(fine, coarse)


def test_hierarchy_upsampled_with_patch_level_nested_and_counts():
    # 8 equidistant clusters in blocks of 4 x 6 tokens, patch 4; the image is not a multiple of
    # the patch size (the ViT padded it bottom / right)
    fmap, (leaf, _, _) = planted_map(h=16, w=12, scales=(0.0, 0.0, 3.0))
    H, W = 16 * 4 - 3, 12 * 4 - 1
    h = vit_kmeans_hierarchy(fmap, (H, W), counts=(8, 4, 2), patch_size=4, seed=0)
    assert h.shape == (4, H, W)
    assert [int(l.max()) + 1 for l in h[1:]] == [8, 4, 2]
    assert int(h[0].max()) + 1 >= 16 * 12  # every patch at least once (some split by level 1)
    for fine, coarse in zip(h[:-1], h[1:]):
        assert nested(fine, coarse)
    # each patch's centre pixel carries its planted cluster
    ys = (torch.arange(16) * 4 + 2).clamp(max=H - 1)
    xs = (torch.arange(12) * 4 + 2).clamp(max=W - 1)
    assert same_partition(h[1][ys][:, xs], leaf)
    # deterministic for a seed
    assert torch.equal(h, vit_kmeans_hierarchy(fmap, (H, W), counts=(8, 4, 2), patch_size=4, seed=0))


def test_fewer_distinct_features_than_asked():
    fmap = torch.zeros(4, 6, 6)
    fmap[0, :3] = 1.0
    fmap[1, 3:] = 1.0
    h = vit_kmeans_hierarchy(fmap, (6, 6), counts=(8, 4, 2), level0="none")
    assert [int(l.max()) + 1 for l in h] == [2, 2, 2]
    for fine, coarse in zip(h[:-1], h[1:]):
        assert nested(fine, coarse)
    with pytest.raises(ValueError):
        vit_kmeans_hierarchy(fmap, (6, 6), counts=(4, 0))


def _segmenter_cfg():
    cfg = get_cfg()
    add_all_configs(cfg)
    add_vit_kmeans_config(cfg)
    cfg.merge_from_list(["MODEL.META_ARCHITECTURE", "ViTKMeansSegmenter", "MODEL.BACKBONE.NAME", "build_vit_backbone",
                         "MODEL.DEVICE", "cpu", "MODEL.VIT.EMBED_DIM", 48, "MODEL.VIT.DEPTH", 2,
                         "MODEL.VIT.NUM_HEADS", 4, "MODEL.PIXEL_MEAN", [123.675, 116.28, 103.53],
                         "MODEL.PIXEL_STD", [58.395, 57.12, 57.375]])
    return cfg


def test_segmenter_outputs_resized_hierarchy_and_refuses_training():
    torch.manual_seed(0)
    model = build_model(_segmenter_cfg())
    img = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    with pytest.raises(RuntimeError):
        model([{"image": img}])
    model.eval()
    out = model([{"image": img, "height": 100, "width": 140}])[0]
    assert out["hierarchy"].shape == (5, 100, 140)
    assert torch.equal(out["num_segments"], out["hierarchy"].flatten(1).amax(1) + 1)
    keys = model.inference([{"image": img}])  # features = attention keys
    assert keys[0]["hierarchy"].shape == (5, 50, 70)


def test_segmenter_scored_on_bsds500(shared_data):
    from hiseg.evaluation import HierarchicalSegEvaluator

    name = "bsds500_val_shared"
    if name not in DatasetCatalog.list():
        pytest.skip("bsds500_val_shared is not registered")
    dicts = DatasetCatalog.get(name)[:2]
    torch.manual_seed(0)
    model = build_model(_segmenter_cfg()).eval()
    ev = HierarchicalSegEvaluator(name, distributed=False, nthresh=33)
    ev.reset()
    for d in dicts:
        img = torch.from_numpy(np.ascontiguousarray(read_image(d["file_name"], "RGB").transpose(2, 0, 1)))
        out = model([dict(d, image=img)])
        hier = out[0]["hierarchy"]
        assert hier.shape == (5, d["height"], d["width"])
        assert [int(v) for v in out[0]["num_segments"][1:]] == [64, 32, 16, 8]
        for fine, coarse in zip(hier[:-1], hier[1:]):
            assert nested(fine, coarse)
        ev.process([d], out)
    res = ev.evaluate()["bsds"]
    assert res["num_images"] == 2
    for k in ("ODS", "OIS", "Covering_ODS", "PRI_ODS", "RegionF@32"):
        assert 0.0 <= res[k] <= 1.0
