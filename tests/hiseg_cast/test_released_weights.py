"""Weight conversion (hiseg_cast.released_weights, tools/convert_cast_checkpoint.py).

No official weights exist offline, so each test builds a small source model, writes its weights
in the released layouts (MoCo, DeiT, DINO / timm), converts them, loads the result through
detectron2's DetectionCheckpointer into a meta-architecture, and compares tensors and outputs
with the source (the round trip).
"""
import argparse
import os
import pickle
import re
from collections import OrderedDict

import pytest
import torch

from hiseg_cast import CASTEncoder
from hiseg_cast.released_weights import (CheckpointConversionError, convert_checkpoint, detect_format,
                             save_detectron2_checkpoint, verify_against_model)
from hiseg_cast.modeling import sincos_position_embedding
from hiseg_cast.superpixels import patch_superpixels
from helpers import REPO, load_tool

torch.set_num_threads(2)

DIM, HEADS, DEPTHS, SEGMENTS = 48, 4, [2, 1, 1, 1], [12, 6, 3, 2]


# ----------------------------------------------------------------------------------------------
# source models and released layouts
def source_cast(pos_embed="sincos", seed=0):
    torch.manual_seed(seed)
    model = CASTEncoder(embed_dim=DIM, depths=DEPTHS, num_heads=HEADS, num_segments=SEGMENTS,
                        pos_embed=pos_embed, pos_grid=(28, 28))
    with torch.no_grad():  # non-trivial values everywhere, BN statistics included
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.02)
    return model.eval()


def released_cast_names(model, with_duplicates=True):
    """Our encoder's weights under the released names (``patch_embed.proj.N``, ``pool{k}.pool_block``,
    ``blocks.i`` plus ``blocks{k}.{i}`` copies with the original numbering, ``head``)."""
    sd = OrderedDict()
    for k, v in model.state_dict().items():
        k = re.sub(r"^stem\.proj\.", "patch_embed.proj.", k)
        k = re.sub(r"^pools\.(\d+)\.", lambda m: f"pool{int(m.group(1)) + 1}.pool_block.", k)
        sd[k] = v.clone()
    if with_duplicates:
        start = 0
        for g, depth in enumerate(DEPTHS, start=1):
            for i in range(start, start + depth):
                for k in [k for k in list(sd) if k.startswith(f"blocks.{i}.")]:
                    sd[f"blocks{g}.{i}." + k[len(f"blocks.{i}."):]] = sd[k].clone()
            start += depth
    sd["head.weight"] = torch.randn(10, DIM)
    sd["head.bias"] = torch.randn(10)
    return sd


def write_moco(model, path, sd=None):
    sd = released_cast_names(model) if sd is None else sd
    sd["pos_embed"] = sincos_position_embedding((28, 28), DIM, row_first=True)[None]
    full = OrderedDict()
    for k, v in sd.items():
        full["module.base_encoder." + k] = v
        full["module.momentum_encoder." + k] = v + 1  # must not be picked up
    full["module.predictor.0.weight"] = torch.randn(16, 8)
    full["module.base_encoder.head.0.weight"] = torch.randn(16, DIM)
    torch.save({"epoch": 100, "arch": "cast_small", "state_dict": full,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1.5e-4, "params": [0, 1]}]},
                "scaler": {"scale": 65536.0, "_growth_tracker": 3}}, path)
    return sd


def write_deit(model, path, extra=None):
    sd = released_cast_names(model)
    sd["pos_embed"] = torch.cat([sd.pop("pe_token"), sd["pos_embed"]], dim=1)  # learned (1, 785, D)
    ckpt = {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {"last_epoch": 299},
            "epoch": 299, "model_ema": {k: v + 0.5 for k, v in sd.items()}, "scaler": {"scale": 1024.0},
            "args": argparse.Namespace(model="cast_small", lr=5e-4, batch_size=128, input_size=224,
                                       smoothing=0.1, data_path="/data/imagenet", dist_eval=True,
                                       resume="", mixup=0.8, repeated_aug=True)}
    if extra is not None:
        ckpt["extra"] = extra
    torch.save(ckpt, path)
    return sd


