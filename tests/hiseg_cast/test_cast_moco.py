"""MoCo-v3 pre-training of CAST (Table 11): two views with their own superpixels, momentum
encoder with the cosine schedule, InfoNCE; and the main job end to end at a tiny size."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import hiseg.data  # noqa: F401
from hiseg_cast.modeling.meta_arch.moco import moco_momentum
from hiseg.engine import build_hiseg_optimizer
from helpers import REPO, add_all_configs

CFG = "configs/CAST/quick/moco_cast_tiny_skimage_cpu.yaml"
SMALL = ["MODEL.CAST.EMBED_DIM", 48, "MODEL.MOCO.MLP_DIM", 64, "MODEL.MOCO.DIM", 32,
         "INPUT.CROP.SIZE", [64, 64], "MODEL.CAST.SUPERPIXEL.NUM_SUPERPIXELS", 49,
         "MODEL.CAST.NUM_SEGMENTS", [16, 8, 4, 2]]


def make_cfg(*opts):
    cfg = get_cfg()
    add_all_configs(cfg)
    cfg.merge_from_file(CFG)
    cfg.merge_from_list(SMALL + list(opts))
    return cfg


def test_momentum_schedule():
    assert moco_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert moco_momentum(0.99, 50, 100) == pytest.approx(0.995)
    assert moco_momentum(0.99, 100, 100) == pytest.approx(1.0)


def test_two_view_mapper_gives_views_with_matching_superpixels():
    from hiseg_cast.data.dataset_mappers import MoCoTwoViewMapper

    cfg = make_cfg()
    d = MoCoTwoViewMapper(cfg, True)(DatasetCatalog.get("skimage_natural_images")[0])
    for k in (1, 2):
        assert d[f"view{k}"].shape == (3, 64, 64) and d[f"view{k}"].dtype == torch.uint8
        sp = d[f"superpixels{k}"]
        assert sp.shape == (64, 64) and int(sp.max()) + 1 == len(torch.unique(sp))
    assert not torch.equal(d["view1"], d["view2"])


def test_two_view_mapper_at_evaluation_gives_the_image_the_model_infers_on():
    """--eval-only / TEST.EVAL_PERIOD with the MoCo config: the test loader's mapper gives one
    resized ``image`` with its superpixels, and CASTMoCo's inference reads it (was KeyError 'image')."""
    from hiseg_cast.data.dataset_mappers import MoCoTwoViewMapper

    cfg = make_cfg("INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 128)
    record = DatasetCatalog.get("skimage_natural_images")[0]
    d = MoCoTwoViewMapper(cfg, False)(record)
    assert "view1" not in d and d["image"].dtype == torch.uint8 and min(d["image"].shape[1:]) == 64
    sp = d["superpixels"]
    assert sp.shape == d["image"].shape[1:] and int(sp.max()) + 1 == len(torch.unique(sp))
    model = build_model(cfg).eval()
    out = model([d])[0]
    assert out["hierarchy"].shape[-2:] == (record["height"], record["width"])


def test_moco_hierarchy_uses_the_test_segment_counts():
    """At test time CASTMoCo's hierarchy has MODEL.CAST.TEST_NUM_SEGMENTS segments per level when
    set (Table 6d), as every CAST model's backbone in eval mode; the same weights give the
    training counts without it."""
    from hiseg_cast.superpixels import grid_superpixels

    torch.manual_seed(0)
    model = build_model(make_cfg("MODEL.CAST.TEST_NUM_SEGMENTS", [12, 6, 3, 1])).eval()
    plain = build_model(make_cfg()).eval()
    plain.load_state_dict(model.state_dict())
    img = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    d = {"image": img, "superpixels": torch.from_numpy(grid_superpixels(64, 64, 49))}
    assert model([d])[0]["num_segments"].tolist() == [49, 12, 6, 3, 1]
    assert plain([d])[0]["num_segments"].tolist() == [49, 16, 8, 4, 2]


def test_moco_trains_losses_finite_and_changing_and_teacher_moves():
    from hiseg_cast.data.dataset_mappers import MoCoTwoViewMapper

    torch.manual_seed(0)
    np.random.seed(0)
    cfg = make_cfg("SOLVER.BASE_LR", 1e-3, "SOLVER.MAX_ITER", 10)
    model = build_model(cfg)
    opt = build_hiseg_optimizer(cfg, model)
    mapper = MoCoTwoViewMapper(cfg, True)
    batch = [mapper(d) for d in DatasetCatalog.get("skimage_natural_images")[:4]]
    before = model.momentum_backbone.encoder.cls_token.clone()
    losses = []
    with EventStorage() as storage:
        for it in range(4):
            storage.iter = it
            loss = model(batch)["loss_moco"]
            assert torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
    assert len(set(round(l, 6) for l in losses)) > 1
    assert not torch.equal(before, model.momentum_backbone.encoder.cls_token)
    assert all(not p.requires_grad for p in model.momentum_backbone.parameters())
    # the stem's first conv is frozen (MoCo-v3 --stop-grad-conv1)
    assert model.backbone.encoder.stem.proj[0].weight.grad is None
    model.eval()
    img = batch[0]["view1"]
    out = model.inference([{"image": img, "height": 80, "width": 96}])[0]
    assert out["hierarchy"].shape == (5, 80, 96)


def test_momentum_encoder_starts_from_weights_loaded_after_construction():
    """Converted official weights reach only ``backbone.*``: the first step copies them into the
    momentum encoder (else EMA would average them into its random initialisation); a model
    whose momentum copy is already synced (a resumed run) keeps it."""
    from hiseg_cast.data.dataset_mappers import MoCoTwoViewMapper

    torch.manual_seed(0)
    cfg = make_cfg("SOLVER.MAX_ITER", 10)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(torch.randn_like(p))  # "loaded" weights, unlike the momentum copy's
    loaded = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    batch = [MoCoTwoViewMapper(cfg, True)(d) for d in DatasetCatalog.get("skimage_natural_images")[:2]]
    with EventStorage() as storage:
        storage.iter = 0
        model(batch)  # no optimizer step: the backbone stays as loaded
        mom = model.momentum_backbone.state_dict()
        for k, v in loaded.items():
            if v.is_floating_point() and "running" not in k:
                assert torch.allclose(mom[k], v, atol=1e-6), k
        assert int(model.momentum_synced) == 1
        with torch.no_grad():
            model.momentum_backbone.encoder.cls_token.add_(5.0)  # a resumed, different momentum copy
        kept = model.momentum_backbone.encoder.cls_token.clone()
        storage.iter = 1
        model(batch)
    m = moco_momentum(cfg.MODEL.MOCO.MOMENTUM, 1, 10)
    expected = kept * m + model.backbone.encoder.cls_token.detach() * (1 - m)
    assert torch.allclose(model.momentum_backbone.encoder.cls_token, expected, atol=1e-6)


def test_main_job_runs(shared_data, tmp_path):
    """The README's main job, on its quick settings: CAST and the ViT trained side by side for the
    same (tiny) budget by the CAST vs ViT experiment, pictures of CAST's hierarchy, the BSDS500
    table with the three rows."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run(
        [sys.executable, "tools/main_job.py", "--quick", "--pictures", "2", "--max-size", "160",
         "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "[cast s0] done:" in out.stdout and "[vit s0] done:" in out.stdout
    assert len(list((tmp_path / "pictures").glob("*.png"))) == 2
    table = (tmp_path / "bsds500_val.md").read_text()
    for row in ("| CAST |", "| ViT + K-means (Appx. D.4) |", "| SEEDS superpixels alone |"):
        assert row in table and row in out.stdout, row
    runs = tmp_path / "cast_vs_vit" / "runs"
    assert (runs / "cast_s0" / "point_1.pth").exists() and (runs / "vit_s0" / "point_1.pth").exists()
    assert "python tools/main_job.py --quick" in (tmp_path / "cast_vs_vit" / "results.md").read_text()


def test_slic_torch_superpixels_come_from_the_model_not_the_mappers():
    """MODEL.CAST.SUPERPIXEL.METHOD slic_torch: mappers leave S_0 out and CASTMoCo computes it
    for the whole batch on its device, the same maps the mapper would have made."""
    from hiseg_cast.data.dataset_mappers import CASTDatasetMapper
    from hiseg_cast.data.dataset_mappers import MoCoTwoViewMapper
    from hiseg_cast.superpixels import SuperpixelConfig, compute_superpixels
    from hiseg_cast.superpixels.torch_slic import slic_torch

    cfg = make_cfg("MODEL.CAST.SUPERPIXEL.METHOD", "slic_torch")
    d = MoCoTwoViewMapper(cfg, True)(DatasetCatalog.get("skimage_natural_images")[0])
    assert "view1" in d and not any(k.startswith("superpixels") for k in d)
    dense = CASTDatasetMapper(cfg, False)(DatasetCatalog.get("skimage_natural_images")[0])
    assert "image" in dense and "superpixels" not in dense

    torch.manual_seed(0)
    model = build_model(cfg)
    batch = [MoCoTwoViewMapper(cfg, True)(x) for x in DatasetCatalog.get("skimage_natural_images")[:2]]
    seen = []
    original = model.backbone.encoder.forward

    def spy(images, superpixels, *args, **kwargs):
        seen.append(superpixels)
        return original(images, superpixels, *args, **kwargs)

    model.backbone.encoder.forward = spy
    with EventStorage():
        loss = model(batch)["loss_moco"]
    assert torch.isfinite(loss)
    view1 = torch.stack([x["view1"] for x in batch])
    expected = slic_torch(view1, SuperpixelConfig.from_cfg(cfg.MODEL.CAST.SUPERPIXEL).num_superpixels)
    assert torch.equal(seen[0].cpu(), expected)
    cpu = compute_superpixels(batch[0]["view1"].permute(1, 2, 0).numpy(), SuperpixelConfig.from_cfg(cfg.MODEL.CAST.SUPERPIXEL))
    assert np.array_equal(cpu, expected[0].numpy())
