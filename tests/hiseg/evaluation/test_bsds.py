"""BSDS500 dataset registration, the BSDS boundary/region measures and the hierarchical evaluator.

The boundary measure is checked against the official MATLAB benchmark's own outputs for the
5-image sample of ``BSR/bench/data`` (shared data folder ``bsds500_bench``):

* ``test_2`` and ``png-eval-5``: ``boundaryBench`` on ``png/`` with ``nthresh = 5`` (two MATLAB
  runs; they differ slightly because ``correspondPixels`` draws its outlier edges at random);
* ``png-eval-99``: the same with 99 thresholds;
* ``png-fasteval-99``: a non one-to-one ("fast") variant, reproduced exactly.

In that sample ``png/`` is the UCM quantised to 8 bits and ``segs/`` are the UCM regions at the 5
thresholds, so the ``ucm2`` and ``segs`` inputs are checked against the same references.
Set ``HISEG_SLOW_TESTS=1`` to also run the 99-threshold reference with the optimal matching.
"""
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from hiseg.evaluation import bsds as M
from hiseg.evaluation.bsds.boundary_maps import _THIN_LUTS
from helpers import load_script

BENCH_IDS = ("2018", "3063", "5096", "6046", "8068")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def bench_dir(shared):
    return Path(shared) / "bsds500_bench"


def load_png(path):
    from PIL import Image

    return np.asarray(Image.open(path), dtype=np.float64) / 255.0


def load_ref_scores(path):
    """``eval_bdry.txt``: ODS T R P F, OIS R P F, AP."""
    v = np.loadtxt(path)
    return {"ODS_T": v[0], "ODS": v[3], "OIS": v[6], "AP": v[7]}


def bench_images(shared):
    from hiseg.data.datasets.bsds500 import load_bsds_ground_truth

    out = {}
    for i in BENCH_IDS:
        segs, bdrys = load_bsds_ground_truth(bench_dir(shared) / "groundTruth" / f"{i}.mat")
        out[i] = (load_png(bench_dir(shared) / "png" / f"{i}.png"), segs, bdrys)
    return out


def assert_scores_close(scores, ref, tol=0.01):
    for key in ("ODS", "OIS", "AP"):
        assert abs(scores[key] - ref[key]) < tol, (key, scores[key], ref[key])


