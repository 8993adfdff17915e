"""The CAST vs ViT experiment (projects/CAST/experiments/cast_vs_vit.py) end to end at --quick size:
two seeds, a pair-mode start paused after one step, a sequential resume to the end of the
budget, evaluation on BSDS500 val, table and plots; then a re-run that trains nothing."""
import csv
import json
import math
import os

import pytest

import hiseg.data  # noqa: F401
from helpers import experiment

BUDGET_MIN = 0.1  # 6 s of training per run


def _steps(run_dir):
    with open(os.path.join(run_dir, "steps.csv")) as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _run(run_dir):
    with open(os.path.join(run_dir, "run.json")) as f:
        return json.load(f)


def test_natural_images_unite_bsds_train_coco_and_skimage(shared_data):
    from detectron2.data import DatasetCatalog

    from hiseg.data.datasets.natural_images import natural_image_sources

    dicts = DatasetCatalog.get("natural_images_unlabelled")
    by_source = {}
    for d in dicts:
        by_source.setdefault(d["source"], []).append(d)
    assert {k: len(v) for k, v in by_source.items()} == {"bsds500": 200, "coco": 100, "skimage": 16}
    assert len({d["image_id"] for d in dicts}) == len(dicts)
    assert all("/train/" in d["file_name"] for d in by_source["bsds500"])  # never val / test
    assert all(set(d) == {"file_name", "height", "width", "image_id", "source"} for d in dicts)  # no labels
    assert natural_image_sources()["coco"] == ("coco_images_unlabelled_shared", 100)


