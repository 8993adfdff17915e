"""The OAP experiment ``projects/OAP/experiments/student_vs_pseudo_masks.py``: moving a
pre-trained ViT into OAPSegmentor, taking the EMA teacher's encoder out of a checkpoint, reading
the trainer's evaluations and writing the report. The full run is a documented command
(docs/oap_student_vs_pseudo_masks.md), not a test."""
import json
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from hiseg.errors import CheckpointError
from hiseg.modeling.vit import make_timm_vit
from helpers import REPO, add_all_configs, experiment

exp = experiment("OAP", "student_vs_pseudo_masks")

QUICK = REPO / "configs" / "OAP" / "quick" / "oap_vit_tiny_coco_sample_cpu.yaml"  # 48-d, 4 blocks, patch 8, 96


def quick_cfg(*opts):
    cfg = add_all_configs(get_cfg())
    cfg.merge_from_file(str(QUICK))
    cfg.merge_from_list(list(opts))
    return cfg


def _vit_state(seed, dim=48, depth=4, img=96):
    torch.manual_seed(seed)
    return make_timm_vit(embed_dim=dim, depth=depth, num_heads=4, patch_size=8, img_size=img).state_dict()


def _moco_checkpoint(path, dim=48, depth=4, img=96):
    """A checkpoint laid out as CASTMoCo's with a ViT backbone: online and momentum encoders
    with different values, plus heads."""
    online, momentum = _vit_state(1, dim, depth, img), _vit_state(2, dim, depth, img)
    model = {"momentum_synced": torch.tensor(1)}
    model.update({"momentum_backbone.vit." + k: v for k, v in momentum.items()})
    model.update({"backbone.vit." + k: v for k, v in online.items()})
    model["projector.0.weight"] = torch.randn(8, dim)
    torch.save({"model": model, "iteration": 10}, path)
    return online


def test_init_checkpoint_takes_the_online_vit_and_fills_the_student(tmp_path):
    online = _moco_checkpoint(tmp_path / "moco.pth")
    cfg = quick_cfg()
    info = exp.oap_init_checkpoint(str(tmp_path / "moco.pth"), str(tmp_path / "init.pth"), cfg)
    assert info["source_prefix"] == "backbone.vit."
    data = torch.load(info["model"], weights_only=False)["model"]
    assert set(data) == {"student.backbone.vit." + k for k in online}
    bare = torch.load(info["backbone"], weights_only=False)["model"]
    assert set(bare) == {"backbone.vit." + k for k in online}

    torch.manual_seed(0)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(info["model"])
    sd = model.state_dict()
    for k, v in online.items():
        assert torch.equal(sd["student.backbone.vit." + k], v), k
    # the bare-backbone copy loads into the config's backbone the pseudo-mask tool builds
    from detectron2.modeling import build_backbone

    holder = torch.nn.Module()
    holder.backbone = build_backbone(cfg)
    DetectionCheckpointer(holder).load(info["backbone"])
    assert torch.equal(holder.backbone.vit.pos_embed, online["pos_embed"])


@pytest.mark.parametrize("opts,key", [
    (("MODEL.VIT.EMBED_DIM", 96), "MODEL.VIT.EMBED_DIM"),
    (("MODEL.VIT.DEPTH", 6), "MODEL.VIT.DEPTH"),
    (("MODEL.VIT.IMG_SIZE", 64), "MODEL.VIT.IMG_SIZE"),
])
def test_init_checkpoint_names_the_key_that_does_not_fit(tmp_path, opts, key):
    _moco_checkpoint(tmp_path / "moco.pth")
    with pytest.raises(CheckpointError, match=key):
        exp.oap_init_checkpoint(str(tmp_path / "moco.pth"), str(tmp_path / "init.pth"), quick_cfg(*opts))
    assert not (tmp_path / "init.pth").exists()


def test_init_checkpoint_refuses_weights_without_a_vit(tmp_path):
    torch.save({"model": {"backbone.encoder.stem.weight": torch.zeros(3)}}, tmp_path / "cast.pth")
    with pytest.raises(CheckpointError, match="no ViT"):
        exp.oap_init_checkpoint(str(tmp_path / "cast.pth"), str(tmp_path / "init.pth"), quick_cfg())
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        exp.oap_init_checkpoint(str(tmp_path / "junk.pth"), str(tmp_path / "init.pth"), quick_cfg())


