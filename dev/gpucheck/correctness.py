"""Correctness on the device against the CPU path of the same code.

Every function adds rows ``(check, status, measured, tolerance, why)`` to a correctness table;
status is ``pass`` / ``FAIL`` / ``ERROR`` / ``skipped (...)`` / ``info``. On ``--device cpu`` the
"device" run is the CPU again: the rows then exercise the code, not the GPU.
"""
from __future__ import annotations

import ast
import contextlib
import copy
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from hiseg.benchmark import normalize

from . import REPO
from .precision import autocast, precision_name, rel_err, strict_fp32
from .report import ERROR, FAIL, INFO, PASS, SKIP, Table, error_text

COLUMNS = ("check", "status", "measured", "tolerance", "why this tolerance")


def new_table(report) -> Table:
    return report.table(
        "Correctness on the device (against the CPU path of the same code)", COLUMNS, kind="correctness",
        intro="Status `FAIL` or `ERROR` makes the script exit with 1. Relative errors are "
              "`||device - cpu|| / ||cpu||`. The correctness rows run with TF32 off (true fp32).")


def _status(ok: bool) -> str:
    return PASS if ok else FAIL


# ------------------------------------------------------------------------------------------------
# shared builders
def build_cfg(config_file: str, opts: Sequence[str], device) -> "object":
    from detectron2.config import get_cfg

    from hiseg_cast import add_cast_config
    from hiseg_oap import add_oap_config

    cfg = add_oap_config(add_cast_config(get_cfg()))
    cfg.merge_from_file(str(REPO / config_file))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = str(device)
    cfg.MODEL.WEIGHTS = ""
    return cfg


def sample_images(n: int, size: int) -> torch.Tensor:
    """(n, 3, size, size) uint8 RGB: scikit-image's sample pictures (``hiseg_cast.benchmark``)."""
    from hiseg_cast.benchmark import sample_batch

    return torch.from_numpy(sample_batch(n, size)).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------------
# slic_torch
def _label_map_problems(labels: np.ndarray) -> Optional[str]:
    from scipy import ndimage

    n = int(labels.max()) + 1
    if labels.min() != 0 or not np.array_equal(np.unique(labels), np.arange(n)):
        return "labels not consecutive from 0"
    for i, box in enumerate(ndimage.find_objects(labels + 1)):
        if box is None or ndimage.label(labels[box] == i)[1] != 1:
            return f"label {i} not 4-connected"
    return None


def check_slic(table: Table, device: torch.device, prof) -> None:
    from hiseg_cast.superpixels.torch_slic import slic_torch

    n, size, k = prof.slic_images, prof.slic_size, prof.slic_k
    x = sample_images(n, size)
    cpu = slic_torch(x, k)
    dev = slic_torch(x.to(device), k)
    again = slic_torch(x.to(device), k)
    j = min(1, n - 1)
    alone = slic_torch(x[j:j + 1].to(device), k)
    dev_c = dev.cpu()
    same = (dev_c == cpu).double().mean().item()
    identical = sum(bool(torch.equal(a, b)) for a, b in zip(dev_c, cpu))
    table.add(f"slic_torch labels, {n} images {size}x{size}, K={k}: device vs CPU", _status(same >= 0.99),
              f"{100 * same:.3f}% of pixels equal; {identical}/{n} images identical", ">= 99% of pixels equal",
              "CUDA's pow() may differ from the CPU's in the last bit; LAB is rounded to 1/1024 right after, "
              "so a difference survives only at a rounding boundary, where it can move a centre and some "
              "pixels (the suite's test_cuda_matches_cpu bound)")
    det = bool(torch.equal(dev, again)) and bool(torch.equal(alone[0], dev[j]))
    table.add("slic_torch on the device: same labels run to run, one image alone = in the batch", _status(det),
              "equal" if det else "differ", "exact",
              "LAB on a 1/1024 grid and float64 sums of integers: atomics' order cannot matter")
    problems = [p for p in (_label_map_problems(m.numpy()) for m in dev_c) if p]
    counts = [int(m.max()) + 1 for m in dev_c]
    in_range = all(0.5 * k <= c <= 1.5 * k for c in counts)
    table.add("slic_torch on the device: label maps valid", _status(not problems and in_range),
              f"{min(counts)}-{max(counts)} labels per image" + (f"; {problems[0]}" if problems else ""),
              "labels 0..n-1 all present, each 4-connected, 0.5K <= n <= 1.5K", "SLIC's post-processing contract")


