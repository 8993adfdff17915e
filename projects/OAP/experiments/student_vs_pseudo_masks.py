#!/usr/bin/env python
"""Does the OAP student surpass its own pseudo-masks? (docs/oap_student_vs_pseudo_masks.md)

    python projects/OAP/experiments/student_vs_pseudo_masks.py \
        --vit-weights output/cast_vs_vit/runs/vit_s0/point_5.pth --iters 400

OAP's central claim (Sec. 1, Sec. 5, Table 1 vs Table 2) is that the universal segmenter trained
on the teacher's online OAP pseudo-masks segments better than those pseudo-masks do. This script
tests it at a 2-core CPU's scale, class-agnostically on the local COCO val images:

1. ``init``: a pre-trained ViT (by default the MoCo-v3 ViT of the CAST vs ViT experiment,
   ``backbone.vit.*`` of its checkpoint) becomes ``MODEL.WEIGHTS`` of ``OAPSegmentor``
   (``student.backbone.vit.*``; the teacher is copied from the student at the first step) and,
   as ``backbone.vit.*``, the feature source of the pseudo-mask scoring;
2. ``pseudo-masks at the start``: the teacher's OAP pseudo-masks (``tools/generate_pseudo_masks.py
   --method oap --unique``: the instance masks of all 5 layers, a repeated mask once, the set the
   training targets are made of; also without ``--unique``) and MaskCut (``--method maskcut``)
   on the same teacher features, scored with COCO's class-agnostic AP / AP50 / AR100;
3. ``train``: ``OAPSegmentor`` trained with ``tools/train_net.py`` on the local COCO train
   images; the trainer scores the model (Sec. 5.1: the teacher network with the mask decoder) on
   the val images at ``--points`` and saves a checkpoint there;
4. ``pseudo-masks along training``: the EMA teacher of every saved checkpoint, as the training
   step uses it (its ViT-Adapter's attention keys), scored with OAP (and, at the end, OAP with
   repeats and MaskCut);
5. ``report``: ``results.md`` (one table: (a) pseudo-masks, (b) MaskCut, (c) the trained
   segmenter, with images and budget), ``learning_curves.png`` and ``results.json``;
   ``manifest.json`` keeps every invocation (command, commit, wall time).

Every step is skipped when its output exists, so re-running the command resumes (training
resumes from its last checkpoint with ``--resume``). The steps run the repository's tools
(``tools/generate_pseudo_masks.py``, ``tools/train_net.py``) as sub-commands: this script lives
beside the OAP project, outside the installed packages.
"""
import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Dict, List, Mapping, Optional, Tuple

import torch

import hiseg  # noqa: F401  (before torch and detectron2: it quietens their import-time warnings)
from hiseg.checkpoint.io import read_checkpoint
from hiseg.checkpoint.prefixes import find_vit_prefix
from hiseg.errors import CheckpointError, UserError
from hiseg.paths import repo_relative
from hiseg.provenance import Manifest, machine_description, read_json
from hiseg.utils.atomic_io import atomic_write, atomic_write_json

__all__ = [
    "oap_init_checkpoint", "branch_backbone_checkpoint", "student_curve",
    "agreement_with_pseudo_masks",
    "parse_args", "main",
]

#: the checkout this script belongs to (its tools run as sub-commands)
REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
DEFAULT_CONFIG = "configs/OAP/experiments/oap_vit_small_coco_cpu.yaml"
DEFAULT_OUT = "output/oap_student_vs_pseudo_masks"
#: the class-agnostic evaluator's keys that the table reports (segm: masks)
METRICS = ("AP", "AP50", "AR100")


class ExperimentError(UserError):
    """A step of the experiment cannot run (bad weights, a failed sub-command)."""


