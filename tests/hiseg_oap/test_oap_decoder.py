"""OAP's mask decoder (hiseg_oap.modeling.pixel_decoder / transformer_decoder): shapes for odd,
non-square inputs, config construction, gradients to the [SEM] / [INS] tokens, the level tokens
as the only thing telling the query groups apart, masked attention with empty masks, and batch
invariance."""
import copy
import math

import pytest
import torch

from hiseg.compat import shape_spec
from hiseg_oap.modeling import (LevelQueryTransformerDecoder, MSDeformAttnPixelDecoder, masked_attention_mask,
                          sine_position_embedding)
from hiseg_oap.modeling.pixel_decoder import _encoder_reference_points

torch.set_num_threads(2)

CHANNELS = {"res2": 8, "res3": 12, "res4": 16, "res5": 20}
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
PIX = dict(conv_dim=32, mask_dim=16, enc_layers=2, dim_feedforward=48, nheads=4, n_points=2)
DEC = dict(hidden_dim=32, num_sem_queries=3, num_ins_queries=5, nheads=4, dim_feedforward=48, dec_layers=4,
           mask_dim=16)


def input_shape(names=("res2", "res3", "res4", "res5")):
    return {k: shape_spec(channels=CHANNELS[k], stride=STRIDES[k]) for k in names}


