"""OAP evaluation (``hiseg_oap.evaluation``): cluster -> class mappings and the cluster evaluators.

* ``cluster_mapping``: hand confusion matrices with known Hungarian / majority answers, square
  and rectangular (K > C, K < C), zero-evidence clusters, bad input.
* On the real 50-image COCO val sample: ground truth fed back as predictions whose cluster ids
  are a random permutation of the classes scores AP = 100 with ``coco_cluster`` and the saved
  mapping inverts the permutation; ``coco_class_agnostic`` scores 100 on ground truth, and with
  half the instances dropped it equals pycocotools run directly on the class-agnostic ground truth.
* On the 2-image COCO panoptic sample: permuted ground truth gives PQ = 100; one segment moved
  to another category's cluster gives the PQ derived by hand from the PQ definition.
* ``sem_seg_cluster``: a hand case with an unmapped cluster (its pixels are errors), and
  COCO-Stuff-27 label maps made from the panoptic sample with the prepare script: mIoU = 100.
"""
import contextlib
import copy
import io
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances

from expectations import expected_pq, registered_dataset
from hiseg_oap.evaluation import (
    ClassAgnosticCOCOEvaluator,
    ClusterCOCOEvaluator,
    ClusterPanopticEvaluator,
    ClusterSemSegEvaluator,
    apply_mapping,
    compute_cluster_mapping,
    confusion_from_labels,
    hungarian_mapping,
    majority_mapping,
    mapping_summary,
)
from helpers import load_script

_COUNTER = itertools.count()


def _unique(stem):
    return f"oap_test_{stem}_{os.getpid()}_{next(_COUNTER)}"


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)




def _run(evaluator, pairs):
    evaluator.reset()
    for inp, out in pairs:
        evaluator.process([inp], [out])
    return _quiet(evaluator.evaluate)


# ============================================================================================
# cluster_mapping
# ============================================================================================


def test_hungarian_beats_greedy_on_a_square_matrix():
    conf = np.array([[5, 4, 0], [4, 0, 0], [0, 0, 1]])
    # greedy (cluster 0 -> class 0) would score 5 + 0 + 1; the optimum is 4 + 4 + 1
    assert hungarian_mapping(conf).tolist() == [1, 0, 2]
    assert majority_mapping(conf).tolist() == [0, 0, 2]
    assert compute_cluster_mapping(conf, "Hungarian").tolist() == [1, 0, 2]


def test_mapping_more_clusters_than_classes():
    conf = np.array([[0, 3, 0], [1, 0, 0], [0, 0, 0], [2, 2, 5], [0, 1, 0]])
    # one-to-one: 3 -> 2 (5), 0 -> 1 (3), 1 -> 0 (1); clusters 2 and 4 are left out
    assert hungarian_mapping(conf).tolist() == [1, 0, -1, 2, -1]
    # many-to-one: every cluster with evidence gets its argmax; the empty cluster 2 none
    assert majority_mapping(conf).tolist() == [1, 0, -1, 2, 1]


def test_mapping_fewer_clusters_than_classes():
    conf = np.array([[1, 5, 0, 0], [0, 4, 3, 0]])
    assert hungarian_mapping(conf).tolist() == [1, 2]  # 5 + 3 beats 1 + 4
    assert majority_mapping(conf).tolist() == [1, 1]


def test_hungarian_drops_zero_evidence_pairs():
    # linear_sum_assignment must use two rows; the second pair has zero overlap: unmapped
    conf = np.array([[0, 0], [0, 0], [3, 0]])
    assert hungarian_mapping(conf).tolist() == [-1, -1, 0]
    assert majority_mapping(conf).tolist() == [-1, -1, 0]
    assert hungarian_mapping(np.zeros((4, 3))).tolist() == [-1] * 4


def test_hungarian_recovers_a_permutation():
    rng = np.random.default_rng(0)
    k, c = 12, 7
    perm = rng.permutation(k)[:c]  # class j is cluster perm[j]
    conf = rng.integers(0, 5, size=(k, c))
    conf[perm, np.arange(c)] += 100
    mapping = hungarian_mapping(conf)
    assert mapping[perm].tolist() == list(range(c))
    assert (mapping >= 0).sum() == c
    s = mapping_summary(conf, mapping)
    assert s["mapped_clusters"] == c
    assert s["agreement"] == pytest.approx(100 * conf[perm, np.arange(c)].sum() / conf.sum())


