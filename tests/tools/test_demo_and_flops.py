"""tools/demo.py (robust inputs, pictures, nested label maps) and hiseg_cast.flops (fvcore counts).

The demo runs once, in this process, on every awkward input at a small size with a tiny CAST
(48-d, 1 block per level); the tests then look at what it wrote and printed.
"""
import contextlib
import io

import cv2
import numpy as np
import pytest
import torch

from helpers import load_tool

TINY = ["MODEL.CAST.EMBED_DIM", "48", "MODEL.CAST.NUM_HEADS", "4", "MODEL.CAST.DEPTHS", "[1,1,1,1]"]
MAX_SIZE = 96


@pytest.fixture(scope="module")
def demo():
    return load_tool("demo")


def _astronaut():
    import skimage.data

    return skimage.data.astronaut()  # 512x512 RGB uint8


@pytest.fixture(scope="module")
def demo_run(demo, tmp_path_factory):
    """Write the awkward inputs, run the demo once on all of them; (rc, stdout, stderr, dirs)."""
    src = tmp_path_factory.mktemp("inputs")
    out = tmp_path_factory.mktemp("demo_out")
    a = _astronaut()
    bgr = a[:, :, ::-1]
    cv2.imwrite(str(src / "grey.png"), cv2.cvtColor(a, cv2.COLOR_RGB2GRAY))
    cv2.imwrite(str(src / "rgba.png"), np.dstack([bgr, np.full(a.shape[:2], 100, np.uint8)]))
    cv2.imwrite(str(src / "deep16.png"), bgr.astype(np.uint16) * 257)
    cv2.imwrite(str(src / "rgb8.png"), bgr)
    cv2.imwrite(str(src / "tiny32.png"), cv2.resize(bgr, (32, 32), interpolation=cv2.INTER_AREA))
    cv2.imwrite(str(src / "flat_small.png"), np.full((40, 40, 3), 77, np.uint8))
    cv2.imwrite(str(src / "huge.jpg"), cv2.resize(bgr, (4000, 3000)), [cv2.IMWRITE_JPEG_QUALITY, 60])
    (src / "notimage.png").write_text("this is text, not a picture\n")
    argv = ["--input", str(src / "*.png"), str(src / "huge.jpg"), str(src / "missing.png"),
            "--skimage", "astronaut", "--output", str(out), "--save-labels", "--max-size", str(MAX_SIZE),
            "--opts", *TINY]
    so, se = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        rc = demo.main(argv)
    return rc, so.getvalue(), se.getvalue(), src, out


GOOD = ["grey", "rgba", "deep16", "rgb8", "tiny32", "flat_small", "huge", "skimage_astronaut"]


@pytest.mark.parametrize("stem", GOOD)
def test_demo_writes_hierarchy_picture(demo_run, stem):
    out = demo_run[4]
    pic = cv2.imread(str(out / f"{stem}_hierarchy.png"), cv2.IMREAD_UNCHANGED)
    assert pic is not None and pic.ndim == 3 and min(pic.shape[:2]) >= 200
    assert pic.std() > 5  # not blank
    with np.load(out / f"{stem}_levels.npz") as z:
        levels, image = z["levels"], z["image"]
    assert levels.ndim == 3 and levels.shape[0] == 5  # superpixels + 4 levels
    assert image.dtype == np.uint8 and image.shape == levels.shape[1:] + (3,)
    assert max(image.shape[:2]) <= MAX_SIZE


def test_demo_bad_inputs_named_and_others_still_run(demo_run):
    rc, stdout, stderr, src, out = demo_run
    assert rc == 1
    assert f"{src / 'notimage.png'}: not a readable image" in stderr
    assert f"{src / 'missing.png'}: file not found" in stderr
    assert not (out / "notimage_hierarchy.png").exists()
    assert "WARNING: MODEL.WEIGHTS is empty" in stdout  # random init is announced
    assert f"{len(GOOD)} image(s) written" in stdout


