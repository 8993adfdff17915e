"""Every checkpoint layout the authors' CAST scripts save converts, loads into the config that
uses it, and gives the released function there (github twke18/CAST, ec85adf).

Each test writes a small random checkpoint under the official key names and wrapper of one
layout (tiny widths; the key lists were read from the authors' models built with random weights):

* ``cast-seg-moco``: ``main_moco_suppix.py -a cast_seg_small_pretrain`` (COCO; the released
  ``checkpoint_0149/0399.pth.tar``): blocks numbered per group, no final ``norm``,
  ``block_fusion.*``, MoCo projector ``head.*`` -> ``semseg_cast_s_voc_finetune.yaml``;
* ``cast-segmenter``: ``segm/train_cast.py``'s ``checkpoint.pth`` ``{'model': {'encoder.*',
  'decoder.*'}, ...}`` -> ``segmenter_cast_s_ade20k.yaml``, decoder included;
* ``cast-lincls``: ``main_lincls_suppix.py``'s ``checkpoint.pth.tar`` (DDP ``module.*`` classifier)
  -> ``linprobe_cast_s_in1k.yaml``, classifier included; and the DeiT file's classifier ->
  ``deit_cast_s_in1k.yaml``.

Outputs are compared with the float64 reference of ``test_cast_released_reference.py`` (the
released forward pass written from the equations), extended here by the released block fusion
(BatchNorm1d with running statistics, then Linear) and Segmenter's mask transformer.
"""
import argparse
import math
import os
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from test_cast_released_reference import (_ln, _lin, _mhsa, random_official_cast, released_forward, vanishing_labels,
                                          write_deit)
from helpers import REPO, load_tool

DIM, HEADS, DEPTHS, SEGMENTS = 64, 4, [2, 1, 1, 1], [12, 6, 3, 2]
NUM_CLASSES = 5
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _fusion(sd, dim, g):
    """``block_fusion.proj_blocks.{0.norm (BatchNorm1d(4D)), 2 (Linear(4D, D))}`` with
    non-trivial running statistics."""
    c = 4 * dim
    sd["block_fusion.proj_blocks.0.norm.weight"] = 1 + 0.2 * torch.randn(c, generator=g)
    sd["block_fusion.proj_blocks.0.norm.bias"] = 0.2 * torch.randn(c, generator=g)
    sd["block_fusion.proj_blocks.0.norm.running_mean"] = 0.5 * torch.randn(c, generator=g)
    sd["block_fusion.proj_blocks.0.norm.running_var"] = torch.rand(c, generator=g) + 0.5
    sd["block_fusion.proj_blocks.0.norm.num_batches_tracked"] = torch.tensor(500)
    sd["block_fusion.proj_blocks.2.weight"] = torch.randn(dim, c, generator=g) / math.sqrt(c)
    sd["block_fusion.proj_blocks.2.bias"] = 0.1 * torch.randn(dim, generator=g)


def coco_moco_encoder(seed=0):
    """``cast_seg.py``'s ``cast_seg_small_pretrain`` layout: ``blocks{k}.{j}`` numbered within
    each group (no flat ``blocks.i``), no ``norm``, ``block_fusion``, a MoCo projector ``head``."""
    flat = random_official_cast(dim=DIM, depths=DEPTHS, seed=seed)
    sd, start = OrderedDict(), 0
    for k, v in flat.items():
        if k.startswith(("blocks.", "norm.", "head.")) or k.split(".")[0] in {f"blocks{i}" for i in range(1, 5)}:
            continue
        sd[k] = v
    for k, depth in enumerate(DEPTHS, start=1):
        for j in range(depth):
            for key, v in flat.items():
                if key.startswith(f"blocks.{start + j}."):
                    sd[f"blocks{k}.{j}." + key[len(f"blocks.{start + j}."):]] = v
        start += depth
    g = _gen(seed + 7)
    _fusion(sd, DIM, g)
    sd["head.0.weight"] = torch.randn(32, DIM, generator=g)  # projector: Linear - BN - ReLU - ...
    sd["head.1.weight"], sd["head.1.bias"] = torch.ones(32), torch.zeros(32)
    sd["head.3.weight"] = torch.randn(16, 32, generator=g)
    return sd


