"""SLIC in PyTorch (hiseg_cast.superpixels.torch_slic): LAB against OpenCV / scikit-image, label-map
invariants, batch = per image, boundary recall on BSDS500, the backbone's METHOD slic_torch."""
import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage import data as skdata

from hiseg_cast.superpixels import SuperpixelConfig, compute_superpixels, compute_superpixels_batch
from hiseg_cast.superpixels.torch_slic import connected_components, grid_shape, rgb_to_lab, slic_torch

SKIMAGE_PICTURES = ("astronaut", "coffee", "chelsea")


def _pictures():
    return [getattr(skdata, name)() for name in SKIMAGE_PICTURES]


def _resized_batch(h, w):
    """The skimage pictures resized (area) to h x w, as a (3, 3, h, w) uint8 batch."""
    ims = [cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA) for im in _pictures()]
    return torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).contiguous()


def _check_label_map(labels: np.ndarray) -> int:
    """Labels 0..n-1 all present, each one 4-connected (scipy); returns n."""
    n = int(labels.max()) + 1
    assert labels.min() == 0
    assert np.array_equal(np.unique(labels), np.arange(n)), "labels are not consecutive"
    for i, box in enumerate(ndimage.find_objects(labels + 1)):
        assert box is not None
        assert ndimage.label(labels[box] == i)[1] == 1, f"label {i} is not connected"
    return n


# ------------------------------------------------------------------------------------------------
def test_lab_matches_skimage_and_opencv():
    from skimage.color import rgb2lab

    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (1, 4096, 3), dtype=np.uint8)
    for img in _pictures() + [colours]:
        x = torch.from_numpy(img).permute(2, 0, 1)
        ours = rgb_to_lab(x).permute(1, 2, 0).numpy().astype(np.float64)
        ref = rgb2lab(img)
        # same formula as skimage: agreement to float rounding (L spans 100, a/b about 200)
        assert np.abs(ours - ref).max() < 1e-3
        # OpenCV's float path interpolates tables (errors up to ~0.4 in a/b, 0.2 in L): on
        # average 1e-3 of the L range, at worst 5e-3
        cv = cv2.cvtColor(img.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB).astype(np.float64)
        diff = np.abs(ours - cv)
        assert diff.max() < 0.5 and diff.mean() < 0.1, (diff.max(), diff.mean())
    # float input in [0, 1], batched, and grey
    img = _pictures()[0]
    x = torch.from_numpy(img).permute(2, 0, 1)
    assert torch.allclose(rgb_to_lab(x.double()[None] / 255.0), rgb_to_lab(x[None]), atol=1e-4)
    grey = x[:1][None]
    lab = rgb_to_lab(grey)
    assert lab.shape == (1, 3) + img.shape[:2] and lab[:, 1:].abs().max() < 1e-2  # neutral (skimage too)


@pytest.mark.parametrize("hwk", [(7, 5, 8), (5, 7, 35), (33, 17, 20), (1, 50, 10), (50, 1, 10),
                                 (3, 100, 30), (100, 37, 50), (224, 224, 196)])
def test_labels_consecutive_connected_and_near_target(hwk):
    h, w, k = hwk
    x = _resized_batch(h, w)
    out = slic_torch(x, k)
    assert out.shape == (3, h, w) and out.dtype == torch.int64
    counts = [_check_label_map(o.numpy()) for o in out]
    assert all(0.5 * k <= n <= 1.5 * k for n in counts), (hwk, counts)
    # without the connectivity step: still consecutive, at most one label per grid cell
    raw = slic_torch(x, k, enforce_connectivity=False)
    rows, cols = grid_shape(h, w, k)
    for o in raw:
        n = int(o.max()) + 1
        assert n <= rows * cols and torch.equal(torch.unique(o), torch.arange(n))