def test_confusion_from_labels_and_apply_mapping():
    clusters = np.array([[0, 1, 1], [2, 2, 0]])
    labels = np.array([[1, 0, 0], [255, 1, 1]])
    conf = confusion_from_labels(clusters, labels, 3, 2, ignore_label=255)
    assert conf.tolist() == [[0, 2], [2, 0], [0, 1]]
    assert apply_mapping(clusters, [1, -1, 0], unmapped_value=9).tolist() == [[1, 9, 9], [0, 0, 1]]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: hungarian_mapping([1, 2, 3]), "2-D"),
        (lambda: hungarian_mapping([[1, -1]]), "negative"),
        (lambda: majority_mapping([[1, float("nan")]]), "non-finite"),
        (lambda: majority_mapping(np.zeros((0, 3))), "at least one"),
        (lambda: compute_cluster_mapping([[1]], "greedy"), "unknown cluster mapping"),
        (lambda: confusion_from_labels([3], [0], 3, 2), "cluster ids"),
        (lambda: confusion_from_labels([0], [2], 3, 2), "labels must lie"),
        (lambda: confusion_from_labels([0, 1], [0], 3, 2), "shape"),
        (lambda: apply_mapping([5], [0, 1]), "cluster ids"),
    ],
)
def test_mapping_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ============================================================================================
# COCO instance segmentation (real 50-image val sample)
# ============================================================================================


@pytest.fixture(scope="module")
def coco_sample(shared_data):
    """(dataset name, pycocotools COCO) of the real val sample under a name of its own."""
    from detectron2.data.datasets import register_coco_instances
    from pycocotools.coco import COCO

    json_file = str(shared_data / "coco" / "annotations" / "instances_val2017.json")
    name = _unique("coco_val_sample")
    register_coco_instances(name, {}, json_file, str(shared_data / "coco" / "val2017"))
    DatasetCatalog.get(name)  # fills thing_dataset_id_to_contiguous_id
    yield name, _quiet(COCO, json_file)
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def gt_instances(coco, id_map, cluster_of=None, keep=lambda ann: True):
    """Per image, every kept non-crowd GT instance as a score-1 prediction: ``pred_classes`` the
    contiguous class (``cluster_of=None``) or 0 with ``pred_clusters = cluster_of[class]``."""
    pairs = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.imgs[image_id]
        h, w = info["height"], info["width"]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=False))
        anns = [a for a in anns if keep(a)]
        classes = torch.tensor([id_map[a["category_id"]] for a in anns], dtype=torch.int64)
        inst = Instances((h, w))
        boxes = [[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in anns)]
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4))
        inst.scores = torch.ones(len(anns))
        if cluster_of is None:
            inst.pred_classes = classes
        else:
            inst.pred_classes = torch.zeros(len(anns), dtype=torch.int64)
            inst.pred_clusters = torch.as_tensor(cluster_of, dtype=torch.int64)[classes]
        masks = [coco.annToMask(a) for a in anns]
        masks = np.stack(masks) if masks else np.zeros((0, h, w), dtype=np.uint8)
        inst.pred_masks = torch.from_numpy(masks).bool()
        pairs.append(({"image_id": image_id}, {"instances": inst}))
    return pairs


@pytest.mark.parametrize("method", ["hungarian", "majority"])
def test_coco_cluster_permuted_gt_scores_100(coco_sample, tmp_path, method):
    name, coco = coco_sample
    id_map = MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id
    k = 97
    cluster_of = np.random.default_rng(1).permutation(k)[: len(id_map)]  # class c -> cluster
    evaluator = ClusterCOCOEvaluator(name, k, method, output_dir=str(tmp_path), distributed=False)
    res = _run(evaluator, gt_instances(coco, id_map, cluster_of))
    for task in ("bbox", "segm"):
        for key in ("AP", "AP50", "AR100"):
            assert res[task][key] == pytest.approx(100.0, abs=1e-9), (task, key, res[task])

    with open(tmp_path / "cluster_mapping_coco_cluster.json") as f:
        saved = json.load(f)
    assert saved["method"] == method and saved["num_clusters"] == k and saved["num_classes"] == 80
    mapping = np.array(saved["mapping"])
    present = sorted({id_map[a["category_id"]] for a in coco.anns.values() if not a["iscrowd"]})
    assert 20 < len(present) < 80
    assert mapping[cluster_of[present]].tolist() == present  # inverts the permutation
    assert (mapping >= 0).sum() == len(present)  # clusters without votes stay unmapped
    conf = np.array(saved["confusion"])
    assert conf.shape == (k, 80)
    assert conf.sum() == sum(1 for a in coco.anns.values() if not a["iscrowd"])
    assert res["coco_cluster_mapping"]["agreement"] == pytest.approx(100.0)
    assert (tmp_path / "coco_cluster" / "coco_instances_results.json").is_file()


