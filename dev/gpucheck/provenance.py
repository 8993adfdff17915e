"""Where a GPU check's report came from: the commit (from git, else from the stamp that
``dev/gpu_wheels.sh`` writes beside its wheels, for a copy of the checkout without ``.git``), a
fingerprint of the source files the run executes, and the machine's software and device."""
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from hiseg.provenance import git_state

from . import REPO
from .report import error_text

__all__ = ["STAMP_NAME", "FINGERPRINT_DIRS", "FINGERPRINT_SUFFIXES", "source_fingerprint", "write_stamp",
           "provenance", "environment_lines"]

STAMP_NAME = "STAMP.json"
#: folders whose files make the source fingerprint (what the run executes)
FINGERPRINT_DIRS = ("hiseg", "projects", "tools", "dev", "tests", "configs")
FINGERPRINT_SUFFIXES = (".py", ".yaml", ".sh")


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


def _git(root: Path) -> Optional[Dict[str, str]]:
    """The commit and the number of changed tracked files (strings, as the stamp stores them) from
    :func:`hiseg.provenance.git_state`, or None where there is no git checkout (the device machine
    gets the working tree without ``.git``)."""
    state = git_state(root, count_changes=True)
    if state["commit"] == "unknown":
        return None
    return {"commit": state["commit"], "changed_files": str(state["changed_files"])}


def write_stamp(path: Path, root: Path = REPO) -> Dict[str, str]:
    """Record the commit and the source fingerprint next to the wheels of ``dev/gpu_wheels.sh``
    (a run from a copy of the checkout without ``.git`` reads it back)."""
    state = _git(root) or {"commit": "unknown", "changed_files": "?"}
    stamp = dict(state, fingerprint=source_fingerprint(root), written=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamp, indent=1) + "\n")
    return stamp


def provenance(stamp_path: Optional[Path], root: Path = REPO) -> str:
    """One line: the commit (from git, else from the stamp) and whether the tree matches it."""
    fp = source_fingerprint(root)
    state = _git(root)
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