# ------------------------------------------------------------------------------------------------
# OAP
def canonical(partition: torch.Tensor) -> torch.Tensor:
    """Relabel a partition by order of first appearance (label-order independent comparison)."""
    flat = partition.reshape(-1).cpu()
    labels, inv = torch.unique(flat, return_inverse=True)
    first = torch.full((labels.numel(),), flat.numel(), dtype=torch.long)
    first = first.scatter_reduce(0, inv, torch.arange(flat.numel()), reduce="amin")
    rank = torch.empty_like(first)
    rank[torch.argsort(first)] = torch.arange(first.numel())
    return rank[inv].view(partition.shape)


def compare_pseudo_masks(a, b, features_atol: float) -> Optional[str]:
    """None when two :class:`PseudoMasks` agree (partitions up to label order, masks, parents,
    nesting, instance-to-semantic links exactly, features within ``features_atol``), else what
    differs first."""
    if len(a.layers) != len(b.layers):
        return f"{len(a.layers)} vs {len(b.layers)} layers"
    for la, lb in zip(a.layers, b.layers):
        for name in ("instance", "semantic"):
            x, y = la.level(name).to("cpu"), lb.level(name).to("cpu")
            if not torch.equal(canonical(x.partition), canonical(y.partition)):
                return f"tau {la.threshold}: {name} partitions differ"
            for field in ("masks", "parents", "nested"):
                if not torch.equal(getattr(x, field), getattr(y, field)):
                    return f"tau {la.threshold}: {name} {field} differ"
            if x.features.shape != y.features.shape or (
                    x.features.numel() and (x.features.double() - y.features.double()).abs().max() > features_atol):
                return f"tau {la.threshold}: {name} features differ by more than {features_atol:g}"
        if not torch.equal(la.instance_to_semantic.cpu(), lb.instance_to_semantic.cpu()):
            return f"tau {la.threshold}: instance_to_semantic differs"
    return None


def _first_problem(results_a, results_b, atol) -> Optional[str]:
    for i, (a, b) in enumerate(zip(results_a, results_b)):
        p = compare_pseudo_masks(a, b, atol)
        if p:
            return f"image {i}: {p}"
    return None


def check_oap(table: Table, device: torch.device, prof) -> None:
    from hiseg_oap.pooling import OAPConfig, oap_fast, oap_reference
    from hiseg_oap.pooling.benchmark import random_features, structured_features

    cfg = OAPConfig()
    xs = structured_features(*prof.oap_structured, seed=0)
    xr = random_features(*prof.oap_random, seed=1)
    shape = lambda x: "x".join(str(v) for v in x.shape)  # noqa: E731
    ref_s, ref_r = oap_reference(xs, cfg), oap_reference(xr, cfg)

    f64 = [oap_fast(x.to(device), cfg, dtype=torch.float64) for x in (xs, xr)]
    p = _first_problem(ref_s, f64[0], 1e-9) or _first_problem(ref_r, f64[1], 1e-9)
    masks = sum(len(lay.instance) + len(lay.semantic) for r in ref_s + ref_r for lay in r.layers)
    table.add(f"OAP fast on the device, float64 = reference (float64, CPU): structured {shape(xs)}, "
              f"random {shape(xr)}", _status(p is None), p or f"equal ({masks} masks)",
              "partitions, masks, parents, links exact; features 1e-9",
              "same algorithm and the same float64 expressions; only summation order differs")

    f32 = oap_fast(xs.to(device), cfg)
    p = _first_problem(ref_s, f32, 1e-5)
    table.add(f"OAP fast on the device, float32 = reference on structured maps {shape(xs)}", _status(p is None),
              p or "equal", "partitions, masks, parents, links exact; features 1e-5",
              "structured maps keep similarities far from the thresholds; float32 features carry ~1e-7 "
              "rounding, amplified by the sigma = 0.07 softmax")

    cpu32, dev32 = oap_fast(xr, cfg), oap_fast(xr.to(device), cfg)
    p = _first_problem(cpu32, dev32, 1e-5)
    table.add(f"OAP fast float32, device = CPU (same code) on random maps {shape(xr)}", INFO,
              p or "equal", "not a pass/fail check",
              "on i.i.d. random maps many similarities lie within float32 rounding of a threshold, so CPU and "
              "device matrix products (other summation order) may contract different edges")


