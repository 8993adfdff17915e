#!/usr/bin/env python
"""Train and evaluate any model of this project (CAST, OAP, or a built-in detectron2
meta-architecture on a CAST backbone) with detectron2's trainer.

    python tools/train_net.py --config-file configs/CAST/<cfg>.yaml [--eval-only] [--resume]
        [--num-gpus N] [--num-machines M --machine-rank R --dist-url URL] [KEY VALUE ...]

``--eval-only`` evaluates MODEL.WEIGHTS (or, with ``--resume``, OUTPUT_DIR's last checkpoint); it
refuses to run without weights unless ``--eval-random-weights`` asks for a randomly initialised
model on purpose. The request is checked before anything is built (``hiseg.engine.preflight``).
"""
import logging
import sys

import hiseg  # noqa: F401  (before torch and detectron2: it quietens their import-time warnings)
import torch
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results

import hiseg.data  # noqa: F401  (registers datasets)
from hiseg.cli import merge_config, run_cli
from hiseg.data.datasets.imagenet import register_from_cfg as register_imagenet_from_cfg
from hiseg_cast import add_cast_config
from hiseg_oap import add_oap_config
from hiseg.engine import AtomicDetectionCheckpointer, HisegTrainer
from hiseg.engine.preflight import check_run
from hiseg.engine.trainer import distributed_timeout

logger = logging.getLogger("hiseg")


def build_cfg(args):
    cfg = get_cfg()
    add_oap_config(add_cast_config(cfg))
    merge_config(cfg, args.config_file, args.opts)  # one-line errors: missing file, unknown key, ...
    cfg.freeze()
    register_imagenet_from_cfg(cfg)  # DATASETS.IMAGENET.*: a val folder alone, flat + labels, subsets
    return cfg


def setup(args):
    cfg = build_cfg(args)  # the datasets were checked by check_run in the launching process
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = HisegTrainer.build_model(cfg)
        AtomicDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR, cfg=cfg, evaluating=True).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        res = HisegTrainer.test(cfg, model)
        if torch.cuda.is_available() and cfg.TEST.EXPECTED_RESULTS:
            verify_results(cfg, res)
        return res
    trainer = HisegTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(argv=None):
    parser = default_argument_parser()
    parser.add_argument("--eval-random-weights", action="store_true",
                        help="with --eval-only and no MODEL.WEIGHTS: evaluate a randomly initialised model on purpose")
    args = parser.parse_args(argv)
    check_run(build_cfg(args), world_size=args.num_gpus * args.num_machines, eval_only=args.eval_only,
              resume=args.resume, eval_random_weights=args.eval_random_weights)  # before any process starts
    print("Command Line Args:", args)
    return launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                  dist_url=args.dist_url, args=(args,), timeout=distributed_timeout())


if __name__ == "__main__":
    sys.exit(run_cli(cli))  # a bad file or setting: one line on stderr, exit status 2