# ---------------------------------------------------------------------------------------------
# weights
def _state_dict(obj, path: str) -> Mapping[str, torch.Tensor]:
    sd = obj.get("model", obj) if isinstance(obj, Mapping) else None
    if not isinstance(sd, Mapping) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: holds no state dict (expected a detectron2 checkpoint "
                              "{'model': {...}} or a bare state dict)")
    return sd


def _check_vit_fits(sd: Mapping[str, torch.Tensor], cfg, path: str) -> None:
    """The ViT weights ``sd`` (no prefix) have the width, depth, patch and position grid of
    ``cfg.MODEL.VIT``; otherwise one error naming the mismatch and the keys to set."""
    w = sd["patch_embed.proj.weight"]
    dim, patch = int(w.shape[0]), int(w.shape[-1])
    depth = 1 + max((int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m), default=-1)
    v = cfg.MODEL.VIT
    wrong = [f"{key} {have} (config {want})" for key, have, want in (
        ("MODEL.VIT.EMBED_DIM", dim, v.EMBED_DIM), ("MODEL.VIT.DEPTH", depth, v.DEPTH),
        ("MODEL.VIT.PATCH_SIZE", patch, v.PATCH_SIZE)) if int(have) != int(want)]
    if "pos_embed" in sd and not wrong:
        n = int(sd["pos_embed"].shape[1])
        img = v.IMG_SIZE if isinstance(v.IMG_SIZE, int) else v.IMG_SIZE[0]
        grid = (int(img) // patch) ** 2
        if n not in (grid, grid + 1):
            side = math.isqrt(max(n - 1, 0))
            wrong.append(f"MODEL.VIT.IMG_SIZE {side * patch} ({n} position embeddings; config {img})")
    if wrong:
        raise CheckpointError(f"{path}: the ViT in it does not fit the config: the weights have "
                              + ", ".join(wrong) + "; set these keys (or pass other weights)")


def oap_init_checkpoint(src: str, dst: str, cfg) -> Dict[str, str]:
    """Write the ViT of checkpoint ``src`` as two detectron2 checkpoints (atomically):

    * ``dst``: ``student.backbone.vit.*`` for ``OAPSegmentor``'s ``MODEL.WEIGHTS`` (the rest of
      the model starts from its own initialisation; the teacher copies the student at step 1);
    * ``<dst stem>_backbone.pth``: ``backbone.vit.*``, the same weights for a bare backbone (the
      pseudo-mask tool's ``--config-file`` source).

    The ViT must fit ``cfg.MODEL.VIT`` (checked here, with the key to change). Returns both paths.
    """
    obj = read_checkpoint(src)
    sd = _state_dict(obj, src)
    prefix = find_vit_prefix(sd)
    if prefix is None:
        raise CheckpointError(f"{src}: holds no ViT (no '*patch_embed.proj.weight' key)")
    vit = {k[len(prefix):]: v.detach().clone() for k, v in sd.items()
           if k.startswith(prefix) and isinstance(v, torch.Tensor)}
    _check_vit_fits(vit, cfg, src)
    backbone = os.path.splitext(dst)[0] + "_backbone.pth"
    note = f"the ViT under '{prefix}' of {os.path.abspath(src)}"
    _save({"student.backbone.vit." + k: v for k, v in vit.items()}, dst, note)
    _save({"backbone.vit." + k: v for k, v in vit.items()}, backbone, note)
    return {"model": dst, "backbone": backbone, "source_prefix": prefix}


def branch_backbone_checkpoint(src: str, dst: str, branch: str = "teacher") -> str:
    """``<branch>.backbone.*`` of an ``OAPSegmentor`` checkpoint as ``backbone.*`` in ``dst``: the
    encoder that branch runs (for the teacher, the one whose attention keys OAP pools in training)."""
    if branch not in ("teacher", "student"):
        raise ValueError(f"branch must be 'teacher' or 'student', not {branch!r}")
    obj = read_checkpoint(src)
    sd = _state_dict(obj, src)
    prefix = f"{branch}.backbone."
    out = {"backbone." + k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        raise CheckpointError(f"{src}: no '{prefix}*' weights; is it an OAPSegmentor checkpoint?")
    synced = sd.get("teacher_synced")
    if branch == "teacher" and synced is not None and not int(synced):
        raise CheckpointError(f"{src}: its teacher was never set from the student (teacher_synced = 0)")
    _save(out, dst, f"{branch}.backbone of {os.path.abspath(src)}")
    return dst


def _save(state: Mapping[str, torch.Tensor], path: str, note: str) -> None:
    data = {"model": dict(state), "matching_heuristics": False, "__author__": f"oap experiment: {note}"}
    with atomic_write(path, "wb") as f:
        torch.save(data, f)


# ---------------------------------------------------------------------------------------------
# reading results
def student_curve(metrics_path: str, max_iter: int) -> List[Tuple[int, Dict[str, float]]]:
    """``[(iteration, {"AP": .., "AP50": .., "AR100": ..}), ...]`` of the class-agnostic mask
    evaluations in detectron2's ``metrics.json`` (one JSON object per line). The class-agnostic
    evaluator writes ``segm_agnostic/*`` next to another instance evaluator of the same dataset,
    ``segm/*`` alone. An evaluation after step ``i`` (0-based) is logged at iteration ``i``, the
    final one (after training) at ``max_iter``; both are returned as the number of steps done."""
    rows: Dict[int, Dict[str, float]] = {}
    if not os.path.isfile(metrics_path):
        return []
    with open(metrics_path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            prefix = "segm_agnostic/" if "segm_agnostic/AP" in rec else "segm/"
            vals = {m: float(rec[prefix + m]) for m in METRICS if prefix + m in rec}
            if vals and "iteration" in rec:
                rows.setdefault(min(int(rec["iteration"]) + 1, int(max_iter)), {}).update(vals)
    return sorted(rows.items())


def _pseudo_eval(path: str) -> Optional[Dict[str, float]]:
    rec = read_json(path)
    if not rec:
        return None
    segm = rec["metrics"]["segm"]
    key_ar = f"AR{rec.get('max_dets', 100)}"
    return {"AP": float(segm["AP"]), "AP50": float(segm["AP50"]), "AR100": float(segm.get(key_ar, segm.get("AR100")))}


# ---------------------------------------------------------------------------------------------
# steps
def _run(cmd: List[str], log_path: str, threads: int, what: str) -> float:
    """Run a sub-command with its output in ``log_path``; returns its wall time."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    print(f"[oap_experiment] {what}: {shlex.join(cmd)}  (log {log_path})", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-15:])
        raise ExperimentError(f"{what} failed (exit status {proc.returncode}); last lines of {log_path}:\n{tail}")
    print(f"[oap_experiment] {what}: done in {wall:.0f} s", flush=True)
    return wall


def _tool(name: str) -> str:
    path = os.path.join(REPO, "tools", name)
    if not os.path.isfile(path):
        raise ExperimentError(f"{path} not found: run the experiment from a checkout of the repository")
    return path


#: scored pseudo-mask sets: name -> (method, --unique). "oap": the instance masks of the 5 OAP
#: layers with repeats kept once, the set the training targets are made of
#: (hiseg_oap.modeling.pseudo_targets); "oap_all": every layer's masks, repeats included (Table 1's
#: reading of "the instance masks of every layer"); "maskcut": MaskCut's N = 3 cuts.
PSEUDO_SETS = {"oap": ("oap", True), "oap_all": ("oap", False), "maskcut": ("maskcut", False)}


def score_pseudo_masks(args, backbone_weights: str, name: str, out_json: str, log: str) -> float:
    """Class-agnostic AP of the pseudo-mask set ``name`` (:data:`PSEUDO_SETS`) on the teacher
    features of ``backbone_weights`` (attention keys of the config's backbone, ``--feature keys``),
    at ``--pseudo-input-size`` on the long side; writes ``out_json`` and ``<stem>_eval.json``.
    Returns the wall time."""
    method, unique = PSEUDO_SETS[name]
    cmd = [sys.executable, _tool("generate_pseudo_masks.py"), "--method", method, "--dataset", args.eval_dataset,
           "--config-file", args.config_path, "--feature", "keys", "--keep-aspect",
           "--input-size", str(args.pseudo_input_size), "--levels", "instance", "--evaluate",
           "--max-dets", "100", "--output", out_json, "--no-progress", *(["--unique"] if unique else []),
           "--opts", *args.opts, "MODEL.WEIGHTS", backbone_weights, "MODEL.DEVICE", "cpu"]
    return _run(cmd, log, args.threads, f"{name} pseudo-masks of {os.path.basename(backbone_weights)}")


def train_overrides(args) -> List[str]:
    """The config overrides of the training run: iterations, warm-up (6.25% = the paper's 10k of
    160k), evaluation and checkpoint period at ``--points``, seed, output folder."""
    period = max(1, args.iters // args.points)
    return ["MODEL.WEIGHTS", os.path.join(args.out, "init", "vit_init.pth"),
            "SOLVER.MAX_ITER", str(args.iters), "SOLVER.WARMUP_ITERS", str(max(1, round(args.iters / 16))),
            "TEST.EVAL_PERIOD", str(period), "SOLVER.CHECKPOINT_PERIOD", str(period),
            "SEED", str(args.seed), "OUTPUT_DIR", os.path.join(args.out, "train"), *args.opts]


def saved_points(train_dir: str, iters: int) -> List[Tuple[int, str]]:
    """``[(iteration, checkpoint), ...]`` written by the trainer (``model_<it-1>.pth``, ``model_final.pth``)."""
    out = {}
    if os.path.isdir(train_dir):
        for name in os.listdir(train_dir):
            m = re.fullmatch(r"model_(\d+)\.pth", name)
            if m:
                out[int(m.group(1)) + 1] = os.path.join(train_dir, name)
        final = os.path.join(train_dir, "model_final.pth")
        if os.path.isfile(final):
            out[iters] = final
    return sorted(out.items())


def agreement_with_pseudo_masks(segmenter_results: str, pseudo_results: str, images_json: str,
                                out_json: str) -> Dict[str, float]:
    """How well the trained segmenter reproduces its own kind of targets on unseen images: its
    class-agnostic predictions scored (mask AP / AP50 / AR100) against the teacher's OAP
    pseudo-masks taken as the ground truth, on the images of ``images_json`` (a COCO file; its
    annotations are not used). Predictions with an empty mask cannot match anything and are left
    out (their number is recorded). Written to ``out_json``; returns the mask metrics."""
    from pycocotools import mask as mask_util

    from hiseg_oap.pseudo_labels import evaluate_results, load_results, results_to_coco_dataset, rle_for_api

    with open(images_json) as f:
        images = json.load(f)["images"]
    with open(segmenter_results) as f:
        predictions = json.load(f)
    kept = [r for r in predictions if mask_util.area(rle_for_api(r["segmentation"])) > 0]
    pseudo_gt = results_to_coco_dataset(load_results(pseudo_results), images)
    metrics = evaluate_results(kept, pseudo_gt, image_ids=[im["id"] for im in images], tasks=("segm",))
    atomic_write_json(out_json, {"max_dets": 100, "segmenter": segmenter_results, "ground_truth": pseudo_results,
                                 "predictions": len(predictions), "empty_masks_left_out": len(predictions) - len(kept),
                                 "metrics": metrics}, indent=1)
    return {k: float(metrics["segm"][k]) for k in METRICS}


# ---------------------------------------------------------------------------------------------
# report
def _cell(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}"


def collect(args) -> dict:
    pseudo, pdir = {}, os.path.join(args.out, "pseudo")
    for name in sorted(os.listdir(pdir) if os.path.isdir(pdir) else []):
        m = re.fullmatch(r"(oap_all|oap|maskcut)_it(\d+)_eval\.json", name)
        if m:
            pseudo.setdefault(m.group(1), {})[int(m.group(2))] = _pseudo_eval(os.path.join(pdir, name))
    return {"pseudo": pseudo, "student": student_curve(os.path.join(args.out, "train", "metrics.json"), args.iters),
            "agreement": _pseudo_eval(os.path.join(args.out, "agreement_eval.json"))}


def plot_curves(res: dict, path: str, caption: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.8))
    for ax, m in zip(axes, METRICS):
        st = res["student"]
        if st:
            ax.plot([i for i, _ in st], [v.get(m) for _, v in st], "o-", color="C0",
                    label="(c) trained segmenter (teacher + decoder)")
        for method, color, label in (("oap", "C1", "(a) teacher's OAP pseudo-masks"),
                                     ("oap_all", "C3", "(a') the same, repeats included"),
                                     ("maskcut", "C2", "(b) MaskCut, same teacher features")):
            pts = sorted((i, v[m]) for i, v in res["pseudo"].get(method, {}).items() if v)
            if pts:
                ax.plot([i for i, _ in pts], [v for _, v in pts], "s--" if len(pts) > 1 else "s", color=color,
                        label=label)
        ax.set_xlabel("training iteration")
        ax.set_ylabel(f"class-agnostic mask {m} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(caption, fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(args, manifest: dict) -> str:
    res = collect(args)
    invs = manifest["invocations"]
    commits = sorted({i["commit"][:7] + ("+dirty" if i.get("dirty") else "") for i in invs})
    wall = sum(i.get("wall_s", 0.0) for i in invs)
    final_it = args.iters
    oap, mc = res["pseudo"].get("oap", {}), res["pseudo"].get("maskcut", {})
    oap_all = res["pseudo"].get("oap_all", {})
    st = dict(res["student"])
    n_img = manifest.get("eval_images", "?")
    L = ["# OAP: the trained segmenter vs its own pseudo-masks (class-agnostic, COCO val)", ""]
    L.append("* command(s): " + "; ".join(f"`{i['command']}`" for i in invs))
    L.append(f"* commit(s): {', '.join(commits)}; seed {args.seed}; wall time {wall / 60:.1f} min in all "
             f"(training {sum(i.get('train_wall_s', 0) for i in invs) / 60:.1f} min)")
    L.append(f"* machine: {manifest.get('machine', '?')}; {args.threads} thread(s)")
    L.append(f"* training: `{args.config_file}` on {manifest.get('train_images', '?')} images of "
             f"`{manifest.get('train_dataset', '?')}`, {args.iters} iterations of batch "
             f"{manifest.get('batch', '?')}; init: {manifest.get('init', '?')}")
    L.append(f"* scoring: {n_img} images of `{args.eval_dataset}`, every category as one; COCO mask AP / AP50 / "
             "AR100 in %; pseudo-masks at the teacher features of the long side "
             f"{args.pseudo_input_size} (the segmenter's test input: short side 224)")
    L.append("")
    L.append("| row | what | iteration | mask AP | AP50 | AR100 |")
    L.append("|---|---|---|---|---|---|")
    rows = [("(a)", "teacher's OAP pseudo-masks (instance masks of its 5 layers, repeats once) at the start", 0,
             oap.get(0)),
            ("(a)", "the same from the final EMA teacher", final_it, oap.get(final_it)),
            ("(a')", "as (a) with every layer's masks, repeats included, at the start", 0, oap_all.get(0)),
            ("(a')", "the same from the final EMA teacher", final_it, oap_all.get(final_it)),
            ("(b)", "MaskCut (N = 3) on the start teacher's features", 0, mc.get(0)),
            ("(b)", "MaskCut on the final teacher's features", final_it, mc.get(final_it)),
            ("(c)", "trained segmenter (final teacher + mask decoder, Sec. 5.1)", final_it, st.get(final_it)),
            ("(d)", "(c) scored against (a) of the final teacher as the ground truth (not against COCO)", final_it,
             res["agreement"])]
    for tag, what, it, v in rows:
        v = v or {}
        L.append(f"| {tag} | {what} | {it} | {_cell(v.get('AP'))} | {_cell(v.get('AP50'))} | {_cell(v.get('AR100'))} |")
    L.append("")
    L.append("Along training (mask AP / AR100):")
    L.append("")
    L.append("| iteration | (a) OAP pseudo-masks of the teacher | (c) trained segmenter |")
    L.append("|---|---|---|")
    for it in sorted(set(oap) | set(st)):
        a, c = oap.get(it) or {}, st.get(it) or {}
        L.append(f"| {it} | {_cell(a.get('AP'))} / {_cell(a.get('AR100'))} | {_cell(c.get('AP'))} / {_cell(c.get('AR100'))} |")
    text = "\n".join(L) + "\n"
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    atomic_write_json(os.path.join(args.out, "results.json"), {"manifest": manifest, "results": {
        "pseudo": {m: {str(i): v for i, v in d.items()} for m, d in res["pseudo"].items()},
        "student": [[i, v] for i, v in res["student"]]}}, indent=1)
    caption = (f"{' '.join(invs[-1]['command'].split()[:6])} ... | commit {', '.join(commits)} | seed {args.seed} | "
               f"{n_img} COCO val images | wall {wall / 60:.0f} min")
    plot_curves(res, os.path.join(args.out, "learning_curves.png"), caption)
    return text


# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vit-weights", required=True,
                   help="pre-trained ViT checkpoint (e.g. output/cast_vs_vit/runs/vit_s0/point_5.pth)")
    p.add_argument("--config-file", default=DEFAULT_CONFIG)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--iters", type=int, default=400, help="training iterations (SOLVER.MAX_ITER)")
    p.add_argument("--points", type=int, default=5, help="evaluations / checkpoints along training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--eval-dataset", default="coco_2017_val")
    p.add_argument("--pseudo-input-size", type=int, default=320,
                   help="long side of the images the pseudo-masks' teacher features are computed on")
    p.add_argument("--maskcut-every-point", action="store_true",
                   help="score MaskCut (and OAP with repeats) at every saved point, not only at the start and the end")
    p.add_argument("--report-only", action="store_true", help="only redraw the report from what exists")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ... (after --)")
    args = p.parse_args(argv)
    if args.opts and args.opts[0] == "--":
        args.opts = args.opts[1:]
    if args.iters < 1 or args.points < 1 or args.points > args.iters:
        p.error("--iters must be >= --points >= 1")
    args.config_path = repo_relative(args.config_file)  # sub-commands run in the caller's directory
    return args


def _cfg(args):
    from detectron2.config import get_cfg

    from hiseg.cli import merge_config
    from hiseg_cast import add_cast_config
    from hiseg_oap import add_oap_config

    cfg = get_cfg()
    add_oap_config(add_cast_config(cfg))
    merge_config(cfg, args.config_path, list(args.opts))
    return cfg


def main(argv=None, command: Optional[str] = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = command or "python projects/OAP/experiments/student_vs_pseudo_masks.py " + shlex.join(argv)
    os.makedirs(args.out, exist_ok=True)
    record = Manifest(os.path.join(args.out, "manifest.json"))
    inv = record.start(command)
    manifest = record.data
    old = manifest.get("settings")
    settings = {"iters": args.iters, "points": args.points, "seed": args.seed, "config_file": args.config_file,
                "opts": list(args.opts), "pseudo_input_size": args.pseudo_input_size}
    if old and old != settings and not args.report_only:
        raise ExperimentError(f"{args.out} holds a run with other settings {old}; use another --out")
    manifest["settings"] = settings
    cfg = _cfg(args)
    import hiseg.data  # noqa: F401  (registers the datasets)
    from detectron2.data import DatasetCatalog

    from hiseg.dataset_checks import check_datasets


    try:
        if not args.report_only:
            init = os.path.join(args.out, "init", "vit_init.pth")
            if not os.path.isfile(init):
                info = oap_init_checkpoint(args.vit_weights, init, cfg)
                manifest["init"] = f"`{args.vit_weights}` ({info['source_prefix']}*)"
            # a missing dataset folder: one error line naming it (hiseg.dataset_checks)
            check_datasets((*cfg.DATASETS.TRAIN, args.eval_dataset))
            manifest.update(machine=machine_description(), train_dataset=",".join(cfg.DATASETS.TRAIN),
                            train_images=sum(len(DatasetCatalog.get(d)) for d in cfg.DATASETS.TRAIN),
                            eval_images=len(DatasetCatalog.get(args.eval_dataset)), batch=cfg.SOLVER.IMS_PER_BATCH)
            backbone0 = os.path.splitext(init)[0] + "_backbone.pth"
            pdir = os.path.join(args.out, "pseudo")
            walls = inv["pseudo_wall_s"] = {}  # filled as each set is scored (kept if a later step fails)
            for method in PSEUDO_SETS:
                out_json = os.path.join(pdir, f"{method}_it0.json")
                if not os.path.isfile(out_json[:-5] + "_eval.json"):
                    walls[f"{method}_it0"] = round(score_pseudo_masks(args, backbone0, method, out_json,
                                                                      os.path.join(pdir, "log.txt")), 1)
            train_dir = os.path.join(args.out, "train")
            if not os.path.isfile(os.path.join(train_dir, "model_final.pth")):
                resume = ["--resume"] if os.path.isfile(os.path.join(train_dir, "last_checkpoint")) else []
                cmd = [sys.executable, _tool("train_net.py"), "--config-file", args.config_path, *resume,
                       *train_overrides(args)]
                inv["train_wall_s"] = round(_run(cmd, os.path.join(args.out, "train_log.txt"), args.threads,
                                                 "training"), 1)
            for it, ckpt in saved_points(train_dir, args.iters):
                methods = ["oap"] + (["oap_all", "maskcut"] if it == args.iters or args.maskcut_every_point else [])
                for method in methods:
                    out_json = os.path.join(pdir, f"{method}_it{it}.json")
                    if os.path.isfile(out_json[:-5] + "_eval.json"):
                        continue
                    teacher = os.path.join(args.out, "teacher", f"teacher_it{it}.pth")
                    if not os.path.isfile(teacher):
                        branch_backbone_checkpoint(ckpt, teacher, "teacher")
                    walls[f"{method}_it{it}"] = round(score_pseudo_masks(args, teacher, method, out_json,
                                                                         os.path.join(pdir, "log.txt")), 1)
            final_pseudo = os.path.join(pdir, f"oap_it{args.iters}.json")
            predictions = os.path.join(train_dir, "inference", args.eval_dataset, "coco_instances_results.json")
            images = os.path.join(train_dir, "inference", args.eval_dataset, f"{args.eval_dataset}_cls_agnostic.json")
            agreement = os.path.join(args.out, "agreement_eval.json")
            if not os.path.isfile(agreement) and all(map(os.path.isfile, (final_pseudo, predictions, images))):
                agreement_with_pseudo_masks(predictions, final_pseudo, images, agreement)
    except BaseException as e:  # the invocation is recorded with what it did before it failed
        inv["failed"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        raise
    finally:
        record.finish(inv)
    text = write_report(args, manifest)
    print(text, flush=True)
    return text


if __name__ == "__main__":
    from hiseg.cli import script_main

    script_main(main, result_is_status=False)  # a bad argument or file: one error line, exit status 2