# ------------------------------------------------------------------------------------------------
# CAST forward
@contextlib.contextmanager
def record_fps(encoder):
    """Collect the FPS centroid indices of every graph pooling of ``encoder``'s forward passes."""
    seen: List[torch.Tensor] = []
    patched = []
    for pool in encoder.pools:
        orig = pool.sample_centroids

        def wrapped(*a, _orig=orig, **k):
            idx, ok = _orig(*a, **k)
            seen.append(idx.detach().cpu())
            return idx, ok

        pool.sample_centroids = wrapped  # instance attribute shadows the static method
        patched.append(pool)
    try:
        yield seen
    finally:
        for pool in patched:
            del pool.sample_centroids


def _cast_outputs(encoder, x, sp):
    with torch.no_grad(), record_fps(encoder) as fps:
        out = encoder(x, sp)
    return out, list(fps)


def _finite_logits(lg: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(lg), lg, torch.zeros_like(lg))


def _compare_cast(oc, fc, od, fd):
    """(level-0 error, other-tensor error, FPS equal, hierarchy equal, label counts)"""
    e0 = rel_err(od["levels"][0]["tokens"], oc["levels"][0]["tokens"])
    errs = [rel_err(od["cls"], oc["cls"])]
    errs += [rel_err(d["tokens"], c["tokens"]) for d, c in zip(od["levels"][1:], oc["levels"][1:])]
    for a, b in zip(od["logits"], oc["logits"]):
        same_mask = torch.equal(torch.isfinite(a).cpu(), torch.isfinite(b).cpu())
        errs.append(rel_err(_finite_logits(a), _finite_logits(b)) if same_mask else float("inf"))
    fps_equal = len(fc) == len(fd) and all(torch.equal(a, b) for a, b in zip(fc, fd))
    h_c, h_d = oc["hierarchy"].cpu(), od["hierarchy"].cpu()
    diff = int((h_c != h_d).sum()) if h_c.shape == h_d.shape else h_c.numel()
    return e0, max(errs), fps_equal, diff, h_c.numel()


def check_cast_forward(table: Table, device: torch.device, prof) -> None:
    from hiseg_cast.modeling.backbone import encoder_from_cfg
    from hiseg_cast.superpixels.torch_slic import slic_torch

    cfg = build_cfg(prof.cast_config, prof.cast_opts, "cpu")
    torch.manual_seed(0)
    enc = encoder_from_cfg(cfg).eval()
    enc_dev = copy.deepcopy(enc).to(device)
    u8 = sample_images(prof.cast_batch, prof.cast_size)
    x, sp = normalize(u8), slic_torch(u8, prof.cast_k)  # one S_0 for both: superpixels have their own rows
    name = f"CAST ({cfg.MODEL.CAST.EMBED_DIM}-d, depths {list(cfg.MODEL.CAST.DEPTHS)}) fp32, " \
           f"{prof.cast_batch} images {prof.cast_size}x{prof.cast_size}"
    with strict_fp32():
        oc, fc = _cast_outputs(enc, x, sp)
        od, fd = _cast_outputs(enc_dev, x.to(device), sp.to(device))
    e0, e_rest, fps_equal, diff, total = _compare_cast(oc, fc, od, fd)
    tol = 1e-4
    table.add(f"{name}: level-0 tokens (stem, segment pooling, first blocks; before any FPS)",
              _status(e0 <= tol), f"rel. error {e0:.2e}", f"<= {tol:g}",
              "fp32 with another summation order gives ~1e-6; TF32 (10-bit mantissa) would give ~1e-3")
    exact = fps_equal and diff == 0 and e_rest <= tol
    detail = (f"FPS {'equal' if fps_equal else 'DIFFERS'}, {diff}/{total} hierarchy labels differ, "
              f"cls / coarser tokens / logits rel. error {e_rest:.2e}")
    status = PASS
    if not exact:
        # fp32 rounding can flip an FPS or argmax near-tie, which then changes discrete choices;
        # the same comparison in float64 must then be exact
        enc64, dev64 = copy.deepcopy(enc).double(), copy.deepcopy(enc_dev).double()
        oc, fc = _cast_outputs(enc64, x.double(), sp)
        od, fd = _cast_outputs(dev64, x.double().to(device), sp.to(device))
        _, e64, fps64, diff64, _ = _compare_cast(oc, fc, od, fd)
        ok64 = fps64 and diff64 == 0 and e64 <= 1e-9
        detail += (f"; float64 on both: FPS {'equal' if fps64 else 'DIFFERS'}, {diff64} labels differ, "
                   f"rel. error {e64:.2e}")
        status = _status(ok64)
    table.add(f"{name}: FPS centroids, hierarchy labels, cls, coarser levels, logits", status, detail,
              f"FPS and labels equal, tensors <= {tol:g}; else float64 exact (labels equal, <= 1e-9)",
              "FPS and argmax are discrete: fp32 rounding may flip a near-tie, and only then may fp32 differ; "
              "in float64 no such tie is within rounding")


