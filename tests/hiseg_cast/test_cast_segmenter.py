"""CAST + Segmenter's mask transformer (CAST Table 3b/c): the decoder, training and inference of
``CASTSegmenter`` on CPU, sliding windows, padding, the Segmenter data pipeline, and the quick
config end to end through tools/train_net.py on the real VOC samples."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from helpers import REPO, add_all_configs, stripes_sample

from hiseg_cast.data.dataset_mappers import CASTSegmenterMapper, PhotometricDistortion
from hiseg_cast.data.dataset_mappers.segmenter_dataset_mapper import _photometric
from hiseg_cast.modeling.heads import LinearDecoder, MaskTransformerDecoder
from hiseg_cast.modeling.meta_arch.segmenter import window_grid
from hiseg_cast.superpixels import grid_superpixels
from train_check import sgd_steps
from voc_sample import make_voc2012_root

QUICK = "configs/CAST/quick/segmenter_cast_tiny_voc_cpu.yaml"


# tiny tensors: one intra-op thread is faster (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_cfg(*opts, path=QUICK):
    cfg = get_cfg()
    add_all_configs(cfg)
    cfg.merge_from_file(str(REPO / path))
    cfg.merge_from_list(list(opts))
    return cfg


def make_model(*opts, seed=0):
    """The quick config's model with 5 classes, whole-image inference unless ``opts`` say otherwise."""
    torch.manual_seed(seed)
    return build_model(make_cfg("MODEL.CAST_SEGMENTER.NUM_CLASSES", 5, "MODEL.CAST_SEGMENTER.TEST_WINDOW_SIZE", 0,
                                "MODEL.CAST_SEGMENTER.TEST_WINDOW_STRIDE", 0, *opts))


def stripes(h, w, seed, sp=True):
    """A two-region image (class 0 left, class 3 right) with its superpixels, as the mapper gives."""
    return stripes_sample(h, w, seed, superpixels=sp)