def test_schedule_and_mapper_fairness():
    from hiseg.engine.budget import BudgetSpec, moco_v3_lr_factor

    protocol = experiment("CAST", "cast_vs_vit_protocol")
    MODELS, build_cfg = protocol.MODELS, protocol.build_cfg
    from hiseg_cast.data.dataset_mappers import MoCoTwoViewMapper
    from hiseg_cast.superpixels import mapper_computes_superpixels
    from detectron2.data import DatasetCatalog

    assert moco_v3_lr_factor(0.0, 0.1) == 0.0
    assert moco_v3_lr_factor(0.05, 0.1) == pytest.approx(0.5)
    assert moco_v3_lr_factor(0.1, 0.1) == pytest.approx(1.0)
    assert moco_v3_lr_factor(0.55, 0.1) == pytest.approx(0.5)
    assert moco_v3_lr_factor(0.999999, 0.1) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        BudgetSpec(budget_s=60, fractions=(0.5, 0.9))  # must end with 1
    cast_cfg, vit_cfg = build_cfg(MODELS["cast"][1]), build_cfg(MODELS["vit"][1])
    # the same recipe: everything but the backbone keys is equal
    for key in ("SOLVER", "INPUT", "DATALOADER", "DATASETS"):
        assert cast_cfg[key] == vit_cfg[key], key
    assert cast_cfg.MODEL.MOCO == vit_cfg.MODEL.MOCO
    assert vit_cfg.MODEL.VIT.EMBED_DIM == cast_cfg.MODEL.CAST.EMBED_DIM
    assert vit_cfg.MODEL.VIT.DEPTH == sum(cast_cfg.MODEL.CAST.DEPTHS)
    crop = cast_cfg.INPUT.CROP.SIZE[0]
    assert (crop // vit_cfg.MODEL.VIT.PATCH_SIZE) ** 2 == cast_cfg.MODEL.CAST.SUPERPIXEL.NUM_SUPERPIXELS
    # the ViT and CAST's patch-token ablation get no SEEDS from the mapper; CAST does
    assert mapper_computes_superpixels(cast_cfg) and not mapper_computes_superpixels(vit_cfg)
    patch_cfg = build_cfg(MODELS["cast"][1], ["MODEL.CAST.TOKENS", "patch"])
    assert not mapper_computes_superpixels(patch_cfg)
    # MoCo-v3's stop-grad on the first layer for both: CAST's stem conv1 (its builder), the
    # ViT's patch projection (the experiment's budget trainer's build_model)
    BudgetTrainer = experiment("CAST", "cast_vs_vit_train").MoCoBudgetTrainer

    tiny = ["MODEL.CAST.EMBED_DIM", 48, "MODEL.VIT.EMBED_DIM", 48, "MODEL.CAST.DEPTHS", [1, 1, 1, 1],
            "MODEL.VIT.DEPTH", 4, "MODEL.MOCO.MLP_DIM", 64]
    vit = BudgetTrainer.build_model(build_cfg(MODELS["vit"][1], tiny))
    assert not any(p.requires_grad for p in vit.backbone.vit.patch_embed.parameters())
    assert any(p.requires_grad for p in vit.backbone.vit.blocks.parameters())
    cast = BudgetTrainer.build_model(build_cfg(MODELS["cast"][1], tiny))
    assert not cast.backbone.encoder.stem.proj[0].weight.requires_grad
    small = ["INPUT.CROP.SIZE", [64, 64], "MODEL.CAST.SUPERPIXEL.NUM_SUPERPIXELS", 64]
    d = DatasetCatalog.get("skimage_natural_images")[0]
    assert "superpixels1" in MoCoTwoViewMapper(build_cfg(MODELS["cast"][1], small), True)(d)
    vit_d = MoCoTwoViewMapper(build_cfg(MODELS["vit"][1], small), True)(d)
    assert "view1" in vit_d and not any(k.startswith("superpixels") for k in vit_d)


def test_quick_pipeline_pauses_resumes_evaluates_and_skips_finished_runs(shared_data, tmp_path):
    cast_vs_vit = experiment("CAST", "cast_vs_vit")
    main, run_dir_for = cast_vs_vit.main, cast_vs_vit.run_dir_for

    out = str(tmp_path / "exp")
    # two points keep the test short (the experiment's default has five)
    common = ["--quick", "--out", out, "--points", "0.5,1", "--budget-minutes", str(BUDGET_MIN)]
    budget_s = 60 * BUDGET_MIN

    # 1. pair mode (the two models of seed 0 side by side, one process each), paused after 1 step
    assert main(common + ["--seeds", "0", "--train-only", "--pause-after-steps", "1"]) == ""
    first = {}
    for model, other in (("cast", "vit s0"), ("vit", "cast s0")):
        rd = run_dir_for(out, model, 0)
        info = _run(rd)
        assert info["status"] == "paused" and info["iterations"] == 1, info
        assert info["sessions"][0]["concurrent_with"] == [other] and info["sessions"][0]["threads"] == 1
        assert [r["iter"] for r in _steps(rd)] == [1]
        assert os.path.isfile(os.path.join(rd, "last.pth"))
        first[model] = info["elapsed_s"]
        assert first[model] < budget_s

    # 2. both seeds, sequentially: seed 0 resumes, seed 1 starts; then evaluation and the report
    args2 = common + ["--seeds", "0,1", "--mode", "sequential", "--eval-jobs", "1", "--eval-images", "1"]
    text = main(args2)
    for model in ("cast", "vit"):
        for seed in (0, 1):
            rd = run_dir_for(out, model, seed)
            info = _run(rd)
            steps = _steps(rd)
            assert info["status"] == "done" and info["elapsed_s"] >= budget_s
            assert [int(r["iter"]) for r in steps] == list(range(1, info["iterations"] + 1))
            assert all(b["elapsed_s"] > a["elapsed_s"] for a, b in zip(steps, steps[1:]))
            assert steps[0]["lr"] == 0.0 and max(r["lr"] for r in steps) <= 5e-4 + 1e-12
            pts = info["points"]
            assert [p["k"] for p in pts] == [1, 2] and [p["fraction"] for p in pts] == [0.5, 1.0]
            assert all(p["elapsed_s"] >= p["fraction"] * budget_s for p in pts)
            assert pts[-1]["iteration"] == info["iterations"]
            assert all(os.path.isfile(os.path.join(rd, p["file"])) for p in pts)
            if seed == 0:  # resumed where the pause left it, with the time already spent
                s1, s2 = info["sessions"]
                assert s2["start_iter"] == 1 == s1["end_iter"]
                assert s2["start_elapsed_s"] == pytest.approx(first[model], abs=1e-3)
                assert info["iterations"] > 1
            else:
                assert len(info["sessions"]) == 1 and info["sessions"][0]["start_iter"] == 0
    evals = sorted(os.listdir(os.path.join(out, "eval")))
    assert len(evals) == 1 + 2 * 2 * 2 and "seeds.json" in evals
    for row in ("| CAST |", "| ViT + K-means (Appx. D.4) |", "| SEEDS superpixels alone |", "entropy 1"):
        assert row in text
    assert "--pause-after-steps 1" in text and "commit `" in text  # every invocation is cited
    for png in ("learning_curves.png", "loss_curves.png", "pooling_entropy.png"):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)["results"]
    p = res["models"]["cast"]["0"]["points"][-1]
    assert set(p["metrics"]) >= {"ODS", "OIS", "AP", "Covering_ODS", "PRI_ODS", "VI_ODS", "RegionF@8"}
    ent = p["pooling"]["entropy_norm"]
    assert len(ent) == 4 and all(0.0 <= e <= 1.0 + 1e-6 for e in ent if not math.isnan(e))

    # 3. the same command again: nothing is trained or scored again
    before = {}
    for model in ("cast", "vit"):
        for seed in (0, 1):
            rd = run_dir_for(out, model, seed)
            before[rd] = (open(os.path.join(rd, "steps.csv")).read(), _run(rd))
    mtimes = {e: os.path.getmtime(os.path.join(out, "eval", e)) for e in evals}
    main(args2)
    for rd, (csv_text, info) in before.items():
        assert open(os.path.join(rd, "steps.csv")).read() == csv_text
        assert _run(rd) == info
    assert {e: os.path.getmtime(os.path.join(out, "eval", e)) for e in evals} == mtimes
    with open(os.path.join(out, "manifest.json")) as f:
        assert len(json.load(f)["invocations"]) == 3

    # 4. another budget in the same folder is refused, not mixed in
    with pytest.raises(ValueError, match="another spec"):
        main(common[:-1] + ["0.2", "--seeds", "0", "--mode", "sequential", "--train-only"])


