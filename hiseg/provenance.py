"""Where a result came from: the commit it ran at and the machine, for the experiment drivers'
resumable manifests (every figure in the docs names its command, commit, seeds and wall time)."""
import json
import os
import platform
import subprocess
from typing import Any, Optional

from .paths import REPO_ROOT

__all__ = ["git_state", "machine_description", "read_json"]


def git_state(repo_root: Optional[str] = None) -> dict:
    """``{"commit": <HEAD or "unknown">, "dirty": <tracked files modified>}`` of the checkout."""
    root = str(repo_root or REPO_ROOT)

    def git(*args):
        try:
            return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                                  timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD") or "unknown",
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


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