# --------------------------------------------------------------------------------------------
# the decoder and the windows
# --------------------------------------------------------------------------------------------
def test_mask_transformer_ignores_padded_tokens():
    torch.manual_seed(0)
    dec = MaskTransformerDecoder(16, 7, num_layers=2, num_heads=2).eval()
    assert len(dec.blocks) == 2 and dec.class_embed.weight.shape == (7, 16)
    assert MaskTransformerDecoder(128, 3).blocks[0].attn.num_heads == 2  # Segmenter: width / 64 heads
    tokens = torch.randn(2, 10, 16)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 6:] = False
    with torch.no_grad():
        both = dec(tokens, valid)
        alone = dec(tokens[1:, :6], valid[1:, :6])
    assert both.shape == (2, 10, 7)
    torch.testing.assert_close(both[1, :6], alone[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(both[1, 6:], torch.zeros(4, 7))  # padded slots: zero logits, never NaN
    # mask norm: a LayerNorm over the classes (identity affine at init) -> zero mean per token
    torch.testing.assert_close(both[0].mean(-1), torch.zeros(10), rtol=0, atol=1e-5)
    lin = LinearDecoder(16, 7)
    assert lin(tokens, valid).shape == (2, 10, 7)
    with pytest.raises(ValueError, match="divisible"):
        MaskTransformerDecoder(48, 3, num_heads=5)
    with pytest.raises(ValueError, match="NUM_LAYERS"):
        MaskTransformerDecoder(48, 3, num_layers=0)
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        dec(tokens[0], valid[0])


def test_superpixel_loss_is_per_pixel_cross_entropy():
    """The loss on token logits equals the per-pixel cross-entropy of the scattered logit map."""
    from hiseg_cast.modeling.heads import superpixel_cross_entropy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 4, generator=g)
    sp = torch.randint(0, 6, (2, 9, 11), generator=g)
    sp[1, :, 8:] = -1  # padding
    targets = torch.randint(0, 4, (2, 9, 11), generator=g)
    targets[0, :2] = 255
    targets[sp < 0] = 255
    pixel_logits = torch.stack([logits[b][sp[b].clamp(min=0)].permute(2, 0, 1) for b in range(2)])
    want = torch.nn.functional.cross_entropy(pixel_logits, targets, ignore_index=255)
    torch.testing.assert_close(superpixel_cross_entropy(logits, sp, targets, 255), want)
    with pytest.raises(ValueError, match="labels must be in"):
        superpixel_cross_entropy(logits, sp, torch.full_like(targets, 4), 255)


def test_window_grid_follows_segmenter():
    # starts 0, 40, ... below length - size, then one window flush with the end
    assert window_grid(70, 150, 64, 40) == [(y, x, y + 64, x + 64) for y in (0, 6) for x in (0, 40, 80, 86)]
    assert window_grid(50, 64, 64, 64) == [(0, 0, 50, 64)]  # shorter than the window: clipped
    assert window_grid(128, 128, 64, 64) == [(0, 0, 64, 64), (0, 64, 64, 128), (64, 0, 128, 64),
                                             (64, 64, 128, 128)]
    for h, w, s, t in [(97, 131, 32, 20), (33, 200, 32, 32), (5, 5, 3, 1)]:
        cover = torch.zeros(h, w, dtype=torch.long)
        for y0, x0, y1, x1 in window_grid(h, w, s, t):
            cover[y0:y1, x0:x1] += 1
        assert bool((cover > 0).all())
    with pytest.raises(ValueError, match="stride"):
        window_grid(10, 10, 4, 5)


# --------------------------------------------------------------------------------------------
# the meta-architecture
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder", ["mask", "linear"])
def test_segmenter_trains_on_cpu(decoder):
    model = make_model("MODEL.CAST_SEGMENTER.DECODER", decoder)
    assert type(model).__name__ == "CASTSegmenter"
    # one image brings its superpixels (as CASTDatasetMapper does), the other lets the model compute them
    batch = [stripes(64, 96, 0), stripes(72, 80, 1, sp=False)]
    batch[1]["sem_seg"][:5] = 255  # ignored rows
    losses = sgd_steps(model, batch)
    assert len(set(losses)) == len(losses), losses
    with pytest.raises(ValueError, match="sem_seg"):
        model([{k: v for k, v in batch[0].items() if k != "sem_seg"}])
    bad = dict(batch[0], sem_seg=torch.full((64, 96), 7))
    with pytest.raises(ValueError, match="labels must be in"):
        model([bad])


@pytest.mark.parametrize("window", [0, 48])
def test_inference_shapes_on_odd_sizes(window):
    model = make_model("MODEL.CAST_SEGMENTER.TEST_WINDOW_SIZE", window,
                       "MODEL.CAST_SEGMENTER.TEST_WINDOW_STRIDE", 32).eval()
    inputs = [dict(stripes(37, 53, 0), height=75, width=101),  # smaller than a window
              dict(stripes(70, 150, 1, sp=False), height=71, width=149),  # several windows
              stripes(61, 45, 2)]
    with torch.no_grad():
        outs = model(inputs)
    for d, o in zip(inputs, outs):
        assert o["sem_seg"].shape == (5, d["height"], d["width"])
        assert torch.isfinite(o["sem_seg"]).all()


def test_one_window_equals_whole_image():
    """A window that covers the image gives the whole-image result; overlaps are averaged."""
    whole = make_model().eval()
    windowed = make_model("MODEL.CAST_SEGMENTER.TEST_WINDOW_SIZE", 128).eval()
    windowed.load_state_dict(whole.state_dict())
    d = stripes(64, 96, 3)
    with torch.no_grad():
        a = whole([d])[0]["sem_seg"]
        b = windowed([d])[0]["sem_seg"]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        sp = d["superpixels"]
        for label in (0, int(sp.max())):  # every pixel carries its superpixel token's logits
            pix = a[:, sp == label]
            assert torch.equal(pix, pix[:, :1].expand_as(pix))
        # two windows overlapping on columns 32..63: the overlap holds their mean
        windowed.window_size, windowed.window_stride = 64, 32
        both = windowed([d])[0]["sem_seg"]
        left = windowed.sliding_window_logits({"image": d["image"][:, :, :64],
                                               "superpixels": d["superpixels"][:, :64]})
        right = windowed.sliding_window_logits({"image": d["image"][:, :, 32:],
                                                "superpixels": d["superpixels"][:, 32:]})
    torch.testing.assert_close(both[..., :32], left[..., :32])
    torch.testing.assert_close(both[..., 64:], right[..., 32:])
    torch.testing.assert_close(both[..., 32:64], (left[..., 32:] + right[..., :32]) / 2)


def test_padding_invariance():
    # sin-cos positions: the learned position embedding of the config is resized to the padded
    # feature grid, so with it every token's position depends on the batch's padded size
    model = make_model("MODEL.CAST.POS_EMBED", "sincos").eval()
    g = torch.Generator().manual_seed(5)
    img = torch.randint(0, 255, (3, 64, 96), generator=g).float()
    a = {"image": img, "superpixels": torch.from_numpy(grid_superpixels(64, 96, 24))}
    more = {"image": torch.randint(0, 255, (3, 64, 96), generator=g).float(),
            "superpixels": torch.from_numpy(grid_superpixels(64, 96, 60))}
    bigger = {"image": torch.randint(0, 255, (3, 100, 150), generator=g).float(), "height": 100, "width": 150,
              "superpixels": torch.from_numpy(grid_superpixels(100, 150, 60))}
    with torch.no_grad():
        alone = model([a])[0]["sem_seg"]
        # padded token slots (a batch partner with more superpixels) are masked out: same result
        with_more = model([a, more])[0]["sem_seg"]
        torch.testing.assert_close(alone, with_more, rtol=1e-4, atol=1e-4)
        # spatial padding (a larger partner): superpixels are padded with -1 and the result is
        # cropped back; only the stem's stride-8 features next to the right / bottom edge differ
        # (their bilinear upsampling reads the padded cells), so results agree closely
        padded = model([a, bigger])
        assert padded[0]["sem_seg"].shape == (5, 64, 96) and padded[1]["sem_seg"].shape == (5, 100, 150)
        assert (padded[0]["sem_seg"].argmax(0) == alone.argmax(0)).float().mean() > 0.98
        torch.testing.assert_close(padded[0]["sem_seg"], alone, rtol=0, atol=0.05)
        # sliding windows run each image on its own: exactly invariant
        model.window_size, model.window_stride = 64, 48
        w_alone = model([a])[0]["sem_seg"]
        torch.testing.assert_close(model([a, bigger])[0]["sem_seg"], w_alone, rtol=1e-5, atol=1e-5)


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="DECODER"):
        make_model("MODEL.CAST_SEGMENTER.DECODER", "deeplab")
    with pytest.raises(ValueError, match="STRIDE"):
        make_model("MODEL.CAST_SEGMENTER.TEST_WINDOW_SIZE", 32, "MODEL.CAST_SEGMENTER.TEST_WINDOW_STRIDE", 48)
    with pytest.raises(ValueError, match="HIDDEN_DIM"):
        make_model("MODEL.CAST_SEGMENTER.HIDDEN_DIM", 50)
    model = make_model("MODEL.CAST_SEGMENTER.TEST_WINDOW_SIZE", 32).eval()
    assert model.window_stride == 32  # stride 0: the window size
    d = stripes(40, 40, 0)
    with pytest.raises(ValueError, match="do not match"):
        model([dict(d, superpixels=d["superpixels"][:30])])


