"""Timing, budget, report and provenance helpers of the GPU check."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[2]
STAMP_NAME = "STAMP.json"
#: folders whose files make the source fingerprint (what the run executes)
FINGERPRINT_DIRS = ("hiseg", "projects", "tools", "tests", "configs")
FINGERPRINT_SUFFIXES = (".py", ".yaml", ".sh")

PASS, FAIL, ERROR, SKIP, INFO = "pass", "FAIL", "ERROR", "skipped", "info"
MET, MISSED = "met", "missed"


# ------------------------------------------------------------------------------------------------
# wall-clock budget
class Budget:
    """A running clock against a wall-time budget (seconds since the process started)."""

    def __init__(self, seconds: float, start: Optional[float] = None):
        self.total = float(seconds)
        self.start = time.perf_counter() if start is None else start

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.total - self.elapsed()

    def share(self, weight: float, remaining_weights: float, reserve: float = 0.0) -> float:
        """Seconds allotted to a part of weight ``weight`` among parts still to run whose
        weights sum to ``remaining_weights`` (this one included), keeping ``reserve`` back."""
        return max(0.0, self.left() - reserve) * weight / max(remaining_weights, 1e-9)

    @staticmethod
    def reps(per_rep_s: float, allot_s: float, lo: int, hi: int) -> int:
        """How many repetitions of ``per_rep_s`` seconds fit in ``allot_s``, within [lo, hi]."""
        n = int(allot_s / max(per_rep_s, 1e-6))
        return max(lo, min(hi, n))


# ------------------------------------------------------------------------------------------------
# device timing
class Timer:
    """Seconds of ``fn()`` on ``device``: CUDA events around the call (the queued work is
    waited for), or the host clock on the CPU. Peak memory is CUDA's ``max_memory_allocated``
    over the call (weights and inputs already on the device included), ``None`` on the CPU."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable, track_memory: bool = True):
        """``(seconds, peak_bytes_or_None, result)`` of one call."""
        if not self.cuda:
            t0 = time.perf_counter()
            out = fn()
            return time.perf_counter() - t0, None, out
        self.sync()
        if track_memory:
            torch.cuda.reset_peak_memory_stats(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device) if track_memory else None
        return start.elapsed_time(end) / 1e3, peak, out


@dataclass
class Measured:
    name: str
    times: List[float] = field(default_factory=list)
    peaks: List[int] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    @property
    def spread(self) -> float:
        """(max - min) / median of the timed calls: how noisy the median is."""
        if len(self.times) < 2:
            return 0.0
        return (max(self.times) - min(self.times)) / max(self.median, 1e-12)

    @property
    def peak(self) -> Optional[int]:
        return max(self.peaks) if self.peaks else None


def alternate(timer: Timer, fns: Dict[str, Callable], reps: int, warmup: int = 1) -> Dict[str, Measured]:
    """Time each function ``reps`` times after ``warmup`` untimed rounds; within a round the
    functions run one after the other, so that a change of clocks or load hits all alike (the
    ratios of their medians are then fair). Runs under ``torch.no_grad``."""
    out = {name: Measured(name) for name in fns}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        timer.sync()
        for _ in range(reps):
            for name, fn in fns.items():
                sec, peak, _ = timer.time(fn)
                out[name].times.append(sec)
                if peak is not None:
                    out[name].peaks.append(peak)
    return out


