#!/usr/bin/env bash
# For a GPU machine without network access: builds, on a machine with network, the Python 3.12
# wheels that such a machine's image usually lacks for tools/gpu_check.py into .gpu_site/
# (git-ignored), and a stamp with this checkout's commit (for a copy of the checkout without .git).
#
#   bash dev/gpu_wheels.sh          # with network; again after changing the checkout (seconds)
#
# The image is assumed to have Python 3.12 with torch, torchvision, timm, scipy, scikit-image,
# opencv-python-headless, numpy, pyyaml, tqdm, tabulate, portalocker, cloudpickle, Pillow,
# matplotlib, packaging, typing-extensions and pytest, but not:
#   * detectron2: its v0.6 Python sources (the pb1-detectron2 sdist), patched exactly as
#     setup.sh patches them (dev/detectron2_install.py does it), built into a py3-none-any wheel;
#   * pycocotools: a cp312 manylinux wheel (C extension);
#   * fvcore, iopath, antlr4-python3-runtime: sdists only on PyPI, built here into py3-none-any
#     wheels (pure Python);
#   * yacs, termcolor, omegaconf, hydra-core, panopticapi-lite: pure-Python wheels.
# Versions are those installed in this checkout's environment (the ones the suite runs with),
# else the pins below. On the GPU machine, from the copied checkout (this project is not
# installed there: its packages come from the checkout through PYTHONPATH):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu_site/*.whl
#   PYTHONPATH=/tmp/site:$PWD:$PWD/projects/CAST:$PWD/projects/OAP python3 tools/gpu_check.py
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
site="$root/.gpu_site"
mkdir -p "$site"
cd "$root"

# keep the folder out of git here too (old checkouts' .gitignore may lack the entry)
exclude="$(git rev-parse --git-path info/exclude 2>/dev/null || true)"
if [ -n "$exclude" ]; then
  mkdir -p "$(dirname "$exclude")"
  grep -qxF '/.gpu_site/' "$exclude" 2>/dev/null || echo '/.gpu_site/' >>"$exclude"
fi

version() {  # installed version of a distribution, else the given pin
  "$py" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: print(sys.argv[2])" "$1" "$2"
}
have() { compgen -G "$site/$1" >/dev/null; }

pip_dl=("$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$site")

# name on PyPI | wheel file prefix | pin when not installed here
for spec in "pycocotools|pycocotools|2.0.11" "yacs|yacs|0.1.8" "termcolor|termcolor|3.3.0" \
            "omegaconf|omegaconf|2.3.1" "hydra-core|hydra_core|1.3.8" "panopticapi-lite|panopticapi_lite|0.2.0"; do
  IFS='|' read -r name prefix pin <<<"$spec"
  v="$(version "$name" "$pin")"
  have "$prefix-$v-*.whl" || { echo "[gpu_wheels] download $name==$v"; "${pip_dl[@]}" "$name==$v"; }
done
for spec in "iopath|iopath|0.1.10" "fvcore|fvcore|0.1.5.post20221221" \
            "antlr4-python3-runtime|antlr4_python3_runtime|4.9.3"; do
  IFS='|' read -r name prefix pin <<<"$spec"
  v="$(version "$name" "$pin")"
  have "$prefix-$v-py3-none-any.whl" || { echo "[gpu_wheels] build $name==$v"; \
    "$py" -m pip wheel -q --no-deps -w "$site" "$name==$v"; }
done

if ! have "detectron2-0.6-py3-none-any.whl"; then
  echo "[gpu_wheels] build detectron2 0.6 (pure Python, patched by dev/detectron2_install.py)"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  PYTHONPATH="$root/dev" "$py" - "$work" <<'EOF'
import sys, tarfile
from pathlib import Path

import detectron2_install as d  # the set-up's own download (sha256-checked) and patch

work = Path(sys.argv[1])
sdist = d.fetch_d2_sdist(d.PREFIX / "src")  # reuses the set-up's cached sdist when present
with tarfile.open(sdist) as tar:
    top = tar.getnames()[0].split("/")[0]
    tar.extractall(work, filter="data")
src = work / "detectron2-0.6-pure"
(work / top).rename(src)
print("[gpu_wheels] patched:", len(d.patch_detectron2_v06(src)), "files")
EOF
  "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$site" "$work/detectron2-0.6-pure"
fi

# one version of each: two wheels of one name stop the whole install on the GPU machine
dups="$(ls "$site"/*.whl | xargs -n1 basename | cut -d- -f1 | sort | uniq -d)"
if [ -n "$dups" ]; then echo "[gpu_wheels] more than one wheel of: $dups (delete the old ones)" >&2; exit 1; fi

# the GPU machine's install, dry: the set must install for CPython 3.12 without an index
check="$(mktemp -d)"
"$py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$check" --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --only-binary=:all: "$site"/*.whl
test -f "$check/detectron2/_C.py" && compgen -G "$check/pycocotools/_mask*.so" >/dev/null
rm -rf "$check"

"$py" tools/gpu_check.py --write-stamp "$site/STAMP.json"
echo "[gpu_wheels] $(ls "$site"/*.whl | wc -l) wheels, $(du -sh "$site" | cut -f1) in $site"
