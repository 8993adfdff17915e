"""What every entry point shares: one-line error reports, config merging that names bad keys,
and the warn-skip-count bookkeeping of batch tools.

``tools/*.py`` and ``datasets/prepare_*.py`` end with ``sys.exit(run_cli(main))``: a
:class:`~hiseg.errors.UserError` (bad checkpoint, config key, image, dataset folder, ...) then
prints ``error: <file>: <problem>; <what to do>`` on stderr and exits with status 2 (1 when a
batch tool skipped some inputs), without a traceback.
"""
import argparse
import difflib
import math
import os
import re
import sys
import tempfile
from typing import Callable, List, Optional, Sequence

from .errors import ConfigError, InputError, SkippedInputsError, UsageError, UserError

__all__ = [
    "run_cli",
    "script_main",
    "one_line",
    "merge_config",
    "config_keys",
    "nearest_keys",
    "Skipped",
    "ArgumentParser",
    "bounded",
    "check_device",
    "check_output_file",
    "check_output_dir",
]


# ------------------------------------------------------------------------------------------------
# one-line reports
def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line. An exception re-raised by torch's DataLoader carries
    the worker's whole traceback as its text; its last line holds the original message."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        text = re.sub(r"^[\w.]+(Error|Exception): ", "", last)
    return " ".join(text.split())


def _missing_file_line(e: FileNotFoundError) -> str:
    name = e.filename or one_line(e)
    hint = "check the path"
    data_root = os.environ.get("DETECTRON2_DATASETS", "datasets")
    if isinstance(name, str) and os.path.abspath(name).startswith(os.path.abspath(data_root) + os.sep):
        hint = (f"it is a dataset file: see datasets/README.md for the expected layout under "
                f"DETECTRON2_DATASETS={data_root} and the datasets/prepare_*.py script that makes it")
    return f"{name}: no such file or directory; {hint}"


def run_cli(main: Callable, argv: Optional[Sequence[str]] = None, result_is_status: bool = True) -> int:
    """Call ``main(argv)`` and return an exit status: ``main``'s own if it returns an int (and
    ``result_is_status``; prepare scripts return counts, not statuses), else 0.

    A :class:`UserError` is printed as ``error: <message>`` (one line, stderr) and gives its
    ``exit_code``; so is a ``FileNotFoundError`` (a path that does not exist), with status 2.
    Anything else is a bug and keeps its traceback.
    """
    try:
        result = main(argv) if argv is not None else main()
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return e.exit_code
    except FileNotFoundError as e:
        print(f"error: {_missing_file_line(e)}", file=sys.stderr, flush=True)
        return 2
    if not result_is_status or isinstance(result, bool):
        return 0
    return result if isinstance(result, int) else 0


def script_main(main: Callable, result_is_status: bool = True) -> None:
    """``run_cli(main)`` for a script's ``if __name__ == "__main__":`` block; exits
    (``SystemExit``) only with a non-zero status, so that a script run with ``runpy`` returns
    normally when it succeeds."""
    status = run_cli(main, result_is_status=result_is_status)
    if status:
        raise SystemExit(status)


# ------------------------------------------------------------------------------------------------
# configs
def config_keys(cfg, prefix: str = "") -> List[str]:
    """Every full key (``MODEL.CAST.NUM_SEGMENTS``) of a yacs / detectron2 CfgNode, nodes too."""
    out = []
    for k, v in cfg.items():
        full = prefix + k
        out.append(full)
        if isinstance(v, dict):
            out += config_keys(v, full + ".")
    return out


