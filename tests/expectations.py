"""Hand-derived expectations and temporary dataset registration shared by the evaluator and
dataset tests."""
import contextlib


@contextlib.contextmanager
def registered_dataset(name, loader, **metadata):
    """``name`` registered in detectron2's catalogs for the ``with`` block, removed afterwards."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)
    try:
        yield name
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def expected_pq(gt_json, moved_from=None, moved_to=None, categories=None):
    """PQ / PQ_th / PQ_st (in %) when every segment is predicted exactly, except that one
    non-crowd GT segment of category ``moved_from`` is predicted as ``moved_to``.

    Exact segments have IoU 1, so for a category, PQ_c = SQ_c * RQ_c = 1 * TP / (TP + FP/2 + FN/2).
    The moved segment is one FN of ``moved_from`` and one FP of ``moved_to`` (it does not overlap
    void or a crowd region of ``moved_to``). Crowd GT segments are never matched and a prediction
    on them is ignored, so a category seen only in crowd segments has no TP/FP/FN and, like a
    category absent from both, is left out of the mean (panopticapi's ``pq_average``).
    ``categories`` (default: the JSON's) give ``isthing``.
    """
    cats = {c["id"]: c for c in (categories if categories is not None else gt_json["categories"])}
    tp, fp, fn = {}, {}, {}
    for ann in gt_json["annotations"]:
        for s in ann["segments_info"]:
            if not s["iscrowd"]:
                tp[s["category_id"]] = tp.get(s["category_id"], 0) + 1
    if moved_from is not None:
        tp[moved_from] -= 1
        fn[moved_from] = 1
        fp[moved_to] = 1
    pq, sq = {}, {}
    for c in set(tp) | set(fp) | set(fn):
        t, p, n = tp.get(c, 0), fp.get(c, 0), fn.get(c, 0)
        pq[c] = t / (t + 0.5 * p + 0.5 * n)  # = RQ_c, since SQ_c is 1 (or 0 without TP)
        sq[c] = 1.0 if t else 0.0

    def mean(values, isthing=None):
        vals = [
            v for c, v in values.items() if isthing is None or bool(cats[c]["isthing"]) == isthing
        ]
        return 100.0 * sum(vals) / len(vals)

    return {
        "PQ": mean(pq), "SQ": mean(sq), "RQ": mean(pq),
        "PQ_th": mean(pq, True), "PQ_st": mean(pq, False),
    }  # fmt: skip
