"""Dataset checks that turn detectron2's bare errors into one-line answers.

* :func:`check_datasets` (before anything is built): a name that is not registered gets the
  nearest registered names; a detectron2 built-in whose folder or JSON is absent gets the expected
  path, the README section and the prepare script. Datasets registered by :mod:`hiseg.data`
  check their own files when loaded (:func:`hiseg.data.datasets.common.missing`).
* :func:`dataset_errors` (around building a data loader): detectron2's
  ``AssertionError("Dataset 'x' is empty!")`` / ``"No valid data found in x."`` becomes an
  :class:`~hiseg.errors.EmptyDatasetError` naming the dataset's files.
* :func:`require_input` / :func:`require_files` for ``datasets/prepare_*.py``: a missing
  download folder / an empty one, with the expected layout and what to download;
  :func:`read_json` and :func:`reading` for their input files (invalid JSON, a truncated
  ``.mat``), raising :class:`~hiseg.errors.InputError` naming the file.
"""
import contextlib
import difflib
import json
import os
import re
import struct
import zlib
from typing import Iterable, List, Sequence

from hiseg.errors import ConfigError, DatasetNotFoundError, EmptyDatasetError, InputError

__all__ = ["check_datasets", "dataset_errors", "require_input", "require_files", "read_json", "reading"]

# metadata fields of detectron2's built-in datasets that name files or folders
_PATH_FIELDS = ("json_file", "image_root", "sem_seg_root", "panoptic_root", "panoptic_json", "gt_dir",
                "image_dir", "dirname")
# built-ins whose files one of our scripts writes (the others are downloads, datasets/README.md)
_SCRIPTS = (("ade20k_sem_seg", "prepare_ade20k_sem_seg.py"),
            ("cityscapes_fine_panoptic", "prepare_cityscapes_panoptic.py"))


def _datasets_root() -> str:
    return os.environ.get("DETECTRON2_DATASETS", "datasets")


def _how(name: str) -> str:
    for prefix, script in _SCRIPTS:
        if name.startswith(prefix):
            return f"run `python datasets/{script}` (datasets/README.md shows the expected layout)"
    return "download it as datasets/README.md describes (expected layout there)"


def _path_problem(path: str, kind: str) -> str:
    """What is wrong with ``path`` for a dataset ("" when nothing): absent, not readable, empty
    (a 0-byte file; a folder with no entry), or a file where a folder is wanted and vice versa.
    ``kind``: ``"file"``, ``"dir"``, ``"any"`` or ``"images"`` (a folder with an image file in
    it or in a sub-folder; the walk stops at the first one)."""
    if not os.path.exists(path):
        return "does not exist"
    if os.path.isdir(path):
        if kind == "file":
            return "is a folder, not a file"
        if not os.access(path, os.R_OK | os.X_OK):
            return "is not readable (permissions)"
        with os.scandir(path) as it:
            if next(it, None) is None:
                return "is an empty folder"
        if kind == "images":
            from hiseg.data.datasets.user_data import IMAGE_EXTS

            for _, _, files in os.walk(path, followlinks=True):
                if any(f.lower().endswith(IMAGE_EXTS) for f in files):
                    return ""
            return f"holds no image file ({', '.join(IMAGE_EXTS)}), in sub-folders neither"
        return ""
    if kind in ("dir", "images"):
        return "is a file, not a folder"
    if not os.access(path, os.R_OK):
        return "is not readable (permissions)"
    if os.path.getsize(path) == 0:
        return "is an empty file (0 bytes)"
    return ""


def _required(name: str):
    """``(path, kind, what)`` a dataset needs: for a name of ``hiseg.data.datasets.user_data``'s
    forms its files, else the path fields of its metadata (``json_file``, ``image_root``, ...)."""
    from detectron2.data import MetadataCatalog

    from hiseg.data.datasets.user_data import parse_user_dataset, required_paths

    if parse_user_dataset(name) is not None:
        return required_paths(name)
    meta = MetadataCatalog.get(name)
    out = []
    for field in _PATH_FIELDS:
        path = meta.get(field, None)
        if isinstance(path, str) and path:
            out.append((path, "any", field))
    return out