def test_coco_cluster_drops_unmapped_clusters_and_rejects_bad_ids(coco_sample):
    name, coco = coco_sample
    id_map = MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id
    # two classes share a cluster: one-to-one matching maps it to one of them, the other's
    # instances are dropped (unmapped cluster) or mislabelled, so AP < 100
    cluster_of = np.arange(80)
    person, car = id_map[1], id_map[3]
    cluster_of[car] = cluster_of[person]
    evaluator = ClusterCOCOEvaluator(name, 80, "hungarian", distributed=False, tasks=("bbox",))
    res = _run(evaluator, gt_instances(coco, id_map, cluster_of))
    assert evaluator.mapping[cluster_of[person]] == person  # persons outnumber cars
    assert evaluator.mapping[cluster_of[car]] == person
    assert res["bbox"]["AP"] < 100.0
    assert "segm" not in res

    bad = gt_instances(coco, id_map, np.arange(80))[:1]
    bad[0][1]["instances"].pred_clusters[:] = 80
    with pytest.raises(ValueError, match="pred_clusters must lie in"):
        _run(evaluator, bad)


def every_other_instance(coco):
    """Ids of every other non-crowd annotation (sorted by id)."""
    return set(sorted(coco.getAnnIds(iscrowd=False))[::2])


def pycocotools_class_agnostic(coco, kept):
    """bbox and segm COCOeval stats of the kept GT instances against the class-agnostic GT."""
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    # written here, independently of the library's rewrite: one category, every annotation in it
    agnostic = dict(coco.dataset, categories=[{"id": 1, "name": "fg", "supercategory": "fg"}],
                    annotations=[dict(a, category_id=1) for a in coco.dataset["annotations"]])
    gt = _quiet(COCO)
    gt.dataset = copy.deepcopy(agnostic)  # COCOeval turns GT polygons into RLEs in place
    _quiet(gt.createIndex)
    stats = {}
    for iou_type in ("bbox", "segm"):
        dets = []
        for ann_id in sorted(kept):
            ann = coco.anns[ann_id]
            det = {"image_id": ann["image_id"], "category_id": 1, "score": 1.0}
            if iou_type == "bbox":
                det["bbox"] = list(ann["bbox"])
            else:
                rle = mask_util.encode(np.asfortranarray(coco.annToMask(ann)))
                rle["counts"] = rle["counts"].decode("ascii")
                det["segmentation"] = rle
            dets.append(det)
        ev = COCOeval(gt, _quiet(gt.loadRes, dets), iou_type)
        _quiet(ev.evaluate)
        _quiet(ev.accumulate)
        _quiet(ev.summarize)
        stats[iou_type] = 100.0 * ev.stats
    return stats, agnostic


