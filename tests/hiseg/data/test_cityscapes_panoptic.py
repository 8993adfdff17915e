"""Cityscapes panoptic ground truth from ``datasets/prepare_cityscapes_panoptic.py``.

On the real Cityscapes val frame of the shared data (256x128, downscaled), in a temporary
$DETECTRON2_DATASETS tree:

* detectron2's own built-in ``cityscapes_fine_panoptic_val`` (registered at import from
  $DETECTRON2_DATASETS, so checked in a subprocess) loads the written files;
* the segments agree with ``labelIds`` / ``instanceIds``: per-category areas are pixel counts,
  one segment per instance id, void = the labels outside the 19 evaluated classes, boxes right;
* ground truth fed back as the prediction scores PQ = 100 with detectron2's
  ``COCOPanopticEvaluator``, and with OAP's ``ClusterPanopticEvaluator`` when the categories are
  replaced by a random permutation of 40 cluster ids (the saved mapping inverts it).

Plus a hand-made frame for the crowd (group label) and void rules, and the skip / overwrite
behaviour of the script.
"""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import CITYSCAPES_CATEGORIES
from detectron2.data.datasets.cityscapes_panoptic import load_cityscapes_panoptic
from expectations import registered_dataset
from helpers import load_script

BUILTIN = "cityscapes_fine_panoptic_val"
FRAME = "frankfurt_000000_000294"
CAT_IDS = {c["id"] for c in CITYSCAPES_CATEGORIES}
THING_IDS = {c["id"] for c in CITYSCAPES_CATEGORIES if c["isthing"]}


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


script = load_script("prepare_cityscapes_panoptic")