def test_library_parts_the_experiments_use(tmp_path):
    """What the experiment scripts take from the library: table cells, the manifest of a resumable
    folder, the commit, side-by-side timing."""
    from hiseg.benchmark import time_interleaved
    from hiseg.provenance import Manifest, git_state
    from hiseg.utils.markdown import duration, mean_sd_cell

    assert mean_sd_cell([1.0, 3.0]) == "2.000 ± 1.414"
    assert mean_sd_cell([2.0, None, float("nan")], 1) == "2.0"
    assert mean_sd_cell([]) == "–"
    assert (duration(None), duration(42.4), duration(150.0)) == ("–", "42 s", "2.5 min")

    state = git_state(count_changes=True)
    assert set(state) == {"commit", "dirty", "changed_files"} and state["dirty"] == (state["changed_files"] > 0)
    assert git_state(str(tmp_path)) == {"commit": "unknown", "dirty": False}  # no checkout there

    path = tmp_path / "out" / "manifest.json"
    first = Manifest(str(path))
    inv = first.start("python x.py --a")
    inv["train_wall_s"] = 1.0
    first.finish(inv)
    again = Manifest(str(path))  # a re-run reads the record and adds its own
    again.data["settings"] = {"iters": 3}
    again.finish(again.start("python x.py --b"))
    data = json.loads(path.read_text())
    assert [i["command"] for i in data["invocations"]] == ["python x.py --a", "python x.py --b"]
    assert list(data["invocations"][0]) == ["command", "commit", "dirty", "started", "train_wall_s", "wall_s",
                                            "finished"]
    assert data["settings"] == {"iters": 3}

    calls = []
    medians = time_interleaved([lambda: calls.append("a"), lambda: calls.append("b")], iters=3, warmup=1, device="cpu")
    assert calls == ["a", "b"] * 4 and len(medians) == 2 and min(medians) >= 0
