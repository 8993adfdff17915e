"""Where a result came from: the commit it ran at, the machine, and the manifest of a resumable
experiment folder (every figure in the docs names its command, commit, seeds and wall time)."""
import json
import os
import platform
import subprocess
import time
from typing import Optional

from .paths import REPO_ROOT

__all__ = ["git_state", "machine_description", "read_json", "Manifest"]


def git_state(repo_root: Optional[str] = None, count_changes: bool = False) -> dict:
    """``{"commit": <HEAD or "unknown">, "dirty": <tracked files modified>}`` of the checkout;
    with ``count_changes`` also ``"changed_files"``: how many tracked files are modified. A copy of
    the checkout without ``.git`` (or without git) gives ``"unknown"``, not dirty, 0 files."""
    root = str(repo_root or REPO_ROOT)

    def git(*args):
        try:
            return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                                  timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD") or "unknown"
    changed = [line for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line.strip()]
    state = {"commit": commit, "dirty": bool(changed)}
    if count_changes:
        state["changed_files"] = len(changed)
    return state


def machine_description() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    return f"{platform.node() or 'host'}, {os.cpu_count()} logical CPUs, {cpu}, torch {torch.__version__}"


def read_json(path: str):
    """The JSON in ``path``, or ``None`` if there is no such file."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


class Manifest:
    """``manifest.json`` of a resumable experiment folder: the folder's settings and one record
    per invocation (command, commit, whether tracked files were modified, start and end, wall
    time, and whatever the experiment adds), kept across re-runs and written atomically.

    ``data`` is the whole file (``{"invocations": [...], ...}``); :meth:`start` opens the record
    of this invocation, :meth:`finish` times it, appends it and writes the file."""

    def __init__(self, path: str):
        self.path = path
        self.data = read_json(path) or {"invocations": []}
        self._t0 = time.perf_counter()

    def start(self, command: str, repo_root: Optional[str] = None) -> dict:
        self._t0 = time.perf_counter()
        return {"command": command, **git_state(repo_root), "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def finish(self, invocation: dict) -> None:
        invocation.update(wall_s=round(time.perf_counter() - self._t0, 1), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        self.data["invocations"].append(invocation)
        self.write()

    def write(self) -> None:
        from .utils.atomic_io import atomic_write_json

        atomic_write_json(self.path, self.data, indent=1)
