"""Tests of OAP's multi-crop mapper (Sec. 4.1, 5.1) and of cropping teacher masks to the student's
local views (Sec. 4.3, "Cropped Bipartite Matching").

Real images from ``skimage.data`` written to a temporary jpg; hand-made masks on a 56 x 56 grid
(the token grid of a 448 x 448 view at patch 8).
"""
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetMapper
from PIL import Image

from hiseg.data.mapper_registry import MAPPER_REGISTRY
from hiseg_oap import add_oap_config
from hiseg_oap.data import OAPMultiCropDatasetMapper, crop_masks_to_views

skdata = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def coffee(tmp_path_factory):
    """A 400 x 600 (non-square) real photograph as a jpg dataset dict, and its RGB pixels."""
    path = tmp_path_factory.mktemp("oap_multicrop") / "coffee.jpg"
    Image.fromarray(skdata.coffee()).save(path, quality=95)
    rgb = np.asarray(Image.open(path).convert("RGB"))
    return {"file_name": str(path), "height": 400, "width": 600, "image_id": 7}, rgb


@pytest.fixture(scope="module")
def astronaut(tmp_path_factory):
    path = tmp_path_factory.mktemp("oap_multicrop") / "astronaut.png"  # lossless, square 512
    Image.fromarray(skdata.astronaut()).save(path)
    return {"file_name": str(path), "height": 512, "width": 512}, skdata.astronaut()


def _cfg(**oap):
    cfg = get_cfg()
    add_oap_config(cfg)
    for k, v in oap.items():
        setattr(cfg.INPUT.OAP, k, v)
    return cfg


def _mapper(fmt="RGB", **kw):
    args = dict(image_format=fmt, global_size=224, num_local_crops=4, local_size=96)
    args.update(kw)
    return OAPMultiCropDatasetMapper(True, **args)


def _hwc(chw):
    return chw.permute(1, 2, 0).numpy()


def _pil_crop_resize(global_chw, box, size):
    """Independent reference: PIL's bilinear (antialiased) resize of the box's pixels."""
    x0, y0, x1, y1 = (int(v) for v in box.tolist())
    crop = Image.fromarray(np.ascontiguousarray(_hwc(global_chw)[y0:y1, x0:x1]))
    return np.asarray(crop.resize((size, size), Image.BILINEAR)).astype(np.float64)


# ----------------------------------------------------------------------------- mapper
def test_mapper_from_cfg_shapes_dtypes_boxes(coffee):
    d, _ = coffee
    cfg = _cfg()
    mapper = MAPPER_REGISTRY.get("OAPMultiCropDatasetMapper")(cfg, True)
    assert mapper.global_size == 448 and mapper.num_local_crops == 4 and mapper.image_format == "BGR"
    torch.manual_seed(0)
    out = mapper(dict(d, annotations=[{"bbox": [0, 0, 1, 1]}], sem_seg_file_name="x.png"))
    g, s, n = 448, 224, 4
    assert out["image"].shape == (3, g, g) and out["image"].dtype == torch.uint8
    assert out["local_images"].shape == (n, 3, s, s) and out["local_images"].dtype == torch.uint8
    assert out["local_boxes"].shape == (n, 4) and out["local_boxes"].dtype == torch.float32
    assert out["local_flips"].shape == (n,) and out["local_flips"].dtype == torch.bool
    assert (out["height"], out["width"], out["image_id"], out["file_name"]) == (400, 600, 7, d["file_name"])
    assert "annotations" not in out and "sem_seg_file_name" not in out
    assert "annotations" not in d  # the input dict is not modified


def test_mapper_box_statistics():
    g, (lo, hi) = 160, (0.05, 0.4)
    mapper = _mapper(global_size=g, local_scale=(lo, hi), local_color_aug=False)
    torch.manual_seed(1)
    view = torch.zeros(3, g, g, dtype=torch.uint8)
    boxes = torch.cat([mapper.local_views(view)[1] for _ in range(50)])
    assert (boxes >= 0).all() and (boxes <= g).all()
    assert (boxes == boxes.round()).all()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (w >= 1).all() and (h >= 1).all()
    area, slack = w * h, 0.5 * (w + h) + 1  # rounding of w and h
    assert (area >= lo * g * g - slack).all() and (area <= hi * g * g + slack).all()
    ratio = w / h
    assert (ratio > 0.7).all() and (ratio < 1.45).all()
    # the scales are spread over the range, not stuck at one end
    frac = area / (g * g)
    assert frac.min() < 0.12 and frac.max() > 0.3


