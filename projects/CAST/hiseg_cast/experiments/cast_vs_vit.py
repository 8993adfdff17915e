"""CAST vs ViT + K-means at an equal wall-clock budget (docs/cast_vs_vit.md).

For every seed, a small CAST (``configs/CAST/experiments/moco_cast_small_natural_cpu.yaml``) and
the ViT of the same width and depth (``moco_vit_small_natural_cpu.yaml``) are pre-trained with
the same MoCo-v3 recipe on ``natural_images_unlabelled`` (BSDS500 train + the local COCO images +
scikit-image's photographs) for the same training-time budget (:mod:`hiseg_cast.experiments.budget`:
schedule on the fraction of the budget, weights saved at fixed fractions, resumable). Then every
saved point is scored on BSDS500 val with :class:`~hiseg.evaluation.HierarchicalSegEvaluator`:
CAST's own hierarchy, the ViT's nested K-means hierarchy (Appx. D.4) and, once, the SEEDS
superpixels alone; and the outputs are written to ``--out``:

* ``results.md``: protocol, commands, commit, seeds, wall times; the final-point table and the
  table per point (mean +- sample standard deviation over seeds); iterations and step times;
  CAST's pooling diagnostics; ``final_point.md``: the final-point table alone (the main job prints it);
* ``learning_curves.png`` (metric vs iteration, one thin line per seed and a thick mean, both
  models, SEEDS as a dashed line), ``loss_curves.png`` (MoCo loss vs iteration and vs training
  time), ``pooling_entropy.png`` (CAST's assignment entropy per level vs iteration);
* ``results.json``: every number, per seed; ``manifest.json``: every invocation (command,
  commit, wall time); ``runs/<model>_s<seed>/``: checkpoints, ``steps.csv``, ``run.json``;
  ``eval/*.json``: one file per scored checkpoint.

Fairness (``--mode``):

* ``pair`` (default): the two models of a seed train at the same time, each in its own process
  with ``--threads`` (default 1) intra-op threads, so they see the same machine load for the
  same stretch of time; seeds run one after the other. On a 2-core machine this uses both cores,
  one per model.
* ``sequential``: one run after the other in this process with ``--threads`` (default 2). Fair
  only on a machine whose load does not change between runs.

Data loading runs in the training process (``DATALOADER.NUM_WORKERS: 0``), so each model pays
for its own augmentation and superpixels inside its budget; the ViT computes none (it reads
none).

Evaluation (the same for every checkpoint): each BSDS500 val image is resized to
``--eval-size`` on its long side; CAST gets SEEDS superpixels of its config's
``PIXELS_PER_SUPERPIXEL`` (64) on that image; hierarchies are scored at the ground truth's full
resolution (the ViT's K-means runs there, Appx. D.4). The default 192 turns the 481 x 321 BSDS
images into 192 x 128: 24 x 16 = 384 patches of 8 x 8 for the ViT and exactly 384 SEEDS
superpixels (OpenCV's 8 x 8 seed blocks) for CAST, the same number of tokens of the same area as
in training (196 of 64 pixels on 112 x 112 views). At 224 (224 x 149) SEEDS could only make 308
superpixels against the ViT's 532 patches. ``--eval-images N`` scores
the first N images of the sorted val ids.
"""
import argparse
import dataclasses
import logging
import math
import multiprocessing as mp
import os
import shlex
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from hiseg.utils.atomic_io import atomic_write_json
from hiseg.provenance import git_state, machine_description, read_json

from .budget import (BudgetSpec, CallLimits, point_path, read_run, read_steps, train_for_budget)

__all__ = ["main", "parse_args", "MODELS", "METRICS", "QUICK_OPTS", "build_cfg", "run_dir_for",
           "evaluate_points", "write_report", "train_dataset_name"]

logger = logging.getLogger(__name__)

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
MODELS = {
    "cast": ("CAST", "configs/CAST/experiments/moco_cast_small_natural_cpu.yaml"),
    "vit": ("ViT + K-means (Appx. D.4)", "configs/CAST/experiments/moco_vit_small_natural_cpu.yaml"),
}
SEEDS_LABEL = "SEEDS superpixels alone"
REGION_TARGETS = (64, 32, 16, 8)
# (result key, column name, higher is better)
METRICS = [("ODS", "ODS", True), ("OIS", "OIS", True), ("AP", "AP", True),
           ("Covering_ODS", "Covering", True), ("PRI_ODS", "PRI", True), ("VI_ODS", "VI", False)] + \
          [(f"RegionF@{k}", f"RegionF@{k}", True) for k in REGION_TARGETS]
DEFAULT_POINTS = (0.125, 0.25, 0.5, 0.75, 1.0)
DEFAULT_BUDGET_MIN = 30.0
#: the final-point table alone, next to results.md
FINAL_TABLE = "final_point.md"
EVAL_VERSION = 1

# --quick: a tiny version of both models (the same overrides for both), a few images
QUICK_OPTS = ["MODEL.CAST.EMBED_DIM", 48, "MODEL.VIT.EMBED_DIM", 48, "MODEL.VIT.OUT_CHANNELS", 48,
              "MODEL.CAST.DEPTHS", [1, 1, 1, 1], "MODEL.VIT.DEPTH", 4,
              "MODEL.MOCO.MLP_DIM", 64, "MODEL.MOCO.DIM", 32,
              "INPUT.CROP.SIZE", [64, 64], "MODEL.VIT.IMG_SIZE", 64,
              "MODEL.CAST.SUPERPIXEL.NUM_SUPERPIXELS", 64, "MODEL.CAST.NUM_SEGMENTS", [16, 8, 4, 2],
              "SOLVER.IMS_PER_BATCH", 4]
