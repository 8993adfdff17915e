"""Writing files so that a reader never sees a half-written one: the one atomic write of hiseg.

Checkpoints, ``last_checkpoint``, prepared datasets, evaluation dumps and experiment records are
all written the same way: to a temporary file in the destination folder, flushed to disk
(``fsync``; not the prepare scripts' label-map PNGs), then moved into place with ``os.replace``
(atomic on POSIX). A run killed while writing leaves the previous file (or none) and at most a
temporary file beside it, named ``.tmp-<name>-`` followed by the 8 random characters of
``[a-z0-9_]`` that ``tempfile.mkstemp`` adds (:func:`temp_file_pattern` recognises these names,
for whoever cleans them up); a block that raises removes its temporary file. The result gets the
mode of any other new file (``0o666`` less the umask), not the 0600 of ``mkstemp``.
"""
import contextlib
import json
import os
import re
import tempfile

import numpy as np

__all__ = ["TEMP_PREFIX", "atomic_write", "atomic_write_json", "atomic_save_png", "temp_file_pattern"]

#: how the temporary file of :func:`atomic_write` starts: ``.tmp-<target base name>-``
TEMP_PREFIX = ".tmp-"


def _new_file_mode() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def temp_file_pattern(basename_regex: str) -> "re.Pattern":
    """The names of the temporary files :func:`atomic_write` makes for targets whose base name
    matches ``basename_regex`` (e.g. ``r"model_.*\\.pth"``)."""
    return re.compile(rf"^{re.escape(TEMP_PREFIX)}({basename_regex})-[a-z0-9_]{{8}}$")


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", fsync: bool = True):
    """Open a temporary file next to ``path`` (folders are created) in ``mode`` (``"wb"`` or
    ``"w"``); it replaces ``path`` only if the block succeeds (see the module docstring).
    ``fsync=False`` skips the flush to disk, for files written by the thousand that a rerun
    re-creates (the label maps of the prepare scripts): readers still never see a partial file,
    only a power loss may."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX + os.path.basename(path) + "-", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            os.fchmod(f.fileno(), _new_file_mode())
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj, indent=None) -> None:
    """``json.dump(obj)`` to ``path`` through :func:`atomic_write`."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=indent)


def atomic_save_png(path, array) -> None:
    """Save a 2-D uint8 label map as an 8-bit grayscale PNG (mode ``L``) through :func:`atomic_write`
    without ``fsync`` (the prepare scripts write them by the thousand; see there)."""
    from PIL import Image

    array = np.asarray(array)
    if array.ndim != 2 or array.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 label map, got {array.dtype} {array.shape}")
    image = Image.fromarray(array)  # 2-D uint8 -> mode "L"
    with atomic_write(path, "wb", fsync=False) as f:
        image.save(f, format="PNG")
