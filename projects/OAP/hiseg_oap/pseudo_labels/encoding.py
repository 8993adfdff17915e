"""Pseudo-masks as COCO-format files, and their class-agnostic COCO evaluation.

Written for ``tools/generate_pseudo_masks.py`` and usable on its own:

* :func:`encode_mask` / :func:`decode_segmentation` / :func:`mask_to_result`: one binary mask at
  image size <-> one COCO result entry (``image_id``, ``category_id`` 1, RLE ``segmentation`` with
  ``counts`` as ``str``, ``bbox`` xywh computed from the mask, ``score``, plus any extra fields
  such as ``level`` / ``layer``), the format of CutLER's pseudo-labels and of ``COCO.loadRes``.
* :func:`parse_level_specs` / :func:`resolve_levels`: which OAP layers and kinds to export
  (``instance``, ``semantic:-1``, ``all:0-2``).
* :func:`coherence_scores`: the score given to a mask (see the function).
* :func:`pseudo_masks_to_results`: one :class:`~hiseg_oap.pooling.PseudoMasks` -> result entries.
* :func:`filter_results`: the export filters (masks covering most of the image, a maximum per
  image);
* :func:`validate_results`, :func:`write_results` (atomic), :func:`load_results`,
  :func:`results_to_coco_dataset` (a full annotation file to train on, as CutLER's
  ``imagenet_train_fixsize480_tau0.15_N3.json``).
* :func:`class_agnostic_coco`, :func:`evaluate_results`: detectron2's ``COCOEvaluator`` on a
  ground truth whose categories are collapsed into one (``fg``), with AR added to AP.
"""
from __future__ import annotations

import copy
import json
import os
import re
import tempfile
from collections import OrderedDict
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from pycocotools import mask as mask_util

# the single class of class-agnostic sets (CutLER's: id 1, ``fg``) and the collapse into it
from hiseg.data.datasets.cls_agnostic import FG_CATEGORY, class_agnostic_coco  # noqa: F401  (re-exported)

from .pooling.types import first_unique_rows

__all__ = [
    "KINDS", "SCORES", "FG_CATEGORY",
    "encode_mask", "decode_segmentation", "bbox_from_mask", "mask_to_result", "masks_to_results",
    "parse_level_specs", "resolve_levels", "coherence_scores", "pseudo_masks_to_results",
    "DEFAULT_MAX_AREA_FRACTION", "DEFAULT_MAX_PER_IMAGE", "mask_area_fraction", "filter_results",
    "validate_results", "write_results", "load_results", "results_to_coco_dataset",
    "atomic_write_json", "class_agnostic_coco", "load_ground_truth",
    "evaluate_results", "format_metrics",
]

#: the two mask levels of an OAP layer (MaskCut fills only ``instance``)
KINDS = ("instance", "semantic")
#: how a mask is scored (see :func:`coherence_scores`)
SCORES = ("coherence", "one")


# ---------------------------------------------------------------------------------------------
# one mask <-> one result entry
def encode_mask(mask: np.ndarray) -> dict:
    """COCO compressed RLE of an ``(H, W)`` binary mask, ``counts`` decoded to ``str`` (JSON)."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {m.shape}")
    rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _rle_for_api(seg: Mapping) -> dict:
    """A compressed RLE as pycocotools wants it (``counts`` as bytes); accepts uncompressed RLE."""
    if not isinstance(seg, Mapping) or "counts" not in seg or "size" not in seg:
        raise ValueError(f"segmentation is not an RLE dict with 'size' and 'counts': {str(seg)[:80]}")
    h, w = (int(v) for v in seg["size"])
    counts = seg["counts"]
    if isinstance(counts, list):
        return mask_util.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": [h, w], "counts": counts}


def decode_segmentation(seg: Mapping) -> np.ndarray:
    """``(H, W)`` bool mask of a result's RLE ``segmentation`` (compressed or not)."""
    return mask_util.decode(_rle_for_api(seg)).astype(bool)