QUICK = {"budget_minutes": 0.05, "points": (0.25, 0.5, 0.75, 1.0), "eval_images": 2, "eval_size": 96,
         "max_train_images": 8, "save_every_s": 1.0, "print_every_s": 0.0}


# ---------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------
def _setup_process(threads: int):
    """Threads and logging of a training / evaluation process."""
    torch.set_num_threads(max(1, int(threads)))
    try:
        import cv2

        cv2.setNumThreads(max(1, int(threads)))
    except ImportError:  # pragma: no cover - cv2 is a dependency of the superpixels
        pass
    from detectron2.utils.logger import setup_logger

    setup_logger()  # once (cached); the trainer would call it otherwise and log at INFO
    for name in ("detectron2", "d2", "fvcore", "hiseg", "hiseg_cast"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import hiseg.data  # noqa: F401  (registers the datasets)


def train_dataset_name(base: str, max_images: int) -> str:
    """``base`` itself, or (``max_images`` > 0) a registered subset of that many images spread
    evenly over it (so a handful still mixes the sources)."""
    if max_images <= 0:
        return base
    from detectron2.data import DatasetCatalog

    from hiseg.data.datasets.common import register_lazy

    name = f"{base}__spread{max_images}"

    def load(base=base, n=max_images):
        dicts = DatasetCatalog.get(base)
        idx = sorted(set(np.linspace(0, len(dicts) - 1, min(n, len(dicts))).round().astype(int).tolist()))
        return [dicts[i] for i in idx]

    register_lazy(name, load, {"evaluator_type": "none", "source": f"{max_images} images of {base}"},
                  family="experiments")
    return name


def build_cfg(config_file: str, opts: Sequence = (), train_dataset: Optional[str] = None):
    from detectron2.config import get_cfg

    from hiseg.cli import merge_config
    from hiseg.paths import repo_relative
    from hiseg_cast import add_cast_config

    cfg = get_cfg()
    add_cast_config(cfg)
    # a missing file, an unknown key or a bad value: one-line ConfigError (hiseg.cli)
    merge_config(cfg, repo_relative(config_file),
                 [str(o) if not isinstance(o, (list, tuple)) else str(list(o)) for o in opts])
    if train_dataset:
        cfg.DATASETS.TRAIN = (train_dataset,)
    cfg.freeze()
    return cfg


def run_dir_for(out: str, model: str, seed: int) -> str:
    return os.path.join(out, "runs", f"{model}_s{seed}")


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def _train_job(job: dict, barrier=None) -> dict:
    """Train one (model, seed); runs in a child process (pair mode) or in this one. With
    ``barrier``, the first step waits until every run of the group is ready to take its own."""
    _setup_process(job["threads"])
    label = job["label"]
    ds = train_dataset_name(job["train_dataset"], job["max_train_images"])
    cfg = build_cfg(job["config_file"], job["opts"], ds)
    limits = CallLimits(save_every_s=job["save_every_s"], print_every_s=job["print_every_s"],
                        pause_after_steps=job["pause_after_steps"], pause_after_s=job["pause_after_s"],
                        label=label, print_fn=lambda s: print(s, flush=True), parent_pid=job.get("parent_pid"))
    spec = BudgetSpec(**job["spec"])
    run_info = {"model": job["model"], "seed": job["seed"], "config_file": job["config_file"],
                "opts": [str(o) for o in job["opts"]], "train_dataset": ds}
    ready = None if barrier is None else (lambda: barrier.wait(timeout=3600))
    return train_for_budget(cfg, job["run_dir"], spec, limits, run_info=run_info,
                            session_info={"mode": job["mode"], "concurrent_with": job["concurrent_with"]},
                            ready=ready)


def _child_main(job: dict, barrier=None):
    try:
        _train_job(job, barrier)
    except BaseException as e:  # noqa: BLE001  (reported through the exit code)
        print(f"[{job['label']}] FAILED: {type(e).__name__}: {e}", flush=True)
        import traceback

        traceback.print_exc()
        sys.exit(1)


def _spawn(target, args, threads: int):
    """A spawned process with the thread variables of ``threads`` (inherited at start)."""
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    old = {k: os.environ.get(k) for k in keys}
    try:
        for k in keys:
            os.environ[k] = str(threads)
        p = mp.get_context("spawn").Process(target=target, args=args)
        p.start()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return p


def _jobs(args, spec_for_seed) -> List[List[dict]]:
    """Training jobs grouped as they run together: per seed [cast, vit]."""
    groups = []
    for seed in args.seeds:
        group = []
        for model in args.models:
            group.append({
                "model": model, "seed": seed, "label": f"{model} s{seed}", "config_file": args.configs[model],
                "opts": list(args.opts), "run_dir": run_dir_for(args.out, model, seed),
                "spec": dataclasses.asdict(spec_for_seed(seed)), "threads": args.threads, "mode": args.mode,
                "train_dataset": args.train_dataset, "max_train_images": args.max_train_images,
                "save_every_s": args.save_every_s, "print_every_s": args.print_every_s,
                "pause_after_steps": args.pause_after_steps,
                "pause_after_s": None if args.pause_after_minutes is None else 60.0 * args.pause_after_minutes,
                "concurrent_with": [],
            })
        groups.append(group)
    return groups


def train_all(args) -> Dict[str, float]:
    """Train every (model, seed) not done yet; returns wall seconds per group."""
    def spec_for_seed(seed):
        return BudgetSpec(budget_s=60.0 * args.budget_minutes, fractions=args.points,
                          warmup_fraction=args.warmup_fraction, seed=seed)

    walls = {}
    groups = _jobs(args, spec_for_seed)
    for group in groups:  # before anything trains: a folder holds one protocol
        for j in group:
            info = read_run(j["run_dir"])
            if info is not None and info["spec"] != j["spec"]:
                raise ValueError(f"{j['run_dir']} holds a run of another spec ({info['spec']}, asked {j['spec']}); "
                                 f"use another --out")
    for group in groups:
        todo = [j for j in group if (read_run(j["run_dir"]) or {}).get("status") != "done"]
        for j in group:
            if j not in todo:
                info = read_run(j["run_dir"])
                print(f"[{j['label']}] already done: {info['iterations']} iterations; skipped", flush=True)
        if not todo:
            continue
        t0 = time.perf_counter()
        if args.mode == "pair" and len(todo) > 1:
            for j in todo:
                j["concurrent_with"] = [o["label"] for o in todo if o is not j]
            for j in todo:
                j["parent_pid"] = os.getpid()
            barrier = mp.get_context("spawn").Barrier(len(todo))
            procs = [(j, _spawn(_child_main, (j, barrier), args.threads)) for j in todo]
            failed = []
            while any(p.is_alive() for _, p in procs):
                for j, p in procs:
                    if not p.is_alive() and p.exitcode != 0 and j["label"] not in failed:
                        failed.append(j["label"])
                        barrier.abort()  # a partner that is still waiting to start gives up
                time.sleep(0.5)
            failed = [f"{j['label']} (exit code {p.exitcode})" for j, p in procs if p.exitcode != 0]
            if failed:
                raise RuntimeError("training failed: " + ", ".join(failed) + "; re-run the command to resume")
        else:
            old = torch.get_num_threads()
            try:
                for j in todo:
                    _train_job(j)
            finally:
                torch.set_num_threads(old)
        walls[" + ".join(j["label"] for j in todo)] = round(time.perf_counter() - t0, 1)
    return walls


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
def bsds_val(name: Optional[str] = None):
    """(dataset name, dicts) of BSDS500 val: ``name``, else the first of ``bsds500_val`` /
    ``bsds500_val_shared`` whose files exist."""
    from detectron2.data import DatasetCatalog

    names = [name] if name else ["bsds500_val", "bsds500_val_shared"]
    for n in names:
        if n in DatasetCatalog.list():
            try:
                return n, sorted(DatasetCatalog.get(n), key=lambda d: str(d["image_id"]))
            except FileNotFoundError:
                continue
    raise FileNotFoundError(f"no BSDS500 val set found (tried {names}); set DETECTRON2_DATASETS or HISEG_SHARED_DATA")


def _resize_long_side(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    s = size / max(h, w)
    if s >= 1.0:
        return img
    return np.asarray(Image.fromarray(img).resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR))


class _EvalInputs:
    """Per image (cached): the resized uint8 image tensor and its SEEDS superpixels."""

    def __init__(self, dicts, eval_size: int, sp_cfg):
        self.dicts = dicts
        self.eval_size = eval_size
        self.sp_cfg = sp_cfg
        self._cache = {}

    def get(self, i: int):
        if i not in self._cache:
            from hiseg_cast.superpixels import compute_superpixels
            from hiseg.image_io import read_image

            img = _resize_long_side(read_image(self.dicts[i]["file_name"], "RGB"), self.eval_size)
            img = np.ascontiguousarray(img)
            t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
            sp = torch.from_numpy(compute_superpixels(img, self.sp_cfg))
            self._cache[i] = (t, sp)
        return self._cache[i]


def eval_superpixel_cfg(cfg):
    """SEEDS settings for whole images: the config's, with the count from
    ``PIXELS_PER_SUPERPIXEL`` (``NUM_SUPERPIXELS`` is the training views')."""
    from hiseg_cast.superpixels import SuperpixelConfig

    return dataclasses.replace(SuperpixelConfig.from_cfg(cfg.MODEL.CAST.SUPERPIXEL), num_superpixels=0)


def _entropy_stats(enc_out) -> Dict[str, list]:
    """CAST's pooling diagnostics of one image: per graph pooling, the mean entropy (nats) of
    the soft assignment of the finer tokens to the centroids, the same divided by log(number of
    centroids), and per level the number of segments the hard hierarchy uses."""
    ent, ent_norm = [], []
    for g, lg in enumerate(enc_out["logits"]):
        lg = lg[0].float()
        members = enc_out["levels"][g]["members"][0].bool()
        n_cent = int(torch.isfinite(lg[0]).sum()) if lg.shape[0] else 0
        p = lg.softmax(-1)
        h = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
        h = float(h[members].mean()) if bool(members.any()) else float("nan")
        ent.append(h)
        ent_norm.append(h / math.log(n_cent) if n_cent > 1 else float("nan"))
    hier = enc_out["hierarchy"][0]
    used = [int(torch.unique(level[level >= 0]).numel()) for level in hier]
    return {"entropy": ent, "entropy_norm": ent_norm, "segments_used": used}


def _load_point_model(cfg, path: str):
    from detectron2.modeling import build_model

    from hiseg.checkpoint.io import SafeDetectionCheckpointer

    model = build_model(cfg)
    SafeDetectionCheckpointer(model).load(path)
    return model.eval()


def _eval_item(item: dict, inputs: _EvalInputs, dataset_name: str) -> dict:
    """Score one checkpoint (or the superpixels alone) on the evaluation images."""
    from hiseg.evaluation import HierarchicalSegEvaluator

    from ..superpixels import mapper_computes_superpixels

    t0 = time.perf_counter()
    ev = HierarchicalSegEvaluator(dataset_name, distributed=False, region_targets=REGION_TARGETS)
    ev.reset()
    diag = []
    model = cfg = None
    if item["kind"] != "seeds":
        cfg = build_cfg(item["config_file"], item["opts"])
        model = _load_point_model(cfg, item["checkpoint"])
    model_s = 0.0
    for i, d in enumerate(inputs.dicts):
        t, sp = inputs.get(i)
        h, w = d["height"], d["width"]
        t1 = time.perf_counter()
        if item["kind"] == "seeds":
            hier = sp[None]
        elif model.is_cast:
            store = {}
            hook = model.backbone.encoder.register_forward_hook(lambda _m, _i, o: store.__setitem__("out", o))
            try:
                inp = {"image": t, "height": h, "width": w}
                if mapper_computes_superpixels(cfg):
                    inp["superpixels"] = sp
                with torch.no_grad():
                    hier = model.inference([inp])[0]["hierarchy"]
            finally:
                hook.remove()
            diag.append(_entropy_stats(store["out"]))
        else:
            with torch.no_grad():
                hier = model.inference([{"image": t, "height": h, "width": w}])[0]["hierarchy"]
        model_s += time.perf_counter() - t1
        ev.process([d], [{"hierarchy": hier}])
    res = dict(ev.evaluate()["bsds"])
    out = {"metrics": res, "eval_wall_s": round(time.perf_counter() - t0, 1), "model_s": round(model_s, 1)}
    if diag:
        out["pooling"] = {k: np.nanmean(np.array([x[k] for x in diag], dtype=float), axis=0).tolist()
                          for k in diag[0]}
    return out


def _eval_worker(items: List[dict], settings: dict, threads: int):
    _setup_process(threads)
    name, dicts = bsds_val(settings["dataset"])
    ids = settings["image_ids"]
    by_id = {str(d["image_id"]): d for d in dicts}
    dicts = [by_id[i] for i in ids]
    from hiseg_cast.superpixels import SuperpixelConfig

    inputs = _EvalInputs(dicts, settings["eval_size"], SuperpixelConfig(**settings["superpixels"]))
    for item in items:
        if _read_eval(item["out_json"], settings) is not None:
            continue
        res = _eval_item(item, inputs, name)
        res.update(settings=settings, item={k: item[k] for k in ("kind", "model", "seed", "k", "checkpoint")})
        atomic_write_json(item["out_json"], res, indent=1)
        what = SEEDS_LABEL if item["kind"] == "seeds" else f"{item['model']} s{item['seed']} point {item['k']}"
        m = res["metrics"]
        print(f"[eval] {what}: ODS {m['ODS']:.3f}  Covering {m['Covering_ODS']:.3f}  "
              f"RegionF@16 {m['RegionF@16']:.3f}  ({res['eval_wall_s']:.0f} s, {len(dicts)} images)", flush=True)


def _eval_worker_main(items, settings, threads):
    try:
        _eval_worker(items, settings, threads)
    except BaseException as e:  # noqa: BLE001
        print(f"[eval] FAILED: {type(e).__name__}: {e}", flush=True)
        import traceback

        traceback.print_exc()
        sys.exit(1)


def _read_eval(path: str, settings: dict):
    r = read_json(path)
    return r if r is not None and r.get("settings") == settings else None


def eval_settings(args) -> dict:
    """What a score depends on besides the checkpoint; a stored result is reused only when its
    settings are equal."""
    name, dicts = bsds_val(args.eval_dataset)
    if args.eval_images > 0:
        dicts = dicts[:args.eval_images]
    cast_cfg = build_cfg(args.configs["cast"], args.opts)
    return {"version": EVAL_VERSION, "dataset": name, "image_ids": [str(d["image_id"]) for d in dicts],
            "eval_size": int(args.eval_size), "region_targets": list(REGION_TARGETS),
            "superpixels": dataclasses.asdict(eval_superpixel_cfg(cast_cfg))}


def eval_json_path(out: str, model: str, seed: Optional[int] = None, k: Optional[int] = None) -> str:
    name = "seeds" if model == "seeds" else f"{model}_s{seed}_p{k}"
    return os.path.join(out, "eval", name + ".json")


def evaluate_points(args, settings: dict) -> float:
    """Score every saved point of every finished run (and SEEDS once) that has no result for
    these settings yet; ``--eval-jobs`` processes share the work. Returns the wall seconds."""
    os.makedirs(os.path.join(args.out, "eval"), exist_ok=True)
    items = [{"kind": "seeds", "model": "seeds", "seed": None, "k": None, "checkpoint": None,
              "out_json": eval_json_path(args.out, "seeds")}]
    for model in args.models:
        for seed in args.seeds:
            info = read_run(run_dir_for(args.out, model, seed))
            if not info or info.get("status") != "done":
                continue
            for p in info["points"]:
                items.append({"kind": "model", "model": model, "seed": seed, "k": p["k"],
                              "checkpoint": point_path(run_dir_for(args.out, model, seed), p["k"]),
                              "config_file": args.configs[model], "opts": list(args.opts),
                              "out_json": eval_json_path(args.out, model, seed, p["k"])})
    todo = [it for it in items if _read_eval(it["out_json"], settings) is None]
    print(f"[eval] {len(items) - len(todo)} of {len(items)} results present; scoring {len(todo)} on "
          f"{len(settings['image_ids'])} images of {settings['dataset']}", flush=True)
    t0 = time.perf_counter()
    if not todo:
        return 0.0
    jobs = max(1, min(args.eval_jobs, len(todo)))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    if jobs == 1:
        old = torch.get_num_threads()
        try:
            _eval_worker(todo, settings, threads)
        finally:
            torch.set_num_threads(old)
    else:
        # the most expensive first, dealt round-robin
        todo.sort(key=lambda it: (it["kind"] == "seeds", it["model"] != "vit"))
        shares = [todo[i::jobs] for i in range(jobs)]
        procs = [_spawn(_eval_worker_main, (s, settings, threads), threads) for s in shares]
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError("evaluation failed; re-run the command (finished results are kept)")
    return round(time.perf_counter() - t0, 1)


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def _mean_sd(values):
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan"), int(v.size)


def _cell(values, digits=3):
    m, s, n = _mean_sd(values)
    if n == 0:
        return "–"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


def collect(args, settings: dict) -> dict:
    """Every run's points with their scores, the SEEDS scores and the step logs."""
    res = {"models": {}, "seeds_alone": None}
    s = _read_eval(eval_json_path(args.out, "seeds"), settings)
    if s is not None:
        res["seeds_alone"] = s["metrics"]
    for model in args.models:
        res["models"][model] = {}
        for seed in args.seeds:
            rd = run_dir_for(args.out, model, seed)
            info = read_run(rd)
            if not info:
                continue
            pts = []
            for p in info.get("points", []):
                e = _read_eval(eval_json_path(args.out, model, seed, p["k"]), settings)
                pts.append(dict(p, metrics=e["metrics"] if e else None, pooling=e.get("pooling") if e else None))
            steps = read_steps(os.path.join(rd, "steps.csv"))
            res["models"][model][str(seed)] = {
                "status": info.get("status"), "iterations": info.get("iterations"),
                "elapsed_s": info.get("elapsed_s"), "sessions": info.get("sessions", []), "points": pts,
                "steps": {"iter": [r["iter"] for r in steps], "elapsed_s": [r["elapsed_s"] for r in steps],
                          "loss": [r["loss"] for r in steps], "data_time_s": [r["data_time_s"] for r in steps],
                          "step_time_s": [r["step_time_s"] for r in steps]},
            }
    return res


def _point_values(res, model, k, key):
    out = []
    for run in res["models"].get(model, {}).values():
        for p in run["points"]:
            if p["k"] == k and p["metrics"] is not None:
                out.append(p["metrics"][key])
    return out


def _point_field(res, model, k, field):
    return [p[field] for run in res["models"].get(model, {}).values() for p in run["points"] if p["k"] == k]


def _smooth(y, n):
    y = np.asarray(y, dtype=float)
    if y.size == 0 or n <= 1:
        return y
    n = min(n, y.size)
    c = np.cumsum(np.insert(y, 0, 0.0))
    out = np.empty_like(y)
    for i in range(y.size):  # trailing mean over up to n steps
        lo = max(0, i + 1 - n)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


_COLORS = {"cast": "tab:blue", "vit": "tab:orange"}
_SEED_STYLES = ("--", ":", "-.", (0, (5, 1, 1, 1)))


def plot_learning_curves(res, args, path: str, caption: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = math.ceil(len(METRICS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows + 0.8), squeeze=False)
    for ax, (key, name, higher) in zip(axes.flat, METRICS):
        for model in args.models:
            label = args.labels[model]
            means_x, means_y = [], []
            for j, (seed, run) in enumerate(sorted(res["models"].get(model, {}).items())):
                pts = [p for p in run["points"] if p["metrics"] is not None]
                if pts:
                    ax.plot([p["iteration"] for p in pts], [p["metrics"][key] for p in pts], color=_COLORS.get(model),
                            alpha=0.45, lw=1, ls=_SEED_STYLES[j % len(_SEED_STYLES)], marker=".",
                            label=f"{label}, seed {seed}")
            for k in range(1, len(args.points) + 1):
                ys = _point_values(res, model, k, key)
                xs = [p["iteration"] for run in res["models"].get(model, {}).values() for p in run["points"]
                      if p["k"] == k and p["metrics"] is not None]
                if ys:
                    means_x.append(float(np.mean(xs)))
                    means_y.append(float(np.mean(ys)))
            if means_x:
                ax.plot(means_x, means_y, color=_COLORS.get(model), lw=2.2, marker="o", label=f"{label}, mean")
        if res["seeds_alone"] is not None:
            ax.axhline(res["seeds_alone"][key], color="gray", ls="--", lw=1, label=SEEDS_LABEL)
        ax.set_title(name + ("" if higher else " (lower is better)"), fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(METRICS):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=8, frameon=False)
    fig.suptitle(caption, fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(res, args, path: str, caption: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for model in args.models:
        for j, (seed, run) in enumerate(sorted(res["models"].get(model, {}).items())):
            st = run["steps"]
            if not st["iter"]:
                continue
            n = max(1, len(st["iter"]) // 50)
            y = _smooth(st["loss"], n)
            lab = f"{args.labels[model]}, seed {seed}"
            style = dict(color=_COLORS.get(model), alpha=0.8, lw=1, ls=_SEED_STYLES[j % len(_SEED_STYLES)], label=lab)
            axes[0].plot(st["iter"], y, **style)
            axes[1].plot(np.asarray(st["elapsed_s"]) / 60.0, y, **style)
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("training time (min)")
    for ax in axes:
        ax.set_ylabel("MoCo loss (trailing mean)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(caption, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_entropy(res, path: str, caption: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = res["models"].get("cast", {})
    fig, ax = plt.subplots(figsize=(10, 4.8))
    n_levels = 0
    for j, (seed, run) in enumerate(sorted(runs.items())):
        pts = [p for p in run["points"] if p.get("pooling")]
        if not pts:
            continue
        n_levels = len(pts[0]["pooling"]["entropy_norm"])
        for lvl in range(n_levels):
            ax.plot([p["iteration"] for p in pts], [p["pooling"]["entropy_norm"][lvl] for p in pts],
                    color=f"C{lvl}", marker=".", alpha=0.8, ls=_SEED_STYLES[j % len(_SEED_STYLES)],
                    label=f"pooling {lvl + 1} (level {lvl} -> {lvl + 1}), seed {seed}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("assignment entropy / log(#centroids)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if n_levels:
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.suptitle(caption, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt_s(s):
    return "–" if s is None or not np.isfinite(s) else (f"{s / 60:.1f} min" if s >= 120 else f"{s:.0f} s")


def write_report(args, settings: dict, manifest: dict) -> str:
    res = collect(args, settings)
    invs = manifest["invocations"]
    commits = sorted({i["commit"] + (" (uncommitted changes)" if i["dirty"] else "") for i in invs})
    cite = (f"commit {', '.join(c[:10] if len(c) >= 10 else c for c in commits)}; seeds "
            f"{', '.join(map(str, args.seeds))}; budget {args.budget_minutes:g} min per run; "
            f"{len(settings['image_ids'])} BSDS500 val images")
    walls = [i.get("wall_s") or 0.0 for i in invs]
    cite += (f"; wall time {_fmt_s(sum(walls))} over {len(invs)} invocation(s)" if invs else "")
    cmd_line = invs[-1]["command"] if invs else ""
    os.makedirs(args.out, exist_ok=True)
    lc, lo, en = (os.path.join(args.out, n) for n in ("learning_curves.png", "loss_curves.png", "pooling_entropy.png"))
    plot_learning_curves(res, args, lc, f"{cmd_line}\n{cite}")
    plot_losses(res, args, lo, f"{cmd_line}\n{cite}")
    plot_entropy(res, en, f"CAST pooling entropy per level on BSDS500 val\n{cmd_line}\n{cite}")

    keys = [k for k, _, _ in METRICS]
    head = "| model | iterations | " + " | ".join(n + ("" if hi else " ↓") for _, n, hi in METRICS) + " |"
    sep = "|---" * (len(METRICS) + 2) + "|"
    L = []
    L.append("# CAST vs ViT + K-means at an equal wall-clock budget: results")
    L.append("")
    L.append("Written by `hiseg_cast.experiments.cast_vs_vit`. Every number below comes from the runs in this "
             "folder; none is from the paper.")
    L.append("")
    L.append("## Provenance")
    L.append("")
    for i in invs:
        L.append(f"* `{i['command']}` — commit `{i['commit']}`{' (with uncommitted changes)' if i['dirty'] else ''}, "
                 f"started {i['started']}, wall {_fmt_s(i.get('wall_s'))}"
                 + "".join(f", {what} {_fmt_s(i[key])}" for key, what in (("train_wall_s", "training"),
                                                                           ("eval_wall_s", "evaluation"))
                           if i.get(key) is not None))
    L.append(f"* seeds: {', '.join(map(str, args.seeds))}; budget per run: {args.budget_minutes:g} min of training "
             f"time; points at {', '.join(f'{100 * f:g}%' for f in args.points)} of it; mode `{args.mode}`, "
             f"{args.threads} thread(s) per run")
    L.append(f"* machine: {manifest['machine']}")
    L.append(f"* training data: `{manifest['train_dataset']}` ({manifest['train_images']})")
    L.append(f"* evaluation: {len(settings['image_ids'])} images of `{settings['dataset']}`, long side "
             f"{settings['eval_size']}, SEEDS {settings['superpixels']['pixels_per_superpixel']} pixels per "
             f"superpixel; ODS/OIS/AP boundary measures, region measures at the best level (ODS), "
             f"RegionF@K at the level nearest K regions")
    L.append(f"* configs: `{args.configs['cast']}`, `{args.configs['vit']}`"
             + (f"; overrides for both: `{' '.join(map(str, args.opts))}`" if args.opts else ""))
    L.append("")

    n_pts = len(args.points)
    final = [f"Final point ({100 * args.points[-1]:g}% of the budget); mean ± sample s.d. over seeds", "", head, sep]
    for model in args.models:
        iters = _point_field(res, model, n_pts, "iteration")
        final.append(f"| {args.labels[model]} | {_cell(iters, 0)} | "
                     + " | ".join(_cell(_point_values(res, model, n_pts, k)) for k in keys) + " |")
    if res["seeds_alone"] is not None:
        final.append(f"| {SEEDS_LABEL} | – | " + " | ".join(f"{res['seeds_alone'][k]:.3f}" for k in keys) + " |")
    with open(os.path.join(args.out, FINAL_TABLE), "w") as f:  # the main job prints this one
        f.write("\n".join(final) + "\n")
    L += ["## " + final[0], *final[1:], ""]
    L.append("## Every point")
    L.append("")
    L.append("| point | model | iterations | " + " | ".join(n for _, n, _ in METRICS) + " |")
    L.append("|---" * (len(METRICS) + 3) + "|")
    for k, frac in enumerate(args.points, start=1):
        for model in args.models:
            iters = _point_field(res, model, k, "iteration")
            L.append(f"| {100 * frac:g}% | {args.labels[model]} | {_cell(iters, 0)} | "
                     + " | ".join(_cell(_point_values(res, model, k, key)) for key in keys) + " |")
    L.append("")
    L.append("![learning curves](learning_curves.png)")
    L.append("")
    L.append("## Training: iterations, time per step, loss")
    L.append("")
    L.append("| model | seed | status | iterations | training time | s / step | data s / step | "
             "loss, first 5% | loss, last 5% | sessions |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for model in args.models:
        for seed, run in sorted(res["models"].get(model, {}).items()):
            st = run["steps"]
            n = len(st["loss"])
            w = max(1, n // 20)
            first = np.mean(st["loss"][:w]) if n else float("nan")
            last = np.mean(st["loss"][-w:]) if n else float("nan")
            sps = np.mean(st["step_time_s"]) if n else float("nan")
            dps = np.nanmean(st["data_time_s"]) if n else float("nan")
            L.append(f"| {args.labels[model]} | {seed} | {run['status']} | {run['iterations']} | "
                     f"{_fmt_s(run['elapsed_s'])} | {sps:.2f} | {dps:.2f} | {first:.3f} | {last:.3f} | "
                     f"{len(run['sessions'])} |")
    L.append("")
    L.append("![loss curves](loss_curves.png)")
    L.append("")
    cast_runs = res["models"].get("cast", {})
    if any(p.get("pooling") for r in cast_runs.values() for p in r["points"]):
        L.append("## CAST pooling diagnostics on the evaluation images (mean ± s.d. over seeds)")
        L.append("")
        L.append("Entropy of each graph pooling's soft assignment of the finer tokens to the centroids, "
                 "divided by log(number of centroids) (1 = uniform, 0 = hard), and the number of segments "
                 "the hard hierarchy uses per level (level 0: superpixels).")
        L.append("")
        first = next(p["pooling"] for r in cast_runs.values() for p in r["points"] if p.get("pooling"))
        n_pool, n_lvl = len(first["entropy_norm"]), len(first["segments_used"])
        L.append("| point | iterations | " + " | ".join(f"entropy {g + 1}" for g in range(n_pool)) + " | "
                 + " | ".join(f"segments L{l}" for l in range(n_lvl)) + " |")
        L.append("|---" * (n_pool + n_lvl + 2) + "|")
        for k, frac in enumerate(args.points, start=1):
            pools = [p["pooling"] for r in cast_runs.values() for p in r["points"] if p["k"] == k and p.get("pooling")]
            if not pools:
                continue
            L.append(f"| {100 * frac:g}% | {_cell(_point_field(res, 'cast', k, 'iteration'), 0)} | "
                     + " | ".join(_cell([x["entropy_norm"][g] for x in pools], 2) for g in range(n_pool)) + " | "
                     + " | ".join(_cell([x["segments_used"][l] for x in pools], 1) for l in range(n_lvl)) + " |")
        L.append("")
        L.append("![pooling entropy](pooling_entropy.png)")
        L.append("")
    text = "\n".join(L) + "\n"
    from hiseg.utils.atomic_io import atomic_write

    with atomic_write(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    atomic_write_json(os.path.join(args.out, "results.json"),
                      {"manifest": manifest, "eval_settings": settings, "points": list(args.points), "results": res},
                      indent=1)
    return text


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _floats(s):
    return tuple(float(x) for x in s.split(",") if x.strip())


def _ints(s):
    return tuple(int(x) for x in s.split(",") if x.strip())


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="tools/experiments/cast_vs_vit.py",
        description="CAST vs ViT + K-means pre-trained with MoCo-v3 for the same wall-clock budget, scored on "
                    "BSDS500 val along the way (docs/cast_vs_vit.md). Re-running resumes.")
    ap.add_argument("--out", default=None, help="output folder (default output/cast_vs_vit, "
                                                "output/cast_vs_vit_quick with --quick)")
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help=f"training time per (model, seed) run (default {DEFAULT_BUDGET_MIN:g})")
    ap.add_argument("--seeds", type=_ints, default=(0, 1), help="comma-separated seeds (default 0,1)")
    ap.add_argument("--points", type=_floats, default=None,
                    help="fractions of the budget at which weights are saved and scored, ending with 1 "
                         "(default 0.125,0.25,0.5,0.75,1)")
    ap.add_argument("--warmup-fraction", type=float, default=0.1, help="LR warm-up, fraction of the budget")
    ap.add_argument("--mode", choices=("pair", "sequential"), default="pair",
                    help="pair: the two models of a seed train at the same time, one process each (default); "
                         "sequential: one after the other in this process")
    ap.add_argument("--threads", type=int, default=None, help="threads per run (default 1 in pair mode, "
                                                              "min(2, cores) in sequential mode)")
    ap.add_argument("--eval-images", type=int, default=None, help="score the first N BSDS500 val images (0 = all)")
    ap.add_argument("--eval-size", type=int, default=None, help="long side of the evaluated images (default 192)")
    ap.add_argument("--eval-jobs", type=int, default=2, help="evaluation processes (1 thread each when > 1)")
    ap.add_argument("--eval-dataset", default=None, help="BSDS500 val dataset name (default: the first found)")
    ap.add_argument("--quick", action="store_true", help="tiny models, a few seconds per run, 8 training images, "
                                                         "2 val images (tests)")
    ap.add_argument("--train-only", action="store_true", help="train (or resume) and stop")
    ap.add_argument("--eval-only", action="store_true", help="score what is finished and write the report")
    ap.add_argument("--train-dataset", default="natural_images_unlabelled")
    ap.add_argument("--max-train-images", type=int, default=None, help="use N images spread over the set (0 = all)")
    ap.add_argument("--pause-after-steps", type=int, default=None,
                    help="stop each run of this call after N steps, resumable (split a job over sessions)")
    ap.add_argument("--pause-after-minutes", type=float, default=None,
                    help="stop each run of this call after M minutes of wall time, resumable")
    ap.add_argument("--save-every-s", type=float, default=None,
                    help="training seconds between resume checkpoints (default: 5%% of the budget, >= 30 s)")
    ap.add_argument("--print-every-s", type=float, default=None, help="seconds between progress lines (default 30)")
    ap.add_argument("--cast-config", default=MODELS["cast"][1],
                    help="the CAST side (e.g. an ablation of configs/CAST/experiments/ablations/, with its own --out)")
    ap.add_argument("--cast-label", default=MODELS["cast"][0], help="its name in the tables and plots")
    ap.add_argument("--vit-config", default=MODELS["vit"][1])
    ap.add_argument("opts", nargs=argparse.REMAINDER,
                    help="config overrides KEY VALUE ... applied to both models (after --)")
    args = ap.parse_args(argv)
    opts = list(args.opts)
    if opts and opts[0] == "--":
        opts = opts[1:]
    if len(opts) % 2:
        ap.error(f"config overrides come in KEY VALUE pairs, got {opts}")
    q = QUICK if args.quick else {}
    args.opts = (list(QUICK_OPTS) if args.quick else []) + opts
    args.out = args.out or os.path.join("output", "cast_vs_vit_quick" if args.quick else "cast_vs_vit")
    args.budget_minutes = args.budget_minutes if args.budget_minutes is not None else q.get("budget_minutes",
                                                                                             DEFAULT_BUDGET_MIN)
    args.points = tuple(args.points) if args.points is not None else tuple(q.get("points", DEFAULT_POINTS))
    if len(args.points) < 1 or args.points[-1] != 1.0:
        ap.error("--points must end with 1")
    args.eval_images = args.eval_images if args.eval_images is not None else q.get("eval_images", 0)
    args.eval_size = args.eval_size if args.eval_size is not None else q.get("eval_size", 192)
    args.max_train_images = args.max_train_images if args.max_train_images is not None else \
        q.get("max_train_images", 0)
    budget_s = 60.0 * args.budget_minutes
    args.save_every_s = args.save_every_s if args.save_every_s is not None else \
        q.get("save_every_s", max(30.0, 0.05 * budget_s))
    args.print_every_s = args.print_every_s if args.print_every_s is not None else q.get("print_every_s", 30.0)
    if args.threads is None:
        args.threads = 1 if args.mode == "pair" else min(2, os.cpu_count() or 1)
    args.models = ("cast", "vit")
    args.configs = {"cast": args.cast_config, "vit": args.vit_config}
    args.labels = {"cast": args.cast_label, "vit": MODELS["vit"][0]}
    if len(set(args.seeds)) != len(args.seeds) or not args.seeds:
        ap.error(f"--seeds must be distinct, got {args.seeds}")
    return args


def main(argv=None, command: Optional[str] = None) -> str:
    """Run the experiment (see the module docstring); returns the report's text ('' with
    ``--train-only``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = command or "python tools/experiments/cast_vs_vit.py " + shlex.join(argv)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    inv = {"command": command.strip(), **git_state(REPO_ROOT), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    mpath = os.path.join(args.out, "manifest.json")
    manifest = read_json(mpath) or {"invocations": []}
    _setup_process(torch.get_num_threads())
    from hiseg.data.datasets.natural_images import natural_image_sources

    ds = train_dataset_name(args.train_dataset, args.max_train_images)
    from detectron2.data import DatasetCatalog

    n_train = len(DatasetCatalog.get(ds))
    if args.train_dataset == "natural_images_unlabelled":
        src = natural_image_sources()
        parts = ", ".join(f"{k}: {v[1]} from `{v[0]}`" if v else f"{k}: missing" for k, v in src.items())
        manifest["train_images"] = f"{n_train} images used; the full set has {parts}"
    else:
        manifest["train_images"] = f"{n_train} images"
    manifest.update(train_dataset=ds, machine=machine_description())
    print(f"[cast_vs_vit] {args.out}: models {', '.join(args.models)}, seeds {list(args.seeds)}, budget "
          f"{args.budget_minutes:g} min per run, mode {args.mode} ({args.threads} thread(s) per run), "
          f"{n_train} training images", flush=True)

    for model in args.models:  # a bad config file or key: one error line here, not in a child process
        build_cfg(args.configs[model], args.opts, ds)
    if not args.eval_only:
        t0 = time.perf_counter()
        inv["train_groups_wall_s"] = train_all(args)
        inv["train_wall_s"] = round(time.perf_counter() - t0, 1)
    if args.train_only:
        inv.update(wall_s=round(time.perf_counter() - t_start, 1), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        manifest["invocations"].append(inv)
        atomic_write_json(mpath, manifest, indent=1)
        return ""
    settings = eval_settings(args)
    inv["eval_wall_s"] = evaluate_points(args, settings)
    inv.update(wall_s=round(time.perf_counter() - t_start, 1), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    manifest["invocations"].append(inv)
    atomic_write_json(mpath, manifest, indent=1)
    text = write_report(args, settings, manifest)
    print(text, flush=True)
    print(f"[cast_vs_vit] done in {time.perf_counter() - t_start:.0f} s; report {os.path.join(args.out, 'results.md')}",
          flush=True)
    return text
