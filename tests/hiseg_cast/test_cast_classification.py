"""CAST image classification: the top-k evaluator, the classification mapper, superpixel-aware
Mixup / CutMix, the supervised DeiT-recipe classifier, the frozen linear probe, TENT, and a tiny
end-to-end train + evaluate run with the trainer."""
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import hiseg.data  # noqa: F401  (registers the datasets)
from hiseg.engine import build_hiseg_optimizer
from hiseg.evaluation.classification import ClassificationEvaluator, build_classification_evaluators, topk_indices
from helpers import add_all_configs

import hiseg_cast  # noqa: F401  (registers the meta-architectures)
from hiseg_cast.modeling.superpixel_mixup import (SuperpixelMixup, cutmix_superpixels, overlay_superpixels,
                                                  smoothed_one_hot, soft_target_cross_entropy)
from hiseg_cast.modeling.tent import CosinePrototypeClassifier, norm_parameters, tent_adapt
from hiseg_cast.data.dataset_mappers import CASTClassificationMapper

CFG = "configs/CAST/quick/deit_cast_tiny_skimage_cpu.yaml"
TINY = ["MODEL.CAST.EMBED_DIM", 48, "MODEL.CAST.NUM_HEADS", 4, "MODEL.CAST.DEPTHS", [1, 1, 1, 1],
        "INPUT.CROP.SIZE", [64, 64], "MODEL.CAST.POS_GRID", [8, 8], "MODEL.CAST.SUPERPIXEL.NUM_SUPERPIXELS", 49,
        "MODEL.CAST.NUM_SEGMENTS", [16, 8, 4, 2]]


def make_cfg(*opts, base=CFG):
    cfg = get_cfg()
    add_all_configs(cfg)
    cfg.merge_from_file(base)
    cfg.merge_from_list(TINY + list(opts))
    return cfg


def same_partition(a, b) -> bool:
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def consecutive(m) -> bool:
    return sorted(torch.unique(m).tolist()) == list(range(int(m.max()) + 1))


# ----------------------------------------------------------------------------------------------
def test_evaluator_top1_top5_by_hand():
    ev = ClassificationEvaluator(distributed=True, topk=(1, 2, 5))
    ev.reset()
    logits = [
        [0.1, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 1: top-1 hit
        [0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -1.0],  # label 3: rank 4 -> top-5 only
        [0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -1.0],  # label 6: rank 7 -> miss
        [0.2, 0.3, 0.3, 0.0, 0.0, 0.0, 0.0],  # label 2: tie with 1, lower index first -> rank 2
    ]
    labels = [1, 3, 6, 2]
    inputs = [{"image_id": i, "label": l} for i, l in enumerate(labels)] + [{"image_id": 9}]
    outputs = [{"logits": torch.tensor(l)} for l in logits] + [{"logits": torch.zeros(7)}]
    ev.process(inputs[:2], outputs[:2])
    ev.process(inputs[2:], outputs[2:])  # the unlabelled image is skipped
    res = ev.evaluate()["classification"]
    assert res["num_images"] == 4
    assert res["top1"] == pytest.approx(25.0)
    assert res["top2"] == pytest.approx(50.0)
    assert res["top5"] == pytest.approx(75.0)
    assert res["mean_class_top1"] == pytest.approx(25.0)
    assert topk_indices(np.array([1.0, 3.0, 3.0, float("nan")]), 10).tolist() == [1, 2, 0, 3]
    # fewer classes than k: every valid label is in the top k
    ev2 = ClassificationEvaluator(distributed=False)
    ev2.process([{"label": 2}], [{"logits": torch.tensor([3.0, 2.0, 1.0])}])
    assert ev2.evaluate()["classification"]["top5"] == 100.0


def test_evaluator_factory_wiring_and_mapper(tmp_path):
    from hiseg.evaluation.registry import EVALUATOR_FACTORIES, build_evaluators

    cfg = make_cfg("OUTPUT_DIR", str(tmp_path))
    EVALUATOR_FACTORIES.setdefault("classification", build_classification_evaluators)
    assert isinstance(build_evaluators(cfg, "skimage_instances_val"), ClassificationEvaluator)

    dicts = DatasetCatalog.get("skimage_instances_train")
    assert len(dicts) == 16 and sorted(d["label"] for d in dicts) == list(range(16))
    np.random.seed(0)
    torch.manual_seed(0)
    d = CASTClassificationMapper(cfg, True)(dicts[6])  # grey-level 'coins'
    assert d["image"].shape == (3, 64, 64) and d["image"].dtype == torch.uint8
    assert d["superpixels"].shape == (64, 64) and consecutive(d["superpixels"])
    assert d["label"] == 6
    t = CASTClassificationMapper(cfg, False)(dicts[0])
    assert t["image"].shape == (3, 64, 64) and (t["height"], t["width"]) == (64, 64)
    # torchvision's RandAugment, and no superpixels for a ViT backbone
    cfg_tv = make_cfg("MODEL.CLS.AUTO_AUGMENT", "torchvision", "MODEL.BACKBONE.NAME", "build_vit_backbone")
    d = CASTClassificationMapper(cfg_tv, True)(dicts[0])
    assert d["image"].shape == (3, 64, 64) and "superpixels" not in d


# ----------------------------------------------------------------------------------------------
def test_targets_and_loss():
    y = smoothed_one_hot(torch.tensor([2, 0]), 4, 0.1)
    assert torch.allclose(y.sum(1), torch.ones(2))
    assert y[0, 2] == pytest.approx(0.925) and y[0, 0] == pytest.approx(0.025)
    logits = torch.tensor([[0.0, 0.0, 5.0, 0.0]])
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor([2]), label_smoothing=0.1)
    assert soft_target_cross_entropy(logits, y[:1]) == pytest.approx(float(ce), abs=1e-6)