# --------------------------------------------------------------------------------------------
# the Segmenter data pipeline
# --------------------------------------------------------------------------------------------
def test_photometric_distortion():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert np.array_equal(_photometric(img, None, None, True, None, None, "RGB"), img)
    bright = _photometric(img, 10.0, None, True, None, None, "RGB")
    assert np.array_equal(bright, np.clip(img.astype(int) + 10, 0, 255).astype(np.uint8))
    # a full hue turn (180 in OpenCV's uint8 hue) changes nothing beyond HSV round-off
    turned = _photometric(img, None, None, True, None, 180, "RGB")
    assert np.abs(turned.astype(int) - img.astype(int)).max() <= 8
    np.random.seed(0)
    aug = PhotometricDistortion()
    for _ in range(5):
        out = aug.get_transform(img).apply_image(img)
        assert out.shape == img.shape and out.dtype == np.uint8
    with pytest.raises(ValueError, match="RGB or BGR"):
        PhotometricDistortion(image_format="L")


# --------------------------------------------------------------------------------------------
# real VOC samples: the mapper, and tools/train_net.py with the quick config
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def voc_root(shared_data, tmp_path_factory):
    """A DETECTRON2_DATASETS folder with VOC2012's layout holding the real VOC sample images and
    labels (train_aug = val = the 3 images)."""
    return make_voc2012_root(shared_data, tmp_path_factory.mktemp("d2voc"))


def test_mapper_resizes_then_crops(voc_root):
    from hiseg.data.datasets.voc import load_voc_sem_seg

    cfg = make_cfg()
    dicts = load_voc_sem_seg("t", str(voc_root / "VOC2012"), "ImageSets/Segmentation/train_aug.txt",
                             "SegmentationClassAug", None)
    train, test = CASTSegmenterMapper(cfg, True), CASTSegmenterMapper(cfg, False)
    kinds = [type(a).__name__ for a in train.augmentations.augs]
    assert kinds == ["ResizeShortestEdge", "RandomCrop_CategoryAreaConstraint", "RandomFlip",
                     "PhotometricDistortion"]
    np.random.seed(0)
    for d in dicts:
        out = train(d)
        h, w = out["image"].shape[1:]
        # resized first (short side 96..192, 4:3 images), then cropped to at most 128 x 128;
        # detectron2's DatasetMapper would crop the ~500x375 original first and then resize
        assert max(h, w) == 128 and min(h, w) >= 96
        assert out["superpixels"].shape == out["sem_seg"].shape == (h, w)
        assert set(torch.unique(out["sem_seg"]).tolist()) <= set(range(21)) | {255}
        out = test(d)
        assert min(out["image"].shape[1:]) == 128 and out["superpixels"].shape == out["image"].shape[1:]


def test_train_net_quick_config_trains_and_evaluates(voc_root, tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=str(voc_root), OMP_NUM_THREADS="1")
    out_dir = tmp_path / "run"
    log_path = tmp_path / "train.log"
    args = [sys.executable, "tools/train_net.py", "--config-file", QUICK, "OUTPUT_DIR", str(out_dir),
            "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "100"]
    with open(log_path, "w") as log:  # a file, not a PIPE nobody reads (the config dump can fill it)
        proc = subprocess.run(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=300)
    text = log_path.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "Evaluation results for voc_2012_sem_seg_val" in text, text[-3000:]
    assert "copypaste: mIoU" in text
    res = torch.load(out_dir / "inference" / "voc_2012_sem_seg_val" / "sem_seg_evaluation.pth", weights_only=False)
    assert 0 <= res["mIoU"] <= 100 and np.isfinite(res["mIoU"])
    final = torch.load(out_dir / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == 2 and any(k.startswith("head.class_embed") for k in final["model"])
