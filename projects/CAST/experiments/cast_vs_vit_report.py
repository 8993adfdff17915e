"""Report of the CAST vs ViT comparison (``cast_vs_vit.py``): every run's points with their
scores (``collect``), the tables of ``results.md`` and ``final_point.md`` (mean ± sample s.d.
over seeds), ``results.json`` and the plots (learning curves, MoCo loss, CAST's pooling
entropy)."""
import math
import os

import numpy as np

from hiseg.utils.atomic_io import atomic_write, atomic_write_json
from hiseg.engine.budget import read_run, read_steps
from hiseg.utils.markdown import duration, mean_sd_cell

from cast_vs_vit_eval import eval_json_path, read_eval
from cast_vs_vit_protocol import FINAL_TABLE, METRICS, SEEDS_LABEL, run_dir_for


def collect(args, settings: dict) -> dict:
    """Every run's points with their scores, the SEEDS scores and the step logs."""
    res = {"models": {}, "seeds_alone": None}
    s = read_eval(eval_json_path(args.out, "seeds"), settings)
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
                e = read_eval(eval_json_path(args.out, model, seed, p["k"]), settings)
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


def write_report(args, settings: dict, manifest: dict) -> str:
    res = collect(args, settings)
    invs = manifest["invocations"]
    commits = sorted({i["commit"] + (" (uncommitted changes)" if i["dirty"] else "") for i in invs})
    cite = (f"commit {', '.join(c[:10] if len(c) >= 10 else c for c in commits)}; seeds "
            f"{', '.join(map(str, args.seeds))}; budget {args.budget_minutes:g} min per run; "
            f"{len(settings['image_ids'])} BSDS500 val images")
    walls = [i.get("wall_s") or 0.0 for i in invs]
    cite += (f"; wall time {duration(sum(walls))} over {len(invs)} invocation(s)" if invs else "")
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
    L.append("Written by `projects/CAST/experiments/cast_vs_vit.py`. Every number below comes from the runs in this "
             "folder; none is from the paper.")
    L.append("")
    L.append("## Provenance")
    L.append("")
    for i in invs:
        L.append(f"* `{i['command']}` — commit `{i['commit']}`{' (with uncommitted changes)' if i['dirty'] else ''}, "
                 f"started {i['started']}, wall {duration(i.get('wall_s'))}"
                 + "".join(f", {what} {duration(i[key])}" for key, what in (("train_wall_s", "training"),
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
        final.append(f"| {args.labels[model]} | {mean_sd_cell(iters, 0)} | "
                     + " | ".join(mean_sd_cell(_point_values(res, model, n_pts, k)) for k in keys) + " |")
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
            L.append(f"| {100 * frac:g}% | {args.labels[model]} | {mean_sd_cell(iters, 0)} | "
                     + " | ".join(mean_sd_cell(_point_values(res, model, k, key)) for key in keys) + " |")
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
                     f"{duration(run['elapsed_s'])} | {sps:.2f} | {dps:.2f} | {first:.3f} | {last:.3f} | "
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
            L.append(f"| {100 * frac:g}% | {mean_sd_cell(_point_field(res, 'cast', k, 'iteration'), 0)} | "
                     + " | ".join(mean_sd_cell([x["entropy_norm"][g] for x in pools], 2) for g in range(n_pool)) + " | "
                     + " | ".join(mean_sd_cell([x["segments_used"][l] for x in pools], 1) for l in range(n_lvl)) + " |")
        L.append("")
        L.append("![pooling entropy](pooling_entropy.png)")
        L.append("")
    text = "\n".join(L) + "\n"
    with atomic_write(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    atomic_write_json(os.path.join(args.out, "results.json"),
                      {"manifest": manifest, "eval_settings": settings, "points": list(args.points), "results": res},
                      indent=1)
    return text