def nearest_keys(key: str, valid: Sequence[str], n: int = 3) -> List[str]:
    """Valid keys closest to ``key`` (``difflib``): keys with the same last part (a key put under
    the wrong node), then keys of the same node with a similar last part, then keys anywhere with
    a similar last part; similar full names only when none of those exist."""
    parent, _, leaf = key.rpartition(".")
    split = [(k, *k.rpartition(".")[::2]) for k in valid]  # (key, parent, leaf)

    def close(word, words, cutoff):
        return set(difflib.get_close_matches(word, words, n=n, cutoff=cutoff))

    same_leaf = [k for k, p, l in split if l == leaf]
    siblings = {l: k for k, p, l in split if p == parent}
    near_sibling = [siblings[w] for w in difflib.get_close_matches(leaf, list(siblings), n=n, cutoff=0.6)]
    leaves = close(leaf, [l for _, _, l in split], 0.75)
    near_leaf = sorted((k for k, _, l in split if l in leaves),
                       key=lambda k: -difflib.SequenceMatcher(None, key, k).ratio())
    found = same_leaf + near_sibling + near_leaf
    near_full = [] if found else difflib.get_close_matches(key, valid, n=n, cutoff=0.85)
    out = []
    for k in found + near_full:
        if k not in out and k != key:
            out.append(k)
    return out[:n]


def _type_mismatch(where: str, text: str) -> Optional[str]:
    m = re.search(r"Type mismatch \(<class '(\w+)'> vs\. <class '(\w+)'>\) with values \((.*) vs\. (.*)\) "
                  r"for config key: (\S+)", text)
    if not m:
        return None
    want, got, default, value, key = m.groups()
    a = "an" if want[:1] in "aeiou" else "a"
    return (f"{where}: {key} takes {a} {want} (its default is {default}), got the {got} {value}; "
            f"write {a} {want} value")


def _unknown_key_message(where: str, key: str, cfg) -> str:
    valid = config_keys(cfg)
    near = nearest_keys(key, valid)
    if near:
        hint = "nearest valid keys: " + ", ".join(near)
    else:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        siblings = [k for k in valid if k.rsplit(".", 1)[0] == parent and "." in k] if parent else \
            [k for k in valid if "." not in k]
        hint = (f"no similar key; the keys under {parent or 'the top level'} are " +
                ", ".join(siblings[:8]) + (", ..." if len(siblings) > 8 else "")) if siblings else "no similar key"
    return f"{where}: unknown config key {key}; {hint} (fix the spelling or remove it)"


def _find_unknown(root, node, loaded: dict, prefix: str = "") -> List[str]:
    unknown = []
    for k, v in loaded.items():
        full = prefix + str(k)
        if root.key_is_deprecated(full) or root.key_is_renamed(full):
            continue
        if k not in node:
            if not node.is_new_allowed():
                unknown.append(full)
        elif isinstance(v, dict) and isinstance(node[k], dict):
            unknown += _find_unknown(root, node[k], v, full + ".")
    return unknown


def _config_file_error(path: str) -> Optional[str]:
    if not os.path.exists(path):
        folder = os.path.dirname(path) or "."
        here = []
        if os.path.isdir(folder):
            here = difflib.get_close_matches(os.path.basename(path),
                                             [f for f in os.listdir(folder) if f.endswith((".yaml", ".yml"))], n=3)
        hint = ("did you mean " + ", ".join(os.path.join(folder, f) for f in here)) if here else \
            "the configs are under configs/CAST and configs/OAP"
        return f"{path}: config file not found; {hint}"
    if not os.path.isfile(path):
        return f"{path}: not a file (a folder?); give a .yaml config file"
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head.strip():
        return (f"{path}: empty config file ({len(head)} bytes); give a .yaml config file (the configs are under "
                f"configs/CAST and configs/OAP)")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not a multi-byte character cut at the end of the head
            return (f"{path}: not a config file but {_binary_file_kind(head)}; give a .yaml config file "
                    f"(the configs are under configs/CAST and configs/OAP)")
    return None


def _binary_file_kind(head: bytes) -> str:
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG image"
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    from .image_io import describe_file_start

    return describe_file_start(head)


