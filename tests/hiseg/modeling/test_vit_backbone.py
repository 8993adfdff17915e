"""The plain-ViT Detectron2 backbone (hiseg.modeling.vit): sizes, strides, key features, grads."""
import math

import pytest
import torch

from hiseg.modeling import ViTBackbone, add_vit_config, build_vit_backbone, vit_base, vit_small

torch.set_num_threads(2)


def tiny(patch_size=16, **kw):
    kw.setdefault("out_features", ["p2", "p3", "p4", "p5"])
    return ViTBackbone(embed_dim=64, depth=2, num_heads=4, patch_size=patch_size, img_size=32,
                       out_channels=32, **kw).eval()


def check_outputs(model, out, h, w):
    shapes = model.output_shape()
    assert set(out) == set(shapes)
    for name, spec in shapes.items():
        s = spec.stride
        assert out[name].shape == (out[name].shape[0], spec.channels, math.ceil(h / s), math.ceil(w / s)), name


@pytest.mark.parametrize("patch_size", [8, 16])
def test_any_image_size_and_strides(patch_size):
    torch.manual_seed(0)
    model = tiny(patch_size, out_features=["p2", "p3", "p4", "p5", "p6"])
    assert {k: v.stride for k, v in model.output_shape().items()} == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    assert model.size_divisibility == 64
    x = torch.randn(2, 3, 64, 96)  # grid 4x6 (patch 16) or 8x12 (patch 8) from a 4x4 / 2x2 trained grid
    with torch.no_grad():
        out = model(x)
    check_outputs(model, out, 64, 96)
    assert all(torch.isfinite(v).all() for v in out.values())
    # a portrait image of another size, and one that is not a multiple of the patch (padded)
    with torch.no_grad():
        check_outputs(model, model(torch.randn(1, 3, 128, 64)), 128, 64)
        k = model.key_features(torch.randn(1, 3, 70, 50))
    assert k.shape == (1, math.ceil(70 / patch_size) * math.ceil(50 / patch_size), 64)


def test_res_names_and_size_divisibility():
    model = tiny(8, out_features=["res2", "res3", "res4", "res5"])
    assert {k: v.stride for k, v in model.output_shape().items()} == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    assert model.size_divisibility == 32
    with torch.no_grad():
        check_outputs(model, model(torch.randn(1, 3, 64, 96)), 64, 96)
    with pytest.raises(ValueError, match="p7"):
        tiny(16, out_features=["p7"])


def test_non_power_of_two_patch():
    model = tiny(14)
    assert model.size_divisibility == math.lcm(14, 32)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 448))
    check_outputs(model, out, 224, 448)


def test_key_features_are_the_last_blocks_keys():
    torch.manual_seed(1)
    model = tiny(8)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        k, (h, w) = model.key_features(x, return_grid=True)
        vit = model.vit
        t = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        for blk in vit.blocks[:-1]:
            t = blk(t)
        qkv = vit.blocks[-1].attn.qkv(vit.blocks[-1].norm1(t))
    assert (h, w) == (8, 12) and k.shape == (2, 96, 64)
    assert torch.allclose(k, qkv[:, 1:, 64:128], atol=1e-6)
    assert model.vit.blocks[-1].attn.qkv._forward_hooks == {}  # hook removed


def test_gradients_flow_and_freezing():
    torch.manual_seed(2)
    model = tiny(16).train()
    x = torch.randn(1, 3, 64, 96)
    out = model(x)
    sum(v.square().mean() for v in out.values()).backward()
    for name in ("vit.patch_embed.proj.weight", "vit.pos_embed", "vit.cls_token", "vit.blocks.0.attn.qkv.weight",
                 "vit.norm.weight", "pyramid.stages.p2.0.weight", "pyramid.stages.p5.1.weight"):
        p = dict(model.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.zero_grad()
    kf = model.key_features(x)
    kf.sum().backward()
    assert model.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0

    frozen = tiny(16, frozen=True)
    assert not any(p.requires_grad for p in frozen.vit.parameters())
    assert all(p.requires_grad for p in frozen.pyramid.parameters())


def test_channel_layer_norm():
    from hiseg.modeling import ChannelLayerNorm

    norm = ChannelLayerNorm(5)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 5, 3, 4)
    ref = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (5,), norm.weight, norm.bias, 1e-6)
    assert torch.allclose(norm(x), ref.permute(0, 3, 1, 2), atol=1e-6)
    assert isinstance(norm, torch.nn.LayerNorm)  # no weight decay under the usual norm rules


def test_presets():
    with torch.device("meta"):
        s, b = vit_small(), vit_base(patch_size=8)
    assert (s.vit.embed_dim, len(s.vit.blocks), s.vit.blocks[0].attn.num_heads, s.patch_size) == (384, 12, 6, 16)
    assert (b.vit.embed_dim, len(b.vit.blocks), b.vit.blocks[0].attn.num_heads, b.patch_size) == (768, 12, 12, 8)
    assert s.vit.blocks[0].norm1.eps == 1e-6 and s.vit.blocks[0].attn.qkv.bias is not None
    assert s.vit.pos_embed.shape == (1, 1 + 14 * 14, 384)


def test_config_and_meta_architecture():
    from detectron2.config import get_cfg
    from detectron2.modeling import build_backbone, build_model

    cfg = get_cfg()
    add_vit_config(cfg)
    add_vit_config(cfg)  # idempotent
    cfg.MODEL.BACKBONE.NAME = "build_vit_backbone"
    cfg.MODEL.VIT.merge_from_list(["EMBED_DIM", 64, "DEPTH", 2, "NUM_HEADS", 4, "PATCH_SIZE", 8,
                                   "IMG_SIZE", 32, "OUT_CHANNELS", 32])
    cfg.MODEL.DEVICE = "cpu"
    backbone = build_backbone(cfg)
    assert isinstance(backbone, ViTBackbone) and backbone.size_divisibility == 32
    assert backbone.vit.pos_embed.shape == (1, 1 + 16, 64)

    cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
    cfg.MODEL.SEM_SEG_HEAD.NAME = "SemSegFPNHead"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 16
    cfg.MODEL.SEM_SEG_HEAD.NORM = ""
    model = build_model(cfg).train()
    batch = [{"image": torch.randint(0, 255, (3, 64, 96)).float(),
              "sem_seg": torch.randint(0, 3, (64, 96))}]
    losses = model(batch)
    sum(losses.values()).backward()
    assert model.backbone.vit.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert build_vit_backbone is not None