# ---------------------------------------------------------------------------------------------
# boundary maps, thinning, hand-made matching cases
# ---------------------------------------------------------------------------------------------
def test_seg2bdry_small_case():
    seg = np.array([[1, 1, 2], [1, 1, 2], [3, 3, 3]])
    b = M.seg2bdry(seg)
    # junction lattice: pixel (i, j) stands for the corner below-right of it; the last row and
    # column copy the edges next to them (MATLAB's frame copy), the last corner is empty
    expected = np.array([[0, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(b, expected)
    assert M.seg2bdry(seg, "doubleSize").shape == (7, 7)
    assert not M.seg2bdry(np.ones((4, 5), int)).any()


def test_measures_import_without_torch_or_detectron2():
    import subprocess
    import sys

    code = ("import sys, hiseg.evaluation.bsds; "
            "print(sorted(m for m in ('torch', 'detectron2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_thinning_matches_skimage():
    from skimage.morphology import thin

    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = rng.integers(1, 40, size=2)
        img = rng.random((h, w)) < rng.random()
        np.testing.assert_array_equal(M.thin_boundaries(img), thin(img))
    try:  # the deletion tables themselves, when skimage exposes them
        from skimage.morphology._skeletonize import G123_LUT, G123P_LUT
    except ImportError:
        return
    np.testing.assert_array_equal(_THIN_LUTS[0], G123_LUT)
    np.testing.assert_array_equal(_THIN_LUTS[1], G123P_LUT)


def _line_map(shape, col):
    b = np.zeros(shape, dtype=bool)
    b[:, col] = True
    return b


@pytest.mark.parametrize("matching", M.MATCHING_METHODS)
def test_boundary_identical_and_shifted(matching):
    shape = (100, 100)  # tolerance 0.0075 * hypot(100, 100) = 1.06 px
    gt = _line_map(shape, 50)
    # identical boundaries: P = R = F = 1
    counts = M.match_boundaries(gt, [gt, gt], matching=matching)
    assert counts == (200, 200, 100, 100)
    out = M.evaluate_boundaries_image(gt.astype(float), [gt], thresholds=3, matching=matching)
    scores = M.collect_boundary_scores([out])
    assert scores["ODS"] == pytest.approx(1.0) and scores["OIS"] == pytest.approx(1.0)
    # a 1-pixel shift is within the tolerance
    assert M.match_boundaries(_line_map(shape, 51), [gt], matching=matching) == (100, 100, 100, 100)
    # a 2-pixel shift is not
    assert M.match_boundaries(_line_map(shape, 52), [gt], matching=matching) == (0, 100, 0, 100)
    m1, m2 = M.correspond_pixels(_line_map(shape, 52), gt, matching=matching)
    assert not m1.any() and not m2.any()


@pytest.mark.parametrize("matching", M.MATCHING_METHODS)
def test_boundary_matching_is_one_to_one(matching):
    shape = (100, 100)
    gt = _line_map(shape, 50)
    double = _line_map(shape, 49) | _line_map(shape, 51)  # both lines within 1 px of the human one
    cnt_r, sum_r, cnt_p, sum_p = M.match_boundaries(double, [gt], thin=False, matching=matching)
    assert (cnt_r, sum_r, sum_p) == (100, 100, 200)
    assert cnt_p == 100  # each human pixel can vouch for one machine pixel only
    # the distance-only variant accepts both lines
    fast = M.evaluate_boundaries_image_fast(
        double.astype(float), [gt], thresholds=[0.5], thin=False
    )
    assert tuple(fast[0, 1:]) == (100, 100, 200, 200)
    # precision accumulates over humans: each human matches one of the lines
    counts = M.match_boundaries(double, [_line_map(shape, 49), _line_map(shape, 51)], thin=False)
    assert counts == (200, 200, 200, 200)


def _dense_optimum(b1, b2, radius, outlier):
    """Brute-force reference: min-cost assignment with explicit outlier rows/columns."""
    p1 = np.argwhere(b1)
    p2 = np.argwhere(b2)
    n1, n2 = len(p1), len(p2)
    d = np.sqrt(((p1[:, None, :] - p2[None, :, :]) ** 2).sum(-1))
    big = 1e9
    cost = np.full((n1 + n2, n1 + n2), big)
    cost[:n1, :n2] = np.where(d <= radius, np.rint(d * 100), big)
    cost[:n1, n2:] = np.where(np.eye(n1, dtype=bool), outlier, big)
    cost[n1:, :n2] = np.where(np.eye(n2, dtype=bool), outlier, big)
    cost[n1:, n2:] = np.where(cost[:n1, :n2].T < big, 0.0, big)
    rows, cols = linear_sum_assignment(cost)
    real = (rows < n1) & (cols < n2)
    return int(real.sum()), float(cost[rows[real], cols[real]].sum())


def test_matching_cardinality_against_brute_force():
    rng = np.random.default_rng(1)
    max_dist = 0.06  # 2.5 px on 30 x 30
    radius = max_dist * np.hypot(30, 30)
    for _ in range(6):
        b1 = rng.random((30, 30)) < 0.08
        b2 = rng.random((30, 30)) < 0.08
        size, _ = _dense_optimum(b1, b2, radius, np.ceil(100 * radius * 100))
        for matching in M.MATCHING_METHODS:
            m1, m2 = M.correspond_pixels(b1, b2, max_dist=max_dist, matching=matching)
            assert m1.sum() == m2.sum() == size, matching
            assert not (m1 & ~b1).any() and not (m2 & ~b2).any()


def test_max_f_interpolates_between_thresholds():
    # two points of a P/R curve; the best F lies between them
    t, r, p, f = M.max_f_interpolated([0.1, 0.2], [1.0, 0.0], [0.0, 1.0])
    assert f == pytest.approx(0.5, abs=1e-3) and t == pytest.approx(0.15, abs=1e-3)


# ---------------------------------------------------------------------------------------------
# region measures, computed by hand
# ---------------------------------------------------------------------------------------------
SEG = np.array([[1, 1, 2, 2]])
GT = np.array([[1, 1, 1, 2]])


def test_rand_index_and_vi_by_hand():
    n = M.contingency_table(SEG, GT)
    np.testing.assert_array_equal(n, [[2, 0], [1, 1]])
    # pixel pairs: (0,1) agree, (0,2) no, (0,3) agree, (1,2) no, (1,3) agree, (2,3) no
    assert M.rand_index(n) == pytest.approx(0.5)
    # VI = H(S|G) + H(G|S) = 3/4 * H(2/3, 1/3) + 1/2 * H(1/2, 1/2)
    h = -(2 / 3 * np.log2(2 / 3) + 1 / 3 * np.log2(1 / 3))
    assert M.variation_of_information(n) == pytest.approx(0.75 * h + 0.5)
    assert M.rand_index(M.contingency_table(GT, GT)) == 1.0
    assert M.variation_of_information(M.contingency_table(GT, GT)) == pytest.approx(0.0)


def test_covering_pri_vi_by_hand():
    other = np.array([[1, 2, 2, 2]])
    res = M.evaluate_regions_image([SEG, np.ones_like(SEG)], [GT, other])
    # level 1 vs GT: regions {3 px: IoU 2/3}, {1 px: IoU 1/2}; vs other: {1: 1/2}, {3: 2/3}
    assert res["cntR"][0] == pytest.approx(2 * (3 * 2 / 3 + 1 * 1 / 2))
    assert res["sumR"][0] == 8
    # machine regions: {0,1} best IoU 2/3 (GT region 1), {2,3} best 2/3 (other's region 2)
    assert res["cntP"][0] == pytest.approx(2 * 2 / 3 + 2 * 2 / 3) and res["sumP"][0] == 4
    # RI vs GT = 1/2 (above); vs other: pairs (0,1) no, (0,2) agree, (0,3) agree, (1,2) no,
    # (1,3) no, (2,3) agree -> 1/2
    assert res["RI"][0] == pytest.approx(0.5)
    # level 2 (one region): covering = 3/4 * 3/4 + 1/4 * 1/4 per human
    assert res["cntR"][1] == pytest.approx(2 * (3 * 0.75 + 1 * 0.25))
    assert res["RI"][1] == pytest.approx(0.5)  # 3 of 6 pairs are together in each human
    # best covering over levels: each human region takes its best level
    assert float(res["cntR_best"]) == pytest.approx(2 * (3 * 0.75 + 1 * 0.5))
    scores = M.collect_region_scores([res])
    assert scores["Covering_ODS"] == pytest.approx(5.0 / 8.0)
    assert scores["Covering_Best"] == pytest.approx(5.5 / 8.0)
    assert scores["PRI_ODS"] == pytest.approx(0.5)
    assert res["num_regions"].tolist() == [2, 1]


def test_region_fscore_by_hand():
    # IoU: seg1-gt1 2/3, seg2-gt1 1/4, seg2-gt2 1/2 -> pairs (1,1) and (2,2) share 2 + 1 pixels
    p, r, f = M.region_fscore(SEG, GT)
    assert (p, r, f) == pytest.approx((0.75, 0.75, 0.75))
    assert M.region_fscore(GT, GT) == pytest.approx((1.0, 1.0, 1.0))
    # ignored ground truth: precision over all predicted pixels, recall over labelled ones
    gt = np.array([[1, 1, 0, 0]])
    p, r, f = M.region_fscore(np.array([[5, 5, 5, 7]]), gt, ignore_label=0)
    assert p == pytest.approx(2 / 4) and r == pytest.approx(1.0)
    assert f == pytest.approx(2 * 0.5 / 1.5)
    # evaluate_regions_image reports the same measure (averaged over humans)
    res = M.evaluate_regions_image([SEG], [GT, GT])
    assert res["region_f"][0] == pytest.approx(0.75)


def test_collect_reproduces_reference_files(shared_data):
    """The dataset-level statistics, fed with the MATLAB per-image counts, give the MATLAB
    ODS/OIS/AP and per-image bests to print precision."""
    for folder in ("png-eval-5", "png-eval-99", "png-fasteval-99"):
        d = bench_dir(shared_data) / folder
        scores = M.collect_boundary_scores([np.loadtxt(d / f"{i}_ev1.txt") for i in BENCH_IDS])
        ref = np.loadtxt(d / "eval_bdry.txt")
        keys = ("ODS_T", "ODS_R", "ODS_P", "ODS", "OIS_R", "OIS_P", "OIS", "AP")
        mine = [scores[k] for k in keys]
        np.testing.assert_allclose(mine, ref, atol=2e-6)
        img = np.loadtxt(d / "eval_bdry_img.txt")
        np.testing.assert_allclose(scores["per_image"], img[:, 1:], atol=2e-6)


# ---------------------------------------------------------------------------------------------
# the MATLAB reference outputs
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench(shared_data):
    return bench_images(shared_data)


def test_ground_truth_boundaries_are_thinned_seg2bdry(bench):
    for _, segs, bdrys in bench.values():
        for seg, bdry in zip(segs, bdrys):
            np.testing.assert_array_equal(M.thin_boundaries(M.seg2bdry(seg)), bdry)


def _check_counts(per_image, folder, tol_r, tol_p):
    """Per-threshold counts against ``<id>_ev1.txt``: the totals (thinned machine pixels, human
    pixels) exactly, the matched counts to a relative tolerance."""
    for i, ours in per_image.items():
        ref = np.loadtxt(folder / f"{i}_ev1.txt")
        np.testing.assert_allclose(ours[:, 0], ref[:, 0], atol=1e-4)
        np.testing.assert_array_equal(ours[:, [2, 4]], ref[:, [2, 4]])  # sumR, sumP
        for col, tol in ((1, tol_r), (3, tol_p)):  # cntR, cntP
            rel = np.abs(ours[:, col] - ref[:, col]) / np.maximum(ref[:, col], 1)
            assert rel.max() <= tol, (i, col, rel.max())


@pytest.fixture(scope="module")
def png5(bench):
    out = {}
    for m in M.MATCHING_METHODS:
        out[m] = {
            i: M.evaluate_boundaries_image(pb, b, thresholds=5, matching=m)
            for i, (pb, _, b) in bench.items()
        }
    return out


@pytest.mark.parametrize("matching", M.MATCHING_METHODS)
def test_png_5_thresholds_matches_matlab(shared_data, png5, matching):
    per_image = png5[matching]
    _check_counts(per_image, bench_dir(shared_data) / "png-eval-5", tol_r=0.004, tol_p=0.004)
    scores = M.collect_boundary_scores([per_image[i] for i in BENCH_IDS])
    for folder in ("test_2", "png-eval-5"):
        ref = load_ref_scores(bench_dir(shared_data) / folder / "eval_bdry.txt")
        assert_scores_close(scores, ref, tol=0.002)
        assert scores["ODS_T"] == pytest.approx(ref["ODS_T"], abs=1e-4)
    # the per-threshold curve of test_2 (eval_bdry_thr.txt: thresh R P F)
    thr = np.loadtxt(bench_dir(shared_data) / "test_2" / "eval_bdry_thr.txt")
    np.testing.assert_allclose(scores["curve"], thr, atol=0.003)


def test_segs_and_ucm2_inputs_match_matlab(shared_data, bench):
    """The benchmark's other input formats on the same sample: ``segs`` (one threshold per
    segmentation) and ``ucm2`` (boundaries ``ucm2[2::2, 2::2]``, regions ``bwlabel(ucm2 <= t)``)."""
    from scipy.io import loadmat

    ref = load_ref_scores(bench_dir(shared_data) / "test_2" / "eval_bdry.txt")
    seg_counts, ucm_counts = [], []
    for i, (_, gt_segs, bdrys) in bench.items():
        segs = list(loadmat(bench_dir(shared_data) / "segs" / f"{i}.mat")["segs"][0])
        ucm2 = loadmat(bench_dir(shared_data) / "ucm2" / f"{i}.mat")["ucm2"]
        seg_counts.append(M.evaluate_segs_boundaries_image(segs, bdrys, matching="greedy"))
        ucm_counts.append(
            M.evaluate_boundaries_image(M.ucm2_to_boundary_map(ucm2), bdrys, 5, matching="greedy")
        )
        # the UCM's regions at the 5 thresholds are the segs (up to label names)
        for t, seg in zip(M.boundary_thresholds(5), segs):
            n = M.contingency_table(M.ucm2_to_segmentation(ucm2, t), seg)
            assert ((n > 0).sum(axis=0) == 1).all() and ((n > 0).sum(axis=1) == 1).all()
    assert_scores_close(M.collect_boundary_scores(seg_counts), ref, tol=0.002)
    assert_scores_close(M.collect_boundary_scores(ucm_counts), ref, tol=0.002)


def test_png_99_thresholds_matches_matlab(shared_data, bench):
    folder = bench_dir(shared_data) / "png-eval-99"
    per_image = {
        i: M.evaluate_boundaries_image(pb, b, thresholds=99, matching="greedy")
        for i, (pb, _, b) in bench.items()
    }
    _check_counts(per_image, folder, tol_r=0.005, tol_p=0.01)
    scores = M.collect_boundary_scores([per_image[i] for i in BENCH_IDS])
    assert_scores_close(scores, load_ref_scores(folder / "eval_bdry.txt"), tol=0.003)
    # P/R at every threshold of eval_bdry_thr.txt (rows in that file's own order)
    thr = np.loadtxt(folder / "eval_bdry_thr.txt")
    idx = np.rint(thr[:, 0] * 100).astype(int) - 1
    np.testing.assert_allclose(scores["curve"][idx, 1:3], thr[:, 1:3], atol=0.005)


@pytest.mark.skipif(not os.environ.get("HISEG_SLOW_TESTS"), reason="slow; set HISEG_SLOW_TESTS=1")
def test_png_99_thresholds_optimal_matching(shared_data, bench):
    folder = bench_dir(shared_data) / "png-eval-99"
    per_image = {
        i: M.evaluate_boundaries_image(pb, b, thresholds=99, matching="optimal")
        for i, (pb, _, b) in bench.items()
    }
    _check_counts(per_image, folder, tol_r=0.005, tol_p=0.005)
    scores = M.collect_boundary_scores([per_image[i] for i in BENCH_IDS])
    assert_scores_close(scores, load_ref_scores(folder / "eval_bdry.txt"), tol=0.002)


def test_fast_variant_matches_reference_exactly(shared_data, bench):
    folder = bench_dir(shared_data) / "png-fasteval-99"
    per_image = {}
    for i, (pb, _, b) in bench.items():
        radius = M.DEFAULT_MAX_DIST * max(pb.shape)
        per_image[i] = M.evaluate_boundaries_image_fast(pb, b, thresholds=99, radius=radius)
    _check_counts(per_image, folder, tol_r=0.0, tol_p=0.0)
    scores = M.collect_boundary_scores([per_image[i] for i in BENCH_IDS])
    assert_scores_close(scores, load_ref_scores(folder / "eval_bdry.txt"), tol=1e-5)


# ---------------------------------------------------------------------------------------------
# dataset registration
# ---------------------------------------------------------------------------------------------
def test_bsds_registration_and_dicts(shared_data):
    import hiseg.data  # noqa: F401  (registers everything)
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from hiseg.data.datasets import bsds500

    names = DatasetCatalog.list()
    for name in ("bsds500_train", "bsds500_val", "bsds500_test", "bsds500_train_shared",
                 "bsds500_val_shared", "bsds500_bench_sample"):  # fmt: skip
        assert name in names
        assert MetadataCatalog.get(name).evaluator_type == "bsds_hierarchical"
    assert bsds500.register_all() == []  # idempotent: everything already there

    dicts = DatasetCatalog.get("bsds500_val_shared")
    assert len(dicts) == 100
    d = dicts[0]
    assert set(d) >= {"file_name", "image_id", "height", "width", "bsds_gt_file"}
    assert isinstance(d["image_id"], str) and Path(d["file_name"]).stem == d["image_id"]
    segs, bdrys = bsds500.load_bsds_ground_truth(d["bsds_gt_file"])
    assert 4 <= len(segs) == len(bdrys) <= 9
    assert segs[0].shape == (d["height"], d["width"]) and bdrys[0].dtype == bool
    assert np.issubdtype(segs[0].dtype, np.integer) and segs[0].min() >= 1
    bench_dicts = DatasetCatalog.get("bsds500_bench_sample")
    assert [x["image_id"] for x in bench_dicts] == list(BENCH_IDS)


def test_bsds_missing_files_and_npz(shared_data, tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from hiseg.data.datasets import bsds500

    import hiseg.data  # noqa: F401

    orig_root = Path(MetadataCatalog.get("bsds500_val").image_root).parents[2]
    try:
        bsds500.register_bsds500(tmp_path, overwrite=True)
        expected = re.escape(str(tmp_path / "bsds500" / "images" / "val"))
        with pytest.raises(FileNotFoundError, match=expected):
            DatasetCatalog.get("bsds500_val")

        # a two-image copy of the val split, converted to npz by the prepare script
        src = Path(shared_data) / "bsds500"
        ids = sorted(p.stem for p in (src / "groundTruth" / "val").glob("*.mat"))[:2]
        for sub, ext in (("images", ".jpg"), ("groundTruth", ".mat")):
            (tmp_path / "bsds500" / sub / "val").mkdir(parents=True)
            for i in ids:
                shutil.copy(src / sub / "val" / f"{i}{ext}", tmp_path / "bsds500" / sub / "val")
        dicts = DatasetCatalog.get("bsds500_val")
        assert [d["image_id"] for d in dicts] == ids

        prepare = load_script("prepare_bsds500")
        assert prepare.main(["--root", str(tmp_path), "--splits", "val"]) == 0
        for d in dicts:
            npz = Path(bsds500.npz_path_for(d["bsds_gt_file"]))
            assert npz.is_file()
            segs_npz, b_npz = bsds500.load_bsds_ground_truth(d["bsds_gt_file"])
            segs_mat, b_mat = bsds500.load_bsds_ground_truth_mat(d["bsds_gt_file"])
            for a, b in zip(segs_npz + b_npz, segs_mat + b_mat):
                np.testing.assert_array_equal(a, b)
        assert not list((tmp_path / "bsds500").rglob(".tmp-*"))  # atomic writes leave nothing
        assert prepare.main(["--root", str(tmp_path), "--splits", "val"]) == 0  # nothing to do
    finally:
        bsds500.register_bsds500(orig_root, overwrite=True)
    assert Path(MetadataCatalog.get("bsds500_val").image_root).parents[2] == orig_root


# ---------------------------------------------------------------------------------------------
# the evaluator
# ---------------------------------------------------------------------------------------------
def _gt_hierarchy(d):
    from hiseg.data.datasets.bsds500 import load_bsds_ground_truth

    segs, _ = load_bsds_ground_truth(d["bsds_gt_file"])
    return sorted(segs, key=lambda s: -len(np.unique(s)))  # fine to coarse


def test_evaluator_on_val_images_with_gt_predictions(shared_data, tmp_path):
    import torch
    from detectron2.data import DatasetCatalog

    import hiseg.data  # noqa: F401
    from hiseg.evaluation import HierarchicalSegEvaluator

    dicts = DatasetCatalog.get("bsds500_val_shared")[:3]
    ev = HierarchicalSegEvaluator("bsds500_val_shared", output_dir=str(tmp_path))
    ev.reset()
    for k, d in enumerate(dicts):
        levels = _gt_hierarchy(d)  # every human segmentation is a level (4 to 9 levels)
        if k == 1:
            levels = torch.as_tensor(np.stack(levels))  # an (L, H, W) tensor works too
        ev.process([d], [{"hierarchy": levels}])
    res = ev.evaluate()["bsds"]
    assert res["num_images"] == 3
    # every human region is a region of some level
    assert res["Covering_Best"] == pytest.approx(1.0)
    assert res["Covering_OIS"] > 0.7 and res["Covering_ODS"] > 0.6
    assert res["ODS"] > 0.97 and res["OIS"] > 0.97 and res["AP"] > 0.9
    assert res["PRI_OIS"] > 0.85 and res["VI_OIS"] < 1.5
    for k in (64, 32, 16):
        assert 0.5 < res[f"RegionF@{k}"] <= 1.0
    assert (tmp_path / "bsds_per_image.json").is_file()

    # a one-region "hierarchy" is poor on every measure
    ev2 = HierarchicalSegEvaluator(distributed=False)
    for d in dicts:
        ev2.process([d], [{"hierarchy": [np.zeros((d["height"], d["width"]), np.int64)]}])
    bad = ev2.evaluate()["bsds"]
    assert bad["ODS"] < 0.05 and bad["Covering_ODS"] < res["Covering_ODS"]
    assert bad["RegionF@64"] < res["RegionF@64"]


def test_evaluator_reproduces_matlab_on_bench(shared_data):
    """The 5 UCM levels of the sample as a hierarchy give the MATLAB ODS/OIS/AP (test_2): the
    fraction-of-levels boundary map has the same level sets as the UCM."""
    from detectron2.data import DatasetCatalog
    from scipy.io import loadmat

    import hiseg.data  # noqa: F401
    from hiseg.evaluation import HierarchicalSegEvaluator

    ev = HierarchicalSegEvaluator("bsds500_bench_sample", distributed=True)  # gather on 1 worker
    for d in DatasetCatalog.get("bsds500_bench_sample"):
        segs = loadmat(bench_dir(shared_data) / "segs" / f"{d['image_id']}.mat")["segs"][0]
        ev.process([d], [{"hierarchy": list(segs)}])  # fine to coarse, 5 levels
    res = ev.evaluate()["bsds"]
    ref = load_ref_scores(bench_dir(shared_data) / "test_2" / "eval_bdry.txt")
    assert_scores_close(res, ref, 0.002)
    assert 0 < res["Covering_ODS"] < 1 and 0 < res["VI_ODS"]


def test_resize_and_level_choice():
    from hiseg.evaluation.hierarchical_evaluator import (
        _nearest_level,
        hierarchy_as_arrays,
    )
    from hiseg.evaluation.label_maps import resize_nearest

    small = np.array([[1, 2], [3, 4]])
    big = resize_nearest(small, (4, 6))
    np.testing.assert_array_equal(big[:, :3], [[1] * 3, [1] * 3, [3] * 3, [3] * 3])
    assert resize_nearest(big, (2, 2)).tolist() == small.tolist()
    assert _nearest_level([200, 70, 30, 10], 64) == 1
    assert _nearest_level([200, 48, 16, 8], 32) == 1  # tie: the finer level
    with pytest.raises(ValueError):
        hierarchy_as_arrays([np.zeros((2, 2, 2))])
    assert len(hierarchy_as_arrays(np.zeros((3, 4, 5), np.int32))) == 3
