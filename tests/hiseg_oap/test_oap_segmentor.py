"""OAPSegmentor (OAP Sec. 4.1, 4.3, 5.1): teacher EMA, pseudo-mask targets, a training step
through the multi-crop mapper, inference outputs, and tools/train_net.py end to end on the real
COCO sample (train, then AP / PQ / mIoU from the standard evaluators)."""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from helpers import REPO, add_all_configs, load_tool

QUICK = REPO / "configs" / "OAP" / "quick" / "oap_vit_tiny_coco_sample_cpu.yaml"


def quick_cfg(*opts):
    cfg = add_all_configs(get_cfg())
    cfg.merge_from_file(str(QUICK))
    cfg.merge_from_list(list(opts))
    return cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(quick_cfg())


def test_teacher_momentum_schedule():
    from hiseg_oap.modeling.meta_arch import teacher_momentum

    assert teacher_momentum(0.996, 1.0, 0, 100) == pytest.approx(0.996)
    assert teacher_momentum(0.996, 1.0, 100, 100) == pytest.approx(1.0)
    assert teacher_momentum(0.996, 1.0, 50, 100) == pytest.approx(0.998)
    vals = [teacher_momentum(0.996, 1.0, i, 10) for i in range(11)]
    assert all(a <= b for a, b in zip(vals, vals[1:]))


def test_first_update_copies_then_ema(model):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(torch.randn_like(p))
    m.update_teacher(0.9)
    assert int(m.teacher_synced) == 1
    for ps, pt in zip(m.student.parameters(), m.teacher.parameters()):
        assert torch.equal(ps, pt)
    before = [p.clone() for p in m.teacher.parameters()]
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(1.0)
    m.update_teacher(0.9)
    for b, ps, pt in zip(before, m.student.parameters(), m.teacher.parameters()):
        torch.testing.assert_close(pt, 0.9 * b + 0.1 * ps)


def test_teacher_not_trainable_and_in_eval(model):
    assert all(not p.requires_grad for p in model.teacher.parameters())
    model.train()
    assert not model.teacher.training and model.student.training
    from hiseg.engine.optim import param_groups

    ids = {id(p) for g in param_groups(model, 1e-3, 0.05) for p in g["params"]}
    assert not ids & {id(p) for p in model.teacher.parameters()}
    assert {id(p) for p in model.student.parameters() if p.requires_grad} <= ids
    # learnable queries and level tokens are not weight-decayed
    decayed = {id(p) for g in param_groups(model, 1e-3, 0.05) if g["weight_decay"] > 0 for p in g["params"]}
    for name, mod in model.student.transformer_decoder.named_modules():
        if isinstance(mod, torch.nn.Embedding):
            assert id(mod.weight) not in decayed, name


def test_pseudo_mask_targets_dedup_and_limit():
    from hiseg_oap.modeling.pseudo_targets import pseudo_mask_targets
    from hiseg_oap.pooling import generate_pseudo_masks

    torch.manual_seed(0)
    feats = torch.zeros(1, 8, 12, 12)
    feats[:, 0, :, :6] = 1.0
    feats[:, 1, :, 6:] = 1.0
    feats += 0.01 * torch.randn_like(feats)
    (pm,) = generate_pseudo_masks(feats)
    t = pseudo_mask_targets(pm)
    for name in ("semantic", "instance"):
        masks = t[name].masks.flatten(1)
        assert len(torch.unique(masks, dim=0)) == masks.shape[0]  # no repeats
        all_masks = torch.cat([lv.masks for lv in pm.level(name)]).flatten(1)
        assert len(torch.unique(all_masks, dim=0)) == masks.shape[0]  # nothing else lost
        assert t[name].embeds.shape == (masks.shape[0], 8)
        assert torch.all(t[name].layer[1:] >= t[name].layer[:-1])
    one = pseudo_mask_targets(pm, max_targets=1)
    assert one["instance"].masks.shape[0] == 1
    big = t["instance"].masks.flatten(1).sum(1).max()
    assert one["instance"].masks.flatten(1).sum(1)[0] == big


@pytest.fixture(scope="module")
def train_batch(tmp_path_factory):
    from train_check import oap_skimage_batch

    return oap_skimage_batch(quick_cfg(), tmp_path_factory.mktemp("oap_imgs"))


