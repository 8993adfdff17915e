"""detectron2's standard evaluators give the right numbers on the real samples.

* ``COCOEvaluator`` (bbox + segm) on the 50-image COCO val2017 sample: ground truth fed back as
  predictions scores AP = 100; keeping every other prediction per category gives the AP derived
  below, and the same results scored by pycocotools' ``COCOeval`` directly agree.
* ``COCOPanopticEvaluator`` on ``coco_panoptic_sample``: ground truth gives PQ = 100; relabelling
  one segment gives the PQ computed by hand from the PQ definition.
* ``SemSegEvaluator`` on a tiny dataset written to a tmp folder, against hand-computed values.
"""
import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances

from expectations import expected_pq
from hiseg.compat import coco_evaluator_kwargs

COCO_NAME = "hiseg_test_coco_val_sample"


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# COCOEvaluator
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coco_sample(shared_data):
    """The real val sample under a name of its own (independent of $DETECTRON2_DATASETS)."""
    from detectron2.data.datasets import register_coco_instances
    from pycocotools.coco import COCO

    json_file = str(shared_data / "coco" / "annotations" / "instances_val2017.json")
    if COCO_NAME not in DatasetCatalog.list():
        register_coco_instances(COCO_NAME, {}, json_file, str(shared_data / "coco" / "val2017"))
    DatasetCatalog.get(COCO_NAME)  # fills thing_dataset_id_to_contiguous_id
    return _quiet(COCO, json_file)


def gt_as_predictions(coco, keep=lambda ann: True):
    """Per image: (inputs, outputs) with every kept non-crowd GT instance as a score-1 detection."""
    id_map = MetadataCatalog.get(COCO_NAME).thing_dataset_id_to_contiguous_id
    pairs = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.imgs[image_id]
        h, w = info["height"], info["width"]
        anns = [
            a for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=False)) if keep(a)
        ]
        inst = Instances((h, w))
        boxes = [[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in anns)]
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4))
        inst.scores = torch.ones(len(anns))
        inst.pred_classes = torch.tensor(
            [id_map[a["category_id"]] for a in anns], dtype=torch.int64
        )
        masks = [coco.annToMask(a) for a in anns]
        if masks:
            inst.pred_masks = torch.from_numpy(np.stack(masks)).bool()
        else:
            inst.pred_masks = torch.zeros((0, h, w), dtype=torch.bool)
        pairs.append(({"image_id": image_id}, {"instances": inst}))
    return pairs


def run_coco_evaluator(pairs, output_dir=None):
    from detectron2.evaluation import COCOEvaluator

    evaluator = COCOEvaluator(
        COCO_NAME, tasks=("bbox", "segm"), distributed=False, output_dir=output_dir,
        **coco_evaluator_kwargs(),
    )  # fmt: skip
    evaluator.reset()
    for inp, out in pairs:
        evaluator.process([inp], [out])
    return _quiet(evaluator.evaluate)


def every_other_per_category(coco):
    """Ids of the kept annotations: per category, the 1st, 3rd, 5th, ... non-crowd one by id."""
    kept, counts = set(), {}
    for cat in coco.getCatIds():
        ids = sorted(coco.getAnnIds(catIds=[cat], iscrowd=False))
        kept.update(ids[::2])
        if ids:
            counts[cat] = (len(ids[::2]), len(ids))
    return kept, counts


def expected_ap_keeping(counts):
    """AP (in %) when k of n GT per category are detected perfectly and nothing else is.

    Every detection is a true positive at every IoU threshold (it *is* a GT instance), so the
    precision is 1 up to recall k/n and 0 beyond. COCOeval interpolates precision at the 101
    recall thresholds ``recThrs``: a threshold r counts iff some recall >= r, i.e. r <= k/n.
    So AP_c = #{r in recThrs : r <= k/n} / 101, identical at all 10 IoU thresholds, and
    AP = mean over categories with at least one non-crowd GT.
    """
    from pycocotools.cocoeval import Params

    rec_thrs = Params(iouType="bbox").recThrs
    per_cat = [np.sum(rec_thrs <= np.float64(k) / n) / len(rec_thrs) for k, n in counts.values()]
    return 100.0 * float(np.mean(per_cat))