def write_coco_moco(sd, path):
    full = OrderedDict()
    for k, v in sd.items():
        full["module.base_encoder." + k] = v
        full["module.momentum_encoder." + k] = v + 1
    full["module.predictor.0.weight"] = torch.randn(16, 8)
    torch.save({"epoch": 400, "arch": "cast_seg_small_pretrain", "state_dict": full,
                "optimizer": {"state": {}}, "scaler": {"scale": 65536.0}}, path)


def segmenter_checkpoint(seed=0, num_layers=2):
    """``segm/train_cast.py``'s ``model``: ``encoder.*`` of ``cast_seg_deit.py`` (flat and
    grouped blocks, learned ``pos_embed`` (1, 1+HW, D), unused ``norm`` and classifier ``head``,
    ``block_fusion``) and ``decoder.*`` of Segmenter's ``MaskTransformer``."""
    enc = random_official_cast(dim=DIM, depths=DEPTHS, learned_pos=True, seed=seed)
    g = _gen(seed + 11)
    _fusion(enc, DIM, g)
    dec, d = OrderedDict(), DIM

    def lin(name, n_out, n_in):
        dec[name + ".weight"] = torch.randn(n_out, n_in, generator=g) / math.sqrt(n_in)
        dec[name + ".bias"] = 0.1 * torch.randn(n_out, generator=g)

    def norm(name, n):
        dec[name + ".weight"] = 1 + 0.2 * torch.randn(n, generator=g)
        dec[name + ".bias"] = 0.2 * torch.randn(n, generator=g)

    for i in range(num_layers):
        norm(f"blocks.{i}.norm1", d)
        norm(f"blocks.{i}.norm2", d)
        lin(f"blocks.{i}.attn.qkv", 3 * d, d)
        lin(f"blocks.{i}.attn.proj", d, d)
        lin(f"blocks.{i}.mlp.fc1", 4 * d, d)
        lin(f"blocks.{i}.mlp.fc2", d, 4 * d)
    dec["cls_emb"] = torch.randn(1, NUM_CLASSES, d, generator=g)
    lin("proj_dec", d, DIM)
    dec["proj_patch"] = torch.randn(d, d, generator=g) * d ** -0.5
    dec["proj_classes"] = torch.randn(d, d, generator=g) * d ** -0.5
    norm("decoder_norm", d)
    norm("mask_norm", NUM_CLASSES)
    model = OrderedDict([("encoder." + k, v) for k, v in enc.items()] + [("decoder." + k, v) for k, v in dec.items()])
    return enc, dec, model


# ----------------------------------------------------------------------------------------------
# the released block fusion and Segmenter decoder, in float64 from the released names
def released_fusion(sd, blocks, assignments):
    """``BlockFusion``: level l's tokens gathered through the composed hard assignments,
    concatenated, BatchNorm1d (running statistics, eps 1e-5), Linear."""
    feats, idx = [blocks[0]], None
    for level in range(1, len(blocks)):
        a = assignments[level - 1]
        idx = a if idx is None else a[idx]
        feats.append(blocks[level][idx])
    x = torch.cat(feats, dim=-1)
    bn = {k: sd["block_fusion.proj_blocks.0.norm." + k].double()
          for k in ("weight", "bias", "running_mean", "running_var")}
    x = (x - bn["running_mean"]) / torch.sqrt(bn["running_var"] + 1e-5) * bn["weight"] + bn["bias"]
    return x @ sd["block_fusion.proj_blocks.2.weight"].double().t() + sd["block_fusion.proj_blocks.2.bias"].double()


def released_mask_transformer(dec, tokens, heads):
    """Segmenter's ``MaskTransformer.forward`` on (N, D) tokens -> (N, K) logits (before the
    scatter to pixels)."""
    dec = {k: v.double() for k, v in dec.items()}
    x = torch.cat([_lin(tokens, dec, "proj_dec"), dec["cls_emb"][0]])
    n_blocks = len({k.split(".")[1] for k in dec if k.startswith("blocks.")})
    for i in range(n_blocks):
        b = f"blocks.{i}"
        x = x + _mhsa(_ln(x, dec, b + ".norm1", 1e-5), dec, b + ".attn", heads)
        x = x + _lin(F.gelu(_lin(_ln(x, dec, b + ".norm2", 1e-5), dec, b + ".mlp.fc1")), dec, b + ".mlp.fc2")
    x = _ln(x, dec, "decoder_norm", 1e-5)
    k = dec["cls_emb"].shape[1]
    patches = F.normalize(x[:-k] @ dec["proj_patch"], dim=-1)
    classes = F.normalize(x[-k:] @ dec["proj_classes"], dim=-1)
    return _ln(patches @ classes.t(), dec, "mask_norm", 1e-5)


