"""Speed on the device: ratios measured side by side in one run (alternating calls, medians).

Goals and the papers' figures:

* CAST + superpixels / ViT time: <= 0.75 (CAST paper: 217 / 273 ms = 0.79, superpixels excluded);
* FPS share of graph pooling: <= 10% (CAST paper, Table 8: about 60%);
* superpixels' share of a CAST-S forward: <= 10%;
* OAP pseudo-masks on 56 x 56 tokens: <= 3 ms per image (OAP paper, Table 1: 45 ms);
* OAP vs MaskCut on the same features: >= 300x (OAP paper: about 100x);
* OAP's share of an OAPSegmentor training step at batch 16: <= 10%.

A missed goal is a row marked ``missed``; it never fails the run.
"""
from __future__ import annotations

import statistics
import time
from typing import Dict, List, Optional

import torch

from hiseg.benchmark import Measured, Sync, Timer, alternate, normalize
from hiseg.utils.markdown import mib, ms, pct

from .budget import Budget
from .correctness import build_cfg, oap_batch, sample_images
from .precision import autocast, precision_name, train_step
from .report import ERROR, SKIP, Report, error_text, goal_status

GOAL_CAST_RATIO = 0.75
GOAL_FPS_SHARE = 0.10
GOAL_SP_SHARE = 0.10
GOAL_OAP_MS = 3.0
GOAL_OAP_VS_MASKCUT = 300.0
GOAL_OAP_STEP_SHARE = 0.10


def _precisions(amp: torch.dtype) -> List[Optional[torch.dtype]]:
    return [None, amp]