def test_coco_evaluator_gt_as_predictions_scores_100(coco_sample):
    res = run_coco_evaluator(gt_as_predictions(coco_sample))
    assert res["bbox"]["AP"] > 99.9 and res["segm"]["AP"] > 99.9, res
    assert res["bbox"]["AP"] == pytest.approx(100.0, abs=1e-9)
    assert res["segm"]["AP"] == pytest.approx(100.0, abs=1e-9)
    assert res["bbox"]["AP50"] == pytest.approx(100.0)
    assert res["segm"]["AP75"] == pytest.approx(100.0)


def test_coco_evaluator_dropping_every_other_prediction(coco_sample, tmp_path):
    from pycocotools.cocoeval import COCOeval

    kept, counts = every_other_per_category(coco_sample)
    # sanity of the sample: 382 annotations, some crowd; several categories with n odd
    assert len(coco_sample.anns) == 382
    assert any(n % 2 for _, n in counts.values())
    res = run_coco_evaluator(
        gt_as_predictions(coco_sample, keep=lambda a: a["id"] in kept), output_dir=str(tmp_path)
    )
    want = expected_ap_keeping(counts)
    assert 50.0 < want < 90.0  # categories with one GT keep it: AP 100 there
    assert res["bbox"]["AP"] == pytest.approx(want, abs=1e-6)
    assert res["segm"]["AP"] == pytest.approx(want, abs=1e-6)

    # Second check: the results file the evaluator wrote, scored by pycocotools directly.
    with open(tmp_path / "coco_instances_results.json") as f:
        results = json.load(f)
    assert len(results) == len(kept)
    boxes_only = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    dt = _quiet(coco_sample.loadRes, boxes_only)
    ev = COCOeval(coco_sample, dt, "bbox")
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    _quiet(ev.summarize)
    assert 100.0 * ev.stats[0] == pytest.approx(res["bbox"]["AP"], abs=1e-9)


# --------------------------------------------------------------------------------------------
# COCOPanopticEvaluator
# --------------------------------------------------------------------------------------------


def panoptic_gt_as_predictions(dicts, relabel=None):
    """(inputs, outputs) with each image's panoptic ground truth as the prediction.

    ``relabel``: ``(image_id, segment_id, new contiguous category, isthing)`` to change one segment.
    """
    from panopticapi.utils import rgb2id

    pairs = []
    for d in dicts:
        pan = rgb2id(np.asarray(Image.open(d["pan_seg_file_name"]).convert("RGB")))
        segments = []
        for s in d["segments_info"]:
            s = {"id": s["id"], "category_id": s["category_id"], "isthing": s["isthing"]}
            if relabel and (d["image_id"], s["id"]) == relabel[:2]:
                s["category_id"], s["isthing"] = relabel[2], relabel[3]
            segments.append(s)
        output = {"panoptic_seg": (torch.from_numpy(pan.astype(np.int32)), segments)}
        pairs.append(({"file_name": d["file_name"], "image_id": d["image_id"]}, output))
    return pairs


def run_panoptic_evaluator(pairs):
    from detectron2.evaluation import COCOPanopticEvaluator

    evaluator = COCOPanopticEvaluator("coco_panoptic_sample")
    evaluator.reset()
    for inp, out in pairs:
        evaluator.process([inp], [out])
    return _quiet(evaluator.evaluate)["panoptic_seg"]




@pytest.fixture(scope="module")
def panoptic_sample(shared_data):
    import hiseg.data  # noqa: F401  (registers coco_panoptic_sample)

    with open(shared_data / "coco_panoptic_sample" / "panoptic_examples.json") as f:
        gt_json = json.load(f)
    return DatasetCatalog.get("coco_panoptic_sample"), gt_json


def test_coco_panoptic_evaluator_gt_as_predictions_scores_100(panoptic_sample):
    dicts, gt_json = panoptic_sample
    res = run_panoptic_evaluator(panoptic_gt_as_predictions(dicts))
    for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
        assert res[key] == pytest.approx(100.0, abs=1e-9), (key, res)
    assert expected_pq(gt_json)["PQ"] == 100.0