def bbox_from_mask(mask: np.ndarray) -> List[float]:
    """``[x, y, w, h]`` of the tightest box around the mask's pixels (COCO convention: pixel
    ``(x, y)`` spans ``[x, x + 1)``), ``[0, 0, 0, 0]`` for an empty mask."""
    m = np.asarray(mask, dtype=bool)
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    if rows.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


def mask_to_result(mask: np.ndarray, image_id, score: float = 1.0, category_id: int = 1, **extra) -> dict:
    """One COCO result entry for an ``(H, W)`` mask at image size."""
    rle = encode_mask(mask)
    box = mask_util.toBbox(_rle_for_api(rle))
    out = {
        "image_id": image_id,
        "category_id": int(category_id),
        "segmentation": rle,
        "bbox": [float(v) for v in box],
        "score": float(score),
    }
    out.update(extra)
    return out


def masks_to_results(masks: np.ndarray, image_id, scores: Sequence[float], category_id: int = 1,
                     **extra) -> List[dict]:
    """:func:`mask_to_result` for a ``(K, H, W)`` stack (one pycocotools call); empty masks are
    skipped. ``extra`` values that are sequences of length K are split per mask."""
    m = np.asarray(masks)
    if m.ndim != 3:
        raise ValueError(f"expected (K, H, W) masks, got shape {m.shape}")
    k = m.shape[0]
    if len(scores) != k:
        raise ValueError(f"{k} masks but {len(scores)} scores")
    if k == 0:
        return []
    rles = mask_util.encode(np.asfortranarray(m.transpose(1, 2, 0).astype(np.uint8)))
    boxes = mask_util.toBbox(rles)
    areas = mask_util.area(rles)
    out = []
    for i, rle in enumerate(rles):
        if areas[i] == 0:
            continue
        entry = {
            "image_id": image_id,
            "category_id": int(category_id),
            "segmentation": {"size": [int(rle["size"][0]), int(rle["size"][1])],
                             "counts": rle["counts"].decode("ascii")},
            "bbox": [float(v) for v in boxes[i]],
            "score": float(scores[i]),
        }
        for key, val in extra.items():
            entry[key] = val[i] if isinstance(val, (list, tuple, np.ndarray)) and len(val) == k else val
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------
# which levels to export
_RANGE = re.compile(r"^(\d+)-(\d+)$")
_INT = re.compile(r"^-?\d+$")


def parse_level_specs(specs: Union[str, Sequence[str]]) -> List[Tuple[str, Optional[Tuple[int, ...]]]]:
    """Parse ``KIND[:LAYERS]`` items (``KIND``: ``instance``, ``semantic`` or ``all``; ``LAYERS``:
    ``all``, an index, a comma list, ``a-b`` (inclusive), negative indices from the end), e.g.
    ``["instance"]``, ``["instance:0,2", "semantic:-1"]``, ``["all:1-3"]``. Returns
    ``(kind, layers)`` pairs, ``kind`` possibly ``"all"``; ``LAYERS`` omitted = every layer
    (``None``)."""
    if isinstance(specs, str):
        specs = specs.split()
    if not specs:
        raise ValueError("no level given (use e.g. 'instance', 'semantic:-1', 'all')")
    out: List[Tuple[str, Optional[Tuple[int, ...]]]] = []
    for spec in specs:
        kind, _, layers = str(spec).strip().partition(":")
        kind = kind.strip().lower()
        if kind not in KINDS + ("all",):
            raise ValueError(f"level {spec!r}: kind must be 'instance', 'semantic' or 'all', got {kind!r}")
        idx: Optional[Tuple[int, ...]] = None
        layers = layers.strip()
        if layers and layers.lower() != "all":
            vals: List[int] = []
            for part in layers.split(","):
                part = part.strip()
                m = _RANGE.match(part)
                if m:
                    a, b = int(m.group(1)), int(m.group(2))
                    if b < a:
                        raise ValueError(f"level {spec!r}: empty layer range {part!r}")
                    vals.extend(range(a, b + 1))
                elif _INT.match(part):
                    vals.append(int(part))
                else:
                    raise ValueError(f"level {spec!r}: cannot read layer {part!r} (use e.g. 0, -1, 0,2 or 1-3)")
            idx = tuple(vals)
        out.append((kind, idx))
    return out


