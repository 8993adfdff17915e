"""Converted official CAST weights reproduce the released code's function, on inputs where
superpixels vanish on the stride-8 grid.

No official weights exist offline, so the checkpoints here are random tensors written in the
released layouts (MoCo ``checkpoint_0099.pth.tar``, DeiT ``best_checkpoint.pth``) with perturbed
LayerNorm / BatchNorm parameters and statistics, so that a wrong mapping shows. The expected
values come from :func:`released_forward`, a small reference written in this file from the
paper's equations (Sec. 3, Eq. 1-3, Alg. 1) and the released code's conventions
(../shared/notes/anchors.md): it reads the tensors under their released names and uses plain
tensor operations in float64 (no module of ours), a sequential FPS loop, and the released
handling of a segment that vanishes in the nearest resize of the label map: an all-zero token
(zero position encoding too) that takes part in the blocks' attention, in the centroid block's
attention and token mean and in the pooling sums, left out only of FPS, whose padded entries are
filled with the mean of the valid tokens. The number of tokens the released code makes depends
on the batch (:func:`released_token_count`); the reference takes it as an argument, and
``test_token_count_is_the_released_batched_count`` says which count ours equals.
"""
import argparse
import math
import os
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from helpers import REPO, load_tool

DIM, HEADS, DEPTHS, SEGMENTS = 48, 4, [2, 1, 1, 1], [12, 6, 3, 2]
SIZE = 64  # 8x8 stem grid
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------
# inputs: label maps where some superpixels miss every sample point of the nearest resize
def vanishing_labels(variant: int) -> torch.Tensor:
    """(SIZE, SIZE) label map: 16 blocks of 16x16 plus small superpixels. The nearest resize to
    8x8 samples pixels (8i, 8j), so a superpixel inside rows / columns 1..7 of a cell vanishes."""
    lab = torch.arange(16).view(4, 4).repeat_interleave(16, 0).repeat_interleave(16, 1)
    lab[1:4, 1:4] = 16          # vanishes
    lab[20:23, 41:46] = 17      # vanishes
    lab[8:10, 8:10] = 18        # keeps exactly one grid cell
    if variant == 0:
        lab[57:63, 57:63] = 19  # vanishes
        lab[33:36, 2:6] = 21    # vanishes; label 20 is carried by no pixel: a gap, also an empty token
    return lab