# ------------------------------------------------------------------------------------------------
# precision
def amp_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device supports it (CPU autocast, Ampere and later), else fp16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` on ``device`` with ``dtype``; a no-op context for ``None`` (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(model, optimizer, batch, device: torch.device, dtype: Optional[torch.dtype], scaler=None):
    """One training step: forward under ``autocast(device, dtype)``, the summed losses, backward
    (through ``scaler``, a ``torch.amp.GradScaler``, for fp16) and the optimizer step. Returns the
    loss."""
    with autocast(device, dtype):
        losses = model(batch)
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss


def precision_name(dtype: Optional[torch.dtype]) -> str:
    if dtype is None:
        return "fp32"
    return "AMP " + {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype).replace("torch.", ""))


@contextlib.contextmanager
def strict_fp32():
    """TF32 off for matrix products and cuDNN convolutions (a true fp32 comparison); restored."""
    mm, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = mm
        torch.backends.cudnn.allow_tf32 = cudnn


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 on the CPU (inf when shapes differ or values are not finite)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        return float("inf")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ------------------------------------------------------------------------------------------------
# formatting
def ms(seconds: Optional[float], digits: int = 2) -> str:
    if seconds is None or seconds != seconds:
        return "-"
    return f"{1e3 * seconds:.{digits}f}"


def mib(nbytes: Optional[int]) -> str:
    return "-" if nbytes is None else f"{nbytes / 2 ** 20:.0f} MiB"


def pct(x: Optional[float]) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}%"


def goal_status(value: Optional[float], goal: float, at_most: bool = True) -> str:
    if value is None or value != value:
        return SKIP
    ok = value <= goal if at_most else value >= goal
    return MET if ok else MISSED


# ------------------------------------------------------------------------------------------------
# report
@dataclass
class Table:
    title: str
    columns: Sequence[str]
    intro: str = ""
    rows: List[List[str]] = field(default_factory=list)
    kind: str = "speed"  # "correctness" rows carry a pass/FAIL status in column "status"

    def add(self, *cells) -> List[str]:
        if len(cells) != len(self.columns):
            raise ValueError(f"table {self.title!r}: {len(cells)} cells for {len(self.columns)} columns")
        row = [str(c).replace("|", "/").replace("\n", " ") for c in cells]
        self.rows.append(row)
        return row

    def markdown(self) -> str:
        out = [f"## {self.title}", ""]
        if self.intro:
            out += [self.intro, ""]
        out.append("| " + " | ".join(self.columns) + " |")
        out.append("|" + "---|" * len(self.columns))
        out += ["| " + " | ".join(r) + " |" for r in self.rows]
        if not self.rows:
            out.append("| " + " | ".join(["(not reached)"] + ["-"] * (len(self.columns) - 1)) + " |")
        return "\n".join(out)

    def statuses(self) -> List[str]:
        if "status" not in self.columns:
            return []
        i = list(self.columns).index("status")
        return [r[i] for r in self.rows]


class Report:
    """Markdown report written after every table, so a run stopped at its limit leaves what it
    had measured."""

    def __init__(self, path: Path, title: str):
        self.path = Path(path)
        self.title = title
        self.header: List[str] = []
        self.tables: List[Table] = []
        self.notes: List[str] = []
        self.footer: List[str] = []

    def table(self, title: str, columns: Sequence[str], intro: str = "", kind: str = "speed") -> Table:
        t = Table(title, list(columns), intro, kind=kind)
        self.tables.append(t)
        return t

    def failures(self) -> List[str]:
        """Rows with a FAIL status (correctness tables) or an ERROR in any cell (any table: a
        crash in a speed part is a broken device path too). Missed goals are not failures."""
        bad = []
        for t in self.tables:
            statuses = t.statuses() or [""] * len(t.rows)
            for r, s in zip(t.rows, statuses):
                errors = [c for c in r if c.startswith(ERROR)]
                if s.startswith(FAIL) or errors:
                    bad.append(f"{t.title}: {r[0]} ({s if s.startswith(FAIL) else errors[0]})")
        return bad

    def render(self) -> str:
        parts = [f"# {self.title}", "", *self.header, ""]
        parts += [t.markdown() + "\n" for t in self.tables]
        if self.notes:
            parts += ["## Notes", "", *[f"* {n}" for n in self.notes], ""]
        parts += self.footer
        return "\n".join(parts).rstrip() + "\n"

    def write(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".part")
        tmp.write_text(self.render())
        os.replace(tmp, self.path)


def error_text(exc: BaseException, limit: int = 160) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ------------------------------------------------------------------------------------------------
# provenance
def source_fingerprint(root: Path = REPO) -> str:
    """sha256 (16 hex digits) over the source files the run executes (``FINGERPRINT_DIRS``,
    ``FINGERPRINT_SUFFIXES``), by relative path and content: the same number for a copy of the
    same tree on another machine."""
    h = hashlib.sha256()
    for d in FINGERPRINT_DIRS:
        base = root / d
        if not base.is_dir():
            continue
        for f in sorted(base.rglob("*")):
            if f.suffix in FINGERPRINT_SUFFIXES and f.is_file() and "__pycache__" not in f.parts:
                h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def git_state(root: Path = REPO) -> Optional[Dict[str, str]]:
    """Commit and number of changed files, or None where there is no git checkout (the device
    machine gets the working tree without ``.git``)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10)
        changed = [line for line in status.stdout.splitlines() if line.strip()]
        return {"commit": commit.stdout.strip(), "changed_files": str(len(changed))}
    except (OSError, subprocess.SubprocessError):
        return None


def write_stamp(path: Path, root: Path = REPO) -> Dict[str, str]:
    """Record the commit and the source fingerprint next to the wheels of ``tools/gpu_wheels.sh``
    (a run from a copy of the checkout without ``.git`` reads it back)."""
    state = git_state(root) or {"commit": "unknown", "changed_files": "?"}
    stamp = dict(state, fingerprint=source_fingerprint(root), written=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamp, indent=1) + "\n")
    return stamp


def provenance(stamp_path: Optional[Path], root: Path = REPO) -> str:
    """One line: the commit (from git, else from the stamp) and whether the tree matches it."""
    fp = source_fingerprint(root)
    state = git_state(root)
    if state is not None:
        dirty = "" if state["changed_files"] == "0" else f", {state['changed_files']} tracked files changed"
        return f"commit `{state['commit']}` (git{dirty}); source fingerprint `{fp}`"
    if stamp_path is not None and Path(stamp_path).is_file():
        s = json.loads(Path(stamp_path).read_text())
        same = "matches" if s.get("fingerprint") == fp else f"DIFFERS from the stamp's `{s.get('fingerprint')}`"
        dirty = "" if s.get("changed_files") == "0" else f", {s.get('changed_files')} tracked files changed"
        return (f"commit `{s.get('commit')}` (from {Path(stamp_path).name}, written {s.get('written')}{dirty}); "
                f"source fingerprint `{fp}` {same}")
    return f"commit unknown (no git, no stamp); source fingerprint `{fp}`"


def environment_lines(device: torch.device) -> List[str]:
    lines = [f"* Python {platform.python_version()} ({sys.executable}), {platform.machine()}, "
             f"{os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads"]
    cuda = torch.version.cuda or "none"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    lines.append(f"* torch {torch.__version__}, CUDA {cuda}, cuDNN {cudnn or 'none'}")
    if device.type == "cuda":
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,temperature.gpu",
                                     "--format=csv,noheader"], capture_output=True, text=True, timeout=15).stdout
            lines.append(f"* nvidia-smi: driver, SM clock, max SM clock, temperature = {driver.strip() or '?'}")
        except (OSError, subprocess.SubprocessError):
            lines.append("* nvidia-smi: not available")
        p = torch.cuda.get_device_properties(device)
        lines.append(f"* device: {p.name}, compute capability {p.major}.{p.minor}, "
                     f"{p.total_memory / 2 ** 30:.0f} GiB, {p.multi_processor_count} SMs; "
                     f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, TF32 cuDNN "
                     f"{torch.backends.cudnn.allow_tf32} (torch defaults; the correctness rows turn both off)")
    else:
        lines.append(f"* device: CPU ({platform.processor() or platform.machine()})")
    try:
        import detectron2

        lines.append(f"* detectron2 {detectron2.__version__} ({Path(detectron2.__file__).parent})")
    except Exception as exc:  # noqa: BLE001
        lines.append(f"* detectron2: not importable ({error_text(exc)})")
    return lines