def _copy_writable(src, dst):
    """Copy a tree, its folders made writable (the shared data may be read-only)."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    for folder, _, _ in os.walk(dst):
        os.chmod(folder, 0o755)


@pytest.fixture(scope="module")
def cs(shared_data, tmp_path_factory):
    """(datasets root, cityscapes root, the written JSON) for the one real val frame."""
    root = tmp_path_factory.mktemp("d2_datasets")
    src = Path(shared_data) / "cityscapes_sample"
    for sub in ("leftImg8bit", "gtFine"):
        _copy_writable(src / sub, root / "cityscapes" / sub)
    out = _quiet(script.main, ["--root", str(root), "--split", "val"])
    return root, root / "cityscapes", out["val"]


def _gt_maps(city_root):
    base = city_root / "gtFine" / "val" / "frankfurt" / f"{FRAME}_gtFine_"
    label = np.asarray(Image.open(f"{base}labelIds.png")).astype(np.int64)
    inst = np.asarray(Image.open(f"{base}instanceIds.png")).astype(np.int64)
    return label, inst


def _pan_png(city_root, ann):
    png = city_root / "gtFine" / "cityscapes_panoptic_val" / ann["file_name"]
    return script.rgb_to_id(np.asarray(Image.open(png).convert("RGB")))


@contextlib.contextmanager
def _registered_copy(city_root):
    """A new name for the tmp tree, loaded by detectron2's ``load_cityscapes_panoptic`` with the
    metadata of its built-in ``cityscapes_fine_panoptic_val`` (paths replaced)."""
    name = f"cityscapes_panoptic_val_test_{os.getpid()}"
    meta = {k: v for k, v in MetadataCatalog.get(BUILTIN).as_dict().items() if k != "name"}
    image_dir = str(city_root / "leftImg8bit" / "val")
    gt_dir = str(city_root / "gtFine" / "cityscapes_panoptic_val")
    gt_json = str(city_root / "gtFine" / "cityscapes_panoptic_val.json")
    meta.update(image_root=image_dir, panoptic_root=gt_dir, panoptic_json=gt_json,
                gt_dir=str(city_root / "gtFine" / "val"))  # fmt: skip
    with registered_dataset(name, lambda: load_cityscapes_panoptic(image_dir, gt_dir, gt_json, meta), **meta):
        yield name


def test_builtin_dataset_loads_the_files(cs):
    root, city_root, panoptic = cs
    code = (
        "import json\n"
        "from detectron2.data import DatasetCatalog, MetadataCatalog\n"
        f"dicts = DatasetCatalog.get({BUILTIN!r})\n"
        f"meta = MetadataCatalog.get({BUILTIN!r})\n"
        "print(json.dumps({'dicts': dicts, 'json': meta.panoptic_json}))\n"
    )
    env = dict(os.environ, DETECTRON2_DATASETS=str(root))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["json"] == str(city_root / "gtFine" / "cityscapes_panoptic_val.json")
    (d,) = out["dicts"]
    assert d["image_id"] == FRAME
    assert d["file_name"].endswith(f"leftImg8bit/val/frankfurt/{FRAME}_leftImg8bit.png")
    assert os.path.isfile(d["sem_seg_file_name"]) and os.path.isfile(d["pan_seg_file_name"])
    # the loader maps the Cityscapes label ids to train ids (contiguous)
    to_train = {c["id"]: c["trainId"] for c in CITYSCAPES_CATEGORIES}
    (ann,) = panoptic["annotations"]
    assert [(s["id"], s["category_id"]) for s in d["segments_info"]] == [
        (s["id"], to_train[s["category_id"]]) for s in ann["segments_info"]
    ]


def test_segments_agree_with_label_and_instance_ids(cs):
    _, city_root, panoptic = cs
    label, inst = _gt_maps(city_root)
    (image,) = panoptic["images"]
    (ann,) = panoptic["annotations"]
    assert image == {"id": FRAME, "width": 256, "height": 128,
                     "file_name": f"{FRAME}_leftImg8bit.png"}  # fmt: skip
    assert ann["image_id"] == FRAME and ann["file_name"] == f"{FRAME}_gtFine_panoptic.png"
    assert [c["id"] for c in panoptic["categories"]] == [c["id"] for c in CITYSCAPES_CATEGORIES]
    pan = _pan_png(city_root, ann)
    segs = {s["id"]: s for s in ann["segments_info"]}
    assert set(np.unique(pan).tolist()) - {0} == set(segs)

    # per segment: area and box from its pixels
    for sid, s in segs.items():
        ys, xs = np.nonzero(pan == sid)
        assert s["area"] == len(ys)
        assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    # per category: the summed area is the label's pixel count
    for c in CAT_IDS:
        area = sum(s["area"] for s in segs.values() if s["category_id"] == c)
        assert area == int((label == c).sum()), c
    # void: exactly the pixels of labels outside the evaluated classes
    assert np.array_equal(pan == 0, ~np.isin(label, list(CAT_IDS)))
    # one segment per instance id, covering exactly its pixels
    instances = {int(i) for i in np.unique(inst[inst >= 1000]) if i // 1000 in CAT_IDS}
    assert len(instances) >= 5  # the frame has several persons and cars
    thing_segs = {sid for sid, s in segs.items() if s["category_id"] in THING_IDS}
    assert thing_segs == instances  # this frame has no group (crowd) region
    for i in instances:
        assert np.array_equal(pan == i, inst == i)
        assert segs[i]["category_id"] == i // 1000 and segs[i]["iscrowd"] == 0
    assert all(s["iscrowd"] == 0 for s in segs.values())


def test_crowd_void_and_mismatch_on_a_hand_made_frame():
    cats = script.panoptic_categories()
    # road (7, stuff), ego vehicle (1, void), car 26 as a group (crowd), cars 26000 / 26003,
    # person 24001, caravan instance 29000 (ignoreInEval: void)
    label = np.array([[7, 7, 1, 26, 26], [26, 26, 24, 24, 29], [26, 26, 7, 26, 29]])
    inst = np.array([[7, 7, 1, 26, 26], [26000, 26000, 24001, 24001, 29000],
                     [26003, 26003, 7, 26, 29000]])  # fmt: skip
    pan = script.panoptic_ids(label, inst, cats)
    assert pan.tolist() == [[7, 7, 0, 26, 26], [26000, 26000, 24001, 24001, 0],
                            [26003, 26003, 7, 26, 0]]  # fmt: skip
    infos = {s["id"]: s for s in script.segments_info(pan, cats)}
    assert infos[7] == {"id": 7, "category_id": 7, "iscrowd": 0, "area": 3, "bbox": [0, 0, 3, 3]}
    assert infos[26] == {"id": 26, "category_id": 26, "iscrowd": 1, "area": 3,
                         "bbox": [3, 0, 2, 3]}  # fmt: skip
    assert infos[26000]["iscrowd"] == 0 and infos[26000]["bbox"] == [0, 1, 2, 1]
    assert infos[24001]["category_id"] == 24 and infos[24001]["area"] == 2
    assert list(infos) == [7, 26, 24001, 26000, 26003]  # increasing ids, void left out
    assert np.array_equal(script.rgb_to_id(script.id_to_rgb(pan)), pan)
    with pytest.raises(ValueError, match="disagree"):
        script.panoptic_ids(label, np.where(inst == 24001, 26001, inst), cats)


def test_existing_pngs_are_kept_unless_overwrite(cs, tmp_path):
    _, city_root, panoptic = cs
    root = tmp_path / "d"
    _copy_writable(city_root, root / "cityscapes")
    png = root / "cityscapes/gtFine/cityscapes_panoptic_val" / f"{FRAME}_gtFine_panoptic.png"
    os.utime(png, (1, 1))
    again = _quiet(script.main, ["--root", str(root), "--split", "val"])["val"]
    assert again == panoptic and png.stat().st_mtime == 1
    _quiet(script.main, ["--root", str(root), "--split", "val", "--overwrite"])
    assert png.stat().st_mtime > 1


def _gt_pairs(name, city_root, cluster_of=None):
    """(inputs, outputs): the GT panoptic map as the prediction; ``category_id`` is the
    contiguous id, or ``cluster_of[Cityscapes label id]`` when given."""
    meta = MetadataCatalog.get(name)
    train_to_id = {c["trainId"]: c["id"] for c in CITYSCAPES_CATEGORIES}
    pairs = []
    for d in DatasetCatalog.get(name):
        pan = script.rgb_to_id(np.asarray(Image.open(d["pan_seg_file_name"]).convert("RGB")))
        segments = []
        for s in d["segments_info"]:
            cid = train_to_id[s["category_id"]]
            isthing = cid in meta.thing_dataset_id_to_contiguous_id
            cat = s["category_id"] if cluster_of is None else cluster_of[cid]
            segments.append({"id": s["id"], "category_id": int(cat), "isthing": isthing})
        output = {"panoptic_seg": (torch.from_numpy(pan.astype(np.int32)), segments)}
        pairs.append(({"image_id": d["image_id"], "file_name": d["file_name"]}, output))
    return pairs


def _run(evaluator, pairs):
    evaluator.reset()
    for inp, out in pairs:
        evaluator.process([inp], [out])
    return _quiet(evaluator.evaluate)


def test_gt_scores_pq_100_with_detectron2_panoptic_evaluator(cs, tmp_path):
    from detectron2.evaluation import COCOPanopticEvaluator

    _, city_root, _ = cs
    with _registered_copy(city_root) as name:
        res = _run(COCOPanopticEvaluator(name, str(tmp_path)), _gt_pairs(name, city_root))
    for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
        assert res["panoptic_seg"][key] == pytest.approx(100.0, abs=1e-9), (key, res)


@pytest.mark.parametrize("method", ["hungarian", "majority"])
def test_permuted_gt_scores_pq_100_with_cluster_panoptic_evaluator(cs, tmp_path, method):
    from hiseg_oap.evaluation import ClusterPanopticEvaluator

    _, city_root, panoptic = cs
    k = 40
    perm = np.random.default_rng(7).permutation(k)
    cluster_of = {c["id"]: int(perm[i]) for i, c in enumerate(CITYSCAPES_CATEGORIES)}
    with _registered_copy(city_root) as name:
        evaluator = ClusterPanopticEvaluator(name, k, method, output_dir=str(tmp_path))
        res = _run(evaluator, _gt_pairs(name, city_root, cluster_of))
    for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
        assert res["panoptic_seg"][key] == pytest.approx(100.0, abs=1e-9), (key, res)
    assert res["coco_panoptic_seg_cluster_mapping"]["agreement"] == pytest.approx(100.0)
    with open(tmp_path / "cluster_mapping_coco_panoptic_seg_cluster.json") as f:
        saved = json.load(f)
    present = {s["category_id"] for a in panoptic["annotations"] for s in a["segments_info"]}
    names = {c["id"]: c["name"] for c in CITYSCAPES_CATEGORIES}
    assert {int(c): n for c, n in saved["mapped"].items()} == {
        cluster_of[c]: names[c] for c in present
    }
    class_ids = saved["class_dataset_ids"]
    for c in present:  # cluster -> its category's index among the classes
        assert class_ids[saved["mapping"][cluster_of[c]]] == c
