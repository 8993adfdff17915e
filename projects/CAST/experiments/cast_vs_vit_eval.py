"""Evaluation of the CAST vs ViT comparison (``cast_vs_vit.py``): every saved point of every
finished run, and the SEEDS superpixels alone once, scored on BSDS500 val with
:class:`~hiseg.evaluation.HierarchicalSegEvaluator`, one JSON file per scored checkpoint
(``eval/*.json``), reused while the settings it depends on are unchanged; ``--eval-jobs``
spawned processes share the work."""
import dataclasses
import math
import os
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch

from hiseg.checkpoint.io import load_model
from hiseg.data.datasets.bsds500 import bsds500_val
from hiseg.utils.atomic_io import atomic_write_json
from hiseg.engine.budget import point_path, read_run
from hiseg.provenance import read_json
from hiseg.threads import spawn_with_threads

from cast_vs_vit_protocol import EVAL_VERSION, REGION_TARGETS, SEEDS_LABEL, build_cfg, run_dir_for, setup_process


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

    return SuperpixelConfig.from_cfg(cfg.MODEL.CAST.SUPERPIXEL).for_whole_images()


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


def _eval_item(item: dict, inputs: _EvalInputs, dataset_name: str) -> dict:
    """Score one checkpoint (or the superpixels alone) on the evaluation images."""
    from hiseg.evaluation import HierarchicalSegEvaluator

    from hiseg_cast.superpixels import mapper_computes_superpixels

    t0 = time.perf_counter()
    ev = HierarchicalSegEvaluator(dataset_name, distributed=False, region_targets=REGION_TARGETS)
    ev.reset()
    diag = []
    model = cfg = None
    if item["kind"] != "seeds":
        cfg = build_cfg(item["config_file"], item["opts"])
        model = load_model(cfg, item["checkpoint"])
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
    setup_process(threads)
    name, dicts = bsds500_val(settings["dataset"])
    ids = settings["image_ids"]
    by_id = {str(d["image_id"]): d for d in dicts}
    dicts = [by_id[i] for i in ids]
    from hiseg_cast.superpixels import SuperpixelConfig

    inputs = _EvalInputs(dicts, settings["eval_size"], SuperpixelConfig(**settings["superpixels"]))
    for item in items:
        if read_eval(item["out_json"], settings) is not None:
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


def read_eval(path: str, settings: dict):
    """The stored result in ``path`` if it was scored with ``settings``, else None."""
    r = read_json(path)
    return r if r is not None and r.get("settings") == settings else None


def eval_settings(args) -> dict:
    """What a score depends on besides the checkpoint; a stored result is reused only when its
    settings are equal."""
    name, dicts = bsds500_val(args.eval_dataset)
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
    todo = [it for it in items if read_eval(it["out_json"], settings) is None]
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
        procs = [spawn_with_threads(_eval_worker_main, (s, settings, threads), threads) for s in shares]
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError("evaluation failed; re-run the command (finished results are kept)")
    return round(time.perf_counter() - t0, 1)

