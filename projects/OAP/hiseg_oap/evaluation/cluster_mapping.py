"""From prototype clusters to dataset classes: confusion matrices and the cluster -> class mapping.

OAP (Sec. 5.2, "Test Metrics") evaluates "with the same evaluation protocol [as] U2Seg" and says
"the clustering labels are mapped using Hungarian matching to class labels in the dataset". The
segmenter predicts one of K prototype ids (``MODEL.OAP.HEAD.OUT_DIM``, 512 by default) for every
mask or pixel; before any supervised metric can be computed each cluster gets a dataset class
(or none), from a K x C confusion matrix ``confusion[k, c]`` = evidence that cluster k is class c
(pixels for semantic / panoptic segmentation, matched instances for instance segmentation).

Two mappings are offered (``MODEL.OAP.TEST.CLUSTER_MAPPING``):

* ``"hungarian"``: one-to-one, the assignment maximising the total evidence,
  ``scipy.optimize.linear_sum_assignment(confusion, maximize=True)``, as STEGO (Hamilton et al.,
  ICLR 2022, ``UnsupervisedMetrics.compute``) does. With K > C only C clusters get a class, with
  K < C only K classes can be predicted.
* ``"majority"``: many-to-one, every cluster to the class it overlaps most (argmax of its row).
  U2Seg (Niu et al., CVPR 2024) does this in its released COCO evaluator (the function is called
  ``hungarain_matching`` there, but it is a per-cluster majority vote, run in a second pass whose
  output file is edited by hand); here it is computed in the same run.

Unmatched clusters map to ``-1`` (:data:`UNMAPPED`), as in U2Seg's mapping files. Choices where the
papers are silent:

* A cluster with no evidence at all (an all-zero row) is unmapped under both methods. For the
  Hungarian method this also holds for a cluster that the assignment pairs with a class at zero
  evidence: ``linear_sum_assignment`` must fill every row (K <= C) or column (K >= C), and a pair
  with zero overlap is an arbitrary tie-break, not a match; leaving it out makes the result
  independent of the solver's tie-breaking and changes no metric computed from the evidence.
* Majority ties go to the lowest class index (``numpy.argmax``).
"""
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = [
    "UNMAPPED",
    "MAPPING_METHODS",
    "check_confusion",
    "hungarian_mapping",
    "majority_mapping",
    "compute_cluster_mapping",
    "confusion_from_labels",
    "apply_mapping",
    "mapping_summary",
    "mapping_record",
]

#: Class index of a cluster that has no dataset class.
UNMAPPED = -1
MAPPING_METHODS = ("hungarian", "majority")


