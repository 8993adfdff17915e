"""Training of the CAST vs ViT comparison (``cast_vs_vit.py``): every (model, seed) run under the
wall-clock budget of :mod:`hiseg.engine.budget`, the two models of a seed side by side in pair
mode (one spawned process each, started together at a barrier) or one after the other."""
import dataclasses
import multiprocessing as mp
import os
import sys
import time
from typing import Dict, List

import torch

from hiseg.engine.budget import BudgetSpec, BudgetTrainer, CallLimits, read_run, train_for_budget
from hiseg.threads import spawn_with_threads

from cast_vs_vit_protocol import build_cfg, run_dir_for, setup_process, train_dataset_name


def freeze_vit_patch_projection(model) -> bool:
    """MoCo-v3's stop-gradient on the ViT's patch projection (``--stop-grad-conv1``: weight and
    bias frozen at their random initialisation), the counterpart of CAST's
    ``MODEL.CAST.FROZEN_STEM_CONV1``. ``model`` as built (not wrapped for DDP). Returns whether a
    ViT projection was found."""
    backbone = getattr(model, "backbone", None)
    vit = getattr(backbone, "vit", None)
    if vit is None or not hasattr(vit, "patch_embed"):
        return False
    for p in vit.patch_embed.proj.parameters():
        p.requires_grad_(False)
    return True


class MoCoBudgetTrainer(BudgetTrainer):
    """The budget trainer with MoCo-v3's stop-gradient on the first layer for both models: CAST's
    stem conv1 (its builder reads ``MODEL.CAST.FROZEN_STEM_CONV1``) and, under the same key, the
    ViT's patch projection (the ViT has no key of its own for it)."""

    @classmethod
    def build_model(cls, cfg):
        model = super().build_model(cfg)
        if cfg.MODEL.CAST.FROZEN_STEM_CONV1:  # the same MoCo-v3 flag for the ViT baseline
            freeze_vit_patch_projection(model)
        return model


def _train_job(job: dict, barrier=None) -> dict:
    """Train one (model, seed); runs in a child process (pair mode) or in this one. With
    ``barrier``, the first step waits until every run of the group is ready to take its own."""
    setup_process(job["threads"])
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
                            ready=ready, trainer_cls=MoCoBudgetTrainer)


def _child_main(job: dict, barrier=None):
    try:
        _train_job(job, barrier)
    except BaseException as e:  # noqa: BLE001  (reported through the exit code)
        print(f"[{job['label']}] FAILED: {type(e).__name__}: {e}", flush=True)
        import traceback

        traceback.print_exc()
        sys.exit(1)


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
            procs = [(j, spawn_with_threads(_child_main, (j, barrier), args.threads)) for j in todo]
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