def check_datasets(names: Iterable[str], where: str = "DATASETS") -> None:
    """Raise a one-line error for the first dataset of ``names`` that is not registered, or whose
    files (annotation files, image folders) are absent, unreadable or empty, so that a run stops
    before its first step rather than when it reaches the dataset (a test set: after training).

    Names of the forms ``folder:<dir>``, ``coco:<json>[:<image_root>]`` and
    ``cls_agnostic:<json>[:<image_root>]`` are registered on the way
    (:mod:`hiseg.data.datasets.user_data`). Nothing is loaded, except that a dataset of
    :mod:`hiseg.data` whose files look wrong is loaded once so that its loader's own message (with
    the prepare script to run) is the one reported; if it loads after all, it passes."""
    import hiseg.data  # noqa: F401  (registers the project's datasets)
    from detectron2.data import DatasetCatalog

    from hiseg.data.datasets.common import registered_names
    from hiseg.data.datasets.user_data import parse_user_dataset, register_user_datasets

    names = list(names)
    register_user_datasets(names)
    known = DatasetCatalog.list()
    ours = set(registered_names())
    for name in names:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = (f"nearest registered names: {', '.join(near)}" if near
                    else "datasets/README.md lists the registered names; for your own files use "
                         "folder:<dir>, coco:<json>[:<image_root>] or cls_agnostic:<json>[:<image_root>]")
            raise ConfigError(f"{where}: dataset '{name}' is not registered; {hint}")
        for path, kind, what in _required(name):
            problem = _path_problem(path, kind)
            if not problem:
                continue
            if name in ours and parse_user_dataset(name) is None:
                try:
                    DatasetCatalog.get(name)  # its loader names the file and the prepare script
                except (FileNotFoundError, InputError):
                    raise
                break  # it loads: the metadata path was not needed
            fix = ("check the path"
                   if parse_user_dataset(name) is not None or name in ours else _how(name))
            root = ("the working directory is " + os.getcwd() if parse_user_dataset(name) is not None
                    else f"datasets root DETECTRON2_DATASETS={_datasets_root()}")
            if problem == "does not exist":
                raise DatasetNotFoundError(f"Dataset '{name}': expected {path} ({what}), which does not exist; "
                                           f"{fix}; {root}")
            raise EmptyDatasetError(f"Dataset '{name}': {path} ({what}) {problem}; {fix}; {root}")


def _files_of(name: str) -> str:
    try:
        from detectron2.data import MetadataCatalog

        meta = MetadataCatalog.get(name)
        paths = [f"{f}={meta.get(f)}" for f in _PATH_FIELDS if isinstance(meta.get(f, None), str)]
    except Exception:  # noqa: BLE001  (only for the message)
        paths = []
    return f" ({', '.join(paths)})" if paths else ""


@contextlib.contextmanager
def dataset_errors():
    """Inside the block, detectron2's "dataset is empty" assertions become
    :class:`EmptyDatasetError` s naming the dataset and its files."""
    try:
        yield
    except AssertionError as e:
        text = str(e)
        m = re.search(r"Dataset '([^']+)' is empty", text)
        if m:
            name = m.group(1)
            raise EmptyDatasetError(
                f"Dataset '{name}' is empty: it lists no images{_files_of(name)}; check its files "
                f"(datasets/README.md shows the expected layout) and rerun its prepare script") from None
        m = re.search(r"No valid data found in (.+?)\.?$", text.strip())
        if m:
            names = m.group(1)
            raise EmptyDatasetError(
                f"Dataset(s) {names}: no usable image left (every image lacks annotations, or all are "
                f"crowd); check the annotation files{_files_of(names.split(',')[0])}, or set "
                f"DATALOADER.FILTER_EMPTY_ANNOTATIONS False") from None
        raise


# ------------------------------------------------------------------------------------------------
# datasets/prepare_*.py
def require_input(path: str, layout: str, how: str, kind: str = "dir") -> str:
    """``path`` if it is an existing folder (``kind="dir"``) or file (``"file"``); else a
    :class:`DatasetNotFoundError` with the layout the script expects and what to do."""
    ok = os.path.isdir(path) if kind == "dir" else os.path.isfile(path)
    if not ok:
        what = "folder" if kind == "dir" else "file"
        found = " (it is a file)" if kind == "dir" and os.path.isfile(path) else \
            " (it is a folder)" if kind == "file" and os.path.isdir(path) else ""
        raise DatasetNotFoundError(f"{path}: input {what} not found{found}; expected layout: {layout}; {how}")
    return path


def require_files(files: Sequence[str], where: str, pattern: str, how: str) -> List[str]:
    """``files`` (a listing of ``where``) if not empty; else an :class:`EmptyDatasetError`."""
    if not files:
        raise EmptyDatasetError(f"{where}: no input files ({pattern}) in it, nothing to convert; {how}")
    return list(files)



@contextlib.contextmanager
def reading(path: str, what: str = "file"):
    """Inside the block, a decoder's failure on ``path`` (truncated or damaged data: OSError,
    ValueError, EOFError, IndexError, zlib / struct errors, SciPy's MatReadError) becomes an
    :class:`InputError` naming the file and ``what`` it should be."""
    try:
        yield
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{path}: file not found; check the path") from None
    except (OSError, ValueError, EOFError, IndexError, KeyError, struct.error, zlib.error) as e:
        raise InputError(f"{path}: unreadable {what}, truncated or damaged ({type(e).__name__}: {e}); "
                         f"re-download it") from None
    except Exception as e:  # noqa: BLE001
        if type(e).__name__ != "MatReadError":  # scipy.io's, without importing scipy here
            raise
        raise InputError(f"{path}: unreadable {what}, truncated or damaged ({e}); re-download it") from None


def read_json(path: str, what: str = "JSON file"):
    """The parsed JSON of ``path``; :class:`InputError` naming the file, line and column for
    invalid or truncated JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: {what} not found; check the path") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}; "
                         f"{os.path.getsize(path)} bytes): truncated or not a {what}? re-download it") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text file, not a {what}; give the {what}") from None
