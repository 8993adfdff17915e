"""CAST backbone: each equation against a plain reference, robustness, Detectron2 integration."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hiseg_cast.modeling import CASTEncoder, GraphPool, compose_hierarchy, sincos_position_embedding
from hiseg_cast.modeling.fps import farthest_point_sampling, farthest_point_sampling_reference
from hiseg_cast.modeling.segment_ops import grid_to_segment_matrix, segment_mean_direct, segment_to_grid_matrix
from hiseg_cast.superpixels import SuperpixelConfig, compute_superpixels, grid_superpixels, to_rgb_uint8


def tiny_encoder(**kw):
    args = dict(embed_dim=48, depths=(1, 1, 1, 1), num_heads=4, num_segments=(16, 8, 4, 2))
    args.update(kw)
    torch.manual_seed(0)
    return CASTEncoder(**args).eval()


def test_fps_matches_sequential_reference():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(4, 150, 12, generator=g, dtype=torch.float64)
    pts[1, 10] = pts[1, 20]  # duplicates
    pts[2, :40] = pts[2, 40:80]
    for n in (1, 16, 64, 149):
        fast = farthest_point_sampling(pts, n, start=0)
        for b in range(4):
            ref = farthest_point_sampling_reference(pts[b].numpy(), n, start=0)
            assert fast[b].tolist() == ref.tolist(), (b, n)


def test_fps_rejects_bad_input():
    with pytest.raises(ValueError, match="start index"):
        farthest_point_sampling(torch.randn(1, 5, 2), 3, start=5)
    with pytest.raises(ValueError, match=r"\(B, M, D\)"):
        farthest_point_sampling(torch.randn(5, 2), 3)


@pytest.mark.parametrize("hw", [(64, 64), (50, 77), (33, 17)])
def test_bilinear_segment_mean_equals_upsample_then_average(hw):
    h, w = hw
    g = torch.Generator().manual_seed(1)
    labels = torch.stack([torch.from_numpy(grid_superpixels(h, w, 23)), torch.from_numpy(grid_superpixels(h, w, 9))])
    labels[1, -5:, :] = -1  # padding rows
    feats = torch.randn(2, 7, -(-h // 8), -(-w // 8), generator=g, dtype=torch.float64)
    n = int(labels.max()) + 1
    mat, valid = grid_to_segment_matrix(labels, n, feats.shape[-2:], "bilinear")
    fast = torch.bmm(mat.double(), feats.flatten(2).transpose(1, 2))
    up = F.interpolate(feats, size=(h, w), mode="bilinear", align_corners=False)
    ref = segment_mean_direct(up, labels, n)
    assert torch.allclose(fast, ref, atol=1e-5)
    n1 = int(labels[1].max()) + 1
    assert valid[0].all() and valid[1, :n1].all() and not valid[1, n1:].any()


def test_nearest_segment_mean_and_vanishing_segments():
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[0, 16:, :] = 1
    labels[0, 0, 1] = 2  # a one-pixel segment that the nearest resize drops
    feats = torch.randn(1, 3, 4, 4)
    mat, valid = grid_to_segment_matrix(labels, 3, (4, 4), "nearest")
    tok = torch.bmm(mat, feats.flatten(2).transpose(1, 2))
    assert valid.tolist() == [[True, True, False]]
    assert torch.allclose(tok[0, 0], feats[0, :, :2].mean((1, 2)), atol=1e-6)
    assert torch.count_nonzero(tok[0, 2]) == 0  # vanished -> zero token


def test_segment_to_grid_is_scatter_then_average_pool():
    labels = torch.from_numpy(grid_superpixels(40, 56, 12))[None]
    tokens = torch.randn(1, 12, 5)
    for s in (4, 8):
        mat = segment_to_grid_matrix(labels, 12, s)
        fast = torch.bmm(mat, tokens).transpose(1, 2).reshape(1, 5, 40 // s, 56 // s)
        pix = tokens[0][labels[0]].permute(2, 0, 1)[None]  # (1, 5, H, W)
        assert torch.allclose(fast, F.avg_pool2d(pix, s), atol=1e-5)


def test_graph_pool_follows_equations():
    torch.manual_seed(0)
    pool = GraphPool(dim=8, num_heads=2, kappa=5.0).eval()
    z = torch.randn(2, 12, 8)
    cls = torch.randn(2, 1, 8)
    valid = torch.ones(2, 12, dtype=torch.bool)
    out = pool(cls, z, valid, 4)
    for b in range(2):
        # C <- FPS over [mean; Z] from the mean, first sample dropped
        pts = torch.cat([z[b].mean(0, keepdim=True), z[b]]).double().numpy()
        c = farthest_point_sampling_reference(pts, 5)[1:] - 1
        assert out.sampled[b].tolist() == c.tolist()
        # U <- MSA(LN(Z)) + Z, mean-centred, plus bias
        zz = z[b:b + 1]
        u = zz + pool.centroid_fc.attn(pool.centroid_fc.norm(zz))
        u = (u - u.mean(1, keepdim=True) + pool.centroid_fc.bias)[0]
        v = u[c]
        p = torch.softmax(5.0 * (F.normalize(u, dim=-1) @ F.normalize(v, dim=-1).t()), dim=-1)
        assert torch.allclose(out.logits[b].softmax(-1), p, atol=1e-5)
        zp = pool.fc1(z[b])
        pooled = (p.t() @ zp) / p.sum(0)[:, None]
        y = z[b][c] + pool.fc2(pooled)
        assert torch.allclose(out.tokens[b], y, atol=1e-5)
        assert torch.allclose(out.cls_token[b], cls[b] + pool.fc2(pool.fc1(cls[b])), atol=1e-5)


def test_graph_pool_with_fewer_tokens_than_segments():
    pool = GraphPool(dim=8, num_heads=2).eval()
    z = torch.randn(2, 10, 8)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 3:] = False  # image 1 has 3 tokens
    out = pool(torch.zeros(2, 1, 8), z, valid, 6)
    assert out.valid.sum(1).tolist() == [6, 3]
    assign = out.logits[1, :3].argmax(-1)
    assert (assign < 3).all()
    assert torch.isfinite(out.tokens).all()


def test_position_embedding_layout_matches_released_code():
    d, n = 16, 5
    pe = sincos_position_embedding((n, n), d, row_first=True)
    # the released table: meshgrid (ij) of (w, h); first half = sin/cos of the 'w' grid
    gw, gh = torch.meshgrid(torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32), indexing="ij")
    omega = 1.0 / 1e4 ** (torch.arange(d // 4, dtype=torch.float32) / (d // 4))
    ow, oh = gw.flatten()[:, None] * omega, gh.flatten()[:, None] * omega
    released = torch.cat([ow.sin(), ow.cos(), oh.sin(), oh.cos()], dim=1)
    assert torch.allclose(pe, released, atol=1e-6)
    # for a non-square grid, the first half encodes the row
    pe2 = sincos_position_embedding((2, 3), d)
    assert torch.allclose(pe2[0, : d // 2], pe2[2, : d // 2]) and not torch.allclose(pe2[0, : d // 2], pe2[3, : d // 2])


def _nested(h_maps):
    for l in range(h_maps.shape[0] - 1):
        fine, coarse = h_maps[l].flatten(), h_maps[l + 1].flatten()
        keep = fine >= 0
        pairs = torch.unique(torch.stack([fine[keep], coarse[keep]]), dim=1)
        if pairs.shape[1] != torch.unique(fine[keep]).numel():
            return False
    return True


def test_compose_hierarchy_is_nested():
    sp = torch.from_numpy(grid_superpixels(20, 20, 16))[None]
    a1 = torch.randint(0, 5, (1, 16))
    a2 = torch.randint(0, 2, (1, 5))
    h = compose_hierarchy(sp, [a1, a2])
    assert h.shape == (1, 3, 20, 20) and _nested(h[0])
    assert (h[0, 1] == a1[0][sp[0]]).all() and (h[0, 2] == a2[0][a1[0]][sp[0]]).all()


def test_hierarchy_nested_on_real_bsds_images(shared_data):
    from PIL import Image

    files = sorted((shared_data / "bsds500" / "images" / "val").glob("*.jpg"))[:2]
    assert files, "no BSDS500 val images found"
    enc = tiny_encoder(num_segments=(64, 32, 16, 8))
    for f in files:
        img = np.asarray(Image.open(f).convert("RGB"))
        sp = compute_superpixels(img, SuperpixelConfig(num_superpixels=0, pixels_per_superpixel=256))
        x = (torch.from_numpy(img).permute(2, 0, 1).float()[None] - 120) / 60
        with torch.no_grad():
            out = enc(x, torch.from_numpy(sp)[None])
        h = out["hierarchy"][0]
        assert h.shape[-2:] == img.shape[:2]
        assert _nested(h)
        counts = [int(torch.unique(h[l]).numel()) for l in range(5)]
        assert counts[0] == sp.max() + 1
        assert all(c <= n for c, n in zip(counts[1:], (64, 32, 16, 8)))
        assert counts == sorted(counts, reverse=True)


def test_batch_padding_does_not_change_results():
    enc = tiny_encoder()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 48, 64, generator=g)
    sp_a = torch.from_numpy(grid_superpixels(48, 64, 20))
    sp_b = torch.from_numpy(grid_superpixels(48, 64, 40))
    with torch.no_grad():
        alone = enc(x[:1], sp_a[None])
        both = enc(x, torch.stack([sp_a, sp_b]))
    assert torch.allclose(alone["cls"][0], both["cls"][0], atol=1e-4)
    assert torch.equal(alone["hierarchy"][0], both["hierarchy"][0])


def test_fewer_superpixels_than_segments_is_reported(caplog):
    enc = tiny_encoder(num_segments=(64, 32, 16, 8))
    sp = torch.from_numpy(grid_superpixels(32, 32, 9))[None]
    with torch.no_grad():
        out = enc(torch.randn(1, 3, 32, 32), sp)
    assert out["num_segments"][0].tolist() == [9, 9, 9, 9, 8]
    assert "fewer segments" in caplog.text


def test_test_time_granularity_and_ablations():
    enc = tiny_encoder()
    sp = torch.from_numpy(grid_superpixels(64, 64, 49))[None]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = enc(x, sp, num_segments=(24, 12, 6, 3))
        assert out["num_segments"][0].tolist() == [49, 24, 12, 6, 3]
        flat = tiny_encoder(pooling=False)(x, sp)
        assert flat["hierarchy"].shape[1] == 1 and len(flat["levels"]) == 4
        nearest = tiny_encoder(token_pool_mode="nearest")(x, sp)
        assert torch.isfinite(nearest["cls"]).all()
    with pytest.raises(ValueError, match="segment counts"):
        enc(x, sp, num_segments=(4, 2))
    with pytest.raises(ValueError, match="must agree"):
        enc(x, sp[:, :10])


def test_encoder_backward_reaches_every_trained_parameter():
    enc = tiny_encoder().train()
    sp = torch.from_numpy(grid_superpixels(48, 48, 30))
    out = enc(torch.randn(2, 3, 48, 48), torch.stack([sp, sp]))
    loss = out["cls"].square().sum() + sum(l["tokens"].mean() for l in out["levels"])
    loss.backward()
    last_pool = {n for n, _ in enc.pools[-1].named_parameters()}
    for name, p in enc.named_parameters():
        if not p.requires_grad or name.startswith("pools.3."):
            continue  # the last pooling is read-out only (as in the released code)
        assert p.grad is not None, name
    assert last_pool


@pytest.mark.parametrize("shape", [(224, 224), (200, 300), (20, 300), (12, 12), (1, 1), (40, 40)])
def test_superpixels_any_size(shape):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, size=(*shape, 3), dtype=np.uint8)
    sp = compute_superpixels(img, SuperpixelConfig())
    assert sp.shape == shape and sp.dtype == np.int64
    assert sp.min() == 0 and len(np.unique(sp)) == sp.max() + 1


def test_superpixel_counts_match_released_behaviour():
    from skimage import data
    import cv2

    img = cv2.resize(data.astronaut(), (224, 224))
    assert compute_superpixels(img, SuperpixelConfig(histogram_bins=15, iterations=20)).max() + 1 == 196
    for method in ("slic", "grid"):
        sp = compute_superpixels(img, SuperpixelConfig(method=method))
        assert 100 < sp.max() + 1 < 300


def test_to_rgb_uint8_conversions():
    assert to_rgb_uint8(np.zeros((4, 5), np.uint8)).shape == (4, 5, 3)
    assert to_rgb_uint8(np.full((4, 5, 4), 9, np.uint8))[0, 0].tolist() == [9, 9, 9]
    assert to_rgb_uint8(np.full((2, 2), 65535, np.uint16)).max() == 255
    assert to_rgb_uint8(np.ones((2, 2, 3), np.float32)).max() == 255
    assert to_rgb_uint8(np.array([[True, False]])).tolist() == [[[255] * 3, [0] * 3]]
    assert to_rgb_uint8(np.full((2, 2), 65535, np.int32)).max() == 255  # PIL's 16-bit "I" mode
    assert to_rgb_uint8(np.full((2, 2), 200, np.int32)).max() == 200
    with pytest.raises(ValueError, match="NaN"):
        to_rgb_uint8(np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match="shape"):
        to_rgb_uint8(np.zeros((2, 2, 5)))
    with pytest.raises(ValueError, match="uint8 RGB"):
        compute_superpixels(np.zeros((8, 8), np.uint8))


def test_learned_position_embedding_does_not_depend_on_batch_padding():
    """POS_RESIZE grid: a learned grid embedding is resized to each image's own extent, not the
    padded grid. (The default, stretch, resizes it over each image's own extent too.)"""
    enc = tiny_encoder(pos_embed="learned", pos_resize="grid")
    with torch.no_grad():
        enc.pos_embed.normal_()
    sp_small = torch.from_numpy(grid_superpixels(40, 56, 12))
    sp_big = torch.from_numpy(grid_superpixels(64, 96, 30))
    padded = torch.full((64, 96), -1, dtype=torch.long)
    padded[:40, :56] = sp_small
    alone = enc.position_encoding_batch(sp_small[None], (5, 7))  # stride-8 grid of 40 x 56
    both = enc.position_encoding_batch(torch.stack([padded, sp_big]), (8, 12))
    grid = both.view(2, 8, 12, -1)
    assert torch.equal(grid[0, :5, :7].reshape(1, 35, -1), alone)
    assert torch.all(grid[0, 5:] == 0) and torch.all(grid[0, :, 7:] == 0)
    assert torch.equal(both[1:], enc.position_encoding((8, 12), sp_big.device)[None])
    # whole model: the small image alone vs padded next to a larger one (the stem sees the
    # padding at the border only)
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(2, 3, 64, 96)
    x[0, :, :40, :56] = torch.randn(3, 40, 56, generator=g)
    x[1] = torch.randn(3, 64, 96, generator=g)
    with torch.no_grad():
        one = enc(x[:1, :, :40, :56], sp_small[None])["cls"][0]
        two = enc(x, torch.stack([padded, sp_big]))["cls"][0]
        # the embedding resized to the padded grid, as before: positions shift with the padding
        enc.position_encoding_batch = lambda sp, grid: enc.position_encoding(grid, sp.device)[None]
        shifted = enc(x, torch.stack([padded, sp_big]))["cls"][0]
    assert (one - two).abs().max() < 0.2  # measured 0.11 (stem border; sin-cos: 0.03)
    assert (one - shifted).abs().max() > 10 * (one - two).abs().max()  # measured 4.0
    enc.pos_resize = "stretch"
    with torch.no_grad():
        one = enc(x[:1, :, :40, :56], sp_small[None])["cls"][0]
        two = enc(x, torch.stack([padded, sp_big]))["cls"][0]
    assert (one - two).abs().max() < 0.2  # measured 0.018 (stem border only)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("sizes", [(28, 64), (7, 50), (30, 17), (5, 5)])
def test_interpolation_taps_equal_torch_interpolate(mode, sizes):
    from hiseg.modeling.interpolation_taps import interpolation_taps, taps_matrix

    n_in, n_out = sizes
    x = torch.randn(1, 3, n_in, 4, dtype=torch.float64)
    ref = F.interpolate(x, size=(n_out, 4), mode=mode, align_corners=False)[0, :, :, 0]  # (3, out)
    idx, w = interpolation_taps(mode, n_out, n_in)
    ours = (x[0, :, :, 0][:, idx] * w).sum(1)
    assert torch.allclose(ours, ref, atol=1e-12)
    assert torch.allclose(taps_matrix(idx, w, n_in) @ x[0, :, :, 0].t(), ref.t(), atol=1e-12)


def test_stretched_position_table_equals_bicubic_upsample_then_average():
    """POS_RESIZE stretch (released segmentation code): segment mean of the POS_GRID table
    resized bicubically to each image's own extent; padding rows / columns excluded."""
    from hiseg_cast.modeling.segment_ops import image_extents

    labels = torch.stack([torch.from_numpy(grid_superpixels(50, 77, 23)), torch.from_numpy(grid_superpixels(50, 77, 9))])
    labels[1, 41:, :] = -1
    labels[1, :, 60:] = -1
    table = torch.randn(1, 5, 6, 7, dtype=torch.float64)  # (1, D, gh, gw)
    n = int(labels.max()) + 1
    mat, valid = grid_to_segment_matrix(labels, n, (6, 7), "bicubic", image_extents(labels))
    fast = torch.matmul(mat.double(), table[0].flatten(1).t())
    assert image_extents(labels).tolist() == [[50, 77], [41, 60]]
    for i, (eh, ew) in enumerate([(50, 77), (41, 60)]):
        up = F.interpolate(table, size=(eh, ew), mode="bicubic", align_corners=False)
        ref = segment_mean_direct(up, labels[i:i + 1, :eh, :ew], n)[0]
        assert torch.allclose(fast[i], ref, atol=1e-5)
