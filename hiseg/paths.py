"""Where the project finds data it does not ship.

``HISEG_SHARED_DATA`` points at the folder of real test data (BSDS500, COCO samples, ...). When
unset it defaults to ``../shared/data`` next to the repository, if that folder exists.
"""
import os
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA_ENV = "HISEG_SHARED_DATA"


def shared_data_dir() -> Optional[Path]:
    """The real-data folder, or ``None`` if it is not available on this machine."""
    env = os.environ.get(SHARED_DATA_ENV)
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None


def repo_relative(path: str) -> str:
    """``path`` itself if it exists (or is absolute), else the same path under the repository, so
    that ``configs/...`` names work from any working directory."""
    path = str(path)
    if os.path.isabs(path) or os.path.exists(path):
        return path
    in_repo = REPO_ROOT / path
    return str(in_repo) if in_repo.exists() else path


def datasets_root() -> Path:
    """Detectron2's dataset root (``$DETECTRON2_DATASETS``, default ``./datasets``)."""
    return Path(os.environ.get("DETECTRON2_DATASETS", "datasets"))