def test_demo_only_bad_file_exits_nonzero(demo, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    so, se = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        rc = demo.main(["--input", str(bad), "--output", str(tmp_path / "o"), "--opts", *TINY])
    assert rc == 1 and str(bad) in se.getvalue() and "not a readable image" in se.getvalue()


def test_demo_few_superpixels_keep_fewer_segments(demo_run):
    stdout, out = demo_run[1], demo_run[4]
    with np.load(out / "tiny32_levels.npz") as z:
        n = z["num_segments"]
        asked = z["asked"]
    assert n[0] < asked[0]  # a 32x32 image gives fewer superpixels than level 1 asks for
    assert n[1] == n[0] and all(n[1:] <= asked)
    line = next(l for l in stdout.splitlines() if "tiny32.png" in l and "note:" in l)
    assert f"only {n[0]} superpixels" in line and "level 1 keeps" in line


def test_demo_single_colour_images(demo_run):
    out = demo_run[4]
    for stem in ("flat_small",):
        with np.load(out / f"{stem}_levels.npz") as z:
            assert (z["image"] == z["image"][0, 0]).all()
            assert (z["num_segments"] >= 1).all()
            assert np.all(np.diff(z["num_segments"]) <= 0)


def test_demo_input_conversions(demo_run):
    out = demo_run[4]
    load = lambda s: np.load(out / f"{s}_levels.npz")["image"]  # noqa: E731
    rgb8, deep16, rgba, grey = load("rgb8"), load("deep16"), load("rgba"), load("grey")
    np.testing.assert_array_equal(deep16, rgb8)  # 16-bit scaled back to the same 8-bit values
    np.testing.assert_array_equal(rgba, rgb8)  # alpha dropped, channel order kept
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    a = _astronaut()
    assert abs(float(rgb8[..., 0].mean()) - float(a[..., 0].mean())) < 3  # RGB, not BGR
    assert load("huge").shape == (72, 96, 3)  # 4000x3000 downscaled to --max-size


def test_demo_label_maps_nested_and_16bit(demo_run):
    from hiseg.visualization import is_nested, load_label_maps

    out = demo_run[4]
    for stem in GOOD:
        with np.load(out / f"{stem}_levels.npz") as z:
            levels = z["levels"]
        assert is_nested(list(levels))
        # independent check: every level-l segment maps to exactly one level-(l+1) segment
        for fine, coarse in zip(levels[:-1], levels[1:]):
            for seg in np.unique(fine):
                assert np.unique(coarse[fine == seg]).size == 1, (stem, seg)
        for lvl in range(levels.shape[0]):
            png = load_label_maps(str(out / f"{stem}_level{lvl}.png"))[0]
            np.testing.assert_array_equal(png, levels[lvl])


def test_is_nested_detects_violation():
    from hiseg.visualization import is_nested

    fine = np.array([[0, 0, 1, 1]])
    assert is_nested([fine, np.array([[0, 0, 0, 0]])])
    assert not is_nested([fine, np.array([[0, 1, 1, 1]])])  # segment 0 split across two parents


def test_prepare_image_rejects_bad_arrays(demo):
    with pytest.raises(demo.InputError, match="volume"):
        demo.prepare_image(np.zeros((4, 5, 6, 7), np.uint8), 64, "volume")
    with pytest.raises(demo.InputError, match="empty"):
        demo.prepare_image(np.zeros((0, 5, 3), np.uint8), 64, "empty")
    big = demo.prepare_image(np.zeros((300, 400), np.uint16), 64, "big")
    assert big.shape == (48, 64, 3) and big.dtype == np.uint8


# ------------------------------------------------------------------------------------------------
def test_sdpa_handle_counts_both_products():
    import torch.nn.functional as F
    from hiseg_cast.flops import flop_analysis

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    fa = flop_analysis(M(), (q, k, v))
    assert fa.total() == 2 * 3 * 5 * 7 * (8 + 4)
    assert not fa.unsupported_ops()


@pytest.fixture(scope="module")
def flop_reports():
    from hiseg_cast.flops import CAST_VARIANTS, cast_flops, vit_flops

    return (cast_flops(None, 224, 196, name="CAST-S", **CAST_VARIANTS["CAST-S"]),
            vit_flops("vit_small_patch16_224", 224, name="ViT-S/16"))


def test_flops_cast_s_below_vit_s(flop_reports):
    cast_s, vit_s = flop_reports
    assert cast_s.total < vit_s.total
    assert 2.8e9 < cast_s.total < 3.8e9  # paper: 3.4 GFLOPs
    assert 4.5e9 < vit_s.total < 4.8e9  # paper 4.7; 4.25 would mean attention was not counted
    assert 0.6 < cast_s.total / vit_s.total < 0.8  # "reducing GFLOPS by 30%"
    assert "aten::scaled_dot_product_attention" not in cast_s.skipped
    assert "aten::scaled_dot_product_attention" not in vit_s.skipped


def test_flops_breakdown_adds_up(flop_reports):
    cast_s = flop_reports[0]
    parts = {k: v for k, v in cast_s.parts.items() if "of which" not in k}
    assert sum(parts.values()) == pytest.approx(cast_s.total, rel=1e-9)
    assert all(v >= 0 for v in cast_s.parts.values())
    blocks = [v for k, v in parts.items() if k.startswith("blocks level")]
    pools = [v for k, v in parts.items() if k.startswith("graph pool")]
    assert len(blocks) == 4 and len(pools) == 4
    assert blocks == sorted(blocks, reverse=True) and pools == sorted(pools, reverse=True)
    stem = cast_s.parts["stem (conv)"]
    assert 0.8e9 < stem < 1.0e9  # 4 3x3 convs + 1x1 at stride 8 (0.915 G)
    fps = [v for k, v in cast_s.parts.items() if "FPS" in k]
    assert all(0 < f < p for f, p in zip(fps, pools))


def test_demo_loads_weights_into_encoder(demo, tmp_path):
    """A detectron2-style checkpoint (keys under ``backbone.encoder.``) fills every encoder tensor."""
    from hiseg_cast.demo import build_demo_backbone

    cfg = demo.setup_cfg(demo.DEFAULT_CONFIG, TINY)
    torch.manual_seed(123)
    src = build_demo_backbone(cfg, "cpu").encoder
    state = {"backbone.encoder." + k: v for k, v in src.state_dict().items()}
    ckpt = tmp_path / "model_final.pth"
    torch.save({"model": state, "iteration": 7}, ckpt)
    img = tmp_path / "small.png"
    cv2.imwrite(str(img), cv2.resize(_astronaut(), (48, 48))[:, :, ::-1])
    so, se = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        rc = demo.main(["--input", str(img), "--output", str(tmp_path / "o"), "--save-labels",
                        "--opts", *TINY, "MODEL.WEIGHTS", str(ckpt)])
    n = len(src.state_dict())
    assert rc == 0, se.getvalue()
    assert f"loaded {n}/{n} encoder tensors" in so.getvalue()
    assert "randomly initialised" not in so.getvalue()
    # the hierarchy equals the source encoder's on the same input
    with np.load(tmp_path / "o" / "small_levels.npz") as z:
        levels, image = z["levels"], z["image"]
    mean, std = np.array(cfg.MODEL.PIXEL_MEAN, np.float32), np.array(cfg.MODEL.PIXEL_STD, np.float32)
    x = torch.from_numpy(((image.astype(np.float32) - mean) / std).transpose(2, 0, 1).copy())[None]
    with torch.no_grad():
        ref = src.eval()(x, torch.from_numpy(levels[0]).long()[None])["hierarchy"][0].numpy()
    np.testing.assert_array_equal(ref, levels)