def cast_cfg(pos_embed="sincos", fpn=False):
    from detectron2.config import get_cfg

    from helpers import add_all_configs

    cfg = get_cfg()
    add_all_configs(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "CAST", "Base-CAST-S.yaml"))
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.CAST.EMBED_DIM", DIM, "MODEL.CAST.NUM_HEADS", HEADS,
        "MODEL.CAST.DEPTHS", DEPTHS, "MODEL.CAST.NUM_SEGMENTS", SEGMENTS, "MODEL.CAST.POS_EMBED", pos_embed,
        "MODEL.META_ARCHITECTURE", "SemanticSegmentor", "MODEL.SEM_SEG_HEAD.NAME", "SemSegFPNHead",
        "MODEL.SEM_SEG_HEAD.IN_FEATURES", ["res2", "res3", "res4", "res5"], "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 3,
        "MODEL.SEM_SEG_HEAD.CONVS_DIM", 16, "MODEL.SEM_SEG_HEAD.NORM", ""])
    if fpn:
        cfg.merge_from_list(["MODEL.BACKBONE.NAME", "build_cast_fpn_backbone", "MODEL.FPN.OUT_CHANNELS", 16,
                             "MODEL.FPN.IN_FEATURES", ["res2", "res3", "res4", "res5"],
                             "MODEL.SEM_SEG_HEAD.IN_FEATURES", ["p2", "p3", "p4", "p5"]])
    return cfg


