"""CAST inside detectron2: output_shape, built-in meta-architectures, the superpixel mapper."""
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone, build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from helpers import add_all_configs

TINY = ["MODEL.DEVICE", "cpu", "MODEL.CAST.EMBED_DIM", 48, "MODEL.CAST.NUM_HEADS", 4,
        "MODEL.CAST.DEPTHS", [1, 1, 1, 1], "MODEL.CAST.NUM_SEGMENTS", [24, 12, 6, 3],
        "MODEL.CAST.SUPERPIXEL.NUM_SUPERPIXELS", 0, "MODEL.CAST.SUPERPIXEL.PIXELS_PER_SUPERPIXEL", 64]


def cfg_from(path, *opts):
    cfg = get_cfg()
    add_all_configs(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(TINY + list(opts))
    return cfg


def test_backbone_output_shape_matches_outputs_any_size():
    cfg = cfg_from("configs/CAST/Base-CAST-S.yaml")
    bb = build_backbone(cfg).eval()
    shapes = bb.output_shape()
    assert {k: v.stride for k, v in shapes.items()} == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    for h, w in [(64, 96), (96, 64), (160, 160)]:
        with torch.no_grad():
            out = bb(torch.randn(1, 3, h, w) * 50)
        for k, spec in shapes.items():
            assert out[k].shape == (1, spec.channels, h // spec.stride, w // spec.stride), k
        assert out["hierarchy"].shape == (1, 5, h, w)
        assert out["num_segments"].shape == (1, 5)


def test_backbone_uses_given_superpixels():
    cfg = cfg_from("configs/CAST/Base-CAST-S.yaml")
    bb = build_backbone(cfg).eval()
    sp = torch.arange(64 * 64).view(64, 64) // 512  # 8 horizontal bands
    with torch.no_grad():
        out = bb(torch.randn(1, 3, 64, 64), superpixels=sp[None])
    assert torch.equal(out["hierarchy"][0, 0], sp)


def _image_input(h=96, w=128, with_instances=False, with_sem_seg=False):
    d = {"image": torch.randint(0, 255, (3, h, w), dtype=torch.uint8).float(), "height": h, "width": w}
    if with_instances:
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 10.0, 60.0, 50.0], [30.0, 20.0, 90.0, 80.0]]))
        inst.gt_classes = torch.tensor([0, 3])
        m = torch.zeros(2, h, w, dtype=torch.bool)
        m[0, 10:50, 10:60] = True
        m[1, 20:80, 30:90] = True
        inst.gt_masks = BitMasks(m)
        d["instances"] = inst
    if with_sem_seg:
        d["sem_seg"] = torch.randint(0, 5, (h, w))
    return d


def _assert_every_trainable_parameter_used(model):
    """DDP without find_unused_parameters (detectron2's default) needs a gradient for each."""
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused


def test_semantic_segmentor_trains_and_infers():
    cfg = cfg_from("configs/CAST/semantic_fpn_cast_s_ade20k.yaml", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 5,
                   "MODEL.SEM_SEG_HEAD.CONVS_DIM", 32)
    model = build_model(cfg)
    batch = [_image_input(with_sem_seg=True), _image_input(80, 112, with_sem_seg=True)]
    with EventStorage():
        losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    _assert_every_trainable_parameter_used(model)
    model.eval()
    with torch.no_grad():
        out = model([_image_input()])
    assert out[0]["sem_seg"].shape == (5, 96, 128)


def test_mask_rcnn_with_cast_fpn_trains_and_infers():
    cfg = cfg_from("configs/CAST/quick/mask_rcnn_cast_tiny_coco_sample_cpu.yaml")
    model = build_model(cfg)
    with EventStorage():
        losses = model([_image_input(with_instances=True)])
    assert {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls"} <= set(losses)
    sum(losses.values()).backward()
    assert model.backbone.bottom_up.encoder.blocks[0].attn.qkv.weight.grad is not None
    _assert_every_trainable_parameter_used(model)
    model.eval()
    with torch.no_grad():
        out = model([_image_input()])
    assert "instances" in out[0]


def test_cast_dataset_mapper_adds_superpixels(shared_data):
    from hiseg_cast.data.dataset_mappers import CASTDatasetMapper
    from hiseg_cast.superpixels import batch_superpixels

    cfg = cfg_from("configs/CAST/Base-CAST-S.yaml", "INPUT.MIN_SIZE_TRAIN", (120,), "INPUT.MAX_SIZE_TRAIN", 200)
    mapper = CASTDatasetMapper(cfg, is_train=True)
    f = sorted((shared_data / "coco" / "val2017").glob("*.jpg"))[0]
    out = mapper({"file_name": str(f), "image_id": 0})
    sp = out["superpixels"]
    assert sp.shape == out["image"].shape[1:] and sp.dtype == torch.int64
    assert int(sp.max()) + 1 == len(torch.unique(sp))
    ph, pw = sp.shape[0] + 8, sp.shape[1] + 16
    b = batch_superpixels([sp, sp[:50, :60]], (ph, pw))
    assert b.shape == (2, ph, pw) and (b[0, -8:] == -1).all() and (b[1, 50:] == -1).all() and (b[1, :, 60:] == -1).all()
    with pytest.raises(ValueError, match="larger"):
        batch_superpixels([sp], (10, 10))