def test_local_view_is_resized_crop_of_global_view(coffee):
    d, _ = coffee
    mapper = _mapper(local_color_aug=False, local_flip=False)
    for seed in range(3):
        torch.manual_seed(seed)
        out = mapper(d)
        assert not out["local_flips"].any()
        for img, box in zip(out["local_images"], out["local_boxes"]):
            ref = _pil_crop_resize(out["image"], box, 96)
            diff = np.abs(_hwc(img).astype(np.float64) - ref)
            assert diff.mean() < 1.0 and diff.max() <= 3, (diff.mean(), diff.max())


def test_local_flip_mirrors_the_crop(coffee):
    d, _ = coffee
    mapper = _mapper(local_color_aug=False, local_flip=True)
    seen = set()
    for seed in range(4):
        torch.manual_seed(seed)
        out = mapper(d)
        for img, box, flip in zip(out["local_images"], out["local_boxes"], out["local_flips"]):
            ref = _pil_crop_resize(out["image"], box, 96)
            if flip:
                ref = ref[:, ::-1]
            assert np.abs(_hwc(img).astype(np.float64) - ref).mean() < 1.0
            seen.add(bool(flip))
    assert seen == {True, False}


def test_global_view_is_resized_image(astronaut):
    """A square image has no crop freedom: the global view is the resized image, maybe mirrored."""
    d, rgb = astronaut
    ref = np.asarray(Image.fromarray(rgb).resize((128, 128), Image.BILINEAR)).astype(np.float64)
    mapper = _mapper(global_size=128, local_size=64)
    flipped = set()
    for seed in range(6):
        torch.manual_seed(seed)
        view = _hwc(mapper(d)["image"]).astype(np.float64)
        is_flipped = np.abs(view - ref).mean() > np.abs(view - ref[:, ::-1]).mean()
        target = ref[:, ::-1] if is_flipped else ref
        assert np.abs(view - target).mean() < 1.0
        flipped.add(bool(is_flipped))
    assert flipped == {True, False}


def test_global_view_of_non_square_image_is_a_crop(coffee):
    """Shortest edge (400) -> 448, so the 600-wide image becomes 672 wide; the view is a 448 window."""
    d, rgb = coffee
    resized = np.asarray(Image.fromarray(rgb).resize((672, 448), Image.BILINEAR)).astype(np.float64)
    mapper = _mapper(global_size=448, global_flip=False, local_size=64, num_local_crops=1)
    torch.manual_seed(3)
    view = _hwc(mapper(d)["image"]).astype(np.float64)
    errs = [np.abs(view - resized[:, x0:x0 + 448]).mean() for x0 in range(0, 672 - 448 + 1)]
    assert min(errs) < 1.0


def test_seed_reproduces_views_and_bgr_is_rgb_reversed(coffee):
    d, _ = coffee
    rgb_mapper, bgr_mapper = _mapper("RGB"), _mapper("BGR")
    torch.manual_seed(11)
    a = rgb_mapper(d)
    torch.manual_seed(11)
    b = rgb_mapper(d)
    torch.manual_seed(11)
    c = bgr_mapper(d)
    for k in ("image", "local_images", "local_boxes", "local_flips"):
        assert torch.equal(a[k], b[k]), k
    # colour augmentations run in RGB whatever the output format: BGR is the same pixels reversed
    assert torch.equal(c["image"], a["image"].flip(0))
    assert torch.equal(c["local_images"], a["local_images"].flip(1))
    torch.manual_seed(12)
    assert not torch.equal(rgb_mapper(d)["local_images"], a["local_images"])


def test_color_aug_changes_only_local_views(coffee):
    d, _ = coffee
    torch.manual_seed(5)
    plain = _mapper(local_color_aug=False)(d)
    torch.manual_seed(5)
    aug = _mapper(local_color_aug=True)(d)
    assert torch.equal(plain["image"], aug["image"])  # no photometric augmentation for the teacher
    # crops are sampled before the colour draws of each view, so the first view's box matches
    assert torch.equal(plain["local_boxes"][0], aug["local_boxes"][0])
    assert not torch.equal(plain["local_images"], aug["local_images"])


def test_mapper_bad_input(coffee, tmp_path):
    d, _ = coffee
    with pytest.raises(ValueError, match="local_scale"):
        _mapper(local_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="num_local_crops"):
        _mapper(num_local_crops=0)
    with pytest.raises(ValueError, match="image_format"):
        _mapper("L")
    with pytest.raises(ValueError, match="file not found"):
        _mapper()({"file_name": str(tmp_path / "missing.jpg")})
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="cannot be read"):
        _mapper()({"file_name": str(bad)})
    with pytest.raises(ValueError, match="Mismatched image shape"):
        _mapper()(dict(d, height=10))
    cfg = get_cfg()
    with pytest.raises(ValueError, match="add_oap_config"):
        OAPMultiCropDatasetMapper(cfg, True)