def _two_images():
    """Two 32x40 images with different constant-colour regions and matching superpixels."""
    h, w = 32, 40
    sp_a = torch.arange(h)[:, None].div(8, rounding_mode="floor").expand(h, w) * 5 \
        + torch.arange(w)[None].div(8, rounding_mode="floor")  # 4 x 5 blocks
    sp_b = (torch.arange(w)[None] // 4).expand(h, w).clone()  # 10 vertical stripes
    img = torch.zeros(2, 3, h, w)
    img[0] = (sp_a * 10).float()[None]
    img[1] = (100 + sp_b * 7).float()[None]
    return img, torch.stack([sp_a, sp_b]).long()


def test_cutmix_pastes_superpixels_of_the_second_image():
    img, sp = _two_images()
    mix = SuperpixelMixup(5, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, rng=np.random.RandomState(3))
    labels = torch.tensor([1, 4])
    out, sp_out, target = mix(img, sp, labels)
    lam, box = mix.last["lam"][0], mix.last["boxes"][0]
    assert mix.last["cutmix"][0] and box is not None
    y0, y1, x0, x1 = box
    assert (y1 - y0) * (x1 - x0) > 0
    inside = torch.zeros(32, 40, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    for i, j in ((0, 1), (1, 0)):
        # pixels: the partner's inside the box, the own outside
        assert torch.equal(out[i][:, inside], img[j][:, inside])
        assert torch.equal(out[i][:, ~inside], img[i][:, ~inside])
        s = sp_out[i]
        assert consecutive(s)
        # inside the box the superpixels are exactly the partner's, outside the own ones
        assert same_partition(s[inside], sp[j][inside])
        assert same_partition(s[~inside], sp[i][~inside])
        # no superpixel straddles the box edge
        assert not set(s[inside].tolist()) & set(s[~inside].tolist())
        # every superpixel has uniform colour: it describes the pixels the model sees
        for lab in torch.unique(s):
            assert out[i][0][s == lab].unique().numel() == 1
    assert lam == pytest.approx(1.0 - inside.sum().item() / (32 * 40))
    assert torch.allclose(target[0], lam * torch.eye(5)[1] + (1 - lam) * torch.eye(5)[4])


def test_cutmix_on_real_superpixels():
    cfg = make_cfg()
    np.random.seed(1)
    mapper = CASTClassificationMapper(cfg, True)
    batch = [mapper(d) for d in DatasetCatalog.get("skimage_instances_train")[:2]]
    img = torch.stack([d["image"] for d in batch]).float()
    sp = torch.stack([d["superpixels"] for d in batch])
    mix = SuperpixelMixup(16, mixup_alpha=0.0, cutmix_alpha=1.0, rng=np.random.RandomState(0))
    _, sp_out, _ = mix(img, sp, torch.tensor([0, 1]))
    y0, y1, x0, x1 = mix.last["boxes"][0]
    inside = torch.zeros(64, 64, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    assert inside.any() and (~inside).any()
    s = sp_out[0]
    assert consecutive(s)
    assert same_partition(s[inside], sp[1][inside])
    assert same_partition(s[~inside], sp[0][~inside])
    assert not set(s[inside].tolist()) & set(s[~inside].tolist())


def test_mixup_superpixel_policies():
    img, sp = _two_images()
    labels = torch.tensor([0, 1])
    for policy in ("dominant", "overlay", "recompute"):
        calls = []

        def fn(x):
            calls.append(x.clone())
            return torch.stack([overlay_superpixels(sp[0], sp[1])] * x.shape[0])

        mix = SuperpixelMixup(2, mixup_alpha=0.8, cutmix_alpha=0.0, superpixel_policy=policy,
                              rng=np.random.RandomState(0))
        out, sp_out, target = mix(img, sp, labels, superpixel_fn=fn)
        lam = mix.last["lam"][0]
        assert not mix.last["cutmix"][0] and 0 < lam < 1
        if policy == "dominant":
            assert torch.equal(sp_out[0], sp[0] if lam >= 0.5 else sp[1])
            assert torch.allclose(out[0], lam * img[0] + (1 - lam) * img[1])
        elif policy == "overlay":
            assert same_partition(sp_out[0], sp[0] * 100 + sp[1])
            for lab in torch.unique(sp_out[0]):  # uniform in the blend
                assert out[0][0][sp_out[0] == lab].unique().numel() == 1
        else:
            assert len(calls) == 1 and calls[0].shape[0] == 2
            assert torch.equal(out, out.round()) and torch.equal(calls[0], out)
        assert torch.allclose(target.sum(1), torch.ones(2))
    # "elem" mode: one lambda per image, image i mixed with image B-1-i
    mix = SuperpixelMixup(2, superpixel_policy="dominant", mode="elem", rng=np.random.RandomState(5))
    img4, sp4 = torch.cat([img, img.flip(0)]), torch.cat([sp, sp.flip(0)])
    _, sp_out, target = mix(img4, sp4, torch.tensor([0, 1, 1, 0]))
    assert len(set(mix.last["lam"])) > 1 and mix.last["partner"] == [3, 2, 1, 0]
    assert sp_out.shape == (4, 32, 40) and torch.allclose(target.sum(1), torch.ones(4))
    # the overlay of two maps is their intersection, relabelled
    assert consecutive(overlay_superpixels(sp[0], sp[1]))
    assert torch.equal(cutmix_superpixels(sp[0], sp[1], (0, 0, 0, 0)), sp[0])


# ----------------------------------------------------------------------------------------------
def _batch(cfg, n=4, is_train=True, seed=0):
    np.random.seed(seed)
    mapper = CASTClassificationMapper(cfg, is_train)
    return [mapper(d) for d in DatasetCatalog.get("skimage_instances_train")[:n]]


def test_cast_classifier_trains_with_mixup_and_cutmix():
    torch.manual_seed(0)
    cfg = make_cfg("SOLVER.BASE_LR", 1e-3)
    model = build_model(cfg)
    assert model.mixup is not None and model.mixup.cutmix_alpha == 1.0 and model.mixup.mixup_alpha == 0.8
    # parameters no class-token loss reaches are frozen (dense read-out, last pooling)
    assert not any(p.requires_grad for p in model.backbone.fuse.parameters())
    assert not any(p.requires_grad for p in model.backbone.encoder.pools[-1].parameters())
    opt = build_hiseg_optimizer(cfg, model)
    batch = _batch(cfg)
    model.mixup.rng = np.random.RandomState(2)
    before = model.backbone.encoder.blocks[0].attn.qkv.weight.clone()
    losses, kinds = [], []
    with EventStorage() as storage:
        for it in range(4):
            storage.iter = it
            loss = model(batch)["loss_cls"]
            assert torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            kinds.append(model.mixup.last["cutmix"][0])
    assert len(set(round(v, 6) for v in losses)) > 1
    assert True in kinds and False in kinds  # both cutmix and mixup batches were drawn
    assert not torch.equal(before, model.backbone.encoder.blocks[0].attn.qkv.weight)
    model.eval()
    out = model(_batch(cfg, 3, is_train=False))
    assert len(out) == 3 and out[0]["logits"].shape == (16,)


def test_classifier_recompute_policy_and_deepcopy():
    import copy

    torch.manual_seed(0)
    cfg = make_cfg("MODEL.CLS.MIXUP_SUPERPIXELS", "recompute", "MODEL.CLS.CUTMIX_ALPHA", 0.0)
    model = build_model(cfg)
    model.mixup.rng = np.random.RandomState(0)
    batch = _batch(cfg, 2)
    seen = []
    orig = model.backbone.superpixels_from_images

    def spy(x):
        out = orig(x)
        seen.append(out)
        return out

    model.backbone.superpixels_from_images = spy
    with EventStorage():
        loss = model(batch)["loss_cls"]
    assert torch.isfinite(loss) and len(seen) == 1 and seen[0].shape == (2, 64, 64)
    del model.backbone.superpixels_from_images
    copy.deepcopy(model)  # e.g. for a model EMA: the mixup helper holds no module reference


def test_vit_classifier_trains():
    torch.manual_seed(0)
    cfg = make_cfg("MODEL.BACKBONE.NAME", "build_vit_backbone", "MODEL.VIT.EMBED_DIM", 48, "MODEL.VIT.DEPTH", 2,
                   "MODEL.VIT.NUM_HEADS", 4)
    model = build_model(cfg)
    opt = build_hiseg_optimizer(cfg, model)
    batch = _batch(cfg)
    assert "superpixels" not in batch[0]
    with EventStorage():
        losses = []
        for _ in range(2):
            loss = model(batch)["loss_cls"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)) and losses[0] != losses[1]
    model.eval()
    assert model(batch[:2])[1]["logits"].shape == (16,)


def test_linear_probe_keeps_backbone_frozen():
    torch.manual_seed(0)
    cfg = make_cfg("MODEL.META_ARCHITECTURE", "CASTLinearProbe", "MODEL.CLS.PROBE_BN", True,
                   "SOLVER.OPTIMIZER", "SGD", "SOLVER.BASE_LR", 0.8, "SOLVER.MOMENTUM", 0.9,
                   "SOLVER.WEIGHT_DECAY", 0.0)
    model = build_model(cfg)
    model.train()
    assert model.training and not model.backbone.training  # eval mode: no dropout, BN stats fixed
    assert isinstance(model.head[0], torch.nn.BatchNorm1d) and not model.head[0].affine
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items()}  # incl. BN buffers
    head_before = model.head[1].weight.clone()
    opt = build_hiseg_optimizer(cfg, model)
    trainable = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trainable == {id(model.head[1].weight), id(model.head[1].bias)}
    batch = _batch(cfg)
    with EventStorage():
        for _ in range(3):
            loss = model(batch)["loss_cls"]
            assert torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert all(p.grad is None for p in model.backbone.parameters())
    assert not torch.equal(head_before, model.head[1].weight)
    model.eval()
    assert model(batch[:1])[0]["logits"].shape == (16,)


def test_tent_adapts_only_norm_layers():
    torch.manual_seed(0)
    cfg = make_cfg()
    model = build_model(cfg).eval()
    batch = _batch(cfg, 4, is_train=False)
    with torch.no_grad():
        feats, _ = model.embed(batch)
    protos = CosinePrototypeClassifier.from_embeddings(feats, torch.tensor([0, 1, 0, 1]), temperature=0.07)
    logits = protos(feats)
    assert logits.shape == (4, 2) and float(logits.abs().max()) <= 1.0 / 0.07 + 1e-4

    start = {k: v.clone() for k, v in model.state_dict().items()}
    norms = {id(p) for p in norm_parameters(model.backbone)}
    res = tent_adapt(model, batch[:2], classifier=protos, lr=1.0, steps=1, reset=True)
    assert len(res) == 2
    for r in res:
        assert r["hierarchy"].shape == r["hierarchy_before"].shape == (5, 64, 64)
        assert torch.isfinite(r["entropy"]) and not torch.equal(r["logits"], r["logits_before"])
    for k, v in model.state_dict().items():  # reset: back to the trained model
        assert torch.equal(v, start[k]), k
    assert not model.training

    changed = tent_adapt(model, batch[:1], lr=1.0, reset=False)  # the model's own head
    assert torch.isfinite(changed[0]["entropy"])
    moved = [p for k, p in model.named_parameters() if not torch.equal(p, start[k])]
    assert moved and all(id(p) in norms for p in moved)


def test_tiny_config_trains_and_evaluates_with_the_trainer(tmp_path):
    from hiseg.engine import HisegTrainer
    from hiseg.evaluation.registry import EVALUATOR_FACTORIES

    EVALUATOR_FACTORIES.setdefault("classification", build_classification_evaluators)
    cfg = make_cfg("SOLVER.MAX_ITER", 3, "SOLVER.IMS_PER_BATCH", 4, "SOLVER.WARMUP_ITERS", 1,
                   "OUTPUT_DIR", str(tmp_path))
    cfg.freeze()
    trainer = HisegTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    res = trainer.storage.latest()
    assert "classification/top1" in res and "classification/top5" in res
    assert 0.0 <= res["classification/top5"][0] <= 100.0