# ------------------------------------------------------------------------------------------------
# the suite's CUDA-only tests
def _skipped_without_cuda(cond: ast.AST) -> bool:
    """Whether a skip condition holds exactly when CUDA is absent: ``not <...cuda...>`` or
    ``<...cuda.device_count()...> == 0`` / ``< 1``."""
    if isinstance(cond, ast.UnaryOp) and isinstance(cond.op, ast.Not):
        return "cuda" in ast.unparse(cond.operand)
    if isinstance(cond, ast.Compare) and len(cond.ops) == 1 and "cuda" in ast.unparse(cond.left):
        right = ast.unparse(cond.comparators[0])
        return (isinstance(cond.ops[0], ast.Eq) and right == "0") or (isinstance(cond.ops[0], ast.Lt) and right == "1")
    return False


def _mentions_cuda_skip(node: ast.AST) -> bool:
    """``pytest.mark.skipif(<skipped without CUDA>, ...)`` (the mark or a list holding it)."""
    for call in ast.walk(node):
        if isinstance(call, ast.Call) and ast.unparse(call.func).endswith("skipif"):
            cond = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "condition"), None)
            if cond is not None and _skipped_without_cuda(cond):
                return True
    return False


def cuda_only_tests(tests_dir: Path = REPO / "tests", root: Path = REPO) -> List[str]:
    """Node ids of the tests skipped without CUDA: test functions (or methods of test classes)
    decorated with a ``skipif`` whose condition mentions CUDA, or in a module whose
    ``pytestmark`` is such a mark. Found by reading the source (no import, no collection)."""
    ids = []
    for f in sorted(tests_dir.rglob("test_*.py")):
        tree = ast.parse(f.read_text(), filename=str(f))
        module_mark = any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
                          and _mentions_cuda_skip(n.value) for n in tree.body)
        rel = f.relative_to(root).as_posix()

        def visit(body, prefix, inherited):
            for n in body:
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test"):
                    if inherited or any(_mentions_cuda_skip(d) for d in n.decorator_list):
                        ids.append(f"{prefix}::{n.name}")
                elif isinstance(n, ast.ClassDef) and n.name.startswith("Test"):
                    marked = inherited or any(_mentions_cuda_skip(d) for d in n.decorator_list)
                    visit(n.body, f"{prefix}::{n.name}", marked)

        visit(tree.body, rel, module_mark)
    return ids


def _pytest_counts(text: str) -> Dict[str, int]:
    counts = {}
    for num, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", text):
        counts[word.rstrip("s") if word.startswith("error") else word] = int(num)
    return counts