def load_detectron2(cfg, path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    torch.manual_seed(123)  # a different random init than the source
    model = build_model(cfg)
    DetectionCheckpointer(model).load(path)
    return model.eval()


def assert_same_encoder(src, dst):
    s, d = src.state_dict(), dst.state_dict()
    assert set(s) == set(d)
    for k in s:
        assert torch.equal(s[k], d[k]), k


def assert_same_outputs(src, dst):
    torch.manual_seed(7)
    images = torch.randn(2, 3, 64, 64)
    sp = torch.from_numpy(patch_superpixels(64, 64, 8)).long().expand(2, -1, -1).contiguous()
    with torch.no_grad():
        a, b = src(images, sp), dst(images, sp)
    assert torch.equal(a["hierarchy"], b["hierarchy"])
    assert torch.equal(a["num_segments"], b["num_segments"])
    assert torch.equal(a["cls"], b["cls"])
    for la, lb in zip(a["levels"], b["levels"]):
        assert torch.equal(la["tokens"], lb["tokens"])
    for xa, xb in zip(src.unpool_to_superpixels(a), dst.unpool_to_superpixels(b)):
        assert torch.equal(xa, xb)
    assert len(set(a["hierarchy"][0, 1].unique().tolist())) > 1  # a real, non-trivial hierarchy


# ----------------------------------------------------------------------------------------------
def test_moco_round_trip(tmp_path):
    src = source_cast("sincos")
    path = str(tmp_path / "checkpoint_0099.pth.tar")
    write_moco(src, path)
    result = convert_checkpoint(path)
    assert result.format == "cast-moco" and result.model == "cast"
    assert "pos_embed" not in result.state_dict and "head.weight" not in result.state_dict
    assert not any(k.startswith(("blocks1", "blocks2", "patch_embed", "pool1")) for k in result.state_dict)
    assert result.config["MODEL.CAST.DEPTHS"] == DEPTHS and result.config["MODEL.CAST.POS_EMBED"] == "sincos"
    out = str(tmp_path / "cast_moco_d2.pth")
    data = save_detectron2_checkpoint(result, out)
    assert data["matching_heuristics"] is False and data["__author__"]
    assert all(k.startswith("backbone.encoder.") for k in data["model"])

    model = load_detectron2(cast_cfg("sincos"), out)
    verify_against_model(model, data["model"], "backbone.encoder.")
    assert_same_encoder(src, model.backbone.encoder)
    assert_same_outputs(src, model.backbone.encoder)


def test_deit_round_trip_and_safe_loading(tmp_path):
    src = source_cast("learned", seed=1)
    path = str(tmp_path / "best_checkpoint.pth")
    write_deit(src, path)
    with pytest.raises(pickle.UnpicklingError):  # torch's default refuses the Namespace ...
        torch.load(path)
    result = convert_checkpoint(path)  # ... our allow-list accepts it, and nothing else
    assert result.format == "cast-deit"
    assert result.config["MODEL.CAST.POS_EMBED"] == "learned" and result.config["MODEL.CAST.POS_GRID"] == [28, 28]
    assert any("POS_EMBED: learned" in m for m in result.messages)
    assert result.state_dict["pos_embed"].shape == (1, 784, DIM)
    out = str(tmp_path / "cast_deit_d2.pth")
    save_detectron2_checkpoint(result, out)
    model = load_detectron2(cast_cfg("learned"), out)
    assert_same_encoder(src, model.backbone.encoder)
    assert_same_outputs(src, model.backbone.encoder)

    ema = convert_checkpoint(path, use_ema=True)
    assert torch.equal(ema.state_dict["norm.weight"], src.norm.weight + 0.5)


_MARKER = []


def _side_effect(msg):
    _MARKER.append(msg)
    return msg


class Evil:
    def __reduce__(self):
        return (_side_effect, ("unpickled arbitrary code",))


def test_disallowed_pickled_class_is_refused(tmp_path):
    src = source_cast("learned", seed=2)
    path = str(tmp_path / "best_checkpoint.pth")
    write_deit(src, path, extra=Evil())
    with pytest.raises(CheckpointConversionError, match="refused to unpickle"):
        convert_checkpoint(path)
    assert _MARKER == []


def test_duplicates_must_match(tmp_path):
    src = source_cast()
    sd = released_cast_names(src)
    sd["blocks2.2.attn.qkv.weight"] = sd["blocks2.2.attn.qkv.weight"] + 1e-3
    path = str(tmp_path / "bad_dup.pth.tar")
    write_moco(src, path, sd=sd)
    with pytest.raises(CheckpointConversionError, match=r"blocks2\.2\.attn\.qkv\.weight.*blocks\.2\.attn\.qkv\.weight"):
        convert_checkpoint(path)

    # numbering within each group (blocks2.0 = flat block 2) is recognised too
    sd = released_cast_names(src, with_duplicates=False)
    for k in [k for k in sd if k.startswith("blocks.2.")]:
        sd["blocks2.0." + k[len("blocks.2."):]] = sd[k].clone()
    for k in [k for k in sd if k.startswith("blocks.0.")]:
        sd["blocks1.0." + k[len("blocks.0."):]] = sd[k].clone()
    for k in [k for k in sd if k.startswith("blocks.1.")]:
        sd["blocks1.1." + k[len("blocks.1."):]] = sd[k].clone()
    write_moco(src, path, sd=sd)
    assert convert_checkpoint(path, fmt="cast-moco").state_dict.keys() == src.state_dict().keys()


def test_errors_name_the_problem(tmp_path):
    src = source_cast()
    path = str(tmp_path / "x.pth")

    torch.save({"foo.weight": torch.zeros(2), "bar": torch.zeros(1)}, path)
    with pytest.raises(CheckpointConversionError, match=r"unknown checkpoint layout.*'foo\.weight'"):
        convert_checkpoint(path)

    sd = released_cast_names(src)
    sd["pool1.pool_block.fc1.1.weight"] = torch.zeros(4 * DIM + 4, DIM)
    write_moco(src, path, sd=sd)
    with pytest.raises(CheckpointConversionError,
                       match=r"shape mismatch 'pools\.0\.fc1\.1\.weight': checkpoint \(196, 48\) vs model \(192, 48\)"):
        convert_checkpoint(path)

    sd = released_cast_names(src)
    del sd["norm.weight"]
    write_moco(src, path, sd=sd)
    with pytest.raises(CheckpointConversionError, match=r"missing keys \['norm\.weight'\]"):
        convert_checkpoint(path)

    sd = released_cast_names(src)
    sd["mystery.weight"] = torch.zeros(3)
    write_moco(src, path, sd=sd)
    with pytest.raises(CheckpointConversionError, match=r"unexpected keys \['mystery\.weight'\]"):
        convert_checkpoint(path)

    write_moco(src, path)
    ckpt = torch.load(path)
    ckpt["state_dict"]["module.base_encoder.pos_embed"] += 1e-3
    torch.save(ckpt, path)
    with pytest.raises(CheckpointConversionError, match="'pos_embed'.*sin-cos"):
        convert_checkpoint(path)

    # converted weights checked against a model of another width: key and both shapes named
    write_moco(src, path)
    data = save_detectron2_checkpoint(convert_checkpoint(path), str(tmp_path / "d2.pth"))
    cfg = cast_cfg()
    cfg.MODEL.CAST.EMBED_DIM = 64
    from detectron2.modeling import build_model

    with pytest.raises(CheckpointConversionError, match=r"shape mismatch 'backbone\.encoder\.cls_token': "
                                                        r"checkpoint \(1, 1, 48\) vs model \(1, 1, 64\)"):
        verify_against_model(build_model(cfg), data["model"], "backbone.encoder.")

    with pytest.raises(CheckpointConversionError, match="cannot be converted for model 'vit'"):
        convert_checkpoint(path, model="vit")


def test_cli_fpn_prefix(tmp_path, capsys):
    src = source_cast()
    path, out = str(tmp_path / "checkpoint_0099.pth.tar"), str(tmp_path / "fpn.pth")
    write_moco(src, path)
    assert load_tool("convert_cast_checkpoint").main(["--input", path, "--output", out, "--format", "cast-moco", "--model", "cast",
                        "--prefix", "backbone.bottom_up.encoder."]) == 0
    assert "MODEL.CAST.DEPTHS" in capsys.readouterr().out
    model = load_detectron2(cast_cfg(fpn=True), out)
    assert_same_encoder(src, model.backbone.bottom_up.encoder)

    # with --config-file the prefix is found in the built model and the fit is checked first
    cfg_file, out2 = str(tmp_path / "fpn.yaml"), str(tmp_path / "fpn2.pth")
    with open(cfg_file, "w") as f:
        f.write(cast_cfg(fpn=True).dump())
    assert load_tool("convert_cast_checkpoint").main(["--input", path, "--output", out2, "--config-file", cfg_file]) == 0
    assert "backbone.bottom_up.encoder." in capsys.readouterr().out
    assert torch.load(out2)["model"].keys() == torch.load(out)["model"].keys()
    assert load_tool("convert_cast_checkpoint").main(["--input", path, "--output", str(tmp_path / "no.pth"), "--config-file", cfg_file,
                        "MODEL.CAST.POS_EMBED", "learned"]) == 2
    assert "missing keys ['backbone.bottom_up.encoder.pos_embed']" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "no.pth")

    torch.save({"foo": torch.zeros(1)}, path)
    assert load_tool("convert_cast_checkpoint").main(["--input", path, "--output", out]) == 2
    assert "unknown checkpoint layout" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