def test_training_steps_losses_finite_changing_teacher_moves(train_batch):
    torch.manual_seed(0)
    cfg = quick_cfg("SOLVER.MAX_ITER", "10")
    model = build_model(cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    history, teacher_snap = [], None
    with EventStorage(0) as storage:
        for it in range(3):
            storage.iter = it
            losses = model(train_batch)
            assert {"loss_mask", "loss_dice", "loss_objectness", "loss_sd"} <= set(losses)
            assert any(k.endswith("_0") for k in losses)  # deep supervision
            total = sum(losses.values())
            assert torch.isfinite(total)
            history.append({k: float(v.detach()) for k, v in losses.items()})
            opt.zero_grad()
            total.backward()
            with_grad = {n for n, p in model.student.named_parameters()
                         if p.grad is not None and bool(p.grad.abs().sum() > 0)}
            needed = [n for n, p in model.student.named_parameters() if p.requires_grad and n.startswith(
                ("transformer_decoder.", "query_proj.", "head.", "backbone.vit.blocks."))]
            assert set(needed) <= with_grad, sorted(set(needed) - with_grad)[:5]
            # every trainable parameter takes part (DDP without find_unused_parameters)
            unused = [n for n, p in model.student.named_parameters() if p.requires_grad and p.grad is None]
            assert not unused, unused
            # the zero-initialised adapter (Sec. 4.3) starts as a no-op: its injector gates get a
            # gradient only once the extractors have written into the spatial-prior stream
            gate = "backbone.interactions.0.injector.gamma"
            assert (gate in with_grad) == (it > 0)
            opt.step()
            if it == 1:
                teacher_snap = [p.clone() for p in model.teacher.parameters()]
            assert storage.latest()["oap/instance_targets_per_view"][0] > 0
        m = storage.latest()["oap/teacher_momentum"][0]
    assert history[0] != history[-1]
    # step 2 moved the teacher by the EMA of the student updated at step 1
    moved = sum(not torch.equal(a, b) for a, b in zip(teacher_snap, model.teacher.parameters()))
    assert moved > 0
    from hiseg_oap.modeling.meta_arch import teacher_momentum

    assert m == pytest.approx(teacher_momentum(0.996, 1.0, 2, 10))
    assert model.criterion.center.abs().sum() > 0  # teacher centring updated


def test_training_input_errors(train_batch):
    model = build_model(quick_cfg())
    model.train()
    bad = [{k: v for k, v in x.items() if k != "local_boxes"} for x in train_batch]
    with EventStorage(0), pytest.raises(ValueError, match="local_boxes"):
        model(bad)


def test_inference_outputs(model, train_batch):
    model.eval()
    x = {"image": torch.randint(0, 255, (3, 70, 100), dtype=torch.uint8), "height": 140, "width": 200}
    (out,) = model([x])
    inst = out["instances"]
    assert inst.image_size == (140, 200)
    assert inst.pred_masks.shape[1:] == (140, 200) and inst.pred_masks.dtype == torch.bool
    assert torch.all(inst.pred_classes == 0)
    assert len(inst) <= 20 and torch.all(inst.scores[:-1] >= inst.scores[1:])
    assert inst.pred_clusters.max() < 16
    sem = out["sem_seg_clusters"]
    assert sem.shape == (140, 200) and sem.dtype == torch.long and sem.max() < 16
    pan, segs = out["panoptic_seg"]
    assert pan.shape == (140, 200)
    ids = set(torch.unique(pan).tolist()) - {0}
    assert ids == {s["id"] for s in segs}
    # the chunked semantic argmax equals the dense (K, H, W) computation
    prob = torch.rand(4, 9, 11)
    codes = torch.randn(4, 16)
    obj = torch.rand(4)
    dense = torch.einsum("q,qk,qhw->khw", obj, (codes / model.cluster_temp).softmax(-1), prob).argmax(0)
    assert torch.equal(model._semantic(prob, codes, obj, chunk=7), dense)
    # a confident query outvotes several "no object" queries (Mask2Former drops no-object mass)
    prob = torch.tensor([0.9, 0.5, 0.5, 0.5]).view(4, 1, 1).expand(4, 2, 2)
    codes = torch.full((4, 16), -10.0)
    codes[0, 3] = 10.0
    codes[1:, 7] = 10.0
    sem = model._semantic(prob, codes, torch.tensor([0.99, 0.01, 0.01, 0.01]))
    assert torch.all(sem == 3)
    # before any training step the teacher is unset and inference uses the student
    assert model._inference_network() is model.student


def test_cast_backbone_stands_in(train_batch):
    """MODEL.OAP.TEACHER.FEATURES names a backbone output when CAST replaces the ViT."""
    cfg = quick_cfg(
        "MODEL.BACKBONE.NAME", "build_cast_backbone", "MODEL.OAP.TEACHER.FEATURES", "res3",
        "MODEL.CAST.EMBED_DIM", "48", "MODEL.CAST.NUM_HEADS", "4", "MODEL.CAST.DEPTHS", "[1, 1, 1, 1]",
        "MODEL.CAST.NUM_SEGMENTS", "[24, 12, 6, 3]", "MODEL.CAST.SUPERPIXEL.NUM_SUPERPIXELS", "0",
        "MODEL.CAST.SUPERPIXEL.PIXELS_PER_SUPERPIXEL", "64",
    )
    model = build_model(cfg)
    model.train()
    with EventStorage(0):
        losses = model(train_batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    unused = [n for n, p in model.student.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused
    with pytest.raises(ValueError, match="key_features"):
        build_model(quick_cfg("MODEL.BACKBONE.NAME", "build_cast_backbone", "MODEL.CAST.EMBED_DIM", "48",
                              "MODEL.CAST.NUM_HEADS", "4"))


@pytest.fixture(scope="module")
def oap_d2_root(shared_data, tmp_path_factory):
    """A DETECTRON2_DATASETS folder: coco_2017_val = 4 real COCO val images, and
    coco_2017_val_stuff27 = the 2 panoptic-sample images with COCO-Stuff-27 label maps written by
    datasets/prepare_coco_stuff27.py from their panoptic annotations."""
    root = tmp_path_factory.mktemp("oap_d2")
    coco = root / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "val2017").mkdir()
    src = json.loads((shared_data / "coco" / "annotations" / "instances_val2017.json").read_text())
    images = src["images"][:4]
    ids = {im["id"] for im in images}
    sub = dict(src, images=images, annotations=[a for a in src["annotations"] if a["image_id"] in ids])
    (coco / "annotations" / "instances_val2017.json").write_text(json.dumps(sub))
    pan = shared_data / "coco_panoptic_sample"
    for im in images:
        os.symlink(shared_data / "coco" / "val2017" / im["file_name"], coco / "val2017" / im["file_name"])
    for f in sorted((pan / "input_images").glob("*.jpg")):
        os.symlink(f, coco / "val2017" / f.name)
    subprocess.run([sys.executable, "datasets/prepare_coco_stuff27.py", "--root", str(root),
                    "--panoptic-json", str(pan / "panoptic_examples.json"),
                    "--panoptic-root", str(pan / "panoptic_examples"),
                    "--categories", str(pan / "panoptic_coco_categories.json")],
                   cwd=REPO, check=True, capture_output=True, text=True)
    assert len(list((coco / "stuff27_val2017").glob("*.png"))) == 2
    return root


def test_train_net_trains_then_reports_ap_pq_miou(oap_d2_root, tmp_path):
    """tools/train_net.py with the quick config: 4 training steps on real COCO images, then one
    evaluation pass over three datasets with the cluster-mapped standard evaluators."""
    out = tmp_path / "run"
    env = dict(os.environ, DETECTRON2_DATASETS=str(oap_d2_root), OMP_NUM_THREADS="2")
    args = ["--config-file", str(QUICK), "OUTPUT_DIR", str(out),
            "DATASETS.TEST", '("coco_2017_val", "coco_panoptic_sample", "coco_2017_val_stuff27")',
            "TEST.EVALUATORS", '["coco_2017_val:coco_class_agnostic", "coco_2017_val:coco_cluster", '
            '"coco_panoptic_sample:coco_panoptic_seg_cluster", "coco_2017_val_stuff27:sem_seg_cluster"]']
    log = tmp_path / "train_net.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "tools/train_net.py", *args], cwd=REPO, env=env,
                              stdout=f, stderr=subprocess.STDOUT, timeout=900)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    losses = [m["loss_sd"] for m in metrics if "loss_sd" in m]
    assert losses and all(np.isfinite(losses))  # (losses changing: the in-process test above)
    final = {k: v for m in metrics for k, v in m.items()}
    # class-agnostic (Table 2 "Agn Instance Seg.") and zero-shot class-aware instance segmentation
    for key in ("coco_2017_val/segm_agnostic/AP", "coco_2017_val/segm_agnostic/AP50",
                "coco_2017_val/segm_agnostic/AR100", "coco_2017_val/bbox_agnostic/AP",
                "coco_2017_val/segm/AP", "coco_2017_val/segm/AR100", "coco_panoptic_sample/panoptic_seg/PQ",
                "coco_panoptic_sample/panoptic_seg/SQ", "coco_panoptic_sample/panoptic_seg/RQ",
                "coco_2017_val_stuff27/sem_seg/mIoU", "coco_2017_val_stuff27/sem_seg/pACC"):
        assert key in final, (key, sorted(final)[:40])
        # class-aware AP is NaN (detectron2's "no predictions") when no cluster could be mapped yet
        assert np.isfinite(final[key]) or key.startswith("coco_2017_val/segm/"), (key, final[key])
        assert 0.0 <= final[key] <= 100.0 or not np.isfinite(final[key])
    # the cluster -> class mappings are computed in the run and saved with the results
    for ds, t in (("coco_2017_val", "coco_cluster"), ("coco_panoptic_sample", "coco_panoptic_seg_cluster"),
                  ("coco_2017_val_stuff27", "sem_seg_cluster")):
        saved = json.loads((out / "inference" / ds / f"cluster_mapping_{t}.json").read_text())
        assert len(saved["mapping"]) == 16
    assert "copypaste" in text and "model_final.pth" in os.listdir(out)


def test_dino_weights_reach_student_and_teacher(tmp_path, train_batch):
    """A DINO checkpoint (plain ViT state dict) converted with the quick config lands in the
    student's ViT; the first training step copies it into the teacher (Sec. 5.1 DINO init)."""

    from detectron2.checkpoint import DetectionCheckpointer

    from hiseg.modeling import ViTBackbone

    torch.manual_seed(5)
    src = ViTBackbone(embed_dim=48, depth=4, num_heads=4, patch_size=8, img_size=96)
    with torch.no_grad():
        for t in src.vit.parameters():
            t.add_(torch.randn_like(t) * 0.02)
    dino = {k: v.clone() for k, v in src.vit.state_dict().items()}
    torch.save(dino, tmp_path / "dino_vit_tiny8.pth")
    cfg_file = tmp_path / "oap.yaml"
    cfg_file.write_text(quick_cfg().dump())
    cli = load_tool("convert_cast_checkpoint")
    out = tmp_path / "dino_oap.pth"
    assert cli.main(["--input", str(tmp_path / "dino_vit_tiny8.pth"), "--output", str(out),
                     "--config-file", str(cfg_file)]) == 0
    assert all(k.startswith("student.backbone.vit.") for k in torch.load(out)["model"])

    model = build_model(quick_cfg())
    DetectionCheckpointer(model).load(str(out))
    assert int(model.teacher_synced) == 0
    for k, v in dino.items():
        assert torch.equal(model.student.backbone.vit.state_dict()[k], v), k
    model.train()
    with EventStorage(0):
        model(train_batch)
    assert int(model.teacher_synced) == 1
    for k, v in dino.items():
        assert torch.equal(model.teacher.backbone.vit.state_dict()[k], v), k


def test_demo_writes_oap_pictures(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "tools/demo.py", "--config-file", str(QUICK), "--skimage", "coffee",
                           "--max-size", "128", "--output", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "randomly initialised" in proc.stdout
    from PIL import Image

    pic = Image.open(out / "skimage_coffee_oap.png")
    # input + 5 OAP layers x 2 levels + instances, semantic, panoptic: 14 panels in rows of 3
    assert pic.size[0] > 3 * 128 and pic.size[1] > 5 * 85  # coffee: 128 x 85 at --max-size 128
    assert "13 panels" in proc.stdout  # besides the input


def test_teacher_centre_counts_each_teacher_output_once(train_batch):
    """DINO centres over the teacher's outputs of the batch: every OAP target once, however many
    local views its cropped mask appears in."""
    from hiseg_oap.modeling.pseudo_targets import pseudo_mask_targets

    torch.manual_seed(1)
    model = build_model(quick_cfg())
    model.train()
    seen = {}
    original = model.criterion.update_center

    def record(codes):
        seen["n"] = codes.shape[0]
        return original(codes)

    model.criterion.update_center = record
    with EventStorage(0):
        model(train_batch)
    with torch.no_grad():
        images = model._normalize(torch.stack([x["image"] for x in train_batch]))
        pseudo = model.generator(model.teacher_feature_map(images))
    expected = sum(len(t[name].masks) for p in pseudo for t in [pseudo_mask_targets(p)]
                   for name in ("semantic", "instance"))
    assert seen["n"] == expected