def resolve_levels(parsed, num_layers: int, kinds: Sequence[str] = KINDS,
                   method: str = "oap") -> List[Tuple[str, int]]:
    """``(kind, layer)`` pairs, layer ascending then instance before semantic, no duplicates.

    ``kinds``: the kinds the generator fills (MaskCut: ``("instance",)``). An explicitly
    requested kind it lacks, or a layer outside ``[-num_layers, num_layers)``, raises
    ``ValueError``; ``all`` quietly keeps only the kinds present.
    """
    chosen = set()
    for kind, layers in parsed:
        if kind == "all":
            use = [k for k in KINDS if k in kinds]
        elif kind not in kinds:
            raise ValueError(f"method {method!r} has no {kind} level (it has: {', '.join(kinds)})")
        else:
            use = [kind]
        for i in (range(num_layers) if layers is None else layers):
            if not -num_layers <= i < num_layers:
                raise ValueError(f"layer {i} does not exist: method {method!r} has {num_layers} "
                                 f"layer{'s' if num_layers != 1 else ''} (0..{num_layers - 1}, or -1 for the last)")
            for k in use:
                chosen.add((k, i % num_layers))
    return sorted(chosen, key=lambda kl: (kl[1], KINDS.index(kl[0])))


# ---------------------------------------------------------------------------------------------
# scores
def coherence_scores(masks: torch.Tensor, token_features: torch.Tensor) -> torch.Tensor:
    """Feature coherence of each mask, in ``[0, 1]``: the length of the mean of its tokens'
    L2-normalised features, ``|| (1/|M|) sum_{i in M} f_i ||``.

    It equals the mean cosine similarity between the tokens and their normalised mean direction
    (1: all tokens point the same way; near 0: unrelated features), is defined the same way for
    every method and level, and needs nothing but the features the masks were cut from.

    Args:
        masks: ``(K, h, w)`` bool on the feature grid.
        token_features: ``(h*w, d)`` L2-normalised token features, raster order.
    """
    k = masks.shape[0]
    if k == 0:
        return torch.zeros(0)
    m = masks.reshape(k, -1).to(token_features.dtype)
    if m.shape[1] != token_features.shape[0]:
        raise ValueError(f"masks have {m.shape[1]} tokens, features {token_features.shape[0]}")
    area = m.sum(1, keepdim=True).clamp_min(1)
    mean = (m @ token_features) / area
    return mean.norm(dim=1).clamp(0, 1).float().cpu()


def _first_occurrences(pseudo, levels: Sequence[Tuple[str, int]]) -> Dict[Tuple[str, int], torch.Tensor]:
    """``{(kind, layer): indices}`` of the masks of each listed level that no earlier listed layer
    of the same kind emitted identically (:func:`first_unique_rows` over the layers in order, as
    the training targets are made)."""
    out = {}
    for kind in dict.fromkeys(k for k, _ in levels):
        layers = [i for k, i in levels if k == kind]
        masks = [pseudo.layers[i].level(kind).masks for i in layers]
        first = first_unique_rows(torch.cat(masks).flatten(1))
        start = 0
        for i, m in zip(layers, masks):
            stop = start + m.shape[0]
            out[(kind, i)] = first[(first >= start) & (first < stop)] - start
            start = stop
    return out


#: masks x pixels upsampled at once by :func:`pseudo_masks_to_results`: 2^25 (about 0.25 GB of
#: float32 interpolation output, bool masks and their uint8 copy for the RLE encoder)
UPSAMPLE_PIXELS = 1 << 25


