"""Where the project finds data it does not ship, and whether it can write where it is told to.

``HISEG_SHARED_DATA`` points at the folder of real test data (BSDS500, COCO samples, ...). When
unset it defaults to ``../shared/data`` next to the repository, if that folder exists.
"""
import errno
import os
import tempfile
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


def ensure_writable_dir(path: str, what: str = "output folder") -> str:
    """Create the folder ``path`` if needed and check that a file can be written in it (a
    temporary file is created and removed), so that a run fails at its start, not when it
    writes its first result. Raises :class:`~hiseg.errors.OutputError` (one line naming
    ``what`` and the path, exit status 2): read-only, not a folder, no permission, disk full.
    Returns ``path``."""
    from .errors import OutputError

    path = os.fspath(path)
    fix = f"give a writable folder as {what}"
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{what} {path}: exists and is not a folder; {fix}") from None
    except OSError as e:
        raise OutputError(f"{what} {path}: cannot create this folder ({e.strerror}); {fix}") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-write-check-", dir=path)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(f"{what} {path}: no space left on device; free some space or {fix}") from None
        raise OutputError(f"{what} {path}: cannot write in this folder ({e.strerror}); {fix}") from None
    return path