def test_teacher_backbone_is_the_ema_branch(tmp_path):
    torch.manual_seed(0)
    model = build_model(quick_cfg())
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(1.0)
    model.teacher_synced.fill_(1)
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pth")
    out = exp.branch_backbone_checkpoint(str(tmp_path / "ckpt.pth"), str(tmp_path / "teacher.pth"))
    sd = torch.load(out, weights_only=False)["model"]
    teacher = {k[len("teacher."):]: v for k, v in model.state_dict().items() if k.startswith("teacher.backbone.")}
    assert set(sd) == set(teacher)
    for k, v in teacher.items():
        assert torch.equal(sd[k], v)
    model.teacher_synced.fill_(0)
    torch.save({"model": model.state_dict()}, tmp_path / "unsynced.pth")
    with pytest.raises(CheckpointError, match="teacher_synced"):
        exp.branch_backbone_checkpoint(str(tmp_path / "unsynced.pth"), str(tmp_path / "t2.pth"))
    torch.save({"model": {"backbone.vit.cls_token": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="teacher.backbone"):
        exp.branch_backbone_checkpoint(str(tmp_path / "other.pth"), str(tmp_path / "t3.pth"))


def _write_metrics(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write('{"iteration": 99, "segm_agnostic/AP": 1')  # a line cut by a crash


def test_student_curve_reads_the_class_agnostic_evaluations(tmp_path):
    p = tmp_path / "metrics.json"
    _write_metrics(p, [
        {"iteration": 4, "total_loss": 3.0},
        {"iteration": 9, "segm/AP": 9.0, "segm_agnostic/AP": 1.5, "segm_agnostic/AP50": 4.0,
         "segm_agnostic/AR100": 6.0},
        {"iteration": 20, "segm/AP": 9.0, "segm_agnostic/AP": 2.5, "segm_agnostic/AP50": 5.0,
         "segm_agnostic/AR100": 7.0},  # the final evaluation, logged at MAX_ITER
    ])
    curve = exp.student_curve(str(p), max_iter=20)
    assert curve == [(10, {"AP": 1.5, "AP50": 4.0, "AR100": 6.0}), (20, {"AP": 2.5, "AP50": 5.0, "AR100": 7.0})]
    q = tmp_path / "alone.json"
    _write_metrics(q, [{"iteration": 9, "segm/AP": 3.0, "segm/AP50": 4.0, "segm/AR100": 5.0}])
    assert exp.student_curve(str(q), max_iter=20) == [(10, {"AP": 3.0, "AP50": 4.0, "AR100": 5.0})]
    assert exp.student_curve(str(tmp_path / "missing.json"), 20) == []


def test_report_has_one_row_per_method_with_the_numbers(tmp_path):
    args = exp.parse_args(["--vit-weights", "w.pth", "--out", str(tmp_path), "--iters", "20", "--points", "2"])
    os.makedirs(tmp_path / "pseudo")
    os.makedirs(tmp_path / "train")
    for method, it, ap in (("oap", 0, 1.25), ("maskcut", 0, 2.5), ("oap", 10, 1.5), ("oap", 20, 1.75),
                           ("maskcut", 20, 2.75), ("oap_all", 0, 0.5)):
        with open(tmp_path / "pseudo" / f"{method}_it{it}_eval.json", "w") as f:
            json.dump({"max_dets": 100, "metrics": {"segm": {"AP": ap, "AP50": ap * 2, "AR100": ap * 3}}}, f)
    _write_metrics(tmp_path / "train" / "metrics.json", [
        {"iteration": 9, "segm_agnostic/AP": 0.5, "segm_agnostic/AP50": 1.0, "segm_agnostic/AR100": 2.0},
        {"iteration": 20, "segm_agnostic/AP": 3.5, "segm_agnostic/AP50": 7.0, "segm_agnostic/AR100": 9.0}])
    manifest = {"invocations": [{"command": "python projects/OAP/experiments/student_vs_pseudo_masks.py x",
                                 "commit": "abcdef0123", "dirty": False, "wall_s": 60.0, "train_wall_s": 30.0}],
                "eval_images": 50, "train_images": 50, "batch": 4}
    text = exp.write_report(args, manifest)
    lines = {ln.split("|")[1].strip() + ln.split("|")[2].strip(): ln for ln in text.splitlines() if ln.startswith("| (")}
    assert "| 0 | 1.25 | 2.50 | 3.75 |" in lines["(a)teacher's OAP pseudo-masks (instance masks of its 5 layers, "
                                                "repeats once) at the start"]
    assert "| 0 | 0.50 | 1.00 | 1.50 |" in lines["(a')as (a) with every layer's masks, repeats included, at the start"]
    assert "| 20 | - | - | - |" in lines["(a')the same from the final EMA teacher"]
    assert "| 20 | 2.75 | 5.50 | 8.25 |" in lines["(b)MaskCut on the final teacher's features"]
    assert "| 20 | 3.50 | 7.00 | 9.00 |" in lines["(c)trained segmenter (final teacher + mask decoder, Sec. 5.1)"]
    assert "| 10 | 1.50 / 4.50 | 0.50 / 2.00 |" in text
    assert "abcdef0" in text and (tmp_path / "learning_curves.png").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["results"]["student"][-1][0] == 20


def test_a_folder_refuses_other_settings(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"invocations": [], "settings": {"iters": 5}}))
    with pytest.raises(exp.ExperimentError, match="other settings"):
        exp.main(["--vit-weights", "w.pth", "--out", str(tmp_path), "--iters", "20"])


def test_agreement_scores_the_segmenter_against_the_pseudo_masks(tmp_path):
    """(d): predictions equal to the pseudo-masks are perfect against them, whatever COCO says;
    predictions on the wrong place score 0."""
    import numpy as np

    from hiseg_oap.pseudo_labels import masks_to_results, write_results

    masks = np.zeros((2, 32, 40), dtype=bool)
    masks[0, 2:12, 3:15] = True
    masks[1, 16:30, 20:38] = True
    pseudo = masks_to_results(masks, 7, [0.9, 0.8], level="instance", layer=0, threshold=0.8)
    write_results(str(tmp_path / "pseudo.json"), pseudo)
    (tmp_path / "images.json").write_text(json.dumps({"images": [{"id": 7, "height": 32, "width": 40,
                                                                  "file_name": "x.jpg"}], "annotations": []}))
    same = [dict(r, category_id=1) for r in pseudo]
    (tmp_path / "same.json").write_text(json.dumps(same))
    m = exp.agreement_with_pseudo_masks(str(tmp_path / "same.json"), str(tmp_path / "pseudo.json"),
                                        str(tmp_path / "images.json"), str(tmp_path / "agree.json"))
    assert m["AP"] == pytest.approx(100.0) and m["AR100"] == pytest.approx(100.0)
    assert exp._pseudo_eval(str(tmp_path / "agree.json"))["AP"] == pytest.approx(100.0)
    wrong = masks_to_results(np.roll(masks, 16, axis=2), 7, [0.9, 0.8], category_id=1)
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    m = exp.agreement_with_pseudo_masks(str(tmp_path / "wrong.json"), str(tmp_path / "pseudo.json"),
                                        str(tmp_path / "images.json"), str(tmp_path / "agree2.json"))
    assert m["AP"] == pytest.approx(0.0)
    from hiseg_oap.pseudo_labels import encode_mask

    empty = wrong + [dict(same[0], score=0.99, segmentation=encode_mask(np.zeros((32, 40), bool)))]
    (tmp_path / "empty.json").write_text(json.dumps(empty))
    exp.agreement_with_pseudo_masks(str(tmp_path / "empty.json"), str(tmp_path / "pseudo.json"),
                                    str(tmp_path / "images.json"), str(tmp_path / "agree3.json"))
    assert json.loads((tmp_path / "agree3.json").read_text())["empty_masks_left_out"] == 1


def test_a_failed_invocation_is_recorded(tmp_path):
    """A step that fails (here: weights that are not a checkpoint) still leaves the invocation,
    with the error, in manifest.json; the error is one UserError line for the command line."""
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(CheckpointError):
        exp.main(["--vit-weights", str(tmp_path / "junk.pth"), "--out", str(tmp_path / "out"), "--iters", "4",
                  "--points", "2", "--config-file", str(QUICK)])
    inv = json.loads((tmp_path / "out" / "manifest.json").read_text())["invocations"][-1]
    assert inv["failed"].startswith("CheckpointError") and "junk.pth" in inv["failed"] and "wall_s" in inv