def test_coco_panoptic_evaluator_relabelled_segment(panoptic_sample):
    dicts, gt_json = panoptic_sample
    meta = MetadataCatalog.get("coco_panoptic_sample")
    to_dataset = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
    # the first non-crowd person (dataset id 1) of image 142238 is predicted as a dog (id 18)
    image = next(d for d in dicts if d["image_id"] == 142238)
    seg = next(
        s for s in image["segments_info"]
        if s["isthing"] and to_dataset[s["category_id"]] == 1 and not s["iscrowd"]
    )  # fmt: skip
    dog = meta.thing_dataset_id_to_contiguous_id[18]
    gt_cats = {s["category_id"] for a in gt_json["annotations"] for s in a["segments_info"]}
    assert 18 not in gt_cats  # so "dog" enters the mean with PQ 0
    res = run_panoptic_evaluator(
        panoptic_gt_as_predictions(dicts, relabel=(142238, seg["id"], dog, True))
    )
    want = expected_pq(gt_json, moved_from=1, moved_to=18)
    assert want["PQ"] < 100.0 and want["PQ_st"] == 100.0
    for key, value in want.items():
        assert res[key] == pytest.approx(value, abs=1e-9), (key, res[key], value)


# --------------------------------------------------------------------------------------------
# SemSegEvaluator
# --------------------------------------------------------------------------------------------


def test_sem_seg_evaluator_hand_computed(tmp_path):
    from detectron2.data.datasets import load_sem_seg
    from detectron2.evaluation import SemSegEvaluator

    name = f"hiseg_test_tiny_sem_seg_{os.getpid()}_{tmp_path.name}"
    images, gts = tmp_path / "images", tmp_path / "gt"
    images.mkdir()
    gts.mkdir()
    gt = {
        "a": np.array([[0, 0, 1, 1], [2, 2, 255, 255]], np.uint8),
        "b": np.array([[1, 1], [1, 1]], np.uint8),
    }
    pred = {
        "a": np.array([[0, 1, 1, 1], [2, 0, 0, 2]]),
        "b": np.array([[1, 1], [1, 3]]),
    }
    for key, label in gt.items():
        Image.fromarray(label).save(gts / f"{key}.png")
        Image.fromarray(np.zeros(label.shape + (3,), np.uint8)).save(images / f"{key}.jpg")
    DatasetCatalog.register(name, lambda: load_sem_seg(str(gts), str(images), "png", "jpg"))
    MetadataCatalog.get(name).set(
        stuff_classes=["c0", "c1", "c2", "c3"], ignore_label=255, evaluator_type="sem_seg"
    )
    try:
        evaluator = SemSegEvaluator(name, distributed=False)
        evaluator.reset()
        for d in DatasetCatalog.get(name):
            key = os.path.splitext(os.path.basename(d["file_name"]))[0]
            scores = torch.nn.functional.one_hot(torch.from_numpy(pred[key]), 4).permute(2, 0, 1)
            evaluator.process([d], [{"sem_seg": scores.float()}])
        res = evaluator.evaluate()["sem_seg"]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    # Valid (non-255) pixels: 6 in "a", 4 in "b". Per class (TP, GT pixels, predicted pixels):
    #   c0: (1, 2, 2) -> IoU 1/3      c1: (2+3, 2+4, 3+3) -> IoU 5/7
    #   c2: (1, 2, 1) -> IoU 1/2      c3: (0, 0, 1) -> no GT: IoU NaN, but it still counts in
    #   the denominator of detectron2's mIoU (classes with GT or prediction), adding 0.
    assert res["mIoU"] == pytest.approx(100 * (1 / 3 + 5 / 7 + 1 / 2) / 4)
    assert res["fwIoU"] == pytest.approx(100 * (0.2 / 3 + 0.6 * 5 / 7 + 0.2 / 2))
    assert res["pACC"] == pytest.approx(100 * 7 / 10)
    assert res["mACC"] == pytest.approx(100 * (1 / 2 + 5 / 6 + 1 / 2) / 3)
    assert res["IoU-c1"] == pytest.approx(100 * 5 / 7)
    assert np.isnan(res["IoU-c3"])
