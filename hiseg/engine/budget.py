"""Training with the detectron2 trainer until a wall-clock budget is spent, resumably.

:func:`train_for_budget` trains one config in one run folder with :class:`BudgetTrainer` (the
project's :class:`~hiseg.engine.HisegTrainer`: its model, optimizer, data loader, atomic
checkpointer and ``run_step``; a subclass passed as ``trainer_cls`` may change how the model is
built), and replaces the iteration schedule by one on the budget:

* **what is timed**: each training step from before its data is loaded to after the optimizer
  step (data loading and augmentation, CAST's superpixels included, forward, backward, update);
  checkpoint writing, logging and evaluation are not. Training stops after the step at which the
  time spent reaches the budget.
* **schedule**: with ``f`` = time spent / budget at the start of a step, the learning rate is
  MoCo-v3's (``adjust_learning_rate``: linear warm-up over the first ``warmup_fraction``, then
  half-cosine to 0) and the MoCo momentum follows MoCo-v3's cosine 0.99 -> 1 over ``f`` too
  (``CASTMoCo`` computes it from ``iter / max_iter``; the hook sets ``max_iter`` so that this
  ratio is ``f``). Two models with the same budget thus both get a complete schedule, whatever
  their speed.
* **points**: at fixed fractions of the budget (e.g. 1/8, 1/4, 1/2, 3/4, 1) the model's weights
  are written to ``point_<k>.pth`` (atomically) with the iteration and the time spent.
* **resume**: a full checkpoint (model, optimizer, the hook's time spent and points) is saved as
  ``last.pth`` every ``save_every_s`` of training time and at the end; re-running resumes from
  it, and the budget counts the time already spent (the steps after the last save are lost and
  not counted). ``steps.csv`` (iteration, time spent, loss, LR, momentum, data time, step time)
  is cut back to the resumed iteration. ``run.json`` says ``"status": "done"`` when the budget
  is spent; a finished run is never trained again.
* **pause**: ``pause_after_steps`` / ``pause_after_s`` end this call early with a resume
  checkpoint, to split a long experiment across several runs (and for the tests).

A resumed run re-seeds its RNGs with ``(seed, next iteration)``, so a resumed run does not
replay the data order of its start; it is not bit-identical to an uninterrupted one.
"""
import csv
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence, Type

import torch
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage

from hiseg.checkpoint.io import read_checkpoint
from hiseg.engine import HisegTrainer
from hiseg.engine.atomic_checkpointer import read_last_checkpoint
from hiseg.utils.atomic_io import atomic_write

__all__ = ["BudgetSpec", "CallLimits", "WallClockBudget", "BudgetTrainer", "train_for_budget",
           "moco_v3_lr_factor", "read_steps", "read_run", "STEP_FIELDS", "LAST", "RUN_JSON", "STEPS_CSV",
           "point_path"]

logger = logging.getLogger(__name__)

# iter: steps done after this one (1-based); elapsed_s: training time spent after it
STEP_FIELDS = ("iter", "elapsed_s", "loss", "lr", "momentum", "data_time_s", "step_time_s")
LAST = "last"
RUN_JSON = "run.json"
STEPS_CSV = "steps.csv"


def point_path(run_dir: str, k: int) -> str:
    return os.path.join(run_dir, f"point_{k}.pth")


def moco_v3_lr_factor(fraction: float, warmup_fraction: float) -> float:
    """MoCo-v3's ``adjust_learning_rate`` on the progress ``fraction`` in [0, 1): linear warm-up
    over ``warmup_fraction``, then half-cosine from 1 to 0."""
    if warmup_fraction > 0 and fraction < warmup_fraction:
        return fraction / warmup_fraction
    rest = max(1.0 - warmup_fraction, 1e-12)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (fraction - warmup_fraction) / rest)))