def vit_cfg():
    from detectron2.config import get_cfg

    from hiseg.modeling import add_vit_config

    cfg = get_cfg()
    add_vit_config(cfg)
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.BACKBONE.NAME", "build_vit_backbone", "MODEL.VIT.EMBED_DIM", 64,
        "MODEL.VIT.DEPTH", 2, "MODEL.VIT.NUM_HEADS", 4, "MODEL.VIT.PATCH_SIZE", 8, "MODEL.VIT.IMG_SIZE", 32,
        "MODEL.VIT.OUT_CHANNELS", 16, "MODEL.META_ARCHITECTURE", "SemanticSegmentor",
        "MODEL.SEM_SEG_HEAD.NAME", "SemSegFPNHead", "MODEL.SEM_SEG_HEAD.IN_FEATURES", ["p2", "p3", "p4", "p5"],
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 3, "MODEL.SEM_SEG_HEAD.CONVS_DIM", 16, "MODEL.SEM_SEG_HEAD.NORM", ""])
    return cfg


def test_dino_and_timm_round_trip(tmp_path):
    from hiseg.modeling import ViTBackbone

    torch.manual_seed(3)
    src = ViTBackbone(embed_dim=64, depth=2, num_heads=4, patch_size=8, img_size=32).eval()
    with torch.no_grad():
        for t in src.vit.parameters():
            t.add_(torch.randn_like(t) * 0.02)
    dino = OrderedDict((k, v.clone()) for k, v in src.vit.state_dict().items())
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "norm.weight"} <= set(dino)
    path, out = str(tmp_path / "dino_vits8.pth"), str(tmp_path / "vit_d2.pth")
    torch.save(dino, path)
    result = convert_checkpoint(path)
    assert (result.format, result.model) == ("dino", "vit")
    assert result.config["MODEL.VIT.PATCH_SIZE"] == 8 and result.config["MODEL.VIT.IMG_SIZE"] == 32
    save_detectron2_checkpoint(result, out)
    model = load_detectron2(vit_cfg(), out)
    for k, v in dino.items():
        assert torch.equal(model.backbone.vit.state_dict()[k], v), k
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(src.key_features(x), model.backbone.key_features(x))

    # DINO training checkpoint (teacher with backbone. / head. prefixes)
    full = {"teacher": {**{"backbone." + k: v for k, v in dino.items()}, "head.last_layer.weight": torch.zeros(4, 2)},
            "student": {}, "epoch": 100}
    torch.save(full, path)
    assert convert_checkpoint(path).state_dict.keys() == dino.keys()

    # timm weights with a classifier, as safetensors; position embedding resampled to 64 px
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    st = str(tmp_path / "model.safetensors")
    save_file({**dino, "head.weight": torch.zeros(5, 64), "head.bias": torch.zeros(5)}, st)
    assert detect_format(convert_checkpoint.__globals__["load_checkpoint_file"](st), st) == "timm-vit"
    result = convert_checkpoint(st, img_size=64)
    assert result.format == "timm-vit" and "head.weight" not in result.state_dict
    assert result.state_dict["pos_embed"].shape == (1, 1 + 64, 64) and result.config["MODEL.VIT.IMG_SIZE"] == 64

    with pytest.raises(CheckpointConversionError, match="cannot be converted for model 'cast'"):
        convert_checkpoint(path, model="cast")
    bad = dict(dino)
    bad["blocks.1.mlp.fc2.weight"] = torch.zeros(64, 10)
    torch.save(bad, path)
    with pytest.raises(CheckpointConversionError, match=r"shape mismatch 'blocks\.1\.mlp\.fc2\.weight'"):
        convert_checkpoint(path)
