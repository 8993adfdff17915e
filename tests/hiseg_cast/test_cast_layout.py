"""The CAST project's seams: one ``add_cast_config`` (safe to call twice), one rule for where the
superpixels S_0 are computed (mappers and models), and the backbones' public outputs that the
meta-architectures read (CAST's token-level outputs, the ViT's token outputs)."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_backbone

import hiseg.data  # noqa: F401  (registers the datasets)
from hiseg.data.mapper_registry import MAPPER_REGISTRY
from hiseg.modeling.vit import ViTBackbone
from helpers import add_all_configs

from hiseg_cast import add_cast_config
from hiseg_cast.superpixels import (grid_superpixels, input_superpixels, mapper_computes_superpixels,
                                    reads_superpixels)

TINY = ["MODEL.CAST.EMBED_DIM", 48, "MODEL.CAST.NUM_HEADS", 4, "MODEL.CAST.DEPTHS", [1, 1, 1, 1],
        "MODEL.CAST.NUM_SEGMENTS", [16, 8, 4, 2], "MODEL.CAST.SUPERPIXEL.NUM_SUPERPIXELS", 0,
        "MODEL.CAST.SUPERPIXEL.PIXELS_PER_SUPERPIXEL", 64, "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 96,
        "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 96, "INPUT.CROP.SIZE", [64, 64]]


def cfg_from(path="configs/CAST/Base-CAST-S.yaml", *opts):
    cfg = get_cfg()
    add_all_configs(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(TINY + list(opts))
    return cfg


# ---------------------------------------------------------------------------------------------
def test_add_cast_config_holds_every_section_and_is_idempotent():
    once = add_cast_config(get_cfg())
    for section in ("CAST", "MOCO", "CAST_SEM_SEG", "CLS", "CAST_SEGMENTER"):
        assert section in once.MODEL, section
    assert (once.MODEL.CAST_SEM_SEG.RETRIEVAL_K, once.MODEL.CLS.NUM_CLASSES, once.MODEL.CAST_SEGMENTER.NUM_CLASSES,
            once.MODEL.MOCO.DIM, once.MODEL.CAST.SUPERPIXEL.METHOD) == (20, 1000, 150, 256, "seeds")
    twice = add_cast_config(add_cast_config(get_cfg()))
    assert twice.dump() == once.dump()
    # merged values survive a second call (another project composing its config afterwards)
    cfg = add_cast_config(get_cfg())
    cfg.merge_from_list(["MODEL.CAST_SEM_SEG.RETRIEVAL_K", 7, "MODEL.CLS.NUM_CLASSES", 16,
                         "MODEL.CAST_SEGMENTER.DECODER", "linear", "MODEL.MOCO.DIM", 32])
    add_cast_config(cfg)
    assert (cfg.MODEL.CAST_SEM_SEG.RETRIEVAL_K, cfg.MODEL.CLS.NUM_CLASSES, cfg.MODEL.CAST_SEGMENTER.DECODER,
            cfg.MODEL.MOCO.DIM) == (7, 16, "linear", 32)


# ---------------------------------------------------------------------------------------------
# where S_0 is computed: one rule for the four mappers
MAPPERS = {"CASTDatasetMapper": ["superpixels"], "CASTSegmenterMapper": ["superpixels"],
           "MoCoTwoViewMapper": ["superpixels1", "superpixels2"], "CASTClassificationMapper": ["superpixels"]}


@pytest.mark.parametrize("opts, computes", [
    ([], True),
    (["MODEL.CAST.SUPERPIXEL.METHOD", "slic_torch"], False),  # the backbone computes them on its device
    (["MODEL.CAST.TOKENS", "patch"], False),  # the backbone makes square cells
    (["MODEL.BACKBONE.NAME", "build_vit_backbone"], False),  # reads none
])
def test_every_mapper_follows_the_one_rule(opts, computes):
    cfg = cfg_from("configs/CAST/Base-CAST-S.yaml", *opts)
    assert mapper_computes_superpixels(cfg) is computes
    d = DatasetCatalog.get("skimage_instances_train")[0]
    for name, keys in MAPPERS.items():
        out = MAPPER_REGISTRY.get(name)(cfg, True)(dict(d))
        for key in keys:
            assert (key in out) is computes, (name, key)
            if computes:
                image = out[f"view{key[-1]}"] if name == "MoCoTwoViewMapper" else out["image"]
                assert out[key].shape == image.shape[1:] and out[key].dtype == torch.int64


def test_input_superpixels_takes_the_mappers_and_computes_the_rest():
    cfg = cfg_from()
    backbone = build_backbone(cfg).eval()
    assert reads_superpixels(backbone)
    torch.manual_seed(0)
    images = torch.randn(3, 3, 48, 64)
    sizes = [(48, 64), (40, 56), (48, 64)]
    given = torch.from_numpy(grid_superpixels(48, 64, 12))
    inputs = [{"superpixels": given}, {}, {}]
    sp = input_superpixels(backbone, inputs, images, sizes)
    assert sp.shape == (3, 48, 64) and sp.dtype == torch.int64
    assert torch.equal(sp[0], given)
    # the others: the backbone's S_0 of each image's own extent, -1 beyond it
    own = backbone.superpixels_from_images(images[1:2, :, :40, :56])[0]
    assert torch.equal(sp[1, :40, :56], own) and (sp[1, 40:] == -1).all() and (sp[1, :, 56:] == -1).all()
    assert torch.equal(sp[2], backbone.superpixels_from_images(images[2:3])[0])
    assert torch.equal(backbone.superpixels_from_images(images, sizes)[1:], sp[1:])
    # compute=False: only when every input brings its own (Mixup needs them before the backbone)
    assert input_superpixels(backbone, inputs, images, sizes, compute=False) is None
    full = input_superpixels(backbone, [{"superpixels": given}] * 3, images, compute=False)
    assert torch.equal(full, given.expand(3, -1, -1))
    with pytest.raises(ValueError, match="do not match"):
        input_superpixels(backbone, [{"superpixels": given[:10]}], images[:1])
    vit = ViTBackbone(embed_dim=48, depth=1, num_heads=4, patch_size=16, img_size=64, out_features=("p4",))
    assert not reads_superpixels(vit) and input_superpixels(vit, inputs, images) is None


# ---------------------------------------------------------------------------------------------
# the backbones' public outputs
def test_cast_backbone_token_outputs_are_those_of_the_dense_read_out():
    cfg = cfg_from()
    backbone = build_backbone(cfg).eval()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 96)
    sp = torch.from_numpy(grid_superpixels(64, 96, 24)).expand(2, -1, -1).clone()
    sp[1, :, 80:] = -1
    with torch.no_grad():
        full = backbone(x, sp, features=("res2", "res3", "segment_tokens"))
        alone = backbone(x, sp, features=())
        default = backbone(x, sp)
        enc = backbone.encoder(x, sp)
    assert set(alone) == {"cls", "hierarchy", "num_segments", "superpixels", "segment_valid"}
    assert set(default) == set(alone) | {"res2", "res3", "res4", "res5"}
    for k in alone:
        assert torch.equal(alone[k], full[k]) and torch.equal(alone[k], default[k]), k
    assert torch.equal(alone["superpixels"], sp) and torch.equal(alone["cls"], enc["cls"])
    assert torch.equal(alone["segment_valid"], enc["levels"][0]["valid"])
    fused = backbone.fuse(torch.cat(backbone.encoder.unpool_to_superpixels(enc), dim=-1))
    assert torch.equal(full["segment_tokens"], fused)
    assert torch.equal(full["res2"], default["res2"]) and torch.equal(full["res3"], default["res3"])
    with pytest.raises(ValueError, match="unknown CAST features"):
        backbone(x, sp, features=("p4",))
    token_backbone_cfg = cfg_from("configs/CAST/Base-CAST-S.yaml", "MODEL.CAST.OUT_FEATURES", [])
    with pytest.raises(ValueError, match="out_features"):
        build_backbone(token_backbone_cfg)(x, sp, features=("res2",))


def test_vit_backbone_token_outputs():
    torch.manual_seed(2)
    vit = ViTBackbone(embed_dim=48, depth=2, num_heads=4, patch_size=16, img_size=64, out_features=("p4", "p5")).eval()
    x = torch.randn(2, 3, 50, 70)
    with torch.no_grad():
        prefix, fmap = vit.forward_tokens(x)
        tokens = vit(x, features=())
        default = vit(x)
    assert set(tokens) == {"cls", "prefix_tokens", "patch_tokens"}
    # Without features= the backbone returns its pyramid alone, as every detectron2 backbone does.
    assert set(default) == {"p4", "p5"}
    everything = vit(x, features=("p4", "p5"))
    assert set(everything) == {"p4", "p5"} | set(tokens)
    assert torch.equal(everything["p4"], default["p4"])
    assert torch.equal(tokens["cls"], prefix[:, 0]) and torch.equal(tokens["patch_tokens"], fmap)
    assert torch.equal(vit(x, features=("p5",))["p5"], default["p5"])
    with pytest.raises(ValueError, match="out_features"):
        vit(x, features=("res2",))
    no_cls = ViTBackbone(embed_dim=48, depth=1, num_heads=4, patch_size=16, img_size=64, class_token=False,
                         out_features=("p4",)).eval()
    assert "cls" not in no_cls(x, features=())
    vit.freeze_unread_by_class_token()
    assert not any(p.requires_grad for p in vit.pyramid.parameters())
    assert all(p.requires_grad for p in vit.vit.parameters())