def random_official_cast(dim=DIM, depths=DEPTHS, grid=SIZE // 8, learned_pos=False, seed=0):
    """Random weights under the released names (``patch_embed.proj.N``, ``blocks.i``,
    ``pool{k}.pool_block.*``, ``norm``, ``head``), norms and BN statistics perturbed."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    def norm(prefix, n, sd):
        sd[prefix + ".weight"] = 1 + rnd(n, std=0.2)
        sd[prefix + ".bias"] = rnd(n, std=0.2)

    def linear(prefix, n_out, n_in, sd, std=None):
        sd[prefix + ".weight"] = rnd(n_out, n_in, std=std or 1 / math.sqrt(n_in))
        sd[prefix + ".bias"] = rnd(n_out, std=0.1)

    sd = OrderedDict()
    cin, cout = 3, dim // 8
    for i, conv in enumerate((0, 3, 6, 9)):
        sd[f"patch_embed.proj.{conv}.weight"] = rnd(cout, cin, 3, 3, std=1 / math.sqrt(9 * cin))
        bn = f"patch_embed.proj.{conv + 1}"
        norm(bn, cout, sd)
        sd[bn + ".running_mean"] = rnd(cout, std=0.3)
        sd[bn + ".running_var"] = torch.rand(cout, generator=g) + 0.5
        sd[bn + ".num_batches_tracked"] = torch.tensor(1000)
        cin, cout = cout, cout * 2
    linear("patch_embed.proj.12", dim, cin, sd)
    sd["patch_embed.proj.12.weight"] = sd["patch_embed.proj.12.weight"][:, :, None, None]
    sd["cls_token"] = rnd(1, 1, dim)
    for i in range(sum(depths)):
        b = f"blocks.{i}"
        norm(b + ".norm1", dim, sd)
        linear(b + ".attn.qkv", 3 * dim, dim, sd, std=2 / math.sqrt(dim))
        linear(b + ".attn.proj", dim, dim, sd)
        norm(b + ".norm2", dim, sd)
        linear(b + ".mlp.fc1", 4 * dim, dim, sd)
        linear(b + ".mlp.fc2", dim, 4 * dim, sd)
    for k in range(1, len(depths) + 1):
        p = f"pool{k}.pool_block."
        sd[p + "centroid_fc.bias"] = rnd(dim, std=0.1)
        norm(p + "centroid_fc.norm", dim, sd)
        linear(p + "centroid_fc.attn.qkv", 3 * dim, dim, sd, std=2 / math.sqrt(dim))
        linear(p + "centroid_fc.attn.proj", dim, dim, sd)
        norm(p + "fc1.0", dim, sd)
        linear(p + "fc1.1", 4 * dim, dim, sd)
        norm(p + "fc2.0", 4 * dim, sd)
        linear(p + "fc2.1", dim, 4 * dim, sd)
    norm("norm", dim, sd)
    linear("head", 10, dim, sd)
    if learned_pos:  # DeiT: learned (1, 1 + HW, D), the class entry first
        sd["pos_embed"] = rnd(1, 1 + grid * grid, dim, std=0.5)
    else:  # MoCo: the fixed sin-cos table (built below as the released code does) and pe_token
        sd["pos_embed"] = released_sincos(grid, dim)[None]
        sd["pe_token"] = torch.zeros(1, 1, dim)
    start = 0  # the released classification models also store blocks{k}.{i} copies
    for k, depth in enumerate(depths, start=1):
        for i in range(start, start + depth):
            for key in [key for key in sd if key.startswith(f"blocks.{i}.")]:
                sd[f"blocks{k}.{i}." + key[len(f"blocks.{i}."):]] = sd[key].clone()
        start += depth
    return sd


def released_sincos(grid: int, dim: int, temperature: float = 1e4) -> torch.Tensor:
    """The released 2-D sin-cos table: ``meshgrid(arange(w), arange(h))`` ('ij'), channels
    [sin(w*omega), cos(w*omega), sin(h*omega), cos(h*omega)], rows of the table row-major."""
    gw, gh = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    ow, oh = gw.flatten()[:, None] * omega, gh.flatten()[:, None] * omega
    return torch.cat([ow.sin(), ow.cos(), oh.sin(), oh.cos()], dim=1)


def write_moco(sd, path):
    full = OrderedDict()
    for k, v in sd.items():
        full["module.base_encoder." + k] = v
        full["module.momentum_encoder." + k] = v + 1
    full["module.predictor.0.weight"] = torch.randn(16, 8)
    torch.save({"epoch": 100, "arch": "cast_small", "state_dict": full, "optimizer": {"state": {}},
                "scaler": {"scale": 65536.0}}, path)


def write_deit(sd, path):
    torch.save({"model": sd, "optimizer": {"state": {}}, "lr_scheduler": {"last_epoch": 299}, "epoch": 299,
                "model_ema": {k: v + 0.5 for k, v in sd.items()}, "scaler": {"scale": 1024.0},
                "args": argparse.Namespace(model="cast_small", input_size=224)}, path)


# ----------------------------------------------------------------------------------------------
# the reference: the released forward pass of one image, from the equations
def _ln(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def _lin(x, sd, prefix):
    return x @ sd[prefix + ".weight"].t() + sd[prefix + ".bias"]


def _mhsa(x, sd, prefix, heads):
    """Multi-head self-attention over all rows of x (M, D): no mask, as released."""
    m, d = x.shape
    q, k, v = _lin(x, sd, prefix + ".qkv").view(m, 3, heads, d // heads).permute(1, 2, 0, 3)
    attn = (q @ k.transpose(-1, -2) * (d // heads) ** -0.5).softmax(-1)
    return _lin((attn @ v).transpose(0, 1).reshape(m, d), sd, prefix + ".proj")


def _fps(points, num):
    """Sequential FPS from index 0: squared L2, running minimum, first index of the maximum."""
    chosen, dist = [0], torch.full((points.shape[0],), float("inf"), dtype=points.dtype)
    for _ in range(num - 1):
        dist = torch.minimum(dist, ((points - points[chosen[-1]]) ** 2).sum(1))
        best = 0
        for j in range(points.shape[0]):
            if dist[j] > dist[best]:
                best = j
        chosen.append(best)
    return torch.tensor(chosen)


def released_forward(sd, image, labels, depths=DEPTHS, segments=SEGMENTS, heads=HEADS, pooling="nearest",
                     num_tokens=None, return_blocks=False):
    """One image (3, H, W) normalised and its (H, W) superpixels -> (class feature (D,),
    per-level hard assignments [(M_{l-1},)], per-level logits), and with ``return_blocks`` the
    tokens after each block group (the released ``block1..block4``).

    ``num_tokens``: how many segment tokens the released code makes for this image. Its
    ``segment_mean_nd`` makes ``max(label) + 1`` over the label map it is given *and over the
    batch* (see :func:`released_token_count`); default: ``max(labels) + 1`` of the full-resolution
    map, which is what the released batched evaluation gives whenever a batch-mate keeps its
    largest label.

    ``pooling="nearest"``: the released classification / MoCo code (label map resized to the stem
    grid, the grid's position table added there). ``"bilinear"``: the released segmentation code
    (stem features upsampled bilinearly to the label map, the position table upsampled
    bicubically to it, both averaged per superpixel)."""
    sd = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    x = image[None].double()
    for conv in (0, 3, 6, 9):
        x = F.conv2d(x, sd[f"patch_embed.proj.{conv}.weight"], stride=2 if conv < 9 else 1, padding=1)
        bn = f"patch_embed.proj.{conv + 1}"
        x = (x - sd[bn + ".running_mean"][:, None, None]) / torch.sqrt(sd[bn + ".running_var"][:, None, None] + 1e-5)
        x = (x * sd[bn + ".weight"][:, None, None] + sd[bn + ".bias"][:, None, None]).clamp(min=0)
    x = F.conv2d(x, sd["patch_embed.proj.12.weight"], sd["patch_embed.proj.12.bias"])[0]  # (D, h, w)
    d, h, w = x.shape
    learned = "pe_token" not in sd
    pos = sd["pos_embed"][0, 1:] if learned else sd["pos_embed"][0]
    cls = sd["cls_token"][0] + (sd["pos_embed"][0, :1] if learned else sd["pe_token"][0])
    n = int(labels.max()) + 1 if num_tokens is None else int(num_tokens)
    tokens = torch.zeros(n, d, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    if pooling == "nearest":
        step_y, step_x = labels.shape[0] // h, labels.shape[1] // w
        cell_labels = labels[::step_y, ::step_x].flatten()  # nearest resize with an integer factor
        feats = x.flatten(1).t() + pos
    else:
        g = math.isqrt(pos.shape[0])
        size = tuple(labels.shape)
        table = pos.t().reshape(1, d, g, g)
        feats = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0] \
            + F.interpolate(table, size=size, mode="bicubic", align_corners=False)[0]
        feats, cell_labels = feats.flatten(1).t(), labels.flatten()
    assert int(cell_labels.max()) < n, "the released code never makes fewer tokens than labels it pools"
    for cell in range(feats.shape[0]):
        tokens[cell_labels[cell]] += feats[cell]
        count[cell_labels[cell]] += 1
    valid = count > 0
    tokens = tokens / count.clamp(min=1)[:, None]  # a vanished segment stays an all-zero token

    assignments, logits_all, blocks, start = [], [], [], 0
    for level, depth in enumerate(depths):
        z = torch.cat([cls, tokens])
        for i in range(start, start + depth):
            # classification models: flat blocks.i; the COCO segmentation model: per group only
            b = f"blocks.{i}" if f"blocks.{i}.norm1.weight" in sd else f"blocks{level + 1}.{i - start}"
            z = z + _mhsa(_ln(z, sd, b + ".norm1", 1e-6), sd, b + ".attn", heads)
            hid = F.gelu(_lin(_ln(z, sd, b + ".norm2", 1e-6), sd, b + ".mlp.fc1"))
            z = z + _lin(hid, sd, b + ".mlp.fc2")
        start += depth
        cls, tokens = z[:1], z[1:]
        blocks.append(tokens)
        if level == len(depths) - 1:  # the released segmentation model has no final norm
            out = _ln(cls[0], sd, "norm", 1e-6) if "norm.weight" in sd else cls[0]
        p = f"pool{level + 1}.pool_block."
        mean = tokens[valid].mean(0, keepdim=True)
        filled = torch.where(valid[:, None], tokens, mean)
        sampled = _fps(torch.cat([mean, filled]), segments[level] + 1)[1:] - 1
        assert (sampled >= 0).all()
        u = tokens + _mhsa(_ln(tokens, sd, p + "centroid_fc.norm", 1e-6), sd, p + "centroid_fc.attn", heads)
        u = u - u.mean(0, keepdim=True) + sd[p + "centroid_fc.bias"]
        logits = 5 * F.normalize(u, dim=-1) @ F.normalize(u[sampled], dim=-1).t()
        assignments.append(logits.argmax(-1))
        logits_all.append(logits)
        if level == len(depths) - 1:
            break
        assign = logits.softmax(-1)
        f1 = F.gelu(_lin(_ln(torch.cat([cls, tokens]), sd, p + "fc1.0", 1e-5), sd, p + "fc1.1"))
        pooled = assign.t() @ f1[1:] / assign.sum(0)[:, None]
        f2 = _lin(_ln(torch.cat([f1[:1], pooled]), sd, p + "fc2.0", 1e-5), sd, p + "fc2.1")
        tokens, cls = f2[1:] + tokens[sampled], f2[:1] + cls
        valid = torch.ones(tokens.shape[0], dtype=torch.bool)
    if return_blocks:
        return out, assignments, logits_all, blocks
    return out, assignments, logits_all


def released_token_count(label_maps, grid, pooling="nearest"):
    """The number of segment tokens the released code makes for a batch of label maps: its
    ``segment_mean_nd`` sizes the output by ``max(label) + 1`` over the whole batch of the label
    maps it pools, which for ``pooling="nearest"`` (classification / MoCo code) are the maps
    after the nearest resize to the stem grid. A batch of one image is the authors' code run on
    that image alone."""
    maps = []
    for lab in label_maps:
        if pooling == "nearest":
            step_y, step_x = lab.shape[0] // grid[0], lab.shape[1] // grid[1]
            lab = lab[::step_y, ::step_x]
        maps.append(lab)
    return max(int(m.max()) for m in maps) + 1


# ----------------------------------------------------------------------------------------------
def _converted_model(tmp_path, config, learned_pos, overrides=()):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from hiseg_cast.released_weights import convert_checkpoint, find_prefix, save_detectron2_checkpoint
    from helpers import add_all_configs

    sd = random_official_cast(learned_pos=learned_pos)
    src = str(tmp_path / "official.pth")
    (write_deit if learned_pos else write_moco)(sd, src)
    cfg = get_cfg()
    add_all_configs(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "CAST", config))
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.CAST.EMBED_DIM", DIM, "MODEL.CAST.NUM_HEADS", HEADS,
        "MODEL.CAST.DEPTHS", DEPTHS, "MODEL.CAST.NUM_SEGMENTS", SEGMENTS, "MODEL.CAST.POS_GRID", [8, 8],
        "MODEL.MOCO.MLP_DIM", 32, "MODEL.MOCO.DIM", 16, "MODEL.CLS.NUM_CLASSES", 10, *overrides])
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    result = convert_checkpoint(src)
    prefix = find_prefix(model, "cast")
    dst = str(tmp_path / "converted.pth")
    save_detectron2_checkpoint(result, dst, prefix=prefix)
    DetectionCheckpointer(model).load(dst)
    encoder = model.get_submodule(prefix.rstrip("."))
    return sd, encoder


def _batch():
    torch.manual_seed(3)
    images = torch.randn(2, 3, SIZE, SIZE)
    labels = torch.stack([vanishing_labels(0), vanishing_labels(1)])
    return images, labels


@pytest.mark.parametrize("config,learned_pos,pooling", [
    ("moco_cast_s_in1k.yaml", False, "nearest"),      # MoCo pre-training (sin-cos positions, pe_token)
    ("linprobe_cast_s_in1k.yaml", False, "nearest"),  # linear probe on the MoCo weights
    ("deit_cast_s_in1k.yaml", True, "nearest"),       # DeiT: learned positions, class entry from pos_embed
    ("moco_cast_s_in1k.yaml", False, "bilinear"),     # the segmentation code on the MoCo weights
    ("deit_cast_s_in1k.yaml", True, "bilinear"),      # ... and on the DeiT weights
])
def test_converted_weights_equal_released_function_with_vanished_superpixels(tmp_path, config, learned_pos,
                                                                               pooling):
    sd, encoder = _converted_model(tmp_path, config, learned_pos, ["MODEL.CAST.TOKEN_POOL_MODE", pooling])
    assert encoder.token_pool_mode == pooling and encoder.empty_tokens == "attend"
    images, labels = _batch()
    with torch.no_grad():
        out = encoder(images, labels)
    for i in range(2):
        # the released code with this image's full-resolution count max(label) + 1: its batched
        # evaluation whenever a batch-mate keeps its largest label on the grid. Alone, image 0
        # would get fewer tokens (test_token_count_is_the_released_batched_count below).
        ref_cls, ref_assign, ref_logits = released_forward(sd, images[i], labels[i], pooling=pooling)
        n = int(labels[i].max()) + 1
        assert torch.allclose(out["cls"][i].double(), ref_cls, atol=2e-4, rtol=1e-4), \
            (out["cls"][i].double() - ref_cls).abs().max()
        for level, (a, ref_a) in enumerate(zip(out["assignments"], ref_assign)):
            m = n if level == 0 else SEGMENTS[level - 1]
            assert torch.equal(a[i, :m], ref_a), f"image {i} level {level + 1}"
            assert torch.allclose(out["logits"][level][i, :m].double(), ref_logits[level], atol=2e-4)
        # the hierarchy read-out: level l of a pixel = composed assignments of its superpixel
        seg = torch.arange(n)
        for level, ref_a in enumerate(ref_assign, start=1):
            seg = ref_a[seg]
            assert torch.equal(out["hierarchy"][i, level], seg[labels[i]]), f"image {i} level {level}"
    # the empty tokens the released code keeps: vanished superpixels (nearest) and the gap label
    empty = int(labels[0].max()) + 1 - int(out["levels"][0]["valid"][0].sum())
    assert empty == (5 if pooling == "nearest" else 1)  # 16, 17, 19, 21 vanish; no pixel has 20


def test_token_count_is_the_released_batched_count(tmp_path):
    """The released classification / MoCo code makes ``max(label on the 28x28 grid) + 1`` tokens
    over the *batch*. Image 0 here loses its two largest labels (19, 21) on the grid: run alone,
    the released code makes 19 tokens; in a batch with an image that keeps label 21 on the grid
    (its ImageNet evaluation runs batches of 256), 22. Ours makes ``max(full-resolution label) +
    1`` = 22 for the image whatever its batch, so it equals the released batched evaluation, not
    the released code run on the image alone."""
    sd, encoder = _converted_model(tmp_path, "moco_cast_s_in1k.yaml", False, ["MODEL.CAST.TOKEN_POOL_MODE", "nearest"])
    images, labels = _batch()
    image, lab = images[0], labels[0]
    mate = vanishing_labels(1).clone()
    mate[:8, :8] = 21  # keeps label 21 on the grid (sample (0, 0))
    alone = released_token_count([lab], (8, 8))
    batched = released_token_count([lab, mate], (8, 8))
    assert (alone, batched) == (19, 22)
    with torch.no_grad():
        out = encoder(image[None], lab[None])
        out_pair = encoder(torch.stack([image, images[1]]), torch.stack([lab, mate]))
    assert out["levels"][0]["tokens"].shape[1] == batched == int(lab.max()) + 1
    ref_alone = released_forward(sd, image, lab, num_tokens=alone)[0]
    ref_batched = released_forward(sd, image, lab, num_tokens=batched)[0]
    ours = out["cls"][0].double()
    assert torch.allclose(ours, ref_batched, atol=2e-4, rtol=1e-4), (ours - ref_batched).abs().max()
    assert (ours - ref_alone).abs().max() > 1e-3  # the three extra all-zero tokens attend
    # batch-independent: the same image in another batch gives the same output
    assert torch.allclose(out_pair["cls"][0], out["cls"][0], atol=1e-5)


@pytest.mark.parametrize("option,pooling", [(["MODEL.CAST.EMPTY_TOKENS", "mask"], "nearest"),
                                            (["MODEL.CAST.POS_RESIZE", "grid"], "bilinear")])
def test_our_options_are_different_functions(tmp_path, option, pooling):
    """EMPTY_TOKENS mask (empty tokens left out of attention and pooling) and POS_RESIZE grid
    (the stem grid's encoding, not the stretched table) are our options: on the same weights and
    input they do not give the released function, so the test above tells them apart."""
    sd, encoder = _converted_model(tmp_path, "moco_cast_s_in1k.yaml", False,
                                   [*option, "MODEL.CAST.TOKEN_POOL_MODE", pooling])
    images, labels = _batch()
    with torch.no_grad():
        out = encoder(images, labels)
    ref_cls, _, _ = released_forward(sd, images[0], labels[0], pooling=pooling)
    assert (out["cls"][0].double() - ref_cls).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------
# the converted file says which config values it needs, and loading checks them
QUICK = os.path.join(REPO, "configs", "CAST", "quick", "moco_cast_tiny_skimage_cpu.yaml")  # 96-d, [1,1,1,1]


def _train_net():
    return load_tool("train_net")


def _convert_tiny(tmp_path, capsys):
    """An official MoCo-layout CAST (96-d, 4 groups of 1 block) converted by the tool."""
    src, dst = tmp_path / "checkpoint_0099.pth.tar", tmp_path / "converted.pth"
    write_moco(random_official_cast(dim=96, depths=[1, 1, 1, 1]), src)
    tool = load_tool("convert_cast_checkpoint")
    assert tool.main(["--input", str(src), "--output", str(dst), "--num-heads", "4"]) == 0
    return dst, capsys.readouterr().out


def _eval_only(tmp_path, weights, *opts):
    import contextlib
    import io
    import logging

    from hiseg.cli import run_cli

    err = io.StringIO()
    # a registered test set (--eval-only refuses an empty DATASETS.TEST); the evaluation itself is
    # skipped below: these tests are about loading the weights
    argv = ["--config-file", QUICK, "--eval-only", "MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(tmp_path / "out"),
            "DATASETS.TEST", "('skimage_natural_images',)", *opts]
    # train_net's default_setup attaches log handlers to this test's captured streams: take them
    # off afterwards, or later tests that log would write to closed files
    loggers = [logging.getLogger(n) for n in ("", "detectron2", "fvcore", "hiseg")]
    saved = [list(lg.handlers) for lg in loggers]
    train_net = _train_net()
    train_net.HisegTrainer = type("NoEvalTrainer", (train_net.HisegTrainer,),
                                  {"test": classmethod(lambda cls, cfg, model, evaluators=None: {})})
    try:
        with contextlib.redirect_stderr(err):
            rc = run_cli(train_net.cli, argv)
    finally:
        for lg, handlers in zip(loggers, saved):
            lg.handlers[:] = handlers
    return rc, err.getvalue()


def test_converter_prints_and_stores_the_values_the_weights_need(tmp_path, capsys):
    from hiseg.checkpoint.io import read_checkpoint
    from hiseg.checkpoint.weights_config import WEIGHTS_CONFIG_KEY

    dst, out = _convert_tiny(tmp_path, capsys)
    assert "MODEL.CAST.TOKEN_POOL_MODE: nearest" in out and "MODEL.CAST.EMPTY_TOKENS: attend" in out
    assert "on the command line: MODEL.CAST.EMBED_DIM 96" in out
    meta = read_checkpoint(str(dst))[WEIGHTS_CONFIG_KEY]
    assert meta["required"]["MODEL.CAST.DEPTHS"] == [1, 1, 1, 1] and meta["holds"] == "backbone.encoder."
    assert meta["trained_with"] == {"MODEL.CAST.TOKEN_POOL_MODE": "nearest", "MODEL.CAST.EMPTY_TOKENS": "attend",
                                    "MODEL.CAST.NUM_HEADS": 4, "MODEL.CAST.KAPPA": 5.0}


def test_loading_with_other_values_fails_in_one_line(tmp_path, capsys):
    dst, _ = _convert_tiny(tmp_path, capsys)
    # the case: a bilinear config evaluates weights trained with nearest pooling
    rc, err = _eval_only(tmp_path, dst, "MODEL.CAST.TOKEN_POOL_MODE", "bilinear")
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "MODEL.CAST.TOKEN_POOL_MODE: 'nearest' (this config: 'bilinear')" in lines[0]
    assert str(dst) in lines[0]
    # a shape-level value fails always, with the fix on the line
    rc, err = _eval_only(tmp_path, dst, "MODEL.CAST.EMBED_DIM", "48")
    assert rc == 2 and "MODEL.CAST.EMBED_DIM: 96 (this config: 48)" in err and "MODEL.CAST.EMBED_DIM 96" in err
    # deliberately evaluating with other settings
    rc, err = _eval_only(tmp_path, dst, "MODEL.CAST.TOKEN_POOL_MODE", "bilinear", "HISEG.WEIGHTS_CONFIG_CHECK", "warn")
    assert rc == 0, err


def test_expected_missing_keys_are_one_line(tmp_path, capsys, caplog):
    import logging

    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from hiseg.engine import AtomicDetectionCheckpointer
    from helpers import add_all_configs

    dst, _ = _convert_tiny(tmp_path, capsys)
    cfg = get_cfg()
    add_all_configs(cfg)
    cfg.merge_from_file(QUICK)
    model = build_model(cfg)
    with caplog.at_level(logging.INFO):
        AtomicDetectionCheckpointer(model, cfg=cfg, evaluating=True).load(str(dst))
    text = [r.getMessage() for r in caplog.records]
    summary = [t for t in text if "as expected" in t]
    assert len(summary) == 1 and "momentum_backbone" in summary[0] and "projector" in summary[0]
    assert not any("not found in checkpoint" in t for t in text), text
    assert torch.equal(model.backbone.encoder.cls_token, read_cls(dst))


def read_cls(path):
    from hiseg.checkpoint.io import read_checkpoint

    return read_checkpoint(str(path))["model"]["backbone.encoder.cls_token"]