def test_coco_class_agnostic(coco_sample, tmp_path):
    name, coco = coco_sample
    id_map = MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id

    # ground truth (class-aware pred_classes: they are overwritten with the one category)
    evaluator = ClassAgnosticCOCOEvaluator(name, output_dir=str(tmp_path), distributed=False)
    res = _run(evaluator, gt_instances(coco, id_map))
    for task in ("bbox", "segm"):
        for key in ("AP", "AP50", "AP75", "AR100"):
            assert res[task][key] == pytest.approx(100.0, abs=1e-9), (task, key)
    written = tmp_path / f"{name}_cls_agnostic.json"
    assert evaluator.class_agnostic_json == str(written)
    with open(written) as f:
        agnostic_file = json.load(f)
    assert agnostic_file["categories"] == [{"id": 1, "name": "fg", "supercategory": "fg"}]
    assert len(agnostic_file["annotations"]) == 382
    assert MetadataCatalog.get(name).thing_classes[0] == "person"  # registered metadata untouched

    # half the instances: below 100 and equal to pycocotools on the class-agnostic GT
    kept = every_other_instance(coco)
    want, agnostic = pycocotools_class_agnostic(coco, kept)
    pairs = gt_instances(coco, id_map, keep=lambda a: a["id"] in kept)
    res = _run(evaluator, pairs)
    n = len(coco.getAnnIds(iscrowd=False))
    # every kept prediction is a true positive: precision 1 up to recall k / n, 0 beyond
    rec_thrs = np.linspace(0.0, 1.0, 101)
    expected_ap = 100.0 * np.sum(rec_thrs <= len(kept) / n) / 101
    for task in ("bbox", "segm"):
        assert res[task]["AP"] < 90.0
        assert res[task]["AP"] == pytest.approx(expected_ap, abs=1e-9)
        assert res[task]["AP"] == pytest.approx(want[task][0], abs=1e-9)
        assert res[task]["AP50"] == pytest.approx(want[task][1], abs=1e-9)
        assert res[task]["AR100"] == pytest.approx(want[task][8], abs=1e-9)

    # a one-category dataset (CutLER's cls_agnostic_* layout) is scored against its own json
    from hiseg.data.datasets.cls_agnostic import metadata as cls_agnostic_metadata

    json_file = tmp_path / "agnostic.json"
    json_file.write_text(json.dumps(agnostic))
    one = _unique("cls_agnostic")
    meta = cls_agnostic_metadata(str(json_file), str(tmp_path))
    with registered_dataset(one, lambda: [], **meta):
        ev1 = ClassAgnosticCOCOEvaluator(
            one, output_dir=str(tmp_path / "one"), distributed=False, tasks=("bbox",)
        )
        assert ev1.class_agnostic_json == str(json_file)
        res1 = _run(ev1, pairs)
    assert res1["bbox"]["AP"] == pytest.approx(want["bbox"][0], abs=1e-9)
    assert not (tmp_path / "one" / f"{one}_cls_agnostic.json").exists()


def test_factories_and_result_keys(coco_sample, tmp_path):
    from detectron2.config import get_cfg

    from hiseg.config import add_hiseg_config
    from hiseg.evaluation.registry import EVALUATOR_FACTORIES, build_evaluators
    from hiseg_oap.config import add_oap_config

    name, _ = coco_sample
    types = ("coco_class_agnostic", "coco_cluster", "coco_panoptic_seg_cluster", "sem_seg_cluster")
    assert set(types) <= set(EVALUATOR_FACTORIES)
    cfg = get_cfg()
    add_hiseg_config(cfg)
    cfg.TEST.EVALUATORS = ["coco_cluster"]
    with pytest.raises(ValueError, match="add_oap_config"):
        build_evaluators(cfg, name, str(tmp_path))
    add_oap_config(cfg)
    cfg.MODEL.OAP.HEAD.OUT_DIM = 33
    cfg.MODEL.OAP.TEST.CLUSTER_MAPPING = "majority"
    cfg.TEST.EVALUATORS = ["coco_class_agnostic", "coco_cluster"]
    agn, clu = build_evaluators(cfg, name, str(tmp_path))._evaluators
    assert isinstance(agn, ClassAgnosticCOCOEvaluator) and agn._result_suffix == "_agnostic"
    assert isinstance(clu, ClusterCOCOEvaluator)
    assert clu.num_clusters == 33 and clu.method == "majority"
    cfg.TEST.EVALUATORS = ["coco_class_agnostic"]
    assert build_evaluators(cfg, name, str(tmp_path))._result_suffix == ""
    cfg.MODEL.OAP.TEST.CLUSTER_MAPPING = "greedy"
    cfg.TEST.EVALUATORS = ["coco_cluster"]
    with pytest.raises(ValueError, match="unknown cluster mapping"):
        build_evaluators(cfg, name, str(tmp_path))


# ============================================================================================
# panoptic segmentation (real 2-image COCO panoptic sample)
# ============================================================================================

PANOPTIC = "coco_panoptic_sample"


@pytest.fixture(scope="module")
def panoptic_sample(shared_data):
    import hiseg.data  # noqa: F401  (registers coco_panoptic_sample)

    base = shared_data / "coco_panoptic_sample"
    with open(base / "panoptic_examples.json") as f:
        gt_json = json.load(f)
    with open(base / "panoptic_coco_categories.json") as f:
        categories = json.load(f)
    return base, gt_json, categories