def child_env() -> Dict[str, str]:
    """The environment of a child Python: this checkout's packages first on its path."""
    env = dict(os.environ)
    paths = [str(REPO), str(REPO / "projects" / "CAST"), str(REPO / "projects" / "OAP")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class SuiteRun:
    """The suite's CUDA-only tests in a child pytest, started early and collected later (it
    overlaps the other checks)."""

    def __init__(self):
        self.ids = cuda_only_tests()
        self.t0 = time.perf_counter()
        self.proc = None
        if self.ids:
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *self.ids]
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True)

    def finish(self, table: Table, device: torch.device, timeout: float) -> None:
        if not self.ids:
            table.add("the suite's CUDA-only tests", FAIL, "none found in tests/", ">= 1 test",
                      "the scan (skipif mentioning CUDA) found nothing: the scan or the tests changed")
            return
        try:
            out, _ = self.proc.communicate(timeout=max(1.0, timeout))
            rc = self.proc.returncode
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            rc = None
        out = out or ""
        last = out.strip().splitlines()[-1] if out.strip() else ""
        counts = _pytest_counts(last)
        summary = ", ".join(f"{v} {k}" for k, v in counts.items()) or "no summary"
        if rc is None:
            summary += f" (killed after {timeout:.0f} s)"
        label = f"the suite's CUDA-only tests ({', '.join(i.split('::')[-1] for i in self.ids)})"
        measured = f"{summary} in {time.perf_counter() - self.t0:.0f} s (exit {rc})"
        if device.type == "cuda":
            ok = rc == 0 and counts.get("passed", 0) == len(self.ids)
            if not ok:
                tail = [line for line in out.splitlines() if "Error" in line or "assert" in line][-2:]
                measured += ("; " + " / ".join(tail)) if tail else ""
            table.add(label, _status(ok), measured, f"all {len(self.ids)} pass", "they are skipped on every CPU run")
        else:
            ok = rc == 0 and counts.get("skipped", 0) == len(self.ids)
            table.add(label, f"{SKIP} (no CUDA)" if ok else FAIL, measured,
                      f"all {len(self.ids)} skipped without CUDA",
                      "on the CPU the run only checks that they are found and collected")