def test_test_mode_is_detectron2_test_mapper(coffee):
    d, _ = coffee
    cfg = _cfg()
    cfg.INPUT.MIN_SIZE_TEST = 200
    cfg.INPUT.MAX_SIZE_TEST = 1000
    out = OAPMultiCropDatasetMapper(cfg, False)(dict(d))
    ref = DatasetMapper(cfg, False)(dict(d))
    assert out["image"].shape == (3, 200, 300) and "local_images" not in out
    assert torch.equal(out["image"], ref["image"])
    assert (out["height"], out["width"]) == (400, 600)


# ----------------------------------------------------------------------------- crop_masks_to_views
G, GRID = 448, 56


def _grid_mask(y0, y1, x0, x1, grid=GRID):
    m = torch.zeros(grid, grid, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def test_crop_left_half_mask():
    left = _grid_mask(0, GRID, 0, GRID // 2)[None]  # pixels x < 224
    boxes = torch.tensor([[16.0, 40.0, 200.0, 300.0],  # inside the left half
                          [250.0, 10.0, 440.0, 200.0],  # inside the right half
                          [112.0, 0.0, 336.0, 224.0]])  # straddles: left half of the crop
    flips = torch.tensor([False, False, True])
    out = crop_masks_to_views(left, (G, G), boxes, flips, (28, 28))
    cropped, keep = out[0]
    assert cropped.shape == (1, 28, 28) and cropped.dtype == torch.bool and cropped.all()
    assert keep.tolist() == [0] and keep.dtype == torch.long
    cropped, keep = out[1]
    assert cropped.shape == (0, 28, 28) and keep.numel() == 0
    cropped, keep = out[2]  # mirrored: the mask now covers the right half of the view
    expected = torch.zeros(28, 28, dtype=torch.bool)
    expected[:, 14:] = True
    assert keep.tolist() == [0] and torch.equal(cropped[0], expected)
    out = crop_masks_to_views(left, (G, G), boxes[2:], torch.tensor([False]), (28, 28))
    assert torch.equal(out[0][0][0], expected.flip(-1))


def test_crop_quadrants_around_centre():
    h = GRID // 2
    quads = torch.stack([_grid_mask(0, h, 0, h), _grid_mask(0, h, h, GRID),
                         _grid_mask(h, GRID, 0, h), _grid_mask(h, GRID, h, GRID)])
    boxes = torch.tensor([[124.0, 124.0, 324.0, 324.0],  # centred on (224, 224)
                          [144.0, 184.0, 264.0, 304.0],  # 80 px left/40 px above the centre
                          [300.0, 20.0, 440.0, 200.0]])  # inside the top-right quadrant
    out = crop_masks_to_views(quads, (G, G), boxes, torch.zeros(3, dtype=torch.bool), (20, 20))
    cropped, keep = out[0]
    assert keep.tolist() == [0, 1, 2, 3]
    for q, (ys, xs) in enumerate([(slice(0, 10), slice(0, 10)), (slice(0, 10), slice(10, 20)),
                                  (slice(10, 20), slice(0, 10)), (slice(10, 20), slice(10, 20))]):
        expected = torch.zeros(20, 20, dtype=torch.bool)
        expected[ys, xs] = True
        assert torch.equal(cropped[q], expected), q
    cropped, keep = out[1]  # split at x = 80/120 * 20 = 13.33 cols, y = 40/120 * 20 = 6.67 rows
    assert keep.tolist() == [0, 1, 2, 3]
    assert cropped.sum(0).eq(1).sum() >= 20 * 20 - 2 * 20  # a partition but for the boundary bins
    assert cropped[0, :6, :13].all() and cropped[3, 7:, 14:].all()
    assert not cropped[0, 7:].any() and not cropped[0, :, 14:].any()
    cropped, keep = out[2]
    assert keep.tolist() == [1] and cropped.all()


def test_crop_non_square_view_and_grid_min_area_and_empty():
    # a 200 x 400 (H x W) view on a 25 x 50 grid; the mask is the column band x in [200, 240)
    masks = torch.zeros(2, 25, 50, dtype=torch.bool)
    masks[0, :, 25:30] = True
    masks[1, 20:, :] = True  # bottom rows y >= 160
    boxes = torch.tensor([[160.0, 0.0, 280.0, 120.0]])
    out = crop_masks_to_views(masks, (200, 400), boxes, torch.tensor([False]), (12, 12))
    cropped, keep = out[0]
    assert keep.tolist() == [0]  # the bottom band is outside the crop
    assert cropped[0][:, 4:8].all() and not cropped[0][:, :4].any() and not cropped[0][:, 8:].any()
    out = crop_masks_to_views(masks, (200, 400), boxes, torch.tensor([False]), (12, 12), min_area=49)
    assert out[0][1].numel() == 0  # 48 cells < 49
    # T = 0 and N = 0
    out = crop_masks_to_views(masks[:0], (200, 400), boxes.repeat(2, 1), torch.zeros(2, dtype=torch.bool), (7, 9))
    assert len(out) == 2 and out[0][0].shape == (0, 7, 9) and out[0][0].dtype == torch.bool
    assert out[1][1].shape == (0,) and out[1][1].dtype == torch.long
    assert crop_masks_to_views(masks, (200, 400), boxes[:0], torch.zeros(0, dtype=torch.bool), (7, 9)) == []


def test_crop_bad_input():
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    box, nf = torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.tensor([False])
    with pytest.raises(ValueError, match="bool"):
        crop_masks_to_views(masks.float(), (8, 8), box, nf, (4, 4))
    with pytest.raises(ValueError, match=r"\(T, h, w\)"):
        crop_masks_to_views(masks[0], (8, 8), box, nf, (4, 4))
    with pytest.raises(ValueError, match="inside the global view"):
        crop_masks_to_views(masks, (8, 8), box * 3, nf, (4, 4))
    with pytest.raises(ValueError, match="x1 > x0"):
        crop_masks_to_views(masks, (8, 8), box.flip(-1), nf, (4, 4))
    with pytest.raises(ValueError, match="flips"):
        crop_masks_to_views(masks, (8, 8), box, torch.tensor([False, True]), (4, 4))
    with pytest.raises(ValueError, match="out_size"):
        crop_masks_to_views(masks, (8, 8), box, nf, (0, 4))


# ----------------------------------------------------------------------------- consistency
def _iou(a, b):
    return (a & b).sum().item() / max((a | b).sum().item(), 1)


@pytest.mark.parametrize("flip", [False, True])
def test_cropped_label_map_matches_local_view(coffee, flip):
    """Threshold the global view's intensity into masks and crop them with the view's boxes: they
    must match the same threshold applied to the local views themselves, best at zero shift."""
    d, _ = coffee
    mapper = _mapper(global_size=448, local_size=224, local_color_aug=False, local_flip=flip)
    flips_seen, coarse_ious = [], []
    for seed in (21, 22):
        torch.manual_seed(seed)
        out = mapper(d)
        boxes, flips = out["local_boxes"], out["local_flips"]
        flips_seen += flips.tolist()
        gray = out["image"].float().mean(0)
        thr = gray.median()
        # two complementary masks at full resolution, and the bright mask on the 56 x 56 grid
        masks = torch.stack([gray <= thr, gray > thr])
        crops = crop_masks_to_views(masks, (448, 448), boxes, flips, (224, 224))
        coarse = torch.nn.functional.avg_pool2d(gray[None, None], 8)[0, 0] > thr
        coarse_crops = crop_masks_to_views(coarse[None], (448, 448), boxes, flips, (28, 28))
        for n, local in enumerate(out["local_images"]):
            lg = local.float().mean(0)
            cropped, keep = crops[n]
            assert keep.tolist() == [0, 1]
            assert not (cropped[0] & cropped[1]).any()
            ious = [_iou(torch.roll(cropped[1], dx, 1), lg > thr) for dx in (-1, 0, 1)]
            assert ious[1] > 0.9 and ious[1] >= max(ious), (seed, n, ious)
            cropped, keep = coarse_crops[n]
            local_coarse = torch.nn.functional.avg_pool2d(lg[None, None], 8)[0, 0] > thr
            if local_coarse.sum() > 20:
                # the 8-pixel teacher cells are coarser than the view's: looser, but still best aligned
                ious = [_iou(torch.roll(cropped[0], dx, 1), local_coarse) for dx in (-1, 0, 1)]
                assert keep.tolist() == [0] and ious[1] > 0.65 and ious[1] > max(ious[0], ious[2]), ious
                coarse_ious.append(ious[1])
    assert any(flips_seen) == flip
    assert np.mean(coarse_ious) > 0.8, coarse_ious