def panoptic_pairs(base, gt_json, cluster_of, edit=None):
    """(inputs, outputs): each image's GT panoptic map with ``category_id`` = the cluster of the
    segment's category. ``edit(image_id, pan, segments)`` may change them in place."""
    from panopticapi.utils import rgb2id

    pairs = []
    for ann in gt_json["annotations"]:
        png = Image.open(base / "panoptic_examples" / ann["file_name"]).convert("RGB")
        pan = rgb2id(np.asarray(png))
        segments = [
            {"id": s["id"], "category_id": int(cluster_of[s["category_id"]]), "isthing": False}
            for s in ann["segments_info"]
        ]  # isthing deliberately wrong: the evaluator takes it from the mapped category
        if edit is not None:
            edit(ann["image_id"], pan, segments)
        image = str(base / "input_images" / ann["file_name"].replace(".png", ".jpg"))
        output = {"panoptic_seg": (torch.from_numpy(pan.astype(np.int32)), segments)}
        pairs.append(({"image_id": ann["image_id"], "file_name": image}, output))
    return pairs


def _cluster_of(categories, k, seed):
    perm = np.random.default_rng(seed).permutation(k)
    return {c["id"]: int(perm[i]) for i, c in enumerate(categories)}


@pytest.mark.parametrize("method", ["hungarian", "majority"])
def test_panoptic_cluster_permuted_gt_scores_100(panoptic_sample, tmp_path, method):
    base, gt_json, categories = panoptic_sample
    k = 150
    cluster_of = _cluster_of(categories, k, seed=2)
    evaluator = ClusterPanopticEvaluator(PANOPTIC, k, method, output_dir=str(tmp_path))
    res = _run(evaluator, panoptic_pairs(base, gt_json, cluster_of))
    for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
        assert res["panoptic_seg"][key] == pytest.approx(100.0, abs=1e-9), (key, res)
    with open(tmp_path / "cluster_mapping_coco_panoptic_seg_cluster.json") as f:
        saved = json.load(f)
    present = {s["category_id"] for a in gt_json["annotations"] for s in a["segments_info"]}
    names = {c["id"]: c["name"] for c in categories}
    assert {int(k_): v for k_, v in saved["mapped"].items()} == {
        cluster_of[c]: names[c] for c in present
    }
    assert res["coco_panoptic_seg_cluster_mapping"]["agreement"] == pytest.approx(100.0)


def test_panoptic_cluster_one_segment_moved(panoptic_sample):
    base, gt_json, categories = panoptic_sample
    k = 150
    cluster_of = _cluster_of(categories, k, seed=3)
    # a small non-crowd person (dataset id 1) of image 439180 gets the horse (id 19) cluster:
    # the horse cluster keeps its majority, so the person is a FN and the horse a FP
    image_id, segment_id, person, horse = 439180, 5768384, 1, 19
    seg = next(s for a in gt_json["annotations"] if a["image_id"] == image_id
               for s in a["segments_info"] if s["id"] == segment_id)  # fmt: skip
    assert seg["category_id"] == person and not seg["iscrowd"]

    def move(img, pan, segments):
        for s in segments:
            if img == image_id and s["id"] == segment_id:
                s["category_id"] = cluster_of[horse]

    want = expected_pq(gt_json, moved_from=person, moved_to=horse, categories=categories)
    assert want["PQ"] < 100.0 and want["PQ_st"] == 100.0
    for method in ("hungarian", "majority"):
        evaluator = ClusterPanopticEvaluator(PANOPTIC, k, method)
        res = _run(evaluator, panoptic_pairs(base, gt_json, cluster_of, edit=move))["panoptic_seg"]
        assert evaluator.mapping[cluster_of[horse]] == evaluator._class_index[horse]
        for key, value in want.items():
            assert res[key] == pytest.approx(value, abs=1e-9), (method, key, res[key], value)
        assert res["SQ"] == pytest.approx(100.0)


