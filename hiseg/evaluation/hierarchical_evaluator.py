"""Detectron2 evaluator for hierarchical segmentation on BSDS500-style data.

Model outputs: one dict per image with ``"hierarchy"``, a list of integer label maps (H x W,
numpy arrays or torch tensors, one per level, fine to coarse) or an (L, H, W) array/tensor.
Levels at another resolution than the ground truth are resized with nearest neighbour.
Optionally ``"boundaries"``: a soft boundary map in [0, 1] used for the boundary measure instead
of the one derived from the hierarchy.

Measures (all in [0, 1]; VI in bits), see :mod:`hiseg.evaluation.bsds`:

* boundary ``ODS`` / ``OIS`` / ``AP`` (Martin et al. 2004; Arbelaez et al. 2011). The hierarchy
  is turned into a UCM-like soft boundary map: the strength of a pixel is the fraction of levels
  in which it is a boundary pixel (``seg2bdry``), and the benchmark's 99 thresholds are applied
  to it (:func:`~hiseg.evaluation.bsds.hierarchy_to_boundary_map`);
* region ``Covering_{ODS,OIS,Best}``, ``PRI_{ODS,OIS}``, ``VI_{ODS,OIS}``: the benchmark's region
  measures with the levels as the "thresholds" (as for its ``segs`` input);
* ``RegionF@K`` for K in ``region_targets`` (default 64, 32, 16, CAST Table 2): the region
  F-score (:func:`~hiseg.evaluation.bsds.region_fscore`) of the level whose number of
  regions is nearest K (the finer one on ties), averaged over the humans, then over images.

Per-image counts are computed in :meth:`process` (so they are spread over the workers) and
gathered to the main process in :meth:`evaluate`.
"""
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
from detectron2.evaluation import DatasetEvaluator

from ..utils.atomic_io import atomic_write_json
from . import bsds as M
from .distributed import gather_records
from .label_maps import resize_nearest, to_numpy
from .registry import register_evaluator_factory

__all__ = ["HierarchicalSegEvaluator", "hierarchy_as_arrays", "bsds_hierarchical_factory"]

logger = logging.getLogger(__name__)

_REGION_KEYS = (
    "Covering_ODS", "Covering_OIS", "Covering_Best", "PRI_ODS", "PRI_OIS", "VI_ODS", "VI_OIS",
)  # fmt: skip


def hierarchy_as_arrays(hierarchy) -> List[np.ndarray]:
    """The levels of a hierarchy as 2-D integer numpy arrays."""
    if hasattr(hierarchy, "detach") or isinstance(hierarchy, np.ndarray):
        arr = to_numpy(hierarchy)
        if arr.ndim == 2:
            levels = [arr]
        elif arr.ndim == 3:
            levels = list(arr)
        else:
            raise ValueError(f"hierarchy must be (L, H, W) or (H, W), got shape {arr.shape}")
    else:
        levels = [to_numpy(level) for level in hierarchy]
    if not levels:
        raise ValueError("empty hierarchy")
    out = []
    for level in levels:
        if level.ndim != 2:
            raise ValueError(f"each level must be a 2-D label map, got shape {level.shape}")
        if level.dtype.kind == "f":
            if not np.all(np.isfinite(level)) or np.any(level != np.round(level)):
                raise ValueError("label maps must hold integer labels")
        out.append(level.astype(np.int64, copy=False))
    return out


def _nearest_level(num_regions: Sequence[int], target: int) -> int:
    diffs = [abs(int(n) - target) for n in num_regions]
    return int(np.argmin(diffs))  # first (finest) on ties


def _pad_levels(records: List[Dict[str, np.ndarray]], nt: int) -> List[Dict[str, np.ndarray]]:
    """Hierarchies with fewer levels repeat their coarsest level (so ODS can be taken at a common
    level index)."""
    out = []
    for rec in records:
        n = rec["cntR"].size
        if n == nt:
            out.append(rec)
            continue
        rec = dict(rec)
        idx = np.minimum(np.arange(nt), n - 1)
        for key in ("cntR", "sumR", "cntP", "sumP", "RI", "VOI", "num_regions", "region_f"):
            rec[key] = rec[key][idx]
        rec["thresh"] = np.arange(1, nt + 1, dtype=np.float64)
        out.append(rec)
    return out