@dataclass
class BudgetSpec:
    """What a budgeted run is: changing any of these for an existing run folder is an error."""

    budget_s: float
    fractions: Sequence[float] = (0.125, 0.25, 0.5, 0.75, 1.0)
    warmup_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self):
        self.fractions = [float(f) for f in self.fractions]
        if self.budget_s <= 0:
            raise ValueError(f"budget must be positive, got {self.budget_s} s")
        if sorted(self.fractions) != self.fractions or len(set(self.fractions)) != len(self.fractions) \
                or not self.fractions or self.fractions[0] <= 0 or self.fractions[-1] != 1.0:
            raise ValueError(f"fractions must increase strictly in (0, 1] and end with 1, got {self.fractions}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")


@dataclass
class CallLimits:
    """How this call runs (not part of the run's identity)."""

    save_every_s: float = 120.0
    print_every_s: float = 30.0
    pause_after_steps: Optional[int] = None
    pause_after_s: Optional[float] = None
    label: str = ""
    print_fn: Callable[[str], None] = print
    # stop (resumably) when the process that started this one is gone: a run spawned side by
    # side must not go on training unseen after its parent was killed
    parent_pid: Optional[int] = None


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


class WallClockBudget(HookBase):
    """The budget, the schedule on it, the points, the per-step log and the resume checkpoints
    (see the module docstring). Its state (time spent, points done) travels in the trainer's
    checkpoint (``TrainerBase.state_dict``'s ``hooks``)."""

    def __init__(self, spec: BudgetSpec, limits: CallLimits, run_dir: str):
        self.spec = spec
        self.limits = limits
        self.run_dir = run_dir
        self.elapsed_s = 0.0
        self.points_done: List[dict] = []
        self.base_lrs: Optional[List[float]] = None
        self._steps_this_call = 0
        self._call_t0 = time.perf_counter()
        self._since_save = 0.0
        self._since_print = math.inf
        self._csv = None
        self._writer = None

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self):
        return {"elapsed_s": float(self.elapsed_s), "points_done": [dict(p) for p in self.points_done]}

    def load_state_dict(self, state):
        self.elapsed_s = float(state["elapsed_s"])
        self.points_done = [dict(p) for p in state["points_done"]]

    @property
    def fraction(self) -> float:
        return self.elapsed_s / self.spec.budget_s

    @property
    def spent(self) -> bool:
        return self.elapsed_s >= self.spec.budget_s

    @property
    def paused(self) -> bool:
        lim = self.limits
        if lim.pause_after_steps is not None and self._steps_this_call >= lim.pause_after_steps:
            return True
        if lim.parent_pid is not None and os.getppid() != lim.parent_pid:
            return True
        return lim.pause_after_s is not None and time.perf_counter() - self._call_t0 >= lim.pause_after_s

    # -- hook ----------------------------------------------------------------------------------
    def before_train(self):
        path = os.path.join(self.run_dir, STEPS_CSV)
        keep = [r for r in read_steps(path) if r["iter"] <= self.trainer.start_iter]
        with atomic_write(path, "w") as f:
            w = csv.writer(f)
            w.writerow(STEP_FIELDS)
            for r in keep:
                w.writerow([r[k] for k in STEP_FIELDS])
        self._csv = open(path, "a", newline="")
        self._writer = csv.writer(self._csv)
        self._call_t0 = time.perf_counter()

    def after_train(self):
        if self._csv is not None:
            self._csv.close()
            self._csv = None

    def before_step(self):
        f = min(self.fraction, 1.0)
        factor = moco_v3_lr_factor(f, self.spec.warmup_fraction)
        for g, base in zip(self.trainer.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * factor
        it = self.trainer.iter
        model = _unwrap(self.trainer.model)
        if hasattr(model, "max_iter"):  # CASTMoCo: momentum = cosine of iter / max_iter
            model.max_iter = it / f if (it > 0 and f > 0) else 1
        self._lr = self.trainer.optimizer.param_groups[0]["lr"]
        self._t0 = time.perf_counter()

    def after_step(self):
        dt = time.perf_counter() - self._t0
        self.elapsed_s += dt
        self._since_save += dt
        self._steps_this_call += 1
        st = self.trainer.storage
        it = self.trainer.iter
        loss = st.history("total_loss").latest()
        mom = st.history("moco_momentum").latest() if "moco_momentum" in st.histories() else float("nan")
        data_t = st.history("data_time").latest() if "data_time" in st.histories() else float("nan")
        self._writer.writerow([it + 1, f"{self.elapsed_s:.3f}", f"{loss:.6f}", f"{self._lr:.6g}", f"{mom:.6f}",
                               f"{data_t:.4f}", f"{dt:.4f}"])
        self._csv.flush()
        self._since_print += dt
        if self._since_print >= self.limits.print_every_s or self.spent:
            self._since_print = 0.0
            b = self.spec.budget_s
            self.limits.print_fn(f"[{self.limits.label}] iter {it + 1}  loss {loss:.4f}  lr {self._lr:.2e}  "
                                 f"m {mom:.4f}  {self.elapsed_s:.0f}/{b:.0f} s ({100 * self.fraction:.0f}%)  "
                                 f"{dt:.2f} s/step")
        done_k = {p["k"] for p in self.points_done}
        for k, frac in enumerate(self.spec.fractions, start=1):
            if k not in done_k and self.elapsed_s >= frac * self.spec.budget_s:
                self._save_point(k, frac)
        if self.spent or self.paused or self._since_save >= self.limits.save_every_s:
            self.trainer.checkpointer.save(LAST)
            self._since_save = 0.0

    def _save_point(self, k: int, frac: float):
        model = _unwrap(self.trainer.model)
        rec = {"k": k, "fraction": frac, "iteration": self.trainer.iter + 1,
               "elapsed_s": round(self.elapsed_s, 3), "file": os.path.basename(point_path(self.run_dir, k))}
        data = {"model": model.state_dict(), "iteration": rec["iteration"], "elapsed_s": rec["elapsed_s"],
                "fraction": frac}
        with atomic_write(point_path(self.run_dir, k), "wb") as f:
            torch.save(data, f)
        self.points_done.append(rec)
        self.limits.print_fn(f"[{self.limits.label}] point {k}/{len(self.spec.fractions)} "
                             f"({100 * frac:g}% of the budget) at iteration {rec['iteration']}")


class BudgetTrainer(HisegTrainer):
    """HisegTrainer whose only hook is a :class:`WallClockBudget` and whose loop ends when the
    budget is spent (or the call pauses), not at ``SOLVER.MAX_ITER``."""

    def __init__(self, cfg, budget_hook: WallClockBudget):
        self._budget_hook = budget_hook
        super().__init__(cfg)
        # the per-group LRs the schedule scales (set by the LR scheduler's construction)
        budget_hook.base_lrs = [g.get("initial_lr", g["lr"]) for g in self.optimizer.param_groups]

    def build_hooks(self):
        return [self._budget_hook]

    def train(self):
        hook = self._budget_hook
        self.iter = self.start_iter
        self.max_iter = self.cfg.SOLVER.MAX_ITER  # nominal; the loop ends on the budget
        with EventStorage(self.start_iter) as self.storage:
            self.before_train()
            try:
                while not hook.spent and not hook.paused:
                    self.before_step()
                    self.run_step()
                    self.after_step()
                    self.iter += 1
            finally:
                self.after_train()
        return hook


def read_steps(path: str) -> List[dict]:
    """The rows of a ``steps.csv`` (numbers parsed); [] when the file is absent."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            try:
                rows.append({k: (int(r[k]) if k == "iter" else float(r[k])) for k in STEP_FIELDS})
            except (KeyError, TypeError, ValueError):  # a line cut by a kill
                continue
    return rows


def read_run(run_dir: str) -> Optional[dict]:
    path = os.path.join(run_dir, RUN_JSON)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_run(run_dir: str, info: dict):
    with atomic_write(os.path.join(run_dir, RUN_JSON), "w") as f:
        json.dump(info, f, indent=1)


def _resume_iteration(run_dir: str) -> int:
    """The next iteration of the run's resume checkpoint (0 without one)."""
    name = read_last_checkpoint(run_dir)
    if name is None:
        return 0
    ckpt = read_checkpoint(os.path.join(run_dir, name))
    return int(ckpt["trainer"]["iteration"]) + 1


def train_for_budget(cfg, run_dir: str, spec: BudgetSpec, limits: CallLimits, run_info: Optional[dict] = None,
                     session_info: Optional[dict] = None, ready: Optional[Callable[[], None]] = None,
                     trainer_cls: Type[BudgetTrainer] = BudgetTrainer) -> dict:
    """Train ``cfg`` in ``run_dir`` until ``spec.budget_s`` of training time is spent (see the
    module docstring); returns the run record (also in ``run.json``): ``spec``, ``status``
    (``done`` / ``paused``), ``iterations``, ``elapsed_s``, ``points`` and one ``sessions``
    entry per call (iterations, time spent, wall time, threads, plus ``session_info``), with
    ``run_info`` merged in. A finished run is only read back. ``ready`` is called once the
    trainer is built and resumed, right before the first step (runs that train side by side wait
    for each other there). ``trainer_cls`` is :class:`BudgetTrainer` or a subclass of it."""
    os.makedirs(run_dir, exist_ok=True)
    info = read_run(run_dir)
    spec_d = asdict(spec)
    if info is not None and info["spec"] != spec_d:
        raise ValueError(f"{run_dir} holds a run of another spec ({info['spec']}, asked {spec_d}); "
                         f"use another output folder")
    if info is not None and info.get("status") == "done":
        limits.print_fn(f"[{limits.label}] already done: {info['iterations']} iterations in "
                        f"{info['elapsed_s']:.0f} s; skipped")
        return info
    if info is None:
        info = {"spec": spec_d, "status": "new", "sessions": []}
    start = _resume_iteration(run_dir)
    if info["status"] == "running":  # the last call was killed: what it did after `start` is lost
        info["sessions"].append({"interrupted": True, "resumed_at_iter": start,
                                 "noticed": time.strftime("%Y-%m-%d %H:%M:%S")})
    info.update(run_info or {})
    info["status"] = "running"
    _write_run(run_dir, info)  # the spec is on disk before the first checkpoint
    seed_all_rng(spec.seed if start == 0 else spec.seed * 1_000_003 + start)
    cfg = cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = run_dir
    cfg.SEED = spec.seed
    cfg.freeze()
    with atomic_write(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    hook = WallClockBudget(spec, limits, run_dir)
    trainer = trainer_cls(cfg, hook)
    trainer.resume_or_load(resume=True)
    if trainer.start_iter != start:
        raise RuntimeError(f"{run_dir}: resume checkpoint says iteration {start}, trainer {trainer.start_iter}")
    session = {"start_iter": start, "start_elapsed_s": round(hook.elapsed_s, 3), "threads": torch.get_num_threads(),
               "started": time.strftime("%Y-%m-%d %H:%M:%S"), **(session_info or {})}
    limits.print_fn(f"[{limits.label}] {'resuming at iteration ' + str(start) if start else 'starting'}; "
                    f"{hook.elapsed_s:.0f}/{spec.budget_s:.0f} s spent")
    if ready is not None:
        ready()
    t0 = time.perf_counter()
    trainer.train()
    session.update(end_iter=trainer.iter, end_elapsed_s=round(hook.elapsed_s, 3),
                   wall_s=round(time.perf_counter() - t0, 1), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    info["sessions"].append(session)
    info.update(iterations=trainer.iter, elapsed_s=round(hook.elapsed_s, 3), points=hook.points_done,
                status="done" if hook.spent else "paused")
    _write_run(run_dir, info)
    limits.print_fn(f"[{limits.label}] {info['status']}: {trainer.iter} iterations, "
                    f"{hook.elapsed_s:.0f}/{spec.budget_s:.0f} s of the budget")
    return info
