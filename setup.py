"""Installs the shared package ``hiseg`` and the two Detectron2 projects ``hiseg_cast`` and ``hiseg_oap``."""
from setuptools import find_packages, setup

packages = find_packages(include=["hiseg", "hiseg.*"])
package_dir = {}
for name, where in (("hiseg_cast", "projects/CAST"), ("hiseg_oap", "projects/OAP")):
    for p in find_packages(where=where, include=[name, name + ".*"]):
        packages.append(p)
        package_dir[p] = where + "/" + p.replace(".", "/")

setup(
    name="hiseg",
    version="0.1.0",
    description="Detectron2 extension for hierarchical and self-supervised universal segmentation "
    "(CAST backbone, OAP pseudo-masks)",
    packages=packages,
    package_dir=package_dir,
    python_requires=">=3.9",
    install_requires=[
        "numpy",
        "scipy",
        "opencv-contrib-python-headless",
        "pycocotools",
        "fvcore",
        "timm",
        "tqdm",
        "threadpoolctl",
    ],
)