# ------------------------------------------------------------------------------------------------
# one AMP training step per meta-architecture
def moco_batch(n: int, size: int) -> List[Dict]:
    """Two views per image: the picture and a mirrored, shifted copy (uint8 CHW)."""
    imgs = sample_images(n, size)
    return [{"view1": im, "view2": torch.roll(im.flip(-1), shifts=size // 8, dims=-2).contiguous()} for im in imgs]


def semantic_batch(sizes, num_classes: int, ignore: int) -> List[Dict]:
    """Pictures cropped to each size, with a label map of blocks of classes and an ignored band."""
    side = max(max(h, w) for h, w in sizes)
    imgs = sample_images(len(sizes), side)
    out = []
    for i, (h, w) in enumerate(sizes):
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        labels = ((yy // max(h // 4, 1)) * 3 + xx // max(w // 3, 1) + i) % num_classes
        labels[: max(h // 16, 1)] = ignore
        out.append({"image": imgs[i, :, :h, :w].contiguous(), "sem_seg": labels.long(), "height": h, "width": w})
    return out


def oap_batch(n: int, size: int, crops: int, local: int, seed: int = 0) -> List[Dict]:
    from hiseg_oap.data.synthetic import synthetic_batch

    return synthetic_batch(n, size, crops, local, torch.Generator().manual_seed(seed))


def _one_step(model, optimizer, batch, device, dtype, seed=0) -> Dict:
    from detectron2.utils.events import EventStorage

    scale = 2.0 ** 16 if dtype == torch.float16 else 1.0  # fp16 without a scaler underflows
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with EventStorage(0):
        with autocast(device, dtype):
            losses = model(batch)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        (loss.float() * scale).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with_grad = [(n, p) for n, p in trainable if p.grad is not None]
    for _, p in with_grad:
        p.grad.div_(scale)
    bad = [n for n, p in with_grad if not bool(torch.isfinite(p.grad).all())]
    flat = torch.cat([p.grad.detach().float().flatten() for _, p in with_grad]) if with_grad else torch.zeros(1)
    optimizer.step()
    params_ok = all(bool(torch.isfinite(p).all()) for _, p in trainable)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"loss": float(loss.detach()), "terms": {k: float(v.detach()) for k, v in losses.items()},
            "trainable": len(trainable), "with_grad": len(with_grad), "bad": bad, "flat": flat,
            "params_ok": params_ok, "seconds": time.perf_counter() - t0}


def amp_step(table: Table, label: str, cfg, batch: List[Dict], device: torch.device, dtype: torch.dtype,
             loss_tol: float, why: str) -> None:
    """fp32 step and AMP step from the same weights, optimizer state, batch and seed."""
    from detectron2.modeling import build_model

    from hiseg.engine import build_hiseg_optimizer

    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    optimizer = build_hiseg_optimizer(cfg, model)
    state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(optimizer.state_dict())
    with strict_fp32():
        r32 = _one_step(model, optimizer, batch, device, None)
    model.load_state_dict(state)
    optimizer.load_state_dict(opt_state)
    ramp = _one_step(model, optimizer, batch, device, dtype)
    rel = abs(ramp["loss"] - r32["loss"]) / max(abs(r32["loss"]), 1e-6)
    a, b = ramp["flat"].double(), r32["flat"].double()
    na, nb = a.norm(), b.norm().clamp_min(1e-300)
    cos = float(a @ b / (na * nb).clamp_min(1e-300)) if a.shape == b.shape else float("nan")
    norm_ratio = float(na / nb)
    finite = np.isfinite(ramp["loss"]) and not ramp["bad"] and ramp["with_grad"] > 0 and ramp["params_ok"]
    ok = finite and rel <= loss_tol
    measured = (f"loss fp32 {r32['loss']:.4f}, {precision_name(dtype)} {ramp['loss']:.4f} (rel. {100 * rel:.2f}%); "
                f"{ramp['with_grad']}/{ramp['trainable']} trainable tensors got gradients, "
                f"{'all finite' if not ramp['bad'] else 'NON-FINITE in ' + ramp['bad'][0]}; params finite after the "
                f"step: {'yes' if ramp['params_ok'] else 'NO'}; gradient cosine {cos:.3f}, "
                f"norm ratio {norm_ratio:.3f}; "
                f"step {ramp['seconds']:.2f} s (fp32 {r32['seconds']:.2f} s)")
    table.add(f"{precision_name(dtype)} training step: {label}", _status(ok), measured,
              f"finite loss, gradients and parameters; loss within {100 * loss_tol:g}% of fp32", why)


def check_amp_steps(table: Table, device: torch.device, prof, dtype: torch.dtype,
                    keep_going: Callable[[str], bool]) -> None:
    """One row per meta-architecture; ``keep_going(label)`` may stop the part (time budget)."""
    steps = [
        ("CASTMoCo", lambda: build_cfg(prof.moco_config, prof.moco_opts, device),
         lambda cfg: moco_batch(prof.moco_batch, prof.moco_size), 0.05,
         "bf16 keeps 8 significant bits (rel. 4e-3 per rounding); measured with CPU autocast: CAST-S, batch 8 "
         "at 224: 0.4%; the quick run's 48-d model: 1%"),
        ("CASTSemanticSegmentor", lambda: build_cfg(prof.sem_config, prof.sem_opts, device),
         lambda cfg: semantic_batch(prof.sem_sizes, cfg.MODEL.CAST_SEM_SEG.NUM_CLASSES,
                                    cfg.MODEL.CAST_SEM_SEG.IGNORE_VALUE),
         0.05, "as CASTMoCo (a smooth cross-entropy on the same backbone); measured with CPU autocast: 0.1-0.4%"),
        ("OAPSegmentor", lambda: build_cfg(prof.oap_config, prof.oap_opts, device),
         lambda cfg: oap_batch(prof.oap_batch, prof.oap_size, prof.oap_local_crops, prof.oap_local_size), 0.10,
         "the teacher's keys are bf16 under autocast, so pseudo-masks, Hungarian matching and point sampling "
         "(discrete) may change, not only rounding; measured with CPU autocast (this config, batch 2): 0.13%"),
    ]
    for label, make_cfg, make_batch, tol, why in steps:
        if not keep_going(label):
            table.add(f"{precision_name(dtype)} training step: {label}", f"{SKIP} (time budget)", "-", "-", "-")
            continue
        try:
            cfg = make_cfg()
            amp_step(table, label, cfg, make_batch(cfg), device, dtype, tol, why)
        except Exception as exc:  # noqa: BLE001  (reported as a row; the other models still run)
            table.add(f"{precision_name(dtype)} training step: {label}", ERROR, error_text(exc), "-", "-")
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