def test_panoptic_cluster_split_stuff_segment(panoptic_sample):
    """A stuff segment split in two clusters: majority maps both to the category and the parts are
    merged again (PQ 100); Hungarian leaves the smaller cluster unmapped, its pixels void, so the
    segment is still matched (IoU > 0.5) with SQ < 100."""
    base, gt_json, categories = panoptic_sample
    k = 150
    cluster_of = _cluster_of(categories, k, seed=4)
    spare = next(c for c in range(k) if c not in cluster_of.values())
    image_id, tree_segment = 142238, 2330219

    def split(img, pan, segments):
        if img != image_id:
            return
        rows = np.nonzero((pan == tree_segment).any(axis=1))[0]
        top = (pan == tree_segment) & (np.arange(pan.shape[0])[:, None] < np.percentile(rows, 20))
        new_id = int(pan.max()) + 1
        pan[top] = new_id
        segments.append({"id": new_id, "category_id": spare, "isthing": False})

    pairs = panoptic_pairs(base, gt_json, cluster_of, edit=split)
    res = _run(ClusterPanopticEvaluator(PANOPTIC, k, "majority"), pairs)["panoptic_seg"]
    assert res["PQ"] == pytest.approx(100.0, abs=1e-9)
    res = _run(ClusterPanopticEvaluator(PANOPTIC, k, "majority", merge_stuff=False), pairs)
    assert res["panoptic_seg"]["PQ"] < 100.0
    res = _run(ClusterPanopticEvaluator(PANOPTIC, k, "hungarian"), pairs)["panoptic_seg"]
    assert res["RQ"] == pytest.approx(100.0, abs=1e-9)
    assert res["SQ"] < 100.0 and res["PQ_th"] == pytest.approx(100.0, abs=1e-9)


# ============================================================================================
# semantic segmentation
# ============================================================================================


@pytest.fixture()
def tiny_sem_seg(tmp_path):
    """2 images, 3 classes (+255 ignore), registered under a unique name."""
    from detectron2.data.datasets import load_sem_seg

    images, gts = tmp_path / "images", tmp_path / "gt"
    images.mkdir()
    gts.mkdir()
    gt = {
        "a": np.array([[0, 0, 1, 1], [2, 2, 2, 255]], np.uint8),
        "b": np.array([[1, 1, 1], [1, 1, 1]], np.uint8),
    }
    for key, label in gt.items():
        Image.fromarray(label).save(gts / f"{key}.png")
        Image.fromarray(np.zeros(label.shape + (3,), np.uint8)).save(images / f"{key}.jpg")
    name = _unique("tiny_sem_seg")
    with registered_dataset(
        name, lambda: load_sem_seg(str(gts), str(images), "png", "jpg"),
        stuff_classes=["c0", "c1", "c2"], ignore_label=255, evaluator_type="sem_seg_cluster",
    ):  # fmt: skip
        yield name


# cluster maps (K = 4) of the two images of ``tiny_sem_seg``
HAND_CLUSTERS = {
    "a": np.array([[3, 3, 1, 1], [0, 0, 2, 0]]),
    "b": np.array([[1, 1, 2], [2, 1, 1]]),
}


def _sem_pairs(name, clusters):
    return [
        ({"file_name": d["file_name"]},
         {"sem_seg_clusters": torch.from_numpy(clusters[Path(d["file_name"]).stem])})
        for d in DatasetCatalog.get(name)
    ]  # fmt: skip


def test_sem_seg_cluster_hand_case(tiny_sem_seg, tmp_path):
    # valid-pixel confusion (cluster x class): c0 [0,0,2]  c1 [0,6,0]  c2 [0,2,1]  c3 [2,0,0]
    # (cluster 0 also covers the ignored pixel, which does not count)
    ev = ClusterSemSegEvaluator(tiny_sem_seg, 4, "hungarian", output_dir=str(tmp_path / "h"))
    res = _run(ev, _sem_pairs(tiny_sem_seg, HAND_CLUSTERS))
    assert ev.confusion.tolist() == [[0, 0, 2], [0, 6, 0], [0, 2, 1], [2, 0, 0]]
    # one-to-one: 3 -> c0, 1 -> c1, 0 -> c2; cluster 2 unmapped. Its 3 valid pixels (1 of c2
    # in "a", 2 of c1 in "b") are errors: 10 of 13 valid pixels right. Per class (TP, GT, pred):
    #   c0 (2, 2, 2) IoU 1;  c1 (6, 8, 6) IoU 6/8;  c2 (2, 3, 2) IoU 2/3  ("unmapped", with its 3
    #   pixels, is not a class of the dataset: not in the mean)
    assert ev.mapping.tolist() == [2, 1, -1, 0]
    sem = res["sem_seg"]
    assert sem["pACC"] == pytest.approx(100 * 10 / 13)
    assert sem["mIoU"] == pytest.approx(100 * (1 + 6 / 8 + 2 / 3) / 3)  # dataset classes only
    assert sem["IoU-c1"] == pytest.approx(100 * 6 / 8)
    assert sem["ACC-c1"] == pytest.approx(100 * 6 / 8)  # the 2 unmapped c1 pixels are misses
    assert not any("unmapped" in key for key in sem)
    assert res["sem_seg_cluster_mapping"]["unmapped_evidence"] == pytest.approx(100 * 3 / 13)
    with open(tmp_path / "h" / "cluster_mapping_sem_seg_cluster.json") as f:
        saved = json.load(f)
    assert saved["mapping"] == [2, 1, -1, 0] and saved["class_names"] == ["c0", "c1", "c2"]

    # many-to-one: cluster 2 -> c1 (2 of its 3 pixels); no unmapped pixels
    #   c0 (2, 2, 2) IoU 1;  c1 (8, 8, 9) IoU 8/9;  c2 (2, 3, 2) IoU 2/3
    ev = ClusterSemSegEvaluator(tiny_sem_seg, 4, "majority")
    sem = _run(ev, _sem_pairs(tiny_sem_seg, HAND_CLUSTERS))["sem_seg"]
    assert ev.mapping.tolist() == [2, 1, 1, 0]
    assert sem["pACC"] == pytest.approx(100 * 12 / 13)
    assert sem["mIoU"] == pytest.approx(100 * (1 + 8 / 9 + 2 / 3) / 3)


