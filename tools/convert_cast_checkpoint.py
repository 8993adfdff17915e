#!/usr/bin/env python
"""Convert released CAST / DINO / timm ViT weights into a Detectron2 checkpoint for MODEL.WEIGHTS.

    python tools/convert_cast_checkpoint.py --input checkpoint_0099.pth.tar --output cast_s_moco.pth
    python tools/convert_cast_checkpoint.py --input best_checkpoint.pth --output cast_s_deit.pth \
        --format cast-deit                       # then MODEL.CAST.POS_EMBED: learned
    python tools/convert_cast_checkpoint.py --input checkpoint_0399.pth.tar --output cast_s_coco.pth \
        --config-file configs/CAST/semseg_cast_s_voc_finetune.yaml   # COCO MoCo (cast-seg-moco) + fusion
    python tools/convert_cast_checkpoint.py --input checkpoint.pth --output cast_s_ade20k.pth \
        --config-file configs/CAST/segmenter_cast_s_ade20k.yaml      # segm/train_cast.py: encoder + decoder
    python tools/convert_cast_checkpoint.py --input checkpoint_0099.pth.tar --output cast_fpn.pth \
        --prefix backbone.bottom_up.encoder.      # CAST wrapped by FPN (build_cast_fpn_backbone)
    python tools/convert_cast_checkpoint.py --input dino_vitbase8_pretrain.pth --output vitb8.pth
    python tools/convert_cast_checkpoint.py --input ... --output ... --config-file CFG [KEY VALUE ...]
        # builds CFG's model, takes the prefix from it, checks every tensor fits before writing

A missing or unreadable ``--input``, weights of another layout, or an ``--output`` that cannot
be written (checked first) is one ``error:`` line with exit status 2.

Checkpoints are read with torch's weights_only unpickler (only argparse.Namespace is allowed
besides tensors and containers); .safetensors files are read with the safetensors package.
"""
import argparse
import sys


def parse_args(argv=None):
    from hiseg_cast.released_weights import FORMATS, MODELS
    from hiseg.cli import ArgumentParser

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="released checkpoint (.pth, .pth.tar, .safetensors)")
    p.add_argument("--output", required=True, help="Detectron2 checkpoint to write (.pth)")
    p.add_argument("--format", default="auto", choices=FORMATS, help="layout of --input (default: detect)")
    p.add_argument("--model", default=None, choices=MODELS,
                   help="target backbone (default: the format's: cast for cast-*, vit for dino / timm-vit)")
    p.add_argument("--prefix", default=None,
                   help="key prefix inside the meta-architecture (default: found in --config-file's model, "
                        "else 'backbone.encoder.' for cast, 'backbone.vit.' for vit; "
                        "'backbone.bottom_up.encoder.' for CAST + FPN)")
    p.add_argument("--ema", action="store_true", help="cast-deit: use 'model_ema' instead of 'model'")
    p.add_argument("--img-size", type=int, nargs="+", default=None,
                   help="vit: resample the position embedding to this image size (one or two ints)")
    p.add_argument("--num-heads", type=int, default=12,
                   help="cast: attention heads of the model the weights come from (not stored in them; the "
                        "released CAST-S and CAST-B use 12)")
    p.add_argument("--config-file", default=None, help="optional: build this config's model and check the fit")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE ...) for --config-file")
    return p.parse_args(argv)


def build_model_from_config(args):
    import torch
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from hiseg.cli import merge_config
    from hiseg_cast import add_cast_config
    from hiseg_oap import add_oap_config

    cfg = get_cfg()
    add_oap_config(add_cast_config(cfg))
    merge_config(cfg, args.config_file, args.opts)  # missing file / unknown key: one-line ConfigError
    cfg.MODEL.DEVICE = "cpu"
    with torch.no_grad():
        return build_model(cfg)


def main(argv=None):
    args = parse_args(argv)
    from hiseg_cast.released_weights import (DEFAULT_PREFIX, CheckpointConversionError, convert_checkpoint,
                                 describe_needed_config, find_prefix, parts_for_model,
                                 save_detectron2_checkpoint, to_detectron2_checkpoint, verify_against_model)
    from hiseg.cli import check_output_file, one_line
    from hiseg.errors import UserError

    check_output_file(args.output, "--output")  # UsageError: one line, exit status 2, before reading
    img_size = None
    if args.img_size:
        if len(args.img_size) > 2:
            print("error: --img-size takes one or two integers", file=sys.stderr)
            return 2
        img_size = args.img_size[0] if len(args.img_size) == 1 else tuple(args.img_size)
    try:
        result = convert_checkpoint(args.input, fmt=args.format, model=args.model, use_ema=args.ema,
                                    img_size=img_size, num_heads=args.num_heads)
        for m in result.messages:
            print(f"- {m}")
        print(describe_needed_config(result))
        model = build_model_from_config(args) if args.config_file else None
        prefix = args.prefix
        if prefix is None:
            prefix = find_prefix(model, result.model) if model is not None else DEFAULT_PREFIX[result.model]
        parts = None  # heads / block fusion: all without a config, else those its model has
        if model is not None:
            parts, left_out = parts_for_model(result, model, prefix)
            for m in left_out:
                print(f"- {m}")
        data = to_detectron2_checkpoint(result, prefix, parts=parts)
        if model is not None:
            try:
                verify_against_model(model, data, prefix)
            except CheckpointConversionError as e:
                raise CheckpointConversionError(f"{e}. Does {args.config_file} set the values listed above?") from e
            print(f"checked: every converted tensor fits the model of {args.config_file}")
    except UserError as e:  # a bad --config-file or override (hiseg.cli.merge_config)
        print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except (CheckpointConversionError, FileNotFoundError) as e:  # a missing / bad --input: usage error
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    save_detectron2_checkpoint(data, args.output)
    print(f"wrote {len(data['model'])} tensors under {prefix!r} to {args.output}")
    return 0


if __name__ == "__main__":
    from hiseg.cli import run_cli

    sys.exit(run_cli(main))