# ----------------------------------------------------------------------------------------------
def _overrides(extra=()):
    return ["MODEL.DEVICE", "cpu", "MODEL.CAST.EMBED_DIM", str(DIM), "MODEL.CAST.NUM_HEADS", str(HEADS),
            "MODEL.CAST.DEPTHS", str(DEPTHS), "MODEL.CAST.NUM_SEGMENTS", str(SEGMENTS),
            "MODEL.CAST.POS_GRID", "[8,8]", *extra]


def _convert_and_load(tmp_path, capsys, caplog, src, config, extra=(), evaluating=True):
    """The converter tool with ``--config-file`` (one command), then the output loaded by the
    trainer's checkpointer into the same config's model; returns (model, printed, load log)."""
    import logging

    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from hiseg.engine import AtomicDetectionCheckpointer
    from helpers import add_all_configs

    dst = tmp_path / "converted.pth"
    cfg_path = os.path.join(REPO, "configs", "CAST", config)
    opts = _overrides(extra)
    rc = load_tool("convert_cast_checkpoint").main(["--input", str(src), "--output", str(dst), "--num-heads", str(HEADS),
                       "--config-file", cfg_path, *opts])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    cfg = get_cfg()
    add_all_configs(cfg)
    cfg.merge_from_file(cfg_path)
    cfg.merge_from_list(opts)
    torch.manual_seed(5)
    model = build_model(cfg).eval()
    caplog.clear()
    checkpointer = AtomicDetectionCheckpointer(model, cfg=cfg, evaluating=evaluating)
    # at the checkpointer's own logger too: an earlier test in the same process (the main job,
    # run in-process) may have quietened the fvcore loggers to WARNING
    with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger=checkpointer.logger.name):
        checkpointer.load(str(dst))
    return model, printed.out, [r.getMessage() for r in caplog.records]


def _image():
    torch.manual_seed(3)
    return torch.randn(1, 3, 64, 64), vanishing_labels(1)[None]  # labels 0..18, none without pixels


def _fused(model, images, labels):
    enc = model.backbone.encoder
    out = enc(images, labels)
    return out, model.backbone.fuse(torch.cat(enc.unpool_to_superpixels(out), dim=-1))


def test_coco_moco_segmentation_model_converts_into_the_voc_config(tmp_path, capsys, caplog):
    """The issue's case: ``semseg_cast_s_voc_finetune.yaml`` starts from the COCO MoCo file,
    which the converter refused (missing ``norm``, unexpected ``block_fusion``)."""
    sd = coco_moco_encoder()
    src = tmp_path / "checkpoint_0399.pth.tar"
    write_coco_moco(sd, src)
    # loaded to fine-tune (the authors fine-tune it with the segmentation code's bilinear pooling)
    model, printed, log = _convert_and_load(tmp_path, capsys, caplog, src, "semseg_cast_s_voc_finetune.yaml",
                                            ["MODEL.CAST_SEM_SEG.HEAD_DIM", "16"], evaluating=False)
    assert any("TOKEN_POOL_MODE: 'nearest'; this config uses 'bilinear'" in m for m in log), log
    assert "format: cast-seg-moco" in printed
    assert "blocks numbered per group [2, 1, 1, 1] renumbered" in printed
    assert "no final 'norm'" in printed and "dropped the MoCo projector (4 'head.*' tensors)" in printed
    assert "block fusion -> fuse: BatchNorm1d(256) folded into Linear(256, 64)" in printed
    assert "checked: every converted tensor fits the model" in printed
    assert not any("not found in checkpoint" in m or "were not loaded" in m for m in log), log
    summary = [m for m in log if "as expected" in m]
    assert len(summary) == 1 and "backbone.encoder.norm.weight (the released model has none)" in summary[0]
    assert "head (" in summary[0] and "backbone.fuse" not in summary[0]  # the new head starts from scratch
    # the released function: fused tokens of cast_seg.py (bilinear segmentation path, as fine-tuned)
    images, labels = _image()
    with torch.no_grad():
        out, fused = _fused(model, images, labels)
    _, ref_assign, _, ref_blocks = released_forward(sd, images[0], labels[0], depths=DEPTHS, segments=SEGMENTS,
                                                    heads=HEADS, pooling="bilinear", return_blocks=True)
    ref = released_fusion(sd, ref_blocks, ref_assign)
    assert torch.allclose(fused[0].double(), ref, atol=5e-4, rtol=1e-4), (fused[0].double() - ref).abs().max()