def test_sem_seg_cluster_bad_input(tiny_sem_seg):
    ev = ClusterSemSegEvaluator(tiny_sem_seg, 4)
    pairs = _sem_pairs(tiny_sem_seg, HAND_CLUSTERS)
    ev.reset()
    with pytest.raises(ValueError, match="must lie in \\[0, 4\\)"):
        ev.process([pairs[0][0]], [{"sem_seg_clusters": torch.full((2, 4), 4)}])
    with pytest.raises(ValueError, match="original image size"):
        ev.process([pairs[0][0]], [{"sem_seg_clusters": torch.zeros((3, 4), dtype=torch.long)}])
    with pytest.raises(ValueError, match="no 'sem_seg_clusters'"):
        ev.process([pairs[0][0]], [{"sem_seg": torch.zeros((3, 2, 4))}])
    with pytest.raises(ValueError, match="not an image of"):
        ev.process([{"file_name": "nope.jpg"}], [pairs[0][1]])
    with pytest.raises(ValueError, match="num_clusters"):
        ClusterSemSegEvaluator(tiny_sem_seg, 0)


def test_sem_seg_cluster_coco_stuff27_from_panoptic_sample(panoptic_sample, tmp_path):
    from detectron2.data.datasets import load_sem_seg

    from hiseg.data.datasets.coco_stuff27 import IGNORE_LABEL, STUFF27_CLASSES, category_to_label

    base, gt_json, categories = panoptic_sample
    prep = load_script("prepare_coco_stuff27")
    cat_to_label = category_to_label(categories)
    gt_dir = tmp_path / "stuff27"
    gt_dir.mkdir()
    labels = {}
    for ann in gt_json["annotations"]:
        png = Image.open(base / "panoptic_examples" / ann["file_name"]).convert("RGB")
        pan = prep.rgb_to_id(np.asarray(png))
        label = prep.stuff27_label_map(pan, ann["segments_info"], cat_to_label)
        Image.fromarray(label).save(gt_dir / ann["file_name"])
        labels[Path(ann["file_name"]).stem] = label
    present = sorted({int(v) for lab in labels.values() for v in np.unique(lab)} - {IGNORE_LABEL})
    assert len(present) >= 5

    k = 40
    rng = np.random.default_rng(5)
    perm = rng.permutation(k)
    clusters = {}
    for stem, label in labels.items():
        c = rng.integers(0, k, size=label.shape)  # ignored pixels: any cluster
        valid = label != IGNORE_LABEL
        c[valid] = perm[label[valid]]
        clusters[stem] = c
    name = _unique("stuff27_sample")
    with registered_dataset(
        name, lambda: load_sem_seg(str(gt_dir), str(base / "input_images"), "png", "jpg"),
        stuff_classes=list(STUFF27_CLASSES), ignore_label=IGNORE_LABEL,
    ):  # fmt: skip
        for method in ("hungarian", "majority"):
            ev = ClusterSemSegEvaluator(name, k, method, output_dir=str(tmp_path / method))
            sem = _run(ev, _sem_pairs(name, clusters))["sem_seg"]
            assert sem["mIoU"] == pytest.approx(100.0, abs=1e-9), method
            assert sem["pACC"] == pytest.approx(100.0, abs=1e-9), method
            assert ev.mapping[perm[present]].tolist() == present