class HierarchicalSegEvaluator(DatasetEvaluator):
    """BSDS500 boundary and region benchmark for hierarchical segmentations.

    Args:
        dataset_name: a registered dataset (used to find ground truth when an input has no
            ``bsds_gt_file``: ``<metadata.gt_root>/<image_id>.mat``).
        distributed: gather the per-image results from all workers in :meth:`evaluate`.
        output_dir: if given, per-image results are written to ``bsds_per_image.json`` there.
        nthresh: number of boundary thresholds (benchmark: 99).
        max_dist: matching tolerance as a fraction of the image diagonal (benchmark: 0.0075).
        thin: thin machine boundaries before matching (benchmark: yes).
        matching: ``"greedy"`` (default; exact number of matches, 3-5x faster) or ``"optimal"``
            (exact minimum-cost correspondence), see
            :func:`~hiseg.evaluation.bsds.correspond_pixels`.
        region_targets: numbers of regions for ``RegionF@K``.
        ignore_label: ground-truth label ignored by the region F-score (BSDS has none).
    """

    def __init__(
        self,
        dataset_name: Optional[str] = None,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        *,
        nthresh: int = M.DEFAULT_NTHRESH,
        max_dist: float = M.DEFAULT_MAX_DIST,
        thin: bool = True,
        matching: str = "greedy",
        region_targets: Sequence[int] = (64, 32, 16),
        ignore_label: Optional[int] = None,
    ):
        if matching not in M.MATCHING_METHODS:
            raise ValueError(f"matching must be one of {M.MATCHING_METHODS}, got {matching!r}")
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        self._nthresh = int(nthresh)
        self._max_dist = float(max_dist)
        self._thin = bool(thin)
        self._matching = matching
        self._region_targets = tuple(int(k) for k in region_targets)
        self._ignore_label = ignore_label
        self._gt_root = None
        if dataset_name is not None:
            from detectron2.data import MetadataCatalog

            self._gt_root = MetadataCatalog.get(dataset_name).get("gt_root", None)
        self._records: List[dict] = []

    def reset(self):
        self._records = []

    # -- per image ---------------------------------------------------------------------------
    def _gt_file(self, inp: dict) -> str:
        if "bsds_gt_file" in inp:
            return inp["bsds_gt_file"]
        if self._gt_root is not None and "image_id" in inp:
            return os.path.join(self._gt_root, f"{inp['image_id']}.mat")
        raise KeyError(
            "HierarchicalSegEvaluator needs 'bsds_gt_file' in each input dict (BSDS500 dataset "
            "dicts have it) or a dataset_name whose metadata has gt_root"
        )

    def evaluate_image(self, levels: Sequence[np.ndarray], gt_segs, gt_bdrys, pb=None) -> dict:
        """All per-image results for one hierarchy against its ground truth."""
        shape = np.shape(gt_segs[0])
        levels = [resize_nearest(level, shape) for level in levels]
        if pb is None:
            pb = M.hierarchy_to_boundary_map(levels)
        else:
            pb = np.asarray(pb, dtype=np.float64)
            if pb.shape != shape:
                raise ValueError(f"boundary map {pb.shape} differs from ground truth {shape}")
        bdry = M.evaluate_boundaries_image(
            pb,
            gt_bdrys,
            thresholds=self._nthresh,
            max_dist=self._max_dist,
            thin=self._thin,
            matching=self._matching,
        )
        reg = M.evaluate_regions_image(levels, gt_segs)
        region_f = {}
        for target in self._region_targets:
            k = _nearest_level(reg["num_regions"], target)
            if self._ignore_label is None:
                f = float(reg["region_f"][k])
            else:
                fs = [M.region_fscore(levels[k], gt, self._ignore_label)[2] for gt in gt_segs]
                f = float(np.mean(fs))
            region_f[target] = (f, int(reg["num_regions"][k]))
        return {"bdry": bdry, "reg": reg, "region_f": region_f}

    def process(self, inputs, outputs):
        from hiseg.data.datasets.bsds500 import load_bsds_ground_truth

        for inp, out in zip(inputs, outputs):
            if "hierarchy" not in out:
                raise KeyError("HierarchicalSegEvaluator expects outputs with a 'hierarchy' entry")
            levels = hierarchy_as_arrays(out["hierarchy"])
            gt_segs, gt_bdrys = load_bsds_ground_truth(self._gt_file(inp))
            pb = out.get("boundaries", None)
            pb = None if pb is None else to_numpy(pb)
            rec = self.evaluate_image(levels, gt_segs, gt_bdrys, pb=pb)
            rec["image_id"] = str(inp.get("image_id", len(self._records)))
            self._records.append(rec)

    # -- dataset -----------------------------------------------------------------------------
    def evaluate(self):
        records = gather_records(self._records, self._distributed)
        if records is None:  # not the main process
            return {}
        if not records:
            logger.warning("[HierarchicalSegEvaluator] did not receive valid predictions.")
            return {}
        results = self.summarize(records)
        if self._output_dir:
            self._dump(records)
        return OrderedDict({"bsds": results})

    def summarize(self, records: Sequence[dict]) -> Dict[str, float]:
        """Dataset measures from per-image records (as produced by :meth:`evaluate_image`)."""
        bd = M.collect_boundary_scores([r["bdry"] for r in records])
        regs = [r["reg"] for r in records]
        nt = max(r["cntR"].size for r in regs)
        if any(r["cntR"].size != nt for r in regs):
            logger.warning("hierarchies have different numbers of levels; shorter ones are padded")
        rg = M.collect_region_scores(_pad_levels(regs, nt))
        results = {
            "ODS": bd["ODS"],
            "OIS": bd["OIS"],
            "AP": bd["AP"],
            "ODS_R": bd["ODS_R"],
            "ODS_P": bd["ODS_P"],
            "ODS_threshold": bd["ODS_T"],
        }
        for key in _REGION_KEYS:
            results[key] = rg[key]
        for target in self._region_targets:
            values = [r["region_f"][target][0] for r in records]
            results[f"RegionF@{target}"] = float(np.mean(values))
        results["num_images"] = len(records)
        return results

    def _dump(self, records):
        rows = []
        for r in records:
            row = {
                "image_id": r["image_id"],
                "boundary_counts": r["bdry"].tolist(),
                "num_regions": r["reg"]["num_regions"].tolist(),
                "covering": (r["reg"]["cntR"] / np.maximum(r["reg"]["sumR"], 1)).tolist(),
                "PRI": r["reg"]["RI"].tolist(),
                "VI": r["reg"]["VOI"].tolist(),
                "region_f": {str(k): v[0] for k, v in r["region_f"].items()},
            }
            rows.append(row)
        atomic_write_json(os.path.join(self._output_dir, "bsds_per_image.json"), rows)


@register_evaluator_factory("bsds_hierarchical")
def bsds_hierarchical_factory(cfg, name, out):
    """Evaluator factory of ``evaluator_type="bsds_hierarchical"``."""
    return [HierarchicalSegEvaluator(name, output_dir=out)]