def pseudo_masks_to_results(
    pseudo, image_id, image_size: Sequence[int], levels: Sequence[Tuple[str, int]],
    token_features: Optional[torch.Tensor] = None, score: str = "coherence",
    upsample: str = "bilinear", chunk: Optional[int] = None, unique: bool = False,
    max_pixels: Optional[int] = None,
) -> List[dict]:
    """COCO result entries for the chosen ``(kind, layer)`` levels of one image.

    Masks are brought from the feature grid to ``image_size = (H, W)`` (the original image) with
    :meth:`MaskLevel.upsample` (``upsample``: ``bilinear`` or ``nearest``), as many masks at a
    time as fit ``max_pixels`` image-size pixels (default :data:`UPSAMPLE_PIXELS`; at least one
    mask; ``chunk``, if given, caps the count too). The memory of this step is thus bounded by
    the image's pixels, not by the number of masks: each mask is upsampled on its own, so the
    entries are the same whatever the grouping. Each entry gets ``level`` (kind), ``layer`` (index) and ``threshold`` (``tau_t`` of the
    layer; MaskCut: its affinity threshold). ``score``: ``coherence`` (needs ``token_features``,
    see :func:`coherence_scores`) or ``one`` (1.0, as CutLER's pseudo-labels). ``unique``: a mask
    equal on the feature grid to one already written for the same kind (a supernode that did not
    merge is emitted again by the next layer) is left out, as the training targets leave it
    (``hiseg_oap.modeling.pseudo_targets``); levels are visited in the given order.
    """
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose from {SCORES}")
    if score == "coherence" and token_features is None:
        raise ValueError("score='coherence' needs the token features")
    size = (int(image_size[0]), int(image_size[1]))
    budget = int(UPSAMPLE_PIXELS if max_pixels is None else max_pixels)
    out: List[dict] = []
    keep = _first_occurrences(pseudo, levels) if unique else {}
    for kind, layer_idx in levels:
        layer = pseudo.layers[layer_idx]
        level = layer.level(kind)
        if (kind, layer_idx) in keep:
            level = level.select(keep[(kind, layer_idx)])
        k = len(level)
        if k == 0:
            continue
        if score == "coherence":
            scores = coherence_scores(level.masks.to(token_features.device), token_features).tolist()
        else:
            scores = [1.0] * k
        step = max(1, min(int(chunk) if chunk else k, budget // (size[0] * size[1] or 1)))
        for start in range(0, k, step):
            stop = start + step
            big = level.select(slice(start, stop)).upsample(size, mode=upsample).cpu().numpy()
            out.extend(masks_to_results(big, image_id, scores[start:stop], level=kind,
                                        layer=int(layer_idx), threshold=float(layer.threshold)))
    return out


# ---------------------------------------------------------------------------------------------
# export filters
#: defaults of :func:`filter_results` and of ``tools/generate_pseudo_masks.py``, chosen by the
#: class-agnostic AP of the exported masks on COCO val (docs/your_data.md, "Export defaults")
DEFAULT_MAX_AREA_FRACTION = 0.9
DEFAULT_MAX_PER_IMAGE = 100


def mask_area_fraction(result: Mapping) -> float:
    """The fraction of its image that a result's mask covers (the RLE's size is the image's)."""
    rle = _rle_for_api(result["segmentation"])
    h, w = rle["size"]
    return float(mask_util.area(rle)) / max(1, int(h) * int(w))


def filter_results(results: Sequence[Mapping], max_area_fraction: Optional[float] = DEFAULT_MAX_AREA_FRACTION,
                   max_per_image: Optional[int] = DEFAULT_MAX_PER_IMAGE) -> List[dict]:
    """The results a user exports to train on, in their original order:

    * ``max_area_fraction``: masks covering more than this fraction of their image are dropped
      (a mask of nearly the whole image is background or "everything", not an object, and a
      detector trained on it learns to box the whole image); None or 1 keeps all;
    * ``max_per_image``: at most this many masks per image, the highest ``score`` first (ties:
      the earlier mask); None or 0 keeps all.
    """
    if max_area_fraction is not None and not 0 < max_area_fraction <= 1:
        raise ValueError(f"max_area_fraction must be in (0, 1], got {max_area_fraction}")
    if max_per_image is not None and max_per_image < 0:
        raise ValueError(f"max_per_image must be >= 0, got {max_per_image}")
    keep = list(range(len(results)))
    if max_area_fraction is not None and max_area_fraction < 1:
        keep = [i for i in keep if mask_area_fraction(results[i]) <= max_area_fraction]
    if max_per_image:
        by_image: Dict = {}
        for i in keep:
            by_image.setdefault(results[i]["image_id"], []).append(i)
        chosen = set()
        for idx in by_image.values():
            chosen.update(sorted(idx, key=lambda i: (-float(results[i]["score"]), i))[:max_per_image])
        keep = [i for i in keep if i in chosen]
    return [dict(results[i]) for i in keep]


# ---------------------------------------------------------------------------------------------
# files
def validate_results(results: Sequence[Mapping], image_sizes: Optional[Mapping] = None) -> None:
    """Check COCO result entries: required fields and types, a decodable RLE, the ``bbox`` of the
    mask, and (when ``image_sizes`` maps image id -> (H, W)) the mask size. Raises ValueError."""
    if not isinstance(results, (list, tuple)):
        raise ValueError(f"COCO results must be a list, got {type(results).__name__}")
    for i, r in enumerate(results):
        where = f"result {i}"
        if not isinstance(r, Mapping):
            raise ValueError(f"{where}: not a dict")
        for key in ("image_id", "category_id", "segmentation", "bbox", "score"):
            if key not in r:
                raise ValueError(f"{where}: missing {key!r}")
        seg = r["segmentation"]
        if not isinstance(seg, Mapping) or not isinstance(seg.get("counts"), str):
            raise ValueError(f"{where}: segmentation must be an RLE with str 'counts'")
        try:
            rle = _rle_for_api(seg)
            box = mask_util.toBbox(rle)
            area = float(mask_util.area(rle))
        except Exception as e:  # pycocotools raises plain exceptions on bad strings
            raise ValueError(f"{where}: RLE cannot be decoded: {e}") from e
        if area <= 0:
            raise ValueError(f"{where}: empty mask")
        if len(r["bbox"]) != 4 or not np.allclose(np.asarray(r["bbox"], float), box, atol=1e-6):
            raise ValueError(f"{where}: bbox {r['bbox']} is not the mask's box {box.tolist()}")
        if not isinstance(r["score"], (int, float)) or not np.isfinite(r["score"]):
            raise ValueError(f"{where}: score must be a finite number, got {r['score']!r}")
        if image_sizes is not None:
            want = image_sizes.get(r["image_id"])
            if want is not None and tuple(int(v) for v in seg["size"]) != tuple(int(v) for v in want):
                raise ValueError(f"{where}: mask size {list(seg['size'])} differs from image "
                                 f"{r['image_id']}'s size {list(want)}")


def atomic_write_json(path: str, obj) -> str:
    """Write JSON to a temporary file next to ``path`` and move it into place (a reader never
    sees a partial file; an interrupted run leaves none). Returns ``path``."""
    from hiseg.data.datasets.common import atomic_write_json as write

    write(path, obj)
    return os.fspath(path)


def write_results(path: str, results: Sequence[Mapping], validate: bool = True) -> str:
    """Write COCO results (a JSON list) atomically, after :func:`validate_results`."""
    results = list(results)
    if validate:
        validate_results(results)
    return atomic_write_json(path, results)


def load_results(path: str) -> List[dict]:
    """Read a COCO results JSON written by :func:`write_results` (validated)."""
    with open(path) as f:
        results = json.load(f)
    validate_results(results)
    return results


def results_to_coco_dataset(results: Sequence[Mapping], images: Sequence[Mapping],
                            info: Optional[dict] = None) -> dict:
    """A full COCO instances dict of the pseudo-masks (CutLER's pseudo-label annotation file):
    ``images`` (``id``, ``file_name``, ``height``, ``width``), one ``fg`` category, and one
    annotation per result with ``id``, ``iscrowd`` 0 and ``area`` (mask pixels) added."""
    anns = []
    for i, r in enumerate(results, start=1):
        a = dict(r)
        a["id"] = i
        a["iscrowd"] = 0
        a["area"] = float(mask_util.area(_rle_for_api(r["segmentation"])))
        anns.append(a)
    return {
        "info": dict(info or {"description": "pseudo-masks (tools/generate_pseudo_masks.py)"}),
        "licenses": [],
        "images": [dict(im) for im in images],
        "categories": [dict(FG_CATEGORY)],
        "annotations": anns,
    }


# ---------------------------------------------------------------------------------------------
# class-agnostic evaluation
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
            from .evaluation import COCOEvaluatorWithAR

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