def test_noise_and_degenerate_inputs_do_not_crash():
    g = torch.Generator().manual_seed(0)
    for h, w, k in [(1, 1, 1), (1, 1, 5), (2, 2, 4), (64, 64, 1), (64, 64, 10000), (40, 30, 12)]:
        x = torch.randint(0, 256, (2, 3, h, w), generator=g, dtype=torch.uint8)
        out = slic_torch(x, k)
        for o in out:
            _check_label_map(o.numpy())
    x = _resized_batch(48, 64)
    flat = torch.full_like(x, 128)
    assert int(slic_torch(flat, 12).max()) + 1 == 12  # a flat image gives the grid
    for m in (0.0, 1.0, 100.0):  # m small: some pixels fall outside every window (fallback path)
        for o in slic_torch(x, 24, compactness=m):
            _check_label_map(o.numpy())
    _check_label_map(slic_torch(x[0], 24, iterations=0).numpy())  # (3, H, W) in, (H, W) out
    _check_label_map(slic_torch(x.float() / 255.0, 24, move_to_low_gradient=False)[0].numpy())
    _check_label_map(slic_torch(x, pixels_per_superpixel=64)[0].numpy())
    with pytest.raises(ValueError):
        slic_torch(x, None)
    with pytest.raises(ValueError):
        slic_torch(x[:, :2], 10)


def test_batch_equals_single_images_and_is_deterministic():
    x = _resized_batch(96, 128)
    x = torch.cat([x, x.flip(-1)])  # 6 images
    batch = slic_torch(x, 48)
    single = torch.stack([slic_torch(x[i:i + 1], 48)[0] for i in range(len(x))])
    assert torch.equal(batch, single)
    assert torch.equal(batch, slic_torch(x, 48))
    assert torch.equal(batch, slic_torch(x, 48, max_batch_pixels=2 * 96 * 128))  # chunks of 2
    assert not torch.equal(batch[0], batch[1])


def test_connected_components_matches_scipy():
    g = torch.Generator().manual_seed(1)
    maps = torch.randint(0, 3, (2, 40, 30), generator=g)
    snake = torch.zeros(40, 30, dtype=torch.long)  # one long serpentine component
    snake[::4, :] = 1
    snake[1::8, -1] = snake[2::8, -1] = snake[3::8, -1] = 1
    snake[5::8, 0] = snake[6::8, 0] = snake[7::8, 0] = 1
    maps = torch.cat([maps, snake[None]])
    ours = connected_components(maps)
    for o, lab in zip(ours.numpy(), maps.numpy()):
        ref = np.zeros_like(lab)
        nxt = 0
        for v in np.unique(lab):
            comp, n = ndimage.label(lab == v)
            ref[comp > 0] = comp[comp > 0] + nxt - 1
            nxt += n
        assert o.max() + 1 == nxt
        # the same partition: a bijection between our labels and scipy's
        pairs = np.unique(np.stack([o.ravel(), ref.ravel()]), axis=1)
        assert pairs.shape[1] == nxt
    assert ours[2][snake == 1].unique().numel() == 1  # the snake is one component


# ------------------------------------------------------------------------------------------------
def _boundary(labels):
    b = np.zeros(labels.shape, bool)
    dx = labels[:, 1:] != labels[:, :-1]
    dy = labels[1:] != labels[:-1]
    b[:, 1:] |= dx
    b[:, :-1] |= dx
    b[1:] |= dy
    b[:-1] |= dy
    return b


def _boundary_recall(labels, human_boundaries, tol=2.0):
    """Share of the human boundary pixels within ``tol`` pixels of a superpixel boundary (mean
    over the annotators)."""
    dist = ndimage.distance_transform_edt(~_boundary(labels))
    return float(np.mean([(dist[g] <= tol).mean() for g in human_boundaries if g.any()]))


def test_boundary_recall_on_bsds500(shared_data):
    from PIL import Image
    from skimage.segmentation import slic

    from hiseg.data.datasets.bsds500 import load_bsds_ground_truth

    root = shared_data / "bsds500"
    files = sorted((root / "images" / "val").glob("*.jpg"))[:6]
    assert files, "no BSDS500 val images found"
    k = 196
    seeds_cfg = SuperpixelConfig(num_superpixels=k, histogram_bins=5, iterations=15)
    rec = {"seeds": [], "skimage": [], "slic_torch": []}
    count = {name: [] for name in rec}
    for f in files:
        img = np.asarray(Image.open(f).convert("RGB"))
        _, bdry = load_bsds_ground_truth(root / "groundTruth" / "val" / f"{f.stem}.mat")
        maps = {
            "seeds": compute_superpixels(img, seeds_cfg),
            "skimage": slic(img, n_segments=k, compactness=10, start_label=0),
            "slic_torch": slic_torch(torch.from_numpy(img.copy()).permute(2, 0, 1), k).numpy(),
        }
        _check_label_map(maps["slic_torch"])
        for name, lab in maps.items():
            rec[name].append(_boundary_recall(lab, bdry))
            count[name].append(int(lab.max()) + 1)
    mean = {name: float(np.mean(v)) for name, v in rec.items()}
    print("\nboundary recall (2 px) on", len(files), "BSDS500 val images, K =", k)
    for name in rec:
        print(f"  {name:10s} recall {mean[name]:.3f}  superpixels {np.mean(count[name]):.1f}")
    assert all(0.5 * k <= n <= 1.5 * k for n in count["slic_torch"])
    assert mean["slic_torch"] >= 0.9 * mean["skimage"]
    assert mean["slic_torch"] >= 0.9 * mean["seeds"]


