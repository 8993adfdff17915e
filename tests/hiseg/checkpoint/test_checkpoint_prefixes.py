"""Key prefixes of state dicts and models (hiseg.checkpoint.prefixes)."""
import torch
from torch import nn

from hiseg.checkpoint.prefixes import (as_prefix, find_module_prefix, find_vit_prefix, first_prefix_present,
                                       strip_common_prefix, strip_prefix)


def test_find_vit_prefix_prefers_the_online_encoder_then_the_shortest():
    w = torch.zeros(1)
    moco = {"momentum_backbone.vit.patch_embed.proj.weight": w, "backbone.vit.patch_embed.proj.weight": w}
    assert find_vit_prefix(moco) == "backbone.vit."
    oap = {"teacher.backbone.vit.patch_embed.proj.weight": w, "student.backbone.vit.patch_embed.proj.weight": w}
    assert find_vit_prefix(oap) == "student.backbone.vit."
    assert find_vit_prefix({"b.x.patch_embed.proj.weight": w, "a.x.patch_embed.proj.weight": w,
                            "patch_embed.proj.weight": w}) == ""
    assert find_vit_prefix({"b.patch_embed.proj.weight": w, "a.patch_embed.proj.weight": w}) == "a."
    assert find_vit_prefix({"blocks.0.attn.qkv.weight": w, 3: w}) is None


def test_find_module_prefix_by_type():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Conv2d(1, 1, 1)))
    assert find_module_prefix(model, nn.Conv2d) == "1.1."
    assert find_module_prefix(model, nn.Sequential) == ""
    assert find_module_prefix(model, nn.LayerNorm) is None


def test_strip_and_find_candidates():
    sd = {"module.base_encoder.a": 1, "module.base_encoder.b": 2, "module.predictor.c": 3}
    assert first_prefix_present(sd, ("module.base_encoder.", "base_encoder.")) == "module.base_encoder."
    assert first_prefix_present(sd, ("base_encoder.",)) is None
    assert strip_prefix(sd, "module.base_encoder.") == {"a": 1, "b": 2}
    assert strip_common_prefix(sd, "module.") == {"base_encoder.a": 1, "base_encoder.b": 2, "predictor.c": 3}
    kept = strip_common_prefix({"module.a": 1, "b": 2}, "module.")
    assert kept == {"module.a": 1, "b": 2} and strip_common_prefix({}, "module.") == {}
    assert [as_prefix(n) for n in ("backbone.vit", "backbone.vit.", "")] == ["backbone.vit.", "backbone.vit.", ""]