def _release(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# CAST vs ViT
class CastTables:
    def __init__(self, report: Report, prof, device: torch.device):
        b, s, k = prof.speed_batch, prof.speed_size, prof.speed_k
        where = "the GPU" if device.type == "cuda" else "the CPU"
        self.ratio = report.table(
            f"CAST vs ViT: time per batch of {b} at {s}x{s}, superpixels included",
            ("pair", "precision", "CAST + superpixels ms", "superpixels ms", "CAST (superpixels given) ms", "ViT ms",
             "(CAST + superpixels) / ViT", f"goal <= {GOAL_CAST_RATIO}", "CAST / ViT (paper 0.79, no superpixels)",
             "peak mem CAST + sp.", "peak mem ViT", "timed rounds (spread)"),
            intro=f"slic_torch ({k} superpixels asked) runs on {where} for the whole batch inside the timed CAST call. "
                  "CAST and ViT calls alternate within each round; medians over the rounds; `torch.no_grad`, eval "
                  "mode, random weights. Spread = (max - min) / median of the CAST + superpixels calls.")
        self.sp = report.table(
            "Superpixels' share of a CAST forward",
            ("model", "precision", "superpixels ms", "CAST + superpixels ms", "share", f"goal <= {pct(GOAL_SP_SHARE)}"),
            intro="From the same alternating measurements as the table above.")
        self.fps = report.table(
            "Graph pooling: FPS share",
            ("model", "precision", "graph pooling ms (all levels)", "of which FPS ms", "FPS share",
             f"goal <= {pct(GOAL_FPS_SHARE)}", "paper (Table 8)"),
            intro="From the instrumented pass below (a synchronisation around every part).")
        self.parts = report.table(
            "CAST per-part time (ms per batch; instrumented pass)",
            ("model", "precision", "superpixels", "conv stem", "segment tokens", "blocks (per level)",
             "graph pool (per level)", "FPS (per level)", "other", "total (instrumented)"),
            intro="Forward hooks synchronise before and after every part (hiseg_cast.benchmark's PartTimer, as in "
                  "tools/benchmark.py), so the total is a little above the un-instrumented CAST time; superpixels: the "
                  "alternating median.")


def _parts_row(tables: CastTables, model_name: str, prec: str, parts: Dict, sp_s: float, enc):
    levels = len(enc.depths)
    stem = parts.get("stem", 0.0)
    seg = parts.get("segment_tokens", 0.0) - stem
    blocks = [parts.get(("blocks", g), 0.0) for g in range(levels)]
    pools = [parts.get(("pool", g), 0.0) for g in range(levels)]
    fps = [parts.get(("fps", g), 0.0) for g in range(levels)]
    total = parts.get("total", 0.0)
    other = max(0.0, total - stem - seg - sum(blocks) - sum(pools))
    join = lambda xs: " / ".join(ms(v, 1) for v in xs)  # noqa: E731
    tables.parts.add(model_name, prec, ms(sp_s), ms(stem), ms(seg), join(blocks), join(pools), join(fps), ms(other),
                     ms(total))
    pool_total, fps_total = sum(pools), sum(fps)
    share = fps_total / pool_total if pool_total > 0 else None
    tables.fps.add(model_name, prec, ms(pool_total), ms(fps_total), pct(share), goal_status(share, GOAL_FPS_SHARE),
                   "about 60%")


def speed_cast_vs_vit(report: Report, device: torch.device, prof, amp: torch.dtype, budget: Budget,
                      allot_s: float) -> None:
    from timm.models.vision_transformer import VisionTransformer

    from hiseg_cast.benchmark import time_parts

    from hiseg_cast.modeling.backbone import encoder_from_cfg
    from hiseg_cast.superpixels.torch_slic import slic_torch

    tables = CastTables(report, prof, device)
    timer = Timer(device)
    b, size, k = prof.speed_batch, prof.speed_size, prof.speed_k
    u8 = sample_images(b, size).to(device)
    x = normalize(u8)
    runs = [(m, p) for m in prof.speed_models for p in _precisions(amp)]
    deadline = time.perf_counter() + allot_s
    for i, (m, dtype) in enumerate(runs):
        prec = precision_name(dtype)
        left = deadline - time.perf_counter()
        if left <= 0:
            tables.ratio.add(m.label, prec, *["-"] * 5, f"{SKIP} (time budget)", *["-"] * 4)
            continue
        try:
            cfg = build_cfg(m.cast_config, m.cast_opts, "cpu")
            torch.manual_seed(0)
            enc = encoder_from_cfg(cfg).to(device).eval()
            vit = VisionTransformer(img_size=size, patch_size=m.vit_patch, embed_dim=m.vit_embed_dim,
                                    depth=m.vit_depth, num_heads=m.vit_num_heads, num_classes=0).to(device).eval()
            sp_fixed = slic_torch(u8, k)

            def run_slic():
                return slic_torch(u8, k)

            def run_cast_sp():
                with autocast(device, dtype):
                    return enc(x, slic_torch(u8, k))

            def run_cast():
                with autocast(device, dtype):
                    return enc(x, sp_fixed)

            def run_vit():
                with autocast(device, dtype):
                    return vit(x)

            fns = {"sp": run_slic, "cast_sp": run_cast_sp, "cast": run_cast, "vit": run_vit}
            t0 = time.perf_counter()
            alternate(timer, fns, reps=0, warmup=1)  # warm-up round: kernels, cuBLAS handles, allocator
            round_s = time.perf_counter() - t0
            share = left / (len(runs) - i)
            reps = Budget.reps(round_s * 1.3, 0.75 * share, *prof.speed_reps)  # a quarter for the parts pass
            res: Dict[str, Measured] = alternate(timer, fns, reps=reps, warmup=0)
            sp, cast_sp, cast, vt = (res[n].median for n in ("sp", "cast_sp", "cast", "vit"))
            ratio = cast_sp / vt
            tables.ratio.add(m.label, prec, ms(cast_sp), ms(sp), ms(cast), ms(vt), f"{ratio:.2f}",
                             goal_status(ratio, GOAL_CAST_RATIO), f"{cast / vt:.2f}", mib(res["cast_sp"].peak),
                             mib(res["vit"].peak), f"{reps} ({pct(res['cast_sp'].spread)})")
            sp_share = sp / cast_sp
            tables.sp.add(m.cast_name, prec, ms(sp), ms(cast_sp), pct(sp_share), goal_status(sp_share, GOAL_SP_SHARE))
            with autocast(device, dtype):
                parts = time_parts(enc, x, sp_fixed, iters=1 if device.type == "cpu" else 3, warmup=1,
                                   sync=Sync(device))
            _parts_row(tables, m.cast_name, prec, parts, sp, enc)
        except Exception as exc:  # noqa: BLE001
            tables.ratio.add(m.label, prec, *["-"] * 5, f"{ERROR}: {error_text(exc)}", *["-"] * 4)
        finally:
            enc = vit = None
            _release(device)
        report.write()


# ------------------------------------------------------------------------------------------------
# OAP vs MaskCut
def _feature_kinds(device: torch.device, prof) -> Dict[str, "callable"]:
    from hiseg.modeling.vit import make_timm_vit
    from hiseg_oap.pooling import vit_key_features
    from hiseg_oap.pooling.benchmark import random_features, structured_features

    n, c, h, w = prof.oap_speed
    patch, dim, depth, heads = prof.oap_vit

    def vit_keys():
        torch.manual_seed(0)
        vit = make_timm_vit(patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                            img_size=prof.oap_image_size).to(device).eval()
        imgs = normalize(sample_images(n, prof.oap_image_size)).to(device)
        with torch.no_grad():
            keys = torch.cat([vit_key_features(vit, imgs[i:i + 4]) for i in range(0, n, 4)])
        del vit
        return keys

    return {
        f"ViT-B/8 keys (random init) of {prof.oap_image_size}x{prof.oap_image_size} pictures"
        if dim == 768 and patch == 8 else f"ViT/{patch} keys ({dim}-d, random init)": vit_keys,
        "structured synthetic scenes": lambda: structured_features(n, c, h, w, seed=0).to(device),
        "i.i.d. random (OAP's worst case)": lambda: random_features(n, c, h, w, seed=0).to(device),
    }


def speed_oap(report: Report, device: torch.device, prof, budget: Budget, allot_s: float) -> None:
    from hiseg_oap.pooling import MaskCutConfig, OAPConfig, flatten_normalized, maskcut, oap_fast

    n, c, h, w = prof.oap_speed
    table = report.table(
        f"OAP pseudo-masks on {h}x{w} tokens ({c} channels), batch of {n}, vs MaskCut on the same features",
        ("features", "OAP ms / image", f"goal <= {GOAL_OAP_MS:g} ms", "paper (Table 1)",
         "of which affinity F F^T ms / image", "OAP peak mem", "masks / image (instance / semantic)",
         "MaskCut ms / image (CPU, images)", "MaskCut / OAP", f"goal >= {GOAL_OAP_VS_MASKCUT:g}x", "paper"),
        intro=f"OAP: `oap_fast` (float32) on {'the GPU' if device.type == 'cuda' else 'the CPU'}, the whole batch per "
              "call, median of the timed calls after one warm-up call; the affinity product alone (the N x N x d "
              "part every method pays) is timed on the same batch. MaskCut: NumPy/SciPy on the CPU (its only "
              "implementation), on the first images of the same features, three cuts, no CRF.")
    cfg, mcfg = OAPConfig(), MaskCutConfig()
    timer = Timer(device)
    kinds = _feature_kinds(device, prof)
    deadline = time.perf_counter() + allot_s
    for i, (name, make) in enumerate(kinds.items()):
        left = deadline - time.perf_counter()
        if left <= 0:
            table.add(name, "-", f"{SKIP} (time budget)", "45 ms", *["-"] * 7)
            continue
        try:
            feats = make()
            sec0, _, res = timer.time(lambda: oap_fast(feats, cfg))  # warm-up, and the time of one call
            share = left / (len(kinds) - i)
            reps = Budget.reps(sec0, 0.4 * share, 1, 7)
            calls = Measured("oap")
            for _ in range(reps):
                sec, peak, res = timer.time(lambda: oap_fast(feats, cfg))
                calls.times.append(sec)
                if peak is not None:
                    calls.peaks.append(peak)
            per_img = calls.median / n
            fb = flatten_normalized(feats)[0]
            aff = statistics.median(timer.time(lambda: torch.bmm(fb, fb.transpose(1, 2)), track_memory=False)[0]
                                    for _ in range(3)) / n
            fb = None
            ins = statistics.mean(sum(len(lay.instance) for lay in r.layers) for r in res)
            sem = statistics.mean(sum(len(lay.semantic) for lay in r.layers) for r in res)
            # MaskCut: as many images as fit in what is left of this kind's share
            lo, hi = prof.maskcut_images
            cpu_feats = feats.float().cpu()
            t0 = time.perf_counter()
            maskcut(cpu_feats[:1], mcfg)
            mc_times = [time.perf_counter() - t0]
            spare = share - (time.perf_counter() - (deadline - left))
            more = Budget.reps(mc_times[0], spare * 0.8, lo - 1, hi - 1)
            for j in range(1, 1 + more):
                t0 = time.perf_counter()
                maskcut(cpu_feats[j:j + 1], mcfg)
                mc_times.append(time.perf_counter() - t0)
            mc = statistics.mean(mc_times)
            ratio = mc / per_img
            table.add(name, ms(per_img), goal_status(1e3 * per_img, GOAL_OAP_MS), "45 ms", ms(aff, 3), mib(calls.peak),
                      f"{ins:.1f} / {sem:.1f}", f"{ms(mc, 0)} ({len(mc_times)})", f"{ratio:.0f}x",
                      goal_status(ratio, GOAL_OAP_VS_MASKCUT, at_most=False), "about 100x")
        except Exception as exc:  # noqa: BLE001
            table.add(name, "-", f"{ERROR}: {error_text(exc)}", "45 ms", *["-"] * 7)
        finally:
            feats = None
            _release(device)
        report.write()


# ------------------------------------------------------------------------------------------------
# OAP's share of an OAPSegmentor training step
def speed_oap_step(report: Report, device: torch.device, prof, amp: torch.dtype, budget: Budget,
                   allot_s: float) -> None:
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from hiseg.engine import build_hiseg_optimizer

    table = report.table(
        f"OAP's share of one OAPSegmentor training step, batch {prof.step_batch}",
        ("precision", "views", "step s", "teacher s (encoder + OAP + head)", "OAP s", "OAP share",
         f"goal <= {pct(GOAL_OAP_STEP_SHARE)}", "peak mem", "instance targets / view", "timed steps"),
        intro=f"`{prof.step_config}` (random weights), synthetic multi-crop batches (hiseg_oap.data.synthetic, as in "
              f"tools/benchmark_oap_step.py): "
              f"{prof.step_batch} global views {prof.step_size}x{prof.step_size} + {prof.step_local_crops} local "
              f"views {prof.step_local_size}x{prof.step_local_size} each. Step = teacher EMA + teacher encoder + "
              "OAP + student + losses + backward + AdamW (with the config's clipping); the teacher and OAP "
              "seconds are the model's own synchronised timers. Medians after one warm-up step.")
    deadline = time.perf_counter() + allot_s
    precisions = [amp, None]  # AMP first: the training setting; fp32 if time allows
    for i, dtype in enumerate(precisions):
        prec = precision_name(dtype)
        left = deadline - time.perf_counter()
        if left <= 0:
            table.add(prec, "-", "-", "-", "-", "-", f"{SKIP} (time budget)", "-", "-", "-")
            continue
        model = optimizer = None
        try:
            cfg = build_cfg(prof.step_config, prof.step_opts, device)
            torch.manual_seed(0)
            model = build_model(cfg)
            model.train()
            optimizer = build_hiseg_optimizer(cfg, model)
            scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
            gen = torch.Generator().manual_seed(0)
            timer = Timer(device)
            rows = []
            lo, hi = prof.step_steps
            steps, it = None, 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with EventStorage(0) as storage:
                while steps is None or it < 1 + steps:
                    data = oap_batch(prof.step_batch, prof.step_size, prof.step_local_crops, prof.step_local_size,
                                     seed=int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
                    storage.iter = it

                    def step():
                        return train_step(model, optimizer, data, device, dtype, scaler)

                    sec, _, loss = timer.time(step, track_memory=False)
                    if not torch.isfinite(loss.detach()):
                        raise FloatingPointError(f"non-finite loss {float(loss)} at step {it}")
                    latest = storage.latest()
                    if it == 0:  # warm-up: decide how many steps fit
                        share = left / (len(precisions) - i)
                        steps = Budget.reps(sec, 0.8 * share - sec, lo, hi)
                    else:
                        rows.append((sec, latest["oap/teacher_seconds"][0], latest["oap/pooling_seconds"][0],
                                     latest["oap/instance_targets_per_view"][0]))
                    it += 1
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            step_s = statistics.median(r[0] for r in rows)
            teacher = statistics.median(r[1] for r in rows)
            pooling = statistics.median(r[2] for r in rows)
            share_oap = pooling / step_s
            views = f"{prof.step_batch} + {prof.step_batch * prof.step_local_crops}"
            table.add(prec, views, f"{step_s:.3f}", f"{teacher:.3f}", f"{pooling:.4f}", pct(share_oap),
                      goal_status(share_oap, GOAL_OAP_STEP_SHARE), mib(peak),
                      f"{statistics.median(r[3] for r in rows):.1f}", str(len(rows)))
        except Exception as exc:  # noqa: BLE001
            table.add(prec, "-", "-", "-", "-", "-", f"{ERROR}: {error_text(exc)}", "-", "-", "-")
        finally:
            model = optimizer = None
            _release(device)
        report.write()
