"""OAP's multi-scale encoder (hiseg_oap.modeling): deformable attention core vs a slow reference,
ViT-Adapter shapes / zero initialisation / gradients, and the registered backbone."""
import math

import pytest
import torch

from hiseg.modeling import ViTBackbone
from hiseg_oap.modeling import (MSDeformAttn, ViTAdapterBackbone, add_vit_adapter_config, even_interaction_indexes,
                          level_start_index, ms_deform_attn_pytorch, ms_deform_attn_reference, resample_stride,
                          spatial_shapes_tensor)

torch.set_num_threads(2)

TINY = dict(embed_dim=48, depth=4, num_heads=4, img_size=32, deform_num_heads=4, conv_inplanes=16)


def tiny_adapter(patch_size=16, **kw):
    args = dict(TINY, patch_size=patch_size)
    args.update(kw)
    return ViTAdapterBackbone(**args)


def random_case(dtype=torch.float64, n=2, m=2, dh=3, lq=5, p=3, shapes=((3, 4), (2, 2), (1, 3)), seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, dh, generator=g, dtype=dtype)
    # include locations outside [0, 1] (zero padding) and near the borders
    loc = torch.rand(n, lq, m, len(shapes), p, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    attw = torch.rand(n, lq, m, len(shapes), p, generator=g, dtype=dtype)
    attw = attw / attw.sum((-1, -2), keepdim=True)
    shapes_t = spatial_shapes_tensor(shapes)
    return value, shapes_t, level_start_index(shapes_t), loc, attw


# ---------------------------------------------------------------------------------------------
# multi-scale deformable attention


def test_core_matches_reference_values():
    value, shapes, starts, loc, attw = random_case(torch.float64)
    out = ms_deform_attn_pytorch(value, shapes, starts, loc, attw)
    ref = ms_deform_attn_reference(value, shapes, starts, loc, attw)
    assert out.shape == (2, 5, 2 * 3)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    # float32, a list of shapes, no start index
    value, shapes, starts, loc, attw = random_case(torch.float32, n=1, m=4, dh=8, lq=17, p=4, seed=1)
    out = ms_deform_attn_pytorch(value, shapes.tolist(), None, loc, attw)
    torch.testing.assert_close(out, ms_deform_attn_reference(value, shapes, starts, loc, attw), rtol=1e-5, atol=1e-6)


def test_core_hand_case():
    # one 2x2 level, one head, one channel: sampling at pixel centres reads the pixel; the centre
    # of the map averages the four pixels; outside the map reads zero
    value = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    loc = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.5, 0.5], [1.5, 0.5], [1.0, 0.25]])
    loc = loc.view(1, 6, 1, 1, 1, 2)
    attw = torch.ones(1, 6, 1, 1, 1)
    for fn in (ms_deform_attn_pytorch, ms_deform_attn_reference):
        out = fn(value, [(2, 2)], None, loc, attw).flatten()
        torch.testing.assert_close(out, torch.tensor([1.0, 2.0, 3.0, 2.5, 0.0, 1.0]))