def test_segmenter_checkpoint_converts_with_its_decoder(tmp_path, capsys, caplog):
    """``{'model': {'encoder.*', 'decoder.*'}}`` (it failed with ``missing key 'cls_token'``):
    encoder, block fusion and mask transformer load into ``segmenter_cast_s_ade20k.yaml`` and
    give the released token logits."""
    enc, dec, model_sd = segmenter_checkpoint()
    src = tmp_path / "checkpoint.pth"
    torch.save({"model": model_sd, "optimizer": {"state": {}}, "n_cls": NUM_CLASSES,
                "lr_scheduler": {"last_epoch": 63}, "epoch": 63}, src)
    model, printed, log = _convert_and_load(tmp_path, capsys, caplog, src, "segmenter_cast_s_ade20k.yaml",
                                            ["MODEL.CAST_SEGMENTER.NUM_CLASSES", str(NUM_CLASSES),
                                             "MODEL.CAST.SUPERPIXEL.SEEDS_INPUT", "released_segmenter"])
    assert "format: cast-segmenter" in printed
    assert "MODEL.CAST.SUPERPIXEL.SEEDS_INPUT: released_segmenter" in printed
    assert f"Segmenter mask transformer -> head (2 blocks, {NUM_CLASSES} classes, width {DIM}" in printed
    assert "never reads it" in printed  # the encoder's unused classifier
    assert "MODEL.CAST.TOKEN_POOL_MODE: bilinear" in printed and "MODEL.CAST.POS_RESIZE: stretch" in printed
    assert not any("not found in checkpoint" in m or "were not loaded" in m for m in log), log
    assert not any("as expected" in m for m in log), log  # nothing left to its initialisation
    images, labels = _image()
    with torch.no_grad():
        out, fused = _fused(model, images, labels)
        logits = model.head(fused, out["levels"][0]["valid"])
    _, ref_assign, _, ref_blocks = released_forward(enc, images[0], labels[0], depths=DEPTHS, segments=SEGMENTS,
                                                    heads=HEADS, pooling="bilinear", return_blocks=True)
    ref = released_mask_transformer(dec, released_fusion(enc, ref_blocks, ref_assign), heads=max(1, DIM // 64))
    assert torch.allclose(logits[0].double(), ref, atol=1e-3, rtol=1e-3), (logits[0].double() - ref).abs().max()
    assert torch.equal(logits[0].argmax(-1), ref.argmax(-1))


def write_lincls(sd, path):
    torch.save({"epoch": 90, "arch": "cast_small", "state_dict": {"module." + k: v for k, v in sd.items()},
                "best_acc1": 68.1, "optimizer": {"state": {}}}, path)


@pytest.mark.parametrize("layout,config", [("cast-lincls", "linprobe_cast_s_in1k.yaml"),
                                           ("cast-deit", "deit_cast_s_in1k.yaml")])
def test_classifier_files_convert_with_their_classifier(tmp_path, capsys, caplog, layout, config):
    learned = layout == "cast-deit"
    sd = random_official_cast(dim=DIM, depths=DEPTHS, learned_pos=learned)
    sd["head.weight"], sd["head.bias"] = torch.randn(NUM_CLASSES, DIM), torch.randn(NUM_CLASSES)
    src = tmp_path / "checkpoint.pth.tar"
    (write_deit if learned else write_lincls)(sd, src)
    model, printed, log = _convert_and_load(tmp_path, capsys, caplog, src, config,
                                            ["MODEL.CLS.NUM_CLASSES", str(NUM_CLASSES)])
    assert f"format: {layout}" in printed and f"classifier -> head: Linear({DIM}, {NUM_CLASSES})" in printed
    assert not any("not found in checkpoint" in m or "were not loaded" in m for m in log), log
    torch.manual_seed(3)
    images, labels = torch.randn(1, 3, 64, 64), vanishing_labels(0)[None]
    with torch.no_grad():
        logits = model.head(model.backbone.encoder(images, labels)["cls"])
    ref_cls = released_forward(sd, images[0], labels[0], depths=DEPTHS, segments=SEGMENTS, heads=HEADS)[0]
    ref = ref_cls @ sd["head.weight"].double().t() + sd["head.bias"].double()
    assert torch.allclose(logits[0].double(), ref, atol=5e-4, rtol=1e-4), (logits[0].double() - ref).abs().max()


def test_a_head_the_config_lacks_is_reported_not_written(tmp_path, capsys, caplog):
    """DeiT weights converted for the Segmenter config: the classifier does not fit its
    decoder, so it is left out with one line, and the encoder still converts."""
    sd = random_official_cast(dim=DIM, depths=DEPTHS, learned_pos=True)
    src = tmp_path / "best_checkpoint.pth"
    write_deit(sd, src)
    model, printed, log = _convert_and_load(tmp_path, capsys, caplog, src, "segmenter_cast_s_ade20k.yaml",
                                            ["MODEL.CAST_SEGMENTER.NUM_CLASSES", str(NUM_CLASSES)], evaluating=False)
    assert "- not written: DeiT classifier -> head: Linear(64, 10) (the model has no such module: 'head.weight' " \
           "is not in the model)" in printed
    assert "MODEL.CLS.NUM_CLASSES" not in str(torch.load(tmp_path / "converted.pth", weights_only=False)
                                              ["hiseg_weights_config"]["required"])


def test_released_segmenter_seeds_input(tmp_path):
    """``SEEDS_INPUT: released_segmenter``: SEEDS on what the authors' Segmenter code gives it,
    ``(image_uint8 * 255)`` in uint8 arithmetic (``segm/data/utils.py``), here computed
    independently as ``(255 v) mod 256`` in int64; it is another partition than the image's."""
    import cv2
    import numpy as np
    from skimage import data

    from hiseg_cast.superpixels import SuperpixelConfig, compute_superpixels
    from detectron2.config import get_cfg
    from helpers import add_all_configs

    image = np.ascontiguousarray(data.astronaut()[100:196, 150:246])
    cfg = get_cfg()
    add_all_configs(cfg)
    cfg.merge_from_list(["MODEL.CAST.SUPERPIXEL.SEEDS_INPUT", "released_segmenter",
                         "MODEL.CAST.SUPERPIXEL.NUM_SUPERPIXELS", "36"])
    sp_cfg = SuperpixelConfig.from_cfg(cfg.MODEL.CAST.SUPERPIXEL)  # 5 bins, 15 iterations
    ours = compute_superpixels(image, sp_cfg)
    wrapped = ((image.astype(np.int64) * 255) % 256).astype(np.uint8)
    seeds = cv2.ximgproc.createSuperpixelSEEDS(96, 96, 3, 36, 1, 2, 5, False)
    seeds.iterate(cv2.cvtColor(wrapped, cv2.COLOR_RGB2LAB), 15)
    ref = np.unique(seeds.getLabels(), return_inverse=True)[1].reshape(96, 96)
    assert np.array_equal(ours, ref)
    plain = compute_superpixels(image, SuperpixelConfig(**{**sp_cfg.__dict__, "seeds_input": "rgb"}))
    assert not np.array_equal(ours, plain)


def test_moco_conv_stem_vit_is_refused_with_the_reason(tmp_path):
    """The authors' MoCo-v3 ViT baselines (``-a vit_conv_small``: a convolutional stem,
    ``patch_embed.proj.{0..12}``, then 11 blocks) do not fit our linear-patch ViT: one line says why."""
    from hiseg_cast.released_weights import CheckpointConversionError, convert_checkpoint

    sd = {"module.base_encoder.patch_embed.proj.0.weight": torch.zeros(8, 3, 3, 3),
          "module.base_encoder.patch_embed.proj.12.weight": torch.zeros(64, 64, 1, 1),
          "module.base_encoder.blocks.0.attn.qkv.weight": torch.zeros(192, 64),
          "module.base_encoder.cls_token": torch.zeros(1, 1, 64)}
    src = tmp_path / "checkpoint_0099.pth.tar"
    torch.save({"epoch": 100, "arch": "vit_conv_small", "state_dict": sd}, src)
    with pytest.raises(CheckpointConversionError, match="convolutional stem .* cannot be converted"):
        convert_checkpoint(str(src))