def backbone_features(batch, height, width, seed=0, dtype=torch.float32):
    """Feature maps of a conv backbone at strides 4..32 (sizes rounded up, as with padded convs)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(batch, c, math.ceil(height / STRIDES[k]), math.ceil(width / STRIDES[k]), generator=g,
                           dtype=dtype)
            for k, c in CHANNELS.items()}


def build(seed=0, **dec_kw):
    torch.manual_seed(seed)
    pix = MSDeformAttnPixelDecoder(input_shape(), **PIX)
    dec = LevelQueryTransformerDecoder(PIX["conv_dim"], **dict(DEC, **dec_kw))
    return pix.eval(), dec.eval()


def decoder_inputs(batch=2, sizes=((3, 4), (5, 7), (9, 13)), mask_size=(18, 26), seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(batch, PIX["conv_dim"], h, w, generator=g, dtype=dtype) for h, w in sizes]
    mf = torch.randn(batch, DEC["mask_dim"], *mask_size, generator=g, dtype=dtype)
    return x, mf


def all_predictions(out):
    return [out] + list(out["aux_outputs"])


# ---------------------------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("hw", [(72, 104), (33, 17)])
def test_shapes_odd_non_square(batch, hw):
    pix, dec = build()
    h, w = hw
    feats = backbone_features(batch, h, w)
    with torch.no_grad():
        mask_features, ms = pix.forward_features(feats)
        out = dec(ms, mask_features)
    assert mask_features.shape == (batch, PIX["mask_dim"]) + tuple(feats["res2"].shape[-2:])
    assert len(ms) == 3
    for m, k in zip(ms, ("res5", "res4", "res3")):  # coarsest first
        assert m.shape == (batch, PIX["conv_dim"]) + tuple(feats[k].shape[-2:])
    q = DEC["num_sem_queries"] + DEC["num_ins_queries"]
    assert set(out) == {"pred_masks", "pred_objectness", "query_embeds", "aux_outputs"}
    assert len(out["aux_outputs"]) == DEC["dec_layers"]
    for pred in all_predictions(out):
        assert set(pred) >= {"pred_masks", "pred_objectness", "query_embeds"}
        assert pred["pred_masks"].shape == (batch, q) + tuple(mask_features.shape[-2:])
        assert pred["pred_objectness"].shape == (batch, q, 2)
        assert pred["query_embeds"].shape == (batch, q, DEC["hidden_dim"])
        assert all(torch.isfinite(v).all() for k, v in pred.items() if k != "aux_outputs")
    # 72 x 104 at stride 32 is 3 x 4 (rounded up), at stride 4 it is 18 x 26
    if hw == (72, 104):
        assert ms[0].shape[-2:] == (3, 4) and mask_features.shape[-2:] == (18, 26)


def test_semantic_queries_first():
    _, dec = build()
    s, i = DEC["num_sem_queries"], DEC["num_ins_queries"]
    assert (dec.num_sem_queries, dec.num_ins_queries) == (s, i)
    assert dec.sem_slice == slice(0, s) and dec.ins_slice == slice(s, s + i)
    with torch.no_grad():
        dec.level_tokens.weight[0].fill_(1.0)  # [SEM]
        dec.level_tokens.weight[1].fill_(-1.0)  # [INS]
        extra = dec.query_positions() - dec.query_embed.weight
    torch.testing.assert_close(extra[:s], torch.ones(s, DEC["hidden_dim"]))
    torch.testing.assert_close(extra[s:], -torch.ones(i, DEC["hidden_dim"]))
    # output row q is query q: the prediction before the first layer reads only query_feat[q]
    dec = dec.double()
    x, mf = decoder_inputs()
    before = dec(x, mf)["aux_outputs"][0]["pred_masks"]
    with torch.no_grad():
        dec.query_feat.weight[s] += torch.randn(DEC["hidden_dim"], dtype=torch.float64)  # not a constant: LN
    after = dec(x, mf)["aux_outputs"][0]["pred_masks"]
    changed = (before - after).abs().flatten(2).amax(-1).amax(0) > 0
    assert changed.tolist() == [q == s for q in range(s + i)]


def test_sine_position_embedding():
    pe = sine_position_embedding(3, 5, 8)
    assert pe.shape == (8, 3, 5)
    rows = 2 * math.pi * torch.arange(1, 4) / 3
    cols = 2 * math.pi * torch.arange(1, 6) / 5
    torch.testing.assert_close(pe[0, :, 0], rows.sin())
    torch.testing.assert_close(pe[1, :, 0], rows.cos())
    torch.testing.assert_close(pe[2, :, 0], (rows / 100.0).sin())  # 10000 ** (2 * 1 / 4)
    torch.testing.assert_close(pe[4, 0, :], cols.sin())
    torch.testing.assert_close(pe[5, 0, :], cols.cos())
    with pytest.raises(ValueError, match="even"):
        sine_position_embedding(3, 5, 7)


def test_encoder_reference_points_align_levels():
    # divisible sizes: each level's own cell centres, (i + 0.5) / H_l, as in Mask2Former
    ref = _encoder_reference_points([(2, 3), (4, 6)], [16, 8], torch.device("cpu"), torch.float64)
    assert ref.shape == (1, 30, 2, 2)
    torch.testing.assert_close(ref[0, 0, 0], torch.tensor([0.5 / 3, 0.5 / 2], dtype=torch.float64))
    torch.testing.assert_close(ref[0, 0, 1], torch.tensor([1.0 / 6, 1.0 / 4], dtype=torch.float64))
    # rounded-up coarse level (72 px: 3 cells of 32 = 96 px, 9 cells of 8): same image point on both
    ref = _encoder_reference_points([(3, 1), (9, 1)], [32, 8], torch.device("cpu"), torch.float64)
    y_pix = ref[0, :, 0, 1] * 96
    torch.testing.assert_close(ref[0, :, 1, 1] * 72, y_pix)


# ---------------------------------------------------------------------------------------------
# config


def tiny_cfg():
    from detectron2.config import get_cfg

    from helpers import add_all_configs

    cfg = add_all_configs(get_cfg())
    p, d = cfg.MODEL.OAP.PIXEL_DECODER, cfg.MODEL.OAP.DECODER
    p.CONV_DIM, p.MASK_DIM, p.ENC_LAYERS, p.DIM_FEEDFORWARD, p.NHEADS, p.N_POINTS = 32, 16, 1, 32, 4, 2
    d.HIDDEN_DIM, d.NUM_SEM_QUERIES, d.NUM_INS_QUERIES, d.NHEADS, d.DIM_FEEDFORWARD, d.DEC_LAYERS = 32, 2, 3, 4, 32, 3
    return cfg


def test_from_config_builds_both():
    cfg = tiny_cfg()
    shapes = dict(input_shape(), stem=shape_spec(channels=4, stride=2))  # not in IN_FEATURES: dropped
    pix = MSDeformAttnPixelDecoder(cfg, shapes)
    dec = LevelQueryTransformerDecoder(cfg, cfg.MODEL.OAP.PIXEL_DECODER.CONV_DIM)
    assert pix.deform_in_features == ["res5", "res4", "res3"] and pix.fpn_in_features == ["res2"]
    assert len(pix.encoder.layers) == 1 and pix.mask_dim == 16
    assert (dec.num_sem_queries, dec.num_ins_queries, dec.num_layers, dec.mask_dim) == (2, 3, 3, 16)
    assert isinstance(dec.input_proj[0], torch.nn.Identity)  # in_channels == hidden_dim
    mf, ms = pix.forward_features(backbone_features(1, 40, 56))
    out = dec(ms, mf)
    assert out["pred_masks"].shape == (1, 5, 10, 14) and len(out["aux_outputs"]) == 3
    # a stride-4 feature missing from the backbone
    with pytest.raises(ValueError, match="IN_FEATURES"):
        MSDeformAttnPixelDecoder(cfg, input_shape(("res3", "res4", "res5")))


def test_default_config_builds():
    from detectron2.config import get_cfg

    from helpers import add_all_configs

    cfg = add_all_configs(get_cfg())
    dec = LevelQueryTransformerDecoder(cfg, cfg.MODEL.OAP.PIXEL_DECODER.CONV_DIM)
    assert (dec.num_sem_queries, dec.num_ins_queries, dec.num_layers, dec.hidden_dim) == (50, 150, 9, 256)
    pix = MSDeformAttnPixelDecoder(cfg, {k: shape_spec(channels=64, stride=s) for k, s in STRIDES.items()})
    assert len(pix.encoder.layers) == 6 and pix.encoder.layers[0].self_attn.n_levels == 3


def test_pre_norm_and_enforced_projection():
    torch.manual_seed(0)
    dec = LevelQueryTransformerDecoder(PIX["conv_dim"], **dict(DEC, pre_norm=True, enforce_input_project=True))
    assert not isinstance(dec.input_proj[0], torch.nn.Identity)
    x, mf = decoder_inputs(dtype=torch.float32)
    out = dec(x, mf)
    assert all(torch.isfinite(p["pred_masks"]).all() for p in all_predictions(out))


def test_bad_inputs():
    with pytest.raises(ValueError, match="deform_in_features"):
        MSDeformAttnPixelDecoder(input_shape(("res2", "res3", "res4")), **PIX)
    with pytest.raises(ValueError, match="common_stride"):
        MSDeformAttnPixelDecoder(input_shape(("res3", "res4", "res5")), **PIX)
    with pytest.raises(ValueError, match="nheads"):
        MSDeformAttnPixelDecoder(input_shape(), **dict(PIX, nheads=5))
    with pytest.raises(ValueError, match="nheads"):
        LevelQueryTransformerDecoder(32, **dict(DEC, nheads=5))
    with pytest.raises(ValueError, match="query"):
        LevelQueryTransformerDecoder(32, **dict(DEC, num_sem_queries=0, num_ins_queries=0))
    pix, dec = build()
    feats = backbone_features(1, 40, 56)
    with pytest.raises(ValueError, match="res2"):
        pix.forward_features({k: v for k, v in feats.items() if k != "res2"})
    with pytest.raises(ValueError, match="res4"):
        pix.forward_features(dict(feats, res4=feats["res4"][:, :3]))
    mf, ms = pix.forward_features(feats)
    with pytest.raises(ValueError, match="3 multi-scale maps"):
        dec(ms[:2], mf)
    with pytest.raises(ValueError, match="mask_features"):
        dec(ms, mf[:, :5])
    with pytest.raises(ValueError, match=r"x\[1\]"):
        dec([ms[0], ms[1][:, :7], ms[2]], mf)


# ---------------------------------------------------------------------------------------------
# gradients and the level tokens


def test_backward_reaches_tokens_and_every_parameter():
    pix, dec = build()
    pix.train()
    dec.train()
    mf, ms = pix.forward_features(backbone_features(2, 40, 56))
    out = dec(ms, mf)
    loss = sum(p["pred_masks"].sigmoid().mean() + p["pred_objectness"].logsumexp(-1).mean()
               + p["query_embeds"].square().mean() for p in all_predictions(out))
    loss.backward()
    for module in (pix, dec):
        for name, p in module.named_parameters():
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
    for name in ("level_tokens", "query_feat", "query_embed"):
        g = getattr(dec, name).weight.grad
        assert (g.abs().sum(-1) > 0).all(), name  # every row: [SEM] and [INS], every query
    assert dec.level_tokens.weight.grad.shape == (2, DEC["hidden_dim"])


def swapped_queries(dec, a, b):
    other = copy.deepcopy(dec)
    with torch.no_grad():
        for emb in (other.query_feat, other.query_embed):
            emb.weight[[a, b]] = emb.weight[[b, a]]
    return other


def test_level_tokens_are_what_tells_the_groups_apart():
    _, dec = build()
    dec = dec.double()
    x, mf = decoder_inputs()
    s = DEC["num_sem_queries"]
    a, b = 1, s + 2  # a semantic and an instance query
    perm = list(range(s + DEC["num_ins_queries"]))
    perm[a], perm[b] = b, a

    def close_after_permutation(out, out_swapped):
        return all(torch.allclose(p[k], q[k][:, perm], rtol=1e-9, atol=1e-10)
                   for p, q in zip(all_predictions(out), all_predictions(out_swapped))
                   for k in ("pred_masks", "pred_objectness", "query_embeds"))

    # equal tokens: swapping the two queries' learnable rows just swaps their outputs
    with torch.no_grad():
        dec.level_tokens.weight[1] = dec.level_tokens.weight[0]
    with torch.no_grad():
        assert close_after_permutation(dec(x, mf), swapped_queries(dec, a, b)(x, mf))
    # different tokens: the swapped rows now sit in the other group and behave differently
    with torch.no_grad():
        dec.level_tokens.weight[1] = -dec.level_tokens.weight[0]
        out, out_swapped = dec(x, mf), swapped_queries(dec, a, b)(x, mf)
    assert not close_after_permutation(out, out_swapped)
    # ... but only from the first layer on: the first prediction reads the raw query features
    torch.testing.assert_close(out["aux_outputs"][0]["pred_masks"],
                               out_swapped["aux_outputs"][0]["pred_masks"][:, perm])


# ---------------------------------------------------------------------------------------------
# masked attention


def test_masked_attention_mask_hand_case():
    logits = torch.full((1, 3, 2, 2), -5.0)
    logits[0, 0, 0, 1] = 5.0  # query 0: one pixel
    logits[0, 1] = 5.0  # query 1: everything; query 2: empty mask
    mask = masked_attention_mask(logits, (2, 2), nheads=2)
    assert mask.shape == (2, 3, 4) and mask.dtype == torch.bool
    expected = torch.tensor([[True, False, True, True], [False] * 4, [False] * 4])
    assert torch.equal(mask[0], expected) and torch.equal(mask[1], expected)
    # resized to a coarser scale: the one-pixel mask vanishes there (logits average) -> attends everywhere
    mask = masked_attention_mask(logits, (1, 1), nheads=1)
    assert not mask.any()
    # heads are repeated per image (batch-major), and the mask is detached
    two = torch.cat([logits, -logits]).requires_grad_()
    mask = masked_attention_mask(two, (2, 2), nheads=3)
    assert mask.shape == (6, 3, 4) and not mask.requires_grad
    assert torch.equal(mask[2], expected) and torch.equal(mask[3], mask[5])
    assert not torch.equal(mask[2], mask[3])


def test_empty_masks_attend_everywhere():
    """A query whose previous mask is empty attends to the whole map: with all masks empty the
    decoder's queries equal those with all masks full (nothing masked), and nothing is NaN."""
    _, dec = build()
    dec = dec.double()
    x, mf = decoder_inputs()
    with torch.no_grad():
        last = dec.mask_embed.layers[-1]
        last.weight.zero_()
        last.bias.fill_(1.0)  # every mask embedding is all ones: mask logit = sum of mask features
        empty = dec(x, -mf.abs() - 1.0)  # every logit < 0 at every scale
        full = dec(x, mf.abs() + 1.0)  # every logit > 0
    for p_empty, p_full in zip(all_predictions(empty), all_predictions(full)):
        assert (p_empty["pred_masks"] < 0).all() and (p_full["pred_masks"] > 0).all()
        for k in ("pred_objectness", "query_embeds"):
            assert torch.isfinite(p_empty[k]).all()
            torch.testing.assert_close(p_empty[k], p_full[k], rtol=1e-10, atol=1e-10)
    # and masking is real: a partial mask changes the result
    partial = mf.abs() + 1.0
    partial[..., : mf.shape[-1] // 2] *= -1
    with torch.no_grad():
        out = dec(x, partial)
    assert not torch.allclose(out["query_embeds"], full["query_embeds"])


# ---------------------------------------------------------------------------------------------
# batch invariance


def test_batch_invariance():
    pix, dec = build()
    feats = backbone_features(2, 72, 104, seed=3)
    with torch.no_grad():
        mf, ms = pix.forward_features(feats)
        both = dec(ms, mf)
        for i in range(2):
            mf, ms = pix.forward_features({k: v[i:i + 1] for k, v in feats.items()})
            alone = dec(ms, mf)
            for p, q in zip(all_predictions(both), all_predictions(alone)):
                for k in ("pred_masks", "pred_objectness", "query_embeds"):
                    torch.testing.assert_close(p[k][i:i + 1], q[k], rtol=1e-4, atol=1e-4)