def test_core_gradients_gradcheck_and_reference():
    value, shapes, starts, loc, attw = random_case(torch.float64, n=1, lq=3, p=2, shapes=((3, 4), (2, 3)), seed=2)
    inputs = [value.requires_grad_(), loc.requires_grad_(), attw.requires_grad_()]

    def core(v, l, a):
        return ms_deform_attn_pytorch(v, shapes, starts, l, a)

    def reference(v, l, a):
        return ms_deform_attn_reference(v, shapes, starts, l, a)

    assert torch.autograd.gradcheck(core, inputs, eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(reference, inputs, eps=1e-6, atol=1e-6)
    w = torch.randn(1, 3, 2 * 3, dtype=torch.float64)
    g_core = torch.autograd.grad((core(*inputs) * w).sum(), inputs)
    g_ref = torch.autograd.grad((reference(*inputs) * w).sum(), inputs)
    for a, b in zip(g_core, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_msdeformattn_init_and_forward():
    attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    assert torch.count_nonzero(attn.sampling_offsets.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.bias) == 0
    assert torch.count_nonzero(attn.value_proj.bias) == 0 and torch.count_nonzero(attn.output_proj.bias) == 0
    bias = attn.sampling_offsets.bias.view(4, 3, 2, 2)
    # head k points along angle 2 pi k / 4 (Chebyshev-normalised), point i at distance i + 1
    torch.testing.assert_close(bias[:, 0, 0], torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[:, :, 1], 2 * bias[:, :, 0])
    torch.testing.assert_close(bias[:, 2], bias[:, 0])

    shapes = spatial_shapes_tensor([(6, 8), (3, 4), (2, 2)])
    feats = torch.randn(2, int(shapes.prod(1).sum()), 32)
    query = torch.randn(2, 7, 32)
    ref = torch.rand(1, 7, 3, 2)  # broadcast over the batch
    out = attn(query, ref, feats, shapes, level_start_index(shapes))
    assert out.shape == (2, 7, 32)
    # same as the explicit computation with the reference core
    n = 2
    value = attn.value_proj(feats).view(n, -1, 4, 8)
    off = attn.sampling_offsets(query).view(n, 7, 4, 3, 2, 2)
    w = attn.attention_weights(query).view(n, 7, 4, 6).softmax(-1).view(n, 7, 4, 3, 2)
    norm = torch.stack([shapes[:, 1], shapes[:, 0]], -1).float()
    loc = ref[:, :, None, :, None] + off / norm[None, None, None, :, None]
    expected = attn.output_proj(ms_deform_attn_reference(value, shapes, None, loc, w))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # padded positions contribute nothing: masking == zeroing their values
    mask = torch.zeros(2, feats.shape[1], dtype=torch.bool)
    mask[:, -4:] = True
    out_masked = attn(query, ref, feats, shapes, None, mask)
    assert out_masked.shape == out.shape
    with pytest.raises(ValueError, match="levels"):
        attn(query, ref[:, :, :2], feats[:, :56], shapes[:2])


def test_resample_stride():
    x = torch.arange(24.0).view(1, 1, 4, 6)
    torch.testing.assert_close(resample_stride(x, 8, 16, (2, 3)), torch.nn.functional.avg_pool2d(x, 2))
    torch.testing.assert_close(resample_stride(x, 8, 16, (2, 3)),
                               torch.nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear"))
    assert resample_stride(x, 16, 4, (15, 22)).shape[-2:] == (15, 22)
    assert resample_stride(x, 8, 32, (1, 2)).shape[-2:] == (1, 2)
    assert resample_stride(x, 14, 4, (14, 21)).shape[-2:] == (14, 21)
    assert even_interaction_indexes(12) == [(0, 2), (3, 5), (6, 8), (9, 11)]
    assert even_interaction_indexes(4) == [(0, 0), (1, 1), (2, 2), (3, 3)]


# ---------------------------------------------------------------------------------------------
# ViT-Adapter


@pytest.mark.parametrize("patch_size", [8, 16])
def test_output_shapes_any_size(patch_size):
    torch.manual_seed(0)
    model = tiny_adapter(patch_size, zero_init=False).eval()
    shapes = model.output_shape()
    assert {k: v.stride for k, v in shapes.items()} == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    assert {v.channels for v in shapes.values()} == {48}
    assert model.size_divisibility == math.lcm(patch_size, 32) == 32
    for h, w in ((64, 96), (96, 64), (70, 50)):  # non-square, portrait, not a multiple of the patch
        with torch.no_grad():
            out = model(torch.randn(2, 3, h, w))
        assert set(out) == set(shapes)
        for name, spec in shapes.items():
            assert out[name].shape == (2, spec.channels, math.ceil(h / spec.stride), math.ceil(w / spec.stride))
            assert torch.isfinite(out[name]).all()


def test_non_power_of_two_patch_and_subset():
    model = tiny_adapter(14, out_features=["res3", "res5"]).eval()
    assert model.size_divisibility == math.lcm(14, 32)
    assert set(model.output_shape()) == {"res3", "res5"}
    with torch.no_grad():
        out = model(torch.randn(1, 3, 56, 84))
    assert out["res3"].shape == (1, 48, 7, 11) and out["res5"].shape == (1, 48, 2, 3)
    with pytest.raises(ValueError):
        tiny_adapter(16, out_features=["p2"])
    with pytest.raises(ValueError, match="contiguous"):
        tiny_adapter(16, interaction_indexes=[(0, 0), (1, 1), (3, 3), (2, 2)])


@pytest.mark.parametrize("patch_size", [8, 16])
def test_zero_init_preserves_vit(patch_size):
    torch.manual_seed(0)
    adapter = tiny_adapter(patch_size, reg_tokens=1).eval()
    plain = ViTBackbone(embed_dim=48, depth=4, num_heads=4, img_size=32, patch_size=patch_size, reg_tokens=1).eval()
    # the same ViT weights under the same names
    missing = plain.load_state_dict({k: v for k, v in adapter.state_dict().items() if k.startswith("vit.")},
                                    strict=False)
    assert not [k for k in missing.missing_keys if k.startswith("vit.")] and not missing.unexpected_keys
    # what is zero
    for blk in adapter.interactions:
        assert torch.count_nonzero(blk.injector.gamma) == 0
        for ext in blk.extractors():
            assert torch.count_nonzero(ext.attn.output_proj.weight) == 0 and torch.count_nonzero(ext.ffn.fc2.weight) == 0
    assert torch.count_nonzero(adapter.spm.fc1.weight) == 0 and torch.count_nonzero(adapter.level_embed) == 0
    # (and what is not: the deformable attention still has its Deformable-DETR init)
    assert torch.count_nonzero(adapter.interactions[0].injector.attn.value_proj.weight) > 0

    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out, (prefix, fmap) = adapter.forward_features(x, return_tokens=True)
        prefix0, fmap0 = plain.forward_tokens(x)
        torch.testing.assert_close(prefix, prefix0, rtol=0, atol=1e-6)
        torch.testing.assert_close(fmap, fmap0, rtol=0, atol=1e-6)
        torch.testing.assert_close(adapter.key_features(x), plain.key_features(x), rtol=0, atol=1e-6)
        # each level is the normalised ViT map of its stage, whatever the spatial prior computes
        tokens = plain.vit._pos_embed(plain.vit.patch_embed(x))
        stages = []
        for first, last in adapter.interaction_indexes:
            tokens = plain.vit.blocks[first:last + 1](tokens)
            stages.append(tokens[:, 2:].transpose(1, 2).reshape(2, 48, 64 // patch_size, 96 // patch_size))
        for i, (name, stride) in enumerate((("res2", 4), ("res3", 8), ("res4", 16), ("res5", 32))):
            expected = adapter.out_norms[name](resample_stride(stages[i], patch_size, stride, (64 // stride, 96 // stride)))
            torch.testing.assert_close(out[name], expected, rtol=0, atol=1e-5)
        for p in adapter.spm.stem.parameters():
            p.add_(torch.randn_like(p))
        out2 = adapter(x)
    for name in out:
        torch.testing.assert_close(out2[name], out[name], rtol=0, atol=0)


def test_gradients_reach_adapter():
    torch.manual_seed(0)
    model = tiny_adapter(16).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(1, 3, 32, 64)
    target = {k: torch.randn(1, 48, 32 // s, 64 // s) for k, s in (("res2", 4), ("res3", 8), ("res4", 16),
                                                                       ("res5", 32))}

    def step():
        opt.zero_grad()
        out = model(x)
        loss = sum(((out[k] - target[k]) ** 2).mean() for k in out)
        loss.backward()
        return {n for n, p in model.named_parameters() if p.grad is not None and torch.count_nonzero(p.grad) > 0}

    adapter_names = {n for n, _ in model.adapter_named_parameters()}
    first = step()
    # at the zero init, the ViT, the zeroed layers and the output norms learn at once; the
    # injector (gamma = 0, c = 0) does not yet
    # (the ViT's final LayerNorm is not on the path to res2..res5)
    assert {n for n, _ in model.vit.named_parameters(prefix="vit") if not n.startswith("vit.norm.")} <= first
    assert {"spm.fc2.weight", "level_embed", "up.bias", "interactions.0.extractor.attn.output_proj.weight",
            "interactions.3.extractor.ffn.fc2.bias", "out_norms.res2.weight"} <= first
    assert not any(".injector." in n for n in first)
    opt.step()
    seen = set(first)
    for _ in range(3):
        seen |= step()
        opt.step()
    assert all(torch.count_nonzero(blk.injector.gamma) > 0 for blk in model.interactions)
    assert adapter_names - seen == set(), sorted(adapter_names - seen)


def test_frozen_vit():
    model = tiny_adapter(8, frozen=True)
    assert not any(p.requires_grad for p in model.vit.parameters())
    assert all(p.requires_grad for _, p in model.adapter_named_parameters())


def test_builds_from_cfg():
    from detectron2.config import get_cfg
    from detectron2.modeling import BACKBONE_REGISTRY, build_backbone

    from helpers import add_all_configs

    cfg = get_cfg()
    add_all_configs(cfg)
    add_vit_adapter_config(cfg)
    add_vit_adapter_config(cfg)  # idempotent
    assert cfg.MODEL.VIT_ADAPTER.ZERO_INIT
    assert "build_vit_adapter_backbone" in BACKBONE_REGISTRY._obj_map
    cfg.merge_from_list([
        "MODEL.BACKBONE.NAME", "build_vit_adapter_backbone", "MODEL.VIT.EMBED_DIM", "48", "MODEL.VIT.DEPTH", "4",
        "MODEL.VIT.NUM_HEADS", "4", "MODEL.VIT.PATCH_SIZE", "8", "MODEL.VIT.IMG_SIZE", "32",
        "MODEL.VIT_ADAPTER.DEFORM_NUM_HEADS", "4", "MODEL.VIT_ADAPTER.CONV_INPLANES", "16",
        "MODEL.VIT_ADAPTER.INTERACTION_INDEXES", "[[0, 0], [1, 1], [2, 2], [3, 3]]",
    ])
    model = build_backbone(cfg).eval()
    assert isinstance(model, ViTAdapterBackbone) and model.patch_size == 8
    assert model.interaction_indexes == [(0, 0), (1, 1), (2, 2), (3, 3)]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    for name, spec in model.output_shape().items():
        assert out[name].shape == (1, 48, 64 // spec.stride, 96 // spec.stride)
