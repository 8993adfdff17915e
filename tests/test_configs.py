"""Every yaml under configs/ loads (with detectron2 v0.6 or main) and builds a model."""

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from helpers import REPO, add_all_configs

CONFIGS = sorted(str(p) for p in (REPO / "configs").rglob("*.yaml"))
TINY = ["MODEL.DEVICE", "cpu", "MODEL.CAST.EMBED_DIM", 48, "MODEL.CAST.NUM_HEADS", 4,
        "MODEL.CAST.DEPTHS", [1, 1, 1, 1], "MODEL.VIT.EMBED_DIM", 48, "MODEL.VIT.NUM_HEADS", 4,
        "MODEL.VIT.DEPTH", 4]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.split("configs/")[-1])
def test_config_loads_and_builds(path):
    cfg = get_cfg()
    add_all_configs(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(TINY)
    if cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" and cfg.MODEL.BACKBONE.NAME == "build_resnet_backbone":
        pytest.skip("not ours")
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0
    if cfg.MODEL.BACKBONE.NAME == "build_cast_backbone":
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            out = model.backbone.eval()(x)
        assert out["hierarchy"].shape[-2:] == (64, 64)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.split("configs/")[-1])
def test_config_evaluators_exist(path):
    """Every evaluator type a config asks for (globally or per dataset) is registered, and every
    "<dataset>:<type>" entry names one of its test datasets."""
    import hiseg.data  # noqa: F401  (registers the datasets)
    from hiseg.evaluation.registry import EVALUATOR_FACTORIES, evaluator_types

    cfg = get_cfg()
    add_all_configs(cfg)
    cfg.merge_from_file(path)
    for name in cfg.DATASETS.TEST:
        for t in evaluator_types(cfg, name):
            if t is None:
                continue  # chosen by detectron2's own metadata (not ours)
            assert t in EVALUATOR_FACTORIES, (name, t)
    named = {e.rpartition(":")[0] for e in cfg.TEST.EVALUATORS if ":" in e}
    assert named <= set(cfg.DATASETS.TEST), named - set(cfg.DATASETS.TEST)