def _load_yaml(cfg, path: str) -> dict:
    import yaml

    try:
        loaded = cfg.load_yaml_with_base(path, allow_unsafe=False)
    except FileNotFoundError as e:
        base = e.filename or one_line(e)
        raise ConfigError(f"{path}: its _BASE_ config {base} does not exist; fix the _BASE_ path "
                          f"(relative to the file that names it)") from None
    except yaml.constructor.ConstructorError:
        raise ConfigError(f"{path}: uses YAML tags that build Python objects, which are not loaded "
                          f"(unsafe); write plain values") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or one_line(e)
        raise ConfigError(f"{path}: not valid YAML ({problem}{where}); fix the syntax") from None
    except (AssertionError, KeyError) as e:  # fvcore: "Cannot inherit key ... from base"
        raise ConfigError(f"{path}: {one_line(e)}") from None
    except (TypeError, UnicodeDecodeError):  # an empty or binary _BASE_ file (the named file is checked first)
        raise ConfigError(f"{path}: a _BASE_ config it names is empty or not a text file; fix the _BASE_ "
                          f"path") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: not a config: its top level is a {type(loaded).__name__}, not KEY: value "
                          f"pairs")
    return loaded


def merge_config(cfg, config_file: Optional[str] = None, opts: Sequence = ()):
    """``cfg.merge_from_file(config_file)`` then ``cfg.merge_from_list(opts)``, with every
    problem as a :class:`ConfigError` naming the file or override: a missing config file (or
    ``_BASE_``), invalid YAML, unknown keys (with the nearest valid ones, by ``difflib``), values
    of the wrong type, overrides that are not KEY VALUE pairs, and values the model cannot be
    built with (:func:`hiseg.config.check_config`). YAML that builds Python objects is refused
    (detectron2 would fall back to ``yaml.unsafe_load``). Returns ``cfg``."""
    if config_file:
        config_file = os.fspath(config_file)
        problem = _config_file_error(config_file)
        if problem:
            raise ConfigError(problem)
        loaded = _load_yaml(cfg, config_file)
        unknown = _find_unknown(cfg, cfg, loaded)
        if unknown:
            msg = _unknown_key_message(config_file, unknown[0], cfg)
            if len(unknown) > 1:
                msg += f"; also unknown: {', '.join(unknown[1:6])}" + (", ..." if len(unknown) > 6 else "")
            raise ConfigError(msg)
        try:
            cfg.merge_from_file(config_file, allow_unsafe=False)
        except (AssertionError, KeyError, ValueError, TypeError) as e:
            raise ConfigError(_type_mismatch(config_file, one_line(e)) or f"{config_file}: {one_line(e)}") from None
    opts = [str(o) if not isinstance(o, str) else o for o in (opts or [])]
    if opts:
        if len(opts) % 2:
            raise ConfigError(f"config overrides come in KEY VALUE pairs, got {len(opts)} word(s) "
                              f"({' '.join(opts[-3:])} at the end): is a value missing after {opts[-1]}?")
        for key in opts[0::2]:
            if cfg.key_is_deprecated(key) or cfg.key_is_renamed(key):
                continue
            node, parts = cfg, key.split(".")
            for part in parts:
                if not isinstance(node, dict) or part not in node:
                    raise ConfigError(_unknown_key_message("command-line override", key, cfg))
                node = node[part]
        try:
            cfg.merge_from_list(opts)
        except (AssertionError, KeyError, ValueError, TypeError) as e:
            where = "command-line override"
            raise ConfigError(_type_mismatch(where, one_line(e)) or f"{where}: {one_line(e)}") from None
    from .config import check_config

    check_config(cfg)  # values the model cannot be built with (hiseg.config.register_config_check)
    return cfg