def check_confusion(confusion, name: str = "confusion") -> np.ndarray:
    """``confusion`` as a 2-D float64 array of finite, non-negative counts (else ValueError)."""
    try:
        conf = np.asarray(confusion, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a 2-D array of numbers: {e}") from None
    if conf.ndim != 2:
        raise ValueError(f"{name} must be 2-D (clusters x classes), got shape {conf.shape}")
    if conf.shape[0] == 0 or conf.shape[1] == 0:
        raise ValueError(f"{name} must have at least one cluster and one class, got {conf.shape}")
    if not np.all(np.isfinite(conf)):
        raise ValueError(f"{name} has non-finite entries")
    if np.any(conf < 0):
        raise ValueError(f"{name} has negative entries (it holds counts)")
    return conf


def hungarian_mapping(confusion) -> np.ndarray:
    """One-to-one mapping (K,) int64 maximising the matched evidence (STEGO's Hungarian matching).

    Clusters left out by the assignment, or paired with a class at zero evidence, get ``-1``.
    """
    conf = check_confusion(confusion)
    rows, cols = linear_sum_assignment(conf, maximize=True)
    mapping = np.full(conf.shape[0], UNMAPPED, dtype=np.int64)
    keep = conf[rows, cols] > 0
    mapping[rows[keep]] = cols[keep]
    return mapping


def majority_mapping(confusion) -> np.ndarray:
    """Many-to-one mapping (K,) int64: each cluster to its most overlapping class (U2Seg).

    Clusters without evidence get ``-1``; ties go to the lowest class index.
    """
    conf = check_confusion(confusion)
    mapping = np.argmax(conf, axis=1).astype(np.int64)
    mapping[conf.sum(axis=1) <= 0] = UNMAPPED
    return mapping


def compute_cluster_mapping(confusion, method: str = "hungarian") -> np.ndarray:
    """The (K,) cluster -> class mapping (``-1``: unmapped), ``"hungarian"`` or ``"majority"``."""
    method = str(method).lower()
    if method == "hungarian":
        return hungarian_mapping(confusion)
    if method == "majority":
        return majority_mapping(confusion)
    raise ValueError(
        f"unknown cluster mapping method {method!r}; expected one of {MAPPING_METHODS}"
    )


def confusion_from_labels(
    clusters,
    labels,
    num_clusters: int,
    num_classes: int,
    ignore_label: Optional[int] = None,
) -> np.ndarray:
    """(num_clusters, num_classes) int64 counts of (cluster, label) pairs, e.g. per pixel.

    ``clusters`` and ``labels`` have the same shape; pairs whose label is ``ignore_label`` are
    skipped. A cluster outside ``[0, num_clusters)`` or a label outside ``[0, num_classes)``
    (other than ``ignore_label``) is a ValueError.
    """
    clusters = np.asarray(clusters)
    labels = np.asarray(labels)
    if clusters.shape != labels.shape:
        raise ValueError(f"clusters {clusters.shape} and labels {labels.shape} differ in shape")
    if num_clusters <= 0 or num_classes <= 0:
        raise ValueError(
            f"num_clusters ({num_clusters}) and num_classes ({num_classes}) must be > 0"
        )
    clusters = clusters.reshape(-1).astype(np.int64, copy=False)
    labels = labels.reshape(-1).astype(np.int64, copy=False)
    if ignore_label is not None:
        valid = labels != ignore_label
        clusters, labels = clusters[valid], labels[valid]
    if clusters.size:
        if clusters.min() < 0 or clusters.max() >= num_clusters:
            raise ValueError(
                f"cluster ids must lie in [0, {num_clusters}), "
                f"got [{clusters.min()}, {clusters.max()}]"
            )
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(
                f"labels must lie in [0, {num_classes}) or be the ignore label {ignore_label}, "
                f"got [{labels.min()}, {labels.max()}]"
            )
    counts = np.bincount(clusters * num_classes + labels, minlength=num_clusters * num_classes)
    return counts.reshape(num_clusters, num_classes).astype(np.int64)


def apply_mapping(clusters, mapping, unmapped_value: int = UNMAPPED) -> np.ndarray:
    """Class of every cluster id in ``clusters`` (any shape); unmapped -> ``unmapped_value``."""
    mapping = np.asarray(mapping, dtype=np.int64)
    if mapping.ndim != 1:
        raise ValueError(f"mapping must be 1-D (one class per cluster), got shape {mapping.shape}")
    clusters = np.asarray(clusters, dtype=np.int64)
    if clusters.size and (clusters.min() < 0 or clusters.max() >= mapping.size):
        raise ValueError(
            f"cluster ids must lie in [0, {mapping.size}), got [{clusters.min()}, {clusters.max()}]"
        )
    lut = np.where(mapping >= 0, mapping, unmapped_value)
    return lut[clusters]


def mapping_summary(confusion, mapping) -> Dict[str, float]:
    """Scalars describing a mapping (all floats, so detectron2's result printers accept them).

    * ``mapped_clusters``: clusters with a class;
    * ``agreement``: % of the evidence on (cluster, its class) pairs, the accuracy of the mapping
      on the confusion it was computed from;
    * ``unmapped_evidence``: % of the evidence in clusters without a class.
    """
    conf = check_confusion(confusion)
    mapping = np.asarray(mapping, dtype=np.int64)
    if mapping.shape != (conf.shape[0],):
        raise ValueError(f"mapping shape {mapping.shape} does not match {conf.shape[0]} clusters")
    total = conf.sum()
    mapped = mapping >= 0
    agree = conf[np.nonzero(mapped)[0], mapping[mapped]].sum()
    unmapped = conf[~mapped].sum()
    pct = (lambda x: float(100.0 * x / total)) if total > 0 else (lambda x: float("nan"))
    return {
        "mapped_clusters": float(mapped.sum()),
        "agreement": pct(agree),
        "unmapped_evidence": pct(unmapped),
    }


def mapping_record(
    confusion,
    mapping,
    method: str,
    class_names: Sequence[str],
    *,
    evidence: str,
    **extra,
) -> dict:
    """A JSON-serialisable record of a mapping: method, the mapping as a list (``-1`` unmapped),
    the mapped clusters by class name, the confusion (K lists of C counts) and its summary."""
    conf = np.asarray(confusion)
    mapping = np.asarray(mapping, dtype=np.int64)
    names: List[str] = [str(n) for n in class_names]
    if len(names) != conf.shape[1]:
        raise ValueError(f"{len(names)} class names for {conf.shape[1]} confusion columns")
    rec = {
        "method": method,
        "num_clusters": int(conf.shape[0]),
        "num_classes": int(conf.shape[1]),
        "class_names": names,
        "evidence": evidence,
        "mapping": [int(m) for m in mapping],
        "mapped": {str(k): names[int(m)] for k, m in enumerate(mapping) if m >= 0},
        "summary": mapping_summary(conf, mapping),
        "confusion": conf.astype(np.int64).tolist(),
    }
    rec.update(extra)
    return rec
