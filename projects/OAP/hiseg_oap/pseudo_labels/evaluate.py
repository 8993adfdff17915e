"""Class-agnostic COCO evaluation of pseudo-masks: detectron2's ``COCOEvaluator`` (with AR added to
AP, :class:`hiseg_oap.evaluation.COCOEvaluatorWithAR`) on a ground truth whose categories are
collapsed into one (``fg``, :func:`hiseg.data.datasets.cls_agnostic.class_agnostic_coco`)."""
from __future__ import annotations

import copy
import json
import os
import tempfile
from collections import OrderedDict
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

from hiseg.data.datasets.cls_agnostic import class_agnostic_coco

from .io import validate_results

__all__ = ["load_ground_truth", "evaluate_results", "format_metrics"]


def load_ground_truth(gt) -> Tuple[dict, str]:
    """(COCO dict, description) of a GT: a COCO dict, a JSON path or a registered dataset."""
    if isinstance(gt, Mapping):
        return dict(gt), "<dict>"
    gt = os.fspath(gt)
    if os.path.isfile(gt):
        with open(gt) as f:
            return json.load(f), gt
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if gt not in DatasetCatalog.list():
        raise ValueError(f"ground truth {gt!r} is neither a COCO JSON file nor a registered dataset")
    meta = MetadataCatalog.get(gt)
    json_file = meta.get("json_file") if hasattr(meta, "get") else getattr(meta, "json_file", None)
    if json_file:
        if not os.path.isfile(json_file):
            raise FileNotFoundError(f"ground truth of dataset {gt!r}: {json_file} does not exist")
        with open(json_file) as f:
            return json.load(f), f"{gt} ({json_file})"
    from detectron2.data.datasets.coco import convert_to_coco_dict

    coco = convert_to_coco_dict(gt)
    if not coco.get("annotations"):
        raise ValueError(f"dataset {gt!r} has no instance annotations to evaluate against")
    return coco, gt


def evaluate_results(
    results: Sequence[Mapping], gt, image_ids: Optional[Iterable] = None,
    tasks: Sequence[str] = ("segm", "bbox"), max_dets: int = 100, evaluator_kwargs: Optional[dict] = None,
) -> "OrderedDict[str, Dict[str, float]]":
    """Class-agnostic COCO AP / AR of result entries with detectron2's ``COCOEvaluator``.

    ``gt``: a registered dataset name, a COCO JSON path or a COCO dict. A GT with one category is
    used as it is (e.g. ``cls_agnostic_coco``); otherwise every category is collapsed into
    ``fg`` (:func:`class_agnostic_coco`). The GT is registered on the fly under a temporary name
    (removed afterwards). Every result counts as that one class whatever its ``category_id``.

    ``image_ids``: the images to evaluate on (default: those of the results; images without a
    result must be listed to count as misses). Returns ``{task: {"AP", "AP50", ..., "AR100"}}``.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from hiseg.compat import coco_evaluator_kwargs

    coco, where = load_ground_truth(gt)
    if "annotations" not in coco:
        raise ValueError(f"ground truth {where} has no 'annotations'")
    cats = coco.get("categories") or []
    if len(cats) != 1:
        coco = class_agnostic_coco(coco)
    cat_id = int(coco["categories"][0]["id"])
    gt_images = {im["id"]: (int(im["height"]), int(im["width"])) for im in coco.get("images", [])}
    ids = list(dict.fromkeys(r["image_id"] for r in results)) if image_ids is None else list(dict.fromkeys(image_ids))
    if not ids:
        raise ValueError("nothing to evaluate: no image ids")
    unknown = [i for i in ids if i not in gt_images]
    if unknown:
        raise ValueError(f"{len(unknown)} image id(s) are not in the ground truth {where}: {unknown[:5]}")
    validate_results([r for r in results if r["image_id"] in set(ids)], image_sizes=gt_images)

    by_image: Dict = {i: [] for i in ids}
    for r in results:
        if r["image_id"] in by_image:
            # contiguous class 0; the evaluator maps it back to the GT's category id
            by_image[r["image_id"]].append(dict(copy.deepcopy(dict(r)), category_id=0))

    kwargs = dict(coco_evaluator_kwargs())
    kwargs.update(evaluator_kwargs or {})
    with tempfile.TemporaryDirectory(prefix="oap_eval_") as tmp:
        json_file = os.path.join(tmp, "gt_class_agnostic.json")
        with open(json_file, "w") as f:
            json.dump(coco, f)
        name = f"_oap_pseudo_eval_{os.path.basename(tmp)}"
        DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).set(json_file=json_file, thing_classes=["fg"],
                                      thing_dataset_id_to_contiguous_id={cat_id: 0}, evaluator_type="coco")
        try:
            from ..evaluation import COCOEvaluatorWithAR

            evaluator = COCOEvaluatorWithAR(name, tasks=tuple(tasks), distributed=False, output_dir=None,
                                            max_dets_per_image=int(max_dets), **kwargs)
            evaluator.reset()
            evaluator._predictions = [{"image_id": i, "instances": by_image[i]} for i in ids]
            if not any(by_image.values()):  # the evaluator itself would return {} here
                return OrderedDict((task, evaluator._derive_coco_results(None, task)) for task in tasks)
            return evaluator.evaluate(img_ids=ids)
        finally:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def format_metrics(metrics: Mapping[str, Mapping[str, float]], keys: Sequence[str] = ("AP", "AP50", "AR100")) -> str:
    """A small text table: one row per task, the given metric columns."""
    header = "task  " + "".join(f"{k:>8}" for k in keys)
    rows = [header]
    for task, vals in metrics.items():
        rows.append(f"{task:<6}" + "".join(f"{vals.get(k, float('nan')):8.2f}" for k in keys))
    return "\n".join(rows)