# ------------------------------------------------------------------------------------------------
# batch tools
class Skipped:
    """Inputs a batch tool skipped: each is reported at once as ``warning: <message>; skipped``,
    and :meth:`finish` raises the summary (:class:`SkippedInputsError`, exit status 1) if any."""

    def __init__(self, what: str = "file"):
        self.what = what
        self.items: List[str] = []

    def add(self, name: str, message: str) -> None:
        self.items.append(str(name))
        print(f"warning: {message}; skipped", file=sys.stderr, flush=True)

    def read(self, name: str, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)``, or None after reporting ``name`` as skipped when it raises
        :class:`~hiseg.errors.InputError` (an unreadable input)."""
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            self.add(name, str(e))
            return None

    def __len__(self) -> int:
        return len(self.items)

    def summary(self, total: int) -> str:
        shown = ", ".join(os.path.basename(i) for i in self.items[:5]) + (", ..." if len(self.items) > 5 else "")
        return (f"{len(self.items)} of {total} {self.what}(s) skipped (unreadable, see the warnings above: "
                f"{shown}); the others were processed; replace those files and run again")

    def finish(self, total: int) -> None:
        if self.items:
            raise SkippedInputsError(self.summary(total))


# ------------------------------------------------------------------------------------------------
# command-line arguments checked before any work: numbers in range, devices present, outputs writable
class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are ONE line, ``error: argument --x: ...;
    see prog --help`` on stderr, exit status 2 (argparse prints the whole usage first, which for
    a tool with many options buries the line that matters)."""

    def error(self, message):
        self.exit(2, f"error: {' '.join(str(message).split())}; see {self.prog} --help\n")


def bounded(kind: type = int, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False) -> Callable:
    """An argparse ``type=`` that converts with ``kind`` (``int`` or ``float``) and accepts only
    values in the range from ``lo`` to ``hi`` (``None``: unbounded; ``*_open``: that end
    excluded). A value out of range is argparse's one ``error: argument --x: ...`` line, exit
    status 2, e.g. ``bounded(int, 1)`` for a count, ``bounded(float, -1, 1, hi_open=True)`` for a
    cosine threshold that an edge must exceed. Non-finite floats are refused."""
    noun = "an integer" if kind is int else "a number"
    if lo is not None and hi is not None:
        rng = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        rng = f"{'>' if lo_open else '>='} {lo:g}"
    elif hi is not None:
        rng = f"{'<' if hi_open else '<='} {hi:g}"
    else:
        rng = ""

    def parse(text: str):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}" + (f" (give one {rng})" if rng else ""))
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        too_high = hi is not None and (value >= hi if hi_open else value > hi)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {noun} {rng}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def check_device(device, flag: str = "--device"):
    """``torch.device(device)`` if this machine has it, else :class:`UsageError` (exit status 2)
    with the fix: an unknown name, CUDA without a CUDA device, ``cuda:N`` beyond the devices."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise UsageError(f"{flag} {device}: not a device name ({one_line(e)}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {device}: CUDA is not available on this machine; use {flag} cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise UsageError(f"{flag} {device}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError(f"{flag} {device}: MPS is not available on this machine; use {flag} cpu")
    elif dev.type != "cpu":
        raise UsageError(f"{flag} {device}: unsupported device type {dev.type!r}; use cpu or cuda")
    return dev


def _existing_ancestor(path: str) -> str:
    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return folder


def _check_can_create_in(folder: str, flag: str, path: str) -> None:
    """``folder`` (made when missing) can hold new files: its nearest existing ancestor is a
    folder in which a file can really be created (a probe file, removed at once; permission bits
    alone do not tell, e.g. for root or a read-only mount)."""
    base = _existing_ancestor(folder)
    if not os.path.isdir(base):
        raise UsageError(f"{flag} {path}: {base} is a file, not a folder; choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=base)
    except OSError as e:
        reason = e.strerror or one_line(e)
        raise UsageError(f"{flag} {path}: cannot write in {base} ({reason}); choose a writable location") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path, flag: str = "--output") -> str:
    """Check, before any work, that the file ``path`` can be written (its folder exists or can be
    made, a file can be created there, ``path`` is not a folder nor a read-only file); else
    :class:`UsageError` naming ``flag``. Nothing is left behind. Returns ``path``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder; give a file name (a path inside it, or another one)")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path}: the file exists and is read-only; choose another path or make it writable")
    _check_can_create_in(os.path.dirname(os.path.abspath(path)), flag, path)
    return path


def check_output_dir(path, flag: str = "--output") -> str:
    """Check, before any work, that ``path`` is (or can be made) a folder in which files can be
    written; else :class:`UsageError` naming ``flag``. Nothing is made. Returns ``path``."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a file, not a folder; give a folder for the outputs")
    _check_can_create_in(path, flag, path)
    return path
