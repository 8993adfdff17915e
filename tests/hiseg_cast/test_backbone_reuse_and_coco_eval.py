"""What a Detectron2 user's own code meets first: ``add_cast_config`` alone loads the CAST yaml
files, ``build_cast_fpn_backbone`` works without ``MODEL.FPN.IN_FEATURES``, and detectron2's
``COCOEvaluator`` with its default arguments works on the pure-Python detectron2 the set-up
installs (``tools/install_deps.py`` with ``dev/detectron2_install.py``: ``COCOeval_opt`` falls back to
pycocotools; the stub's error for a direct call of a COCO op names ``use_fast_impl=False``)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg

from helpers import REPO, load_dev

BASE_S = str(REPO / "configs" / "CAST" / "Base-CAST-S.yaml")


def _cast_cfg():
    from hiseg_cast import add_cast_config

    cfg = get_cfg()
    add_cast_config(cfg)
    return cfg


def test_add_cast_config_alone_loads_the_cast_yaml_files():
    for name in ("Base-CAST-S.yaml", "Base-CAST-B.yaml", "mask_rcnn_cast_s_fpn_coco.yaml"):
        cfg = _cast_cfg()
        cfg.merge_from_file(str(REPO / "configs" / "CAST" / name))  # needs SOLVER.OPTIMIZER etc.
    assert cfg.SOLVER.OPTIMIZER == "ADAMW"


def test_config_functions_are_idempotent():
    from hiseg_cast import add_cast_config

    from helpers import add_all_configs

    cfg = _cast_cfg()
    cfg.merge_from_file(BASE_S)
    cfg.MODEL.CAST.EMBED_DIM, cfg.SOLVER.BETAS = 96, [0.5, 0.5]
    add_cast_config(cfg)
    add_all_configs(cfg)  # what a project composing every config function does afterwards
    assert cfg.MODEL.CAST.EMBED_DIM == 96 and cfg.SOLVER.BETAS == [0.5, 0.5]
    assert cfg.SOLVER.OPTIMIZER == "ADAMW"


def _tiny_fpn_cfg(**fpn):
    cfg = _cast_cfg()
    cfg.merge_from_file(BASE_S)
    cfg.MODEL.BACKBONE.NAME = "build_cast_fpn_backbone"
    cfg.MODEL.CAST.EMBED_DIM, cfg.MODEL.CAST.NUM_HEADS, cfg.MODEL.CAST.DEPTHS = 48, 3, [1, 1, 1, 1]
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    for k, v in fpn.items():
        setattr(cfg.MODEL.FPN, k, v)
    return cfg


def test_cast_fpn_without_in_features_uses_res2_to_res5():
    from detectron2.modeling import build_backbone

    import hiseg_cast  # noqa: F401  (registers the backbones)

    torch.manual_seed(0)
    backbone = build_backbone(_tiny_fpn_cfg()).eval()
    assert list(backbone.in_features) == ["res2", "res3", "res4", "res5"]
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 64, 64))
    assert {k: v.shape[-1] for k, v in out.items()} == {"p2": 16, "p3": 8, "p4": 4, "p5": 2, "p6": 1}


def test_cast_fpn_unknown_in_features_names_the_key():
    from detectron2.modeling import build_backbone

    import hiseg_cast  # noqa: F401

    with pytest.raises(ValueError, match=r"MODEL.FPN.IN_FEATURES \['res6'\].*res2"):
        build_backbone(_tiny_fpn_cfg(IN_FEATURES=["res4", "res6"]))


# ---------------------------------------------------------------------------------------------
def _d2_install():
    """``dev/detectron2_install.py``, the set-up's detectron2 steps (loaded by its location, as the
    set-up loads it)."""
    return load_dev("detectron2_install")


def _d2_copy(tmp_path) -> Path:
    """A copy of the installed detectron2 package, as the set-up's pure-Python install leaves it."""
    import detectron2

    site = tmp_path / "site"
    shutil.copytree(os.path.dirname(detectron2.__file__), site / "detectron2",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "model_zoo"))
    fast = site / "detectron2" / "evaluation" / "fast_eval_api.py"
    text = fast.read_text()
    mark = _d2_install().FAST_EVAL_MARK
    if mark in text:  # undo our patch: start from detectron2's own file
        text = "\n".join(ln for k, ln in enumerate(text.splitlines())
                         if mark not in ln and not (k and mark in text.splitlines()[k - 1])) + "\n"
        fast.write_text(text)
    for so in (site / "detectron2").glob("_C*.so"):
        so.unlink()
    return site


_EVAL = r"""
import json, sys
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, Instances
import torch

register_coco_instances("tiny_coco", {}, sys.argv[1], sys.argv[2])
DatasetCatalog.get("tiny_coco")  # fills the category-id mapping the evaluator reads
preds = [[10, 10, 30, 30, 0.9], [0, 0, 12, 12, 0.6], [40, 40, 60, 60, 0.8]]
aps = []
for kwargs in ({}, {"use_fast_impl": False}):
    ev = COCOEvaluator("tiny_coco", tasks=("bbox",), distributed=False, **kwargs)
    ev.reset()
    inst = Instances((64, 64))
    inst.pred_boxes = Boxes(torch.tensor([p[:4] for p in preds], dtype=torch.float32))
    inst.scores = torch.tensor([p[4] for p in preds])
    inst.pred_classes = torch.zeros(len(preds), dtype=torch.int64)
    ev.process([{"image_id": 1}], [{"instances": inst}])
    aps.append(ev.evaluate()["bbox"]["AP"])
from detectron2 import _C
try:
    _C.COCOevalAccumulate(None, None)
    msg = ""
except RuntimeError as e:
    msg = str(e)
print(json.dumps({"aps": aps, "msg": msg}))
"""


@pytest.fixture
def tiny_coco(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "a.jpg")
    gt = {"images": [{"id": 1, "file_name": "a.jpg", "height": 64, "width": 64}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400,
                           "iscrowd": 0},
                          {"id": 2, "image_id": 1, "category_id": 1, "bbox": [40, 40, 20, 20], "area": 400,
                           "iscrowd": 0}],
          "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    return str(tmp_path / "gt.json"), str(tmp_path)


def test_coco_evaluator_defaults_work_on_the_pure_python_detectron2(tmp_path, tiny_coco):
    deps = _d2_install()
    site = _d2_copy(tmp_path)
    pkg = site / "detectron2"
    # the set-up's pure-Python install (fresh) and the refresh of an older one give the same files
    (pkg / "_C.py").write_text(deps.C_STUB.replace("PATCH_LEVEL = 2", "PATCH_LEVEL = 1"))
    calls = []
    deps.python_ok = lambda code: calls.append(code) or f"1 {pkg}"
    deps.log = lambda msg: None
    deps.refresh_installed_stub()
    assert calls and "PATCH_LEVEL = 2" in (pkg / "_C.py").read_text()
    assert not deps.patch_fast_coco_eval(pkg)  # already patched: a second run changes nothing
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", _EVAL, *tiny_coco], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    fast, official = out["aps"]
    assert fast == pytest.approx(official) and fast > 50.0  # 2 of 3 boxes hit both GT boxes
    assert "use_fast_impl=False" in out["msg"]