# ------------------------------------------------------------------------------------------------
def test_compute_paths_and_default():
    assert SuperpixelConfig().method == "seeds"
    x = _resized_batch(64, 80)
    cfg = SuperpixelConfig(method="slic_torch", num_superpixels=0, pixels_per_superpixel=64)
    batch = compute_superpixels_batch(x, cfg)
    assert torch.equal(batch, slic_torch(x, 80))
    for i in range(len(x)):  # the per-image (data mapper) path gives the same maps
        one = compute_superpixels(np.ascontiguousarray(x[i].permute(1, 2, 0).numpy()), cfg)
        assert np.array_equal(one, batch[i].numpy())
    seeds = SuperpixelConfig(num_superpixels=20)  # other methods: the per-image CPU loop
    loop = np.stack([compute_superpixels(np.ascontiguousarray(im.permute(1, 2, 0).numpy()), seeds) for im in x])
    assert np.array_equal(compute_superpixels_batch(x, seeds).numpy(), loop)
    with pytest.raises(ValueError, match="slic_torch"):
        compute_superpixels(np.zeros((8, 8, 3), np.uint8), SuperpixelConfig(method="nope"))


def test_backbone_computes_slic_torch_superpixels_for_the_batch():
    from detectron2.config import get_cfg
    from detectron2.modeling import build_backbone

    from helpers import add_all_configs

    cfg = get_cfg()
    add_all_configs(cfg)
    cfg.merge_from_file("configs/CAST/Base-CAST-S.yaml")
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.CAST.EMBED_DIM", 48, "MODEL.CAST.NUM_HEADS", 4,
                         "MODEL.CAST.DEPTHS", [1, 1, 1, 1], "MODEL.CAST.NUM_SEGMENTS", [24, 12, 6, 3],
                         "MODEL.CAST.SUPERPIXEL.METHOD", "slic_torch",
                         "MODEL.CAST.SUPERPIXEL.NUM_SUPERPIXELS", 0,
                         "MODEL.CAST.SUPERPIXEL.PIXELS_PER_SUPERPIXEL", 64])
    bb = build_backbone(cfg).eval()
    assert bb.superpixel_cfg.method == "slic_torch"
    rgb = _resized_batch(64, 96)
    pixels = rgb.float() if cfg.INPUT.FORMAT == "RGB" else rgb.flip(1).float()
    x = (pixels - bb.pixel_mean) / bb.pixel_std
    with torch.no_grad():
        out = bb(x)
    expected = slic_torch(rgb, 96)
    assert torch.equal(out["hierarchy"][:, 0], expected)
    assert out["num_segments"][:, 0].tolist() == [int(e.max()) + 1 for e in expected]
    for name, spec in bb.output_shape().items():
        assert out[name].shape == (3, spec.channels, 64 // spec.stride, 96 // spec.stride)
        assert torch.isfinite(out[name]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = _resized_batch(96, 128)
    cpu = slic_torch(x, 48)
    gpu = slic_torch(x.cuda(), 48)
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu, slic_torch(x.cuda(), 48))  # deterministic on the GPU
    assert torch.equal(gpu[1:2], slic_torch(x[1:2].cuda(), 48))
    for o in gpu.cpu():
        _check_label_map(o.numpy())
    # CUDA and CPU may differ in the last bit of pow(); after LAB rounding they agree (almost surely)
    assert (gpu.cpu() == cpu).float().mean() > 0.99


def test_grid_superpixels_share_slics_grid_on_thin_images():
    from hiseg_cast.superpixels import grid_superpixels

    for h, w in ((50, 1), (1, 50), (224, 224), (33, 17)):
        labels = grid_superpixels(h, w, 10 if min(h, w) == 1 else 49)
        rows, cols = grid_shape(h, w, 10 if min(h, w) == 1 else 49)
        assert len(np.unique(labels)) == rows * cols
    assert len(np.unique(grid_superpixels(50, 1, 10))) == 10