# ============================================================================================
# two processes (gloo): every rank maps with the confusion of all ranks
# ============================================================================================


def _distributed_worker(rank, world, init_file, gt_dir, image_dir, out_dir, result_dir):
    import torch.distributed as dist
    from detectron2.data.datasets import load_sem_seg

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        name = _unique("dist_sem_seg")
        with registered_dataset(
            name, lambda: load_sem_seg(gt_dir, image_dir, "png", "jpg"),
            stuff_classes=["c0", "c1", "c2"], ignore_label=255,
        ):  # fmt: skip
            pairs = _sem_pairs(name, HAND_CLUSTERS)[rank::world]  # rank 0: "a", rank 1: "b"
            ev = ClusterSemSegEvaluator(name, 4, "hungarian", output_dir=out_dir)
            res = _run(ev, pairs)
        out = {
            "local": ev._confusion.tolist(),
            "confusion": ev.confusion.tolist(),
            "mapping": ev.mapping.tolist(),
            "results": {k: {m: float(v) for m, v in r.items()} for k, r in res.items()},
        }
        with open(os.path.join(result_dir, f"{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def test_sem_seg_cluster_two_processes(tiny_sem_seg, tmp_path):
    import torch.multiprocessing as mp

    d = DatasetCatalog.get(tiny_sem_seg)[0]
    gt_dir, image_dir = os.path.dirname(d["sem_seg_file_name"]), os.path.dirname(d["file_name"])
    results = tmp_path / "results"
    results.mkdir()
    args = (2, str(tmp_path / "init"), gt_dir, image_dir, str(tmp_path / "out"), str(results))
    mp.spawn(_distributed_worker, args=args, nprocs=2, join=True)
    r0, r1 = (json.loads((results / f"{r}.json").read_text()) for r in (0, 1))
    assert r0["local"] != r1["local"]  # each rank saw one image ...
    total = [[0, 0, 2], [0, 6, 0], [0, 2, 1], [2, 0, 0]]
    assert r0["confusion"] == r1["confusion"] == total  # ... and both map with the sum
    assert r0["mapping"] == r1["mapping"] == [2, 1, -1, 0]
    assert r1["results"] == {}  # the standard evaluator reports on the main process
    assert r0["results"]["sem_seg"]["pACC"] == pytest.approx(100 * 10 / 13)
    assert r0["results"]["sem_seg"]["mIoU"] == pytest.approx(100 * (1 + 6 / 8 + 2 / 3) / 3)
    saved = json.loads((tmp_path / "out" / "cluster_mapping_sem_seg_cluster.json").read_text())
    assert saved["confusion"] == total


# ============================================================================================
# package layout
# ============================================================================================


def test_each_evaluator_type_is_registered_beside_its_evaluator():
    import hiseg_oap.evaluation as oap_eval
    from hiseg.evaluation.registry import EVALUATOR_FACTORIES

    modules = {"coco_class_agnostic": "class_agnostic_coco", "coco_cluster": "cluster_coco",
               "coco_panoptic_seg_cluster": "cluster_panoptic", "sem_seg_cluster": "cluster_sem_seg"}
    assert set(oap_eval.EVALUATOR_TYPES) == set(modules)
    for t, module in modules.items():
        assert EVALUATOR_FACTORIES[t].__module__ == f"hiseg_oap.evaluation.{module}", t


def test_evaluation_does_not_import_pseudo_labels():
    """One way only: pseudo-label code may use the evaluators, the evaluators never import it."""
    import ast

    import hiseg_oap.evaluation as oap_eval

    folder = Path(oap_eval.__file__).parent
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = "hiseg_oap" if node.level >= 2 else "hiseg_oap.evaluation" if node.level else ""
                names = [".".join(p for p in (base, node.module) if p)]
                names += [f"{names[0]}.{a.name}" for a in node.names]
            else:
                continue
            bad = [n for n in names if n.startswith("hiseg_oap.pseudo_label")]
            assert not bad, f"{path.name} imports {bad}"
